"""``optlora finetune`` end to end on tiny models and fixture data: lr grid on held-out train, seeds, files, CLI."""

from __future__ import annotations

import csv
import json
import math
import socket
import subprocess
import sys

import pytest
import torch

from optlora import cli
from optlora_experiments import finetune, results
from optlora_experiments.callbacks import StepRecorder

TINY = dict(model="tiny", steps=4, batch_size=8, progress=False, method_warmup=1, eval_batch_size=8, plots=False)


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_glue_lr_grid_on_held_out_train_then_seeds(data_root, tmp_path):
    out = tmp_path / "out"
    recs = finetune.run_finetune(
        "sst2", ["lora", "scalora"], out_dir=out, seeds=[0, 1], lrs=[1e-3, 3e-2], data_dir=data_root,
        telemetry_every=2, holdout_frac=0.25, **{**TINY, "plots": True},
    )  # fmt: skip
    assert len(recs) == 6 and len(list(out.glob("sst2_*.json"))) == 6  # 2 lrs x seed 0 + seed 1 at the chosen lr
    for method in ("lora", "scalora"):
        grid = [r for r in recs if r["method"] == method and r["seed"] == 0]
        assert all("selection_score" in r["final"] and r["final"]["holdout_examples"] == 12 for r in grid)
        best = max(grid, key=lambda r: r["final"]["selection_score"])["config"]["lr"]  # held out, not dev
        (other,) = [r for r in recs if r["method"] == method and r["seed"] == 1]
        assert other["config"]["lr"] == best and "selection_score" not in other["final"]
    for rec in recs:
        disk = results.read_json(out / f"sst2_{rec['method']}_lr{rec['config']['lr']:g}_seed{rec['seed']}.json")
        results.validate_run(disk)
        assert [s["step"] for s in disk["steps"]] == [1, 2, 3, 4]
        assert all({"loss", "lr", "step_ms", "cpu_ms", "wall_time"} <= set(s) for s in disk["steps"])
        assert [s["step"] for s in disk["steps"] if "rank_mean" in s] == [2, 4]
        fin = disk["final"]
        assert fin["score"] == fin["accuracy"] == fin["dev_accuracy"] and 0 <= fin["score"] <= 1
        assert fin["dev_examples"] == 16 and fin["majority_baseline"] == fin["dev_majority"]
        assert fin["ms_per_step"] > 0 and fin["cpu_ms_per_step"] > 0 and fin["peak_memory_mb"] > 0
        assert disk["config"]["data"]["train_examples"] == 36 and disk["config"]["selected_lr"] in (1e-3, 3e-2)
    scal = [r for r in recs if r["method"] == "scalora"]
    assert all("column_fraction" in s and "skipped_fraction" in s for r in scal for s in r["steps"][1:])
    assert len(_csv(out / "summary.csv")) == 6
    agg = {r["method"]: r for r in _csv(out / "aggregate.csv")}
    assert agg["lora"]["seeds"] == agg["scalora"]["seeds"] == "2"
    assert agg["scalora"]["vs_lora_pairs"] == "2" and agg["scalora"]["reached_lora_loss"].endswith("/2")
    assert float(agg["scalora"]["update_rank_mean"]) > 0 and 0 <= float(agg["scalora"]["column_fraction_mean"]) <= 1
    assert agg["lora"]["column_fraction_mean"] == ""  # LoRA has no column branch
    assert (out / "plots" / "loss_vs_step.png").is_file() and (out / "plots" / "scalora.png").is_file()
    assert not (out / "checkpoints").exists()


def test_methods_share_init_data_order_and_schedule_until_the_method_starts(data_root, tmp_path):
    recs = finetune.run_finetune(
        "sst2", ["lora", "reflora", "scalora"], out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0,
        telemetry_every=0, **{**TINY, "method_warmup": 3},
    )  # fmt: skip
    losses = {r["method"]: [s["loss"] for s in r["steps"]] for r in recs}
    assert losses["lora"][:4] == losses["reflora"][:4] == losses["scalora"][:4]  # plain steps 1-3, bit for bit
    lrs = [s["lr"] for s in recs[0]["steps"]]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3) and lrs[1] > lrs[2] > lrs[3] > 0  # 6% warm-up, linear decay


def test_regression_and_every_baseline_through_the_trainer(data_root, tmp_path):
    from optlora_experiments.baselines import galore_unavailable

    methods = ["lora_r32", "loraplus", "dora", "pissa", "full"] + ([] if galore_unavailable() else ["galore"])
    recs = finetune.run_finetune("stsb", methods, out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0,
                                 full_lrs=[1e-4], telemetry_every=0, **{**TINY, "steps": 2})  # fmt: skip
    by = {r["method"]: r for r in recs}
    assert set(by) == set(methods)
    for r in recs:
        fin = r["final"]
        assert r["config"]["kind"] == "regression" and fin["score"] == fin["pearson"]
        assert "spearman" in fin and all(s["loss"] == s["loss"] for s in r["steps"])  # finite
    assert by["lora_r32"]["config"]["method_info"]["rank"] == 32
    assert by["lora_r32"]["final"]["trainable_params"] > 3 * by["dora"]["final"]["trainable_params"] // 2
    assert by["full"]["final"]["trainable_params"] > by["lora_r32"]["final"]["trainable_params"]
    if "galore" in by:
        assert by["galore"]["config"]["method_info"]["galore_params"] > 0


