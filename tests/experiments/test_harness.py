"""The Trainer harness's pieces: deterministic splits, encoding once per sweep, the recording callbacks."""

from __future__ import annotations

import math
import types

import pytest

from optlora_experiments import harness
from optlora_experiments.callbacks import StepRecorder, TelemetryCallback
from optlora_experiments.data import load_task
from optlora_experiments.finetune import default_config
from optlora_experiments.models import tiny_tokenizer


def test_split_is_deterministic_disjoint_and_in_file_order():
    tr, ho = harness.split_train(100, 0.1, None, None, seed=0)
    assert len(ho) == 10 and len(tr) == 90 and not set(tr) & set(ho) and sorted(tr + ho) == list(range(100))
    assert (tr, ho) == harness.split_train(100, 0.1, None, None, seed=0) and ho == sorted(ho)
    assert harness.split_train(100, 0.1, None, None, seed=1)[1] != ho
    assert len(harness.split_train(100, 0.5, 7, None, 0)[1]) == 7  # --holdout-max
    tr20, ho2 = harness.split_train(100, 0.1, None, 20, 0)
    assert ho2 == ho and set(tr20) <= set(tr) and len(tr20) == 20  # the subset never touches the held-out part
    assert harness.subset(10, None, 0) == list(range(10)) and len(harness.subset(10, 3, 0)) == 3
    with pytest.raises(ValueError):
        harness.split_train(10, 1.0, None, None, 0)


def test_prepare_encodes_once_with_the_chosen_sizes(data_root):
    task = load_task("mrpc", data_root)
    cfg = {**default_config("classification", "mrpc"), "holdout_frac": 0.25, "eval_samples": 5, "train_samples": 10}
    prep = harness.prepare(task, tiny_tokenizer(), cfg)
    assert len(prep.train) == 10 and len(prep.holdout.rows) == 12 and prep.evals["dev"].total == 16
    assert len(prep.evals["dev"].rows) == len(prep.evals["dev"].dataset) == 5
    assert prep.info == {"train_examples": 10, "train_dropped_too_long": 0, "train_total": 48, "holdout_examples": 12}


def _state(step, max_steps=4):
    return types.SimpleNamespace(global_step=step, max_steps=max_steps)


def test_step_recorder_and_telemetry_callbacks(tmp_path):
    rec = StepRecorder("cpu")
    control = types.SimpleNamespace(should_training_stop=False)
    args = types.SimpleNamespace(output_dir=str(tmp_path), should_save=True)
    rec.on_train_begin(args, _state(0), control)
    calls = []
    method = types.SimpleNamespace(method_steps=0, stats=lambda: {"layers": 4, "last_skipped_layers": ["a"]})
    tracker = types.SimpleNamespace(summary=lambda: calls.append(1) or {"rank_mean": 9.0})
    tele = TelemetryCallback(rec, method, tracker, every=2)
    for step in (1, 2, 3):
        rec.on_step_begin(None, _state(step - 1), control)
        sum(range(20000))  # some CPU work
        rec.on_step_end(None, _state(step), control)
        method.method_steps = step - 1  # the method acts from step 2 on
        tele.on_step_end(None, _state(step), control)
        rec.on_log(None, _state(step), control, logs={"loss": 1.0 / step, "learning_rate": 0.1, "grad_norm": 2.0})
    s = rec.steps
    assert [x["step"] for x in s] == [1, 2, 3] and [x["loss"] for x in s] == [1.0, 0.5, pytest.approx(1 / 3)]
    assert all(x["step_ms"] > 0 and x["cpu_ms"] >= 0 and x["lr"] == 0.1 for x in s)
    assert "skipped_fraction" not in s[0] and s[1]["skipped_fraction"] == 0.25 and calls == [1]
    assert s[1]["rank_mean"] == 9.0 and "rank_mean" not in s[2]
    summary = rec.summary()
    assert summary["ms_per_step"] == pytest.approx((s[1]["step_ms"] + s[2]["step_ms"]) / 2)  # step 1 excluded
    assert summary["peak_memory_mb"] >= summary["peak_memory_mb"] - summary["memory_delta_mb"] > 0
    rec.on_save(args, _state(2), control)  # a checkpoint after step 2 ...
    again = StepRecorder("cpu")
    again.on_train_begin(args, _state(2), control)  # ... that a resumed run starts from
    assert again.steps == [x for x in s if x["step"] <= 2]
    rec.on_log(None, _state(3), control, logs={"loss": math.nan})
    assert control.should_training_stop and rec.summary()["diverged_at_step"] == 3
