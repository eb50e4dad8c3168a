"""Matrix factorisation (RefLoRA Fig. 2) through the library, and the ScaledGD baseline."""

from __future__ import annotations

import csv
import json
import math

import matplotlib.image
import pytest

from optlora import cli
from optlora_experiments import mf
from optlora_experiments.results import validate_mf_results

TINY = dict(m=20, n=16, rank=2, steps=60)


def test_mf_cli_end_to_end_writes_the_schema(tmp_path, capsys):
    out = tmp_path / "mf"
    argv = ["mf", "--out", str(out), "--m", "12", "--n", "10", "--rank", "2", "--steps", "25", "--lrs", "0.01", "0.02"]
    assert cli.main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "steps to 1e-06x L0" in printed and "reflora_s" in printed
    for path, lr in (
        (out / "results.json", 0.01),
        (out / "lr_0.01/results.json", 0.01),
        (out / "lr_0.02/results.json", 0.02),
    ):
        data = json.loads(path.read_text())
        assert set(data) == {"methods", "config"}
        validate_mf_results(data)
        assert list(data["methods"]) == list(mf.METHODS)
        for name, series in data["methods"].items():
            assert set(series) == set(mf.SERIES), name
            for key, values in series.items():
                assert len(values) == 25 and all(isinstance(v, float) for v in values), (name, key)
        cfg = data["config"]
        assert cfg["lr"] == lr and cfg["steps"] == 25 and cfg["m"] == 12 and cfg["rank"] == 2
        assert {"python", "torch", "peft", "transformers", "platform", "device"} <= set(cfg["environment"])
        assert cfg["method_configs"]["scalora"]["kappa"] == pytest.approx(1 / lr)
        assert cfg["initial_loss"] == data["methods"]["lora"]["loss"][0]
    rows = list(csv.DictReader((out / "summary.csv").open()))
    assert [(float(r["lr"]), r["method"]) for r in rows] == [(lr, m) for lr in (0.01, 0.02) for m in mf.METHODS]
    for png in ("loss.png", "balance.png", "lr_0.01/loss.png", "lr_0.02/balance.png"):
        raw = (out / png).read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        img = matplotlib.image.imread(out / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.std() > 0


def test_identical_start_and_shared_warmup_step():
    cfg = mf.MFConfig(**{**TINY, "steps": 3})
    problem = mf.make_problem(cfg)
    runs = {name: mf.run_method(name, 0.01, cfg, problem)[0] for name in mf.METHODS}
    # step 0 evaluates the same init; the shared plain warm-up step makes step 1 identical too
    for key in ("loss", "norm_A", "norm_B", "grad_norm_A", "grad_norm_B"):
        for t in (0, 1):
            assert len({runs[name][key][t] for name in mf.METHODS}) == 1, (key, t)
    assert runs["lora"]["norm_B"][0] == 0.0 and runs["lora"]["norm_B"][1] > 0
    assert len({runs[name]["loss"][2] for name in mf.METHODS}) == len(mf.METHODS)  # then they differ


def test_reflora_beats_lora_and_scaledgd_on_tiny_mf():
    # at this size lr 0.03 is stable for LoRA, but slow (loss ~1 after 60 steps from ~100)
    cfg = mf.MFConfig(**TINY, lrs=(0.03,), methods=("lora", "scaledgd", "reflora", "reflora_s", "scalora"))
    result = mf.run_mf(cfg)[0.03]["methods"]
    final = {name: s["loss"][-1] for name, s in result.items()}
    assert all(math.isfinite(v) for v in final.values()), final
    assert final["lora"] < 0.1 * result["lora"]["loss"][0], final  # LoRA does make progress
    assert final["reflora"] < 1e-6 * final["lora"], final
    assert final["reflora"] < 1e-6 * final["scaledgd"], final
    assert final["reflora_s"] < 1e-6 * final["lora"], final
    assert final["scalora"] < 1e-6 * final["lora"], final
    assert mf.steps_to_target(result["reflora"]["loss"], 1e-6) is not None
    assert mf.steps_to_target(result["lora"]["loss"], 1e-6) is None


def test_diverged_run_is_recorded_and_stopped():
    cfg = mf.MFConfig(**{**TINY, "steps": 40}, lrs=(0.5,), methods=("lora", "reflora"))
    result = mf.run_mf(cfg)[0.5]
    lora = result["methods"]["lora"]
    assert all(len(v) == 40 for v in lora.values())
    bad = next(t for t, v in enumerate(lora["loss"]) if not math.isfinite(v))
    assert bad < 39 and all(math.isnan(v) for v in lora["loss"][bad + 1 :])
    row = next(r for r in mf.summary_rows({0.5: result}, 1e-6) if r["method"] == "lora")
    assert row["diverged"] and row["steps_to_target"] is None
    validate_mf_results(json.loads(json.dumps(result)))  # NaN/Infinity survive a JSON round trip


def test_steps_to_target():
    losses = [10.0, 1.0, 1e-4, 1e-7]
    assert mf.steps_to_target(losses, 1e-9) is None
    assert mf.steps_to_target(losses, 1e-5) == 2  # first loss <= 1e-4 = 1e-5 x 10
    assert mf.steps_to_target(losses, 1e-6) == 3
    assert mf.steps_to_target([10.0, math.inf, math.nan], 1e-3) is None


@pytest.mark.parametrize(
    "bad", [dict(rank=30), dict(methods=("lora", "nope")), dict(lrs=(0.0,)), dict(warmup_steps=0), dict(steps=0)]
)
def test_config_validation(bad):
    with pytest.raises(ValueError):
        mf.MFConfig(**{**TINY, **bad})