def test_generation_tasks_score_answers(data_root, tmp_path):
    cfg = {**TINY, "steps": 2, "batch_size": 4, "max_len": 512, "gen_tokens": 4, "eval_samples": 2, "holdout_frac": 0.0}
    recs = finetune.run_finetune("commonsense", ["reflora"], out_dir=tmp_path / "c", data_dir=data_root,
                                 train_sets=["boolq"], eval_sets=["boolq", "piqa"], **cfg)  # fmt: skip
    fin = recs[0]["final"]
    assert fin["boolq_examples"] == fin["piqa_examples"] == 2 and fin["boolq_total"] == 6
    assert 0 <= fin["boolq_accuracy"] <= 1 and fin["boolq_loss"] > 0
    assert fin["score"] == pytest.approx((fin["boolq_accuracy"] + fin["piqa_accuracy"]) / 2)
    assert set(recs[0]["sample_outputs"]) == {"boolq", "piqa"}
    g = finetune.run_finetune("gsm8k", ["lora"], out_dir=tmp_path / "g", data_dir=data_root, lrs=[1e-3, 1e-2],
                              **{**cfg, "holdout_frac": 0.25, "gen_samples": 1})  # fmt: skip
    assert all(r["final"]["selection_score"] == -r["final"]["holdout_loss"] for r in g)  # answer loss held out
    assert g[0]["final"]["gsm8k_gen_examples"] == 1 and g[0]["config"]["kind"] == "generation"


def test_resume_reuses_matching_runs_only(data_root, tmp_path):
    kw = dict(out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0, telemetry_every=0, **TINY)
    first = finetune.run_finetune("sst2", ["lora"], **kw)
    f = tmp_path / "sst2_lora_lr0.001_seed0.json"
    stamp = f.read_text()
    again = finetune.run_finetune("sst2", ["lora"], resume=True, **kw)
    assert again[0]["steps"] == first[0]["steps"] and f.read_text() == stamp  # reused, not retrained
    changed = finetune.run_finetune("sst2", ["lora"], resume=True, **{**kw, "steps": 3})
    assert len(changed[0]["steps"]) == 3


def test_an_interrupted_run_resumes_from_its_trainer_checkpoint(data_root, tmp_path, monkeypatch):
    kw = dict(data_dir=data_root, holdout_frac=0.0, telemetry_every=0, save_steps=2, **TINY)
    whole = finetune.run_finetune("sst2", ["scalora"], out_dir=tmp_path / "whole", **kw)[0]
    on_step_end = StepRecorder.on_step_end

    def interrupt_at_3(self, args, state, control, **k):
        if state.global_step == 3:
            raise KeyboardInterrupt
        return on_step_end(self, args, state, control, **k)

    monkeypatch.setattr(StepRecorder, "on_step_end", interrupt_at_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.run_finetune("sst2", ["scalora"], out_dir=tmp_path / "cut", **kw)
    assert (tmp_path / "cut" / "checkpoints" / "sst2_scalora_lr0.001_seed0" / "checkpoint-2").is_dir()
    monkeypatch.setattr(StepRecorder, "on_step_end", on_step_end)
    rec = finetune.run_finetune("sst2", ["scalora"], out_dir=tmp_path / "cut", resume=True, **kw)[0]
    assert rec["final"]["resumed_from_step"] == 2 and [s["step"] for s in rec["steps"]] == [1, 2, 3, 4]
    # ScaLoRA acts from step 2: steps 3-4 after the resume match the uninterrupted run bit for bit
    assert [s["loss"] for s in rec["steps"]] == [s["loss"] for s in whole["steps"]]
    assert not (tmp_path / "cut" / "checkpoints").exists()


def test_bad_arguments(data_root, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        finetune.run_finetune("sst2", ["lora", "sgd"], out_dir=tmp_path, data_dir=data_root, **TINY)
    with pytest.raises(ValueError, match="unknown option"):
        finetune.run_finetune("sst2", ["lora"], out_dir=tmp_path, data_dir=data_root, learning_rate=1, **TINY)
    with pytest.raises(ValueError, match="held-out part"):
        finetune.run_finetune("sst2", ["lora"], out_dir=tmp_path, data_dir=data_root, lrs=[1, 2], holdout_frac=0.0)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data-dir", "{tmp}/nope"], "does not exist"),
        (["--data-dir", "{tmp}"], "no GLUE-format data for 'sst2'"),
        (["--task", "nosuch", "--data-dir", "{data}"], "unknown task 'nosuch'"),
        (["--data-dir", "{data}", "--lrs", "1e-3", "1e-2", "--holdout-frac", "0"], "held-out part"),
        (["--data-dir", "{data}", "--model", "{tmp}/no-model"], "cannot load model"),
    ],
)
def test_cli_errors_are_one_sentence_and_exit_2(data_root, tmp_path, capsys, argv, message):
    argv = [a.format(tmp=tmp_path, data=data_root) for a in argv]
    code = cli.main(["finetune", "--methods", "lora", "--out", str(tmp_path / "o"), "--no-progress", *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert err.startswith("optlora finetune: error: ") and err.count("\n") == 1


def test_cli_end_to_end_with_a_config_file(data_root, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"task: mrpc\nmethods: [lora]\nmodel: tiny\nsteps: 2\nbatch_size: 4\ndata_dir: {data_root}\n")
    code = cli.main(
        ["finetune", "--config", str(cfg), "--out", str(tmp_path / "cli"), "--no-progress", "--threads", "1"]
    )
    assert code == 0
    rec = results.read_json(tmp_path / "cli" / "mrpc_lora_lr0.001_seed0.json")
    assert {"f1", "accuracy"} <= set(rec["final"]) and rec["config"]["threads"] == 1


def test_method_warmup_longer_than_the_run_warns(data_root, tmp_path):
    with pytest.warns(UserWarning, match="will never be applied: the run has 4 optimizer steps and warmup_steps=9"):
        finetune.run_finetune("sst2", ["reflora"], out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0,
                              **{**TINY, "method_warmup": 9})  # fmt: skip


def test_a_diverging_run_is_recorded_as_diverged_for_every_method_alike(data_root, tmp_path, monkeypatch):
    """A NaN in the model after step 2 ends the run at step 3 (no scores), and the sweep goes on."""
    on_step_end = StepRecorder.on_step_end

    def poison_after_2(self, args, state, control, **k):
        if state.global_step == 2:
            with torch.no_grad():
                next(p for n, p in k["model"].named_parameters() if "lora_A" in n).fill_(float("nan"))
        return on_step_end(self, args, state, control, **k)

    monkeypatch.setattr(StepRecorder, "on_step_end", poison_after_2)
    methods = ["lora", "reflora", "scalora"]
    recs = finetune.run_finetune("sst2", methods, out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0,
                                 telemetry_every=0, **TINY)  # fmt: skip
    assert [r["method"] for r in recs] == methods
    for r in recs:
        assert r["final"]["diverged_at_step"] == 3 and r["final"]["score"] is None, r["method"]
        assert [s["step"] for s in r["steps"]] == [1, 2, 3] and not math.isfinite(r["steps"][-1]["loss"])
    assert all(r["optlora_stats"]["skipped"]["nonfinite"] > 0 for r in recs[1:])  # counted, left to AdamW as LoRA


def test_epochs_set_the_steps_and_resume_treats_the_equivalent_steps_as_the_same_run(data_root, tmp_path, capsys):
    kw = dict(out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0, telemetry_every=0, **TINY)
    del kw["steps"]
    (rec,) = finetune.run_finetune("sst2", ["lora"], epochs=2, **kw)  # 48 examples, batch 8: ceil(2 * 48 / 8)
    assert rec["config"]["epochs"] == 2 and rec["config"]["steps"] == 12 == len(rec["steps"])
    assert finetune.epochs_to_steps(1.5, 10, 4, 2) == 2 and finetune.epochs_to_steps(0.01, 10, 4, 1) == 1
    f = tmp_path / "sst2_lora_lr0.001_seed0.json"
    old = results.read_json(f)
    del old["config"]["epochs"], old["config"]["rank_rtol"]  # as written before these options existed
    results.write_run(f, old)
    stamp = f.read_text()
    capsys.readouterr()
    (again,) = finetune.run_finetune("sst2", ["lora"], steps=12, resume=True, **kw)
    assert f.read_text() == stamp and again["steps"] == rec["steps"]  # reused: missing keys count as defaults
    out = capsys.readouterr().out
    assert "already complete in" in out and "sst2_lora_lr0.001_seed0" in out and "all 1 runs complete" in out
    with pytest.raises(ValueError, match="--steps or --epochs"):
        finetune.run_finetune("sst2", ["lora"], epochs=1, steps=3, **kw)


def test_cli_exits_3_when_every_run_left_is_held_by_another_process(data_root, tmp_path, capsys):
    from optlora_experiments import claims

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        c = claims.Claims(out)
        c.dir.mkdir(parents=True)
        info = {"host": socket.gethostname(), "pid": holder.pid, "start_time": claims.process_start_time(holder.pid)}
        c.path("sst2_lora_lr0.001_seed0").write_text(json.dumps(info))
        argv = ["finetune", "--methods", "lora", "--out", str(out), "--no-progress", "--data-dir", str(data_root),
                "--model", "tiny", "--steps", "2", "--resume", "--holdout-frac", "0"]  # fmt: skip
        assert cli.main(argv) == 3
        assert "nothing to run now" in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert cli.main(argv) == 0 and (out / "sst2_lora_lr0.001_seed0.json").is_file()
