"""``optlora finetune`` end to end on tiny models and fixture data: files, keys, lr selection, CLI."""

from __future__ import annotations

import argparse
import csv
import json
import random

import pytest

from optlora.experiments import finetune, results


@pytest.fixture
def data_dir(tmp_path):
    """A tiny SST-2 (learnable: the label is in the word) and GSM8K (single-digit sums) in the real layout."""
    rng = random.Random(0)
    sst = tmp_path / "data" / "glue" / "SST-2"
    sst.mkdir(parents=True)
    for split, n in (("train", 64), ("dev", 16)):
        rows = ["sentence\tlabel"]
        for _ in range(n):
            y = rng.randint(0, 1)
            rows.append(f"a {'good' if y else 'bad'} film\t{y}")
        (sst / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    gsm = tmp_path / "data" / "gsm8k"
    gsm.mkdir()
    for split, n in (("train", 16), ("test", 4)):
        lines = []
        for _ in range(n):
            a, b = rng.randint(1, 9), rng.randint(1, 9)
            lines.append(json.dumps({"question": f"{a}+{b}?", "answer": f"{a}+{b}={a + b}\n#### {a + b}"}))
        (gsm / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "data"


TINY = dict(model="tiny", steps=4, batch_size=8, max_len=24, progress=False, method_warmup=1)


def test_sst2_writes_runs_and_selects_lr(data_dir, tmp_path):
    out = tmp_path / "out"
    recs = finetune.run_finetune(
        "sst2", ["lora", "scalora"], out_dir=out, seeds=[0, 1], lrs=[1e-3, 1e-2], data_dir=data_dir,
        telemetry_every=2, **TINY,
    )  # fmt: skip
    # grid on seed 0 (2 lrs) + seed 1 at the selected lr, per method
    assert len(recs) == 6 and len(list(out.glob("sst2_*.json"))) == 6
    for rec in recs:
        on_disk = results.read_json(out / f"sst2_{rec['method']}_lr{rec['config']['lr']:g}_seed{rec['seed']}.json")
        results.validate_run(on_disk)
        assert set(results.RUN_KEYS) <= set(on_disk)
        assert [s["step"] for s in on_disk["steps"]] == [1, 2, 3, 4]
        assert {"accuracy", "eval_loss", "ms_per_step", "peak_memory_mb"} <= set(on_disk["final"])
        assert 0.0 <= on_disk["final"]["accuracy"] <= 1.0
        assert on_disk["config"]["selected_lr"] in (1e-3, 1e-2)
        ranked = [s for s in on_disk["steps"] if "rank_mean" in s]
        assert [s["step"] for s in ranked] == [2, 4]
    for method in ("lora", "scalora"):
        grid = [r for r in recs if r["method"] == method and r["seed"] == 0]
        best = max(grid, key=lambda r: r["final"]["accuracy"])["config"]["lr"]
        (second,) = [r for r in recs if r["method"] == method and r["seed"] == 1]
        assert second["config"]["lr"] == best
    scal = [r for r in recs if r["method"] == "scalora"]
    assert all("column_fraction" in s for r in scal for s in r["steps"][1:])
    with open(out / "summary.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 6
    with open(out / "aggregate.csv", newline="") as fh:
        agg = list(csv.DictReader(fh))
    assert sorted(r["method"] for r in agg) == ["lora", "scalora"]
    assert all(r["seeds"] == "2" and float(r["accuracy_std"]) >= 0 for r in agg)
    assert (out / "plots" / "loss_vs_step.png").is_file() and (out / "plots" / "scalora.png").is_file()


def test_gsm8k_reports_loss_and_exact_match(data_dir, tmp_path):
    recs = finetune.run_finetune(
        "gsm8k", ["reflora"], out_dir=tmp_path / "g", data_dir=data_dir, eval_samples=2, eval_loss_samples=4,
        gen_tokens=4, **{**TINY, "max_len": 40},
    )  # fmt: skip
    final = recs[0]["final"]
    assert final["eval_loss"] > 0 and final["exact_match"] in (0.0, 0.5, 1.0)
    assert recs[0]["config"]["task"] == "gsm8k"


def test_bad_arguments(data_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown method"):
        finetune.run_finetune("sst2", ["lora", "sgd"], out_dir=tmp_path, data_dir=data_dir, **TINY)
    with pytest.raises(ValueError, match="task"):
        finetune.run_finetune("mnli", ["lora"], out_dir=tmp_path, data_dir=data_dir, **TINY)
    with pytest.raises(ValueError, match="unknown option"):
        finetune.run_finetune("sst2", ["lora"], out_dir=tmp_path, data_dir=data_dir, learning_rate=1, **TINY)


def test_parser_help_and_cli(data_dir, tmp_path):
    parser = argparse.ArgumentParser()
    sub = finetune.add_parser(parser.add_subparsers(dest="command"))
    assert all(a.help for a in sub._actions), "every option needs help text"
    argv = ["finetune", "--model", "tiny", "--data-dir", str(data_dir), "--methods", "lora", "--steps", "2",
            "--batch-size", "4", "--max-len", "16", "--out", str(tmp_path / "cli"), "--no-progress", "--threads", "1"]  # fmt: skip
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert (tmp_path / "cli" / "sst2_lora_lr0.001_seed0.json").is_file()
    assert (tmp_path / "cli" / "aggregate.csv").is_file()


def test_select_lrs_uses_grid_seed_only():
    def rec(method, lr, seed, acc):
        return {"method": method, "seed": seed, "config": {"lr": lr}, "final": {"accuracy": acc}}

    recs = [rec("lora", 1e-3, 0, 0.8), rec("lora", 1e-2, 0, 0.7), rec("lora", 1e-3, 1, 0.5), rec("full", 1e-4, 0, 0.9)]
    recs.append(rec("full", 1e-5, 0, float("nan")))  # a diverged run never wins
    assert finetune.select_lrs("sst2", recs) == {"lora": 1e-3, "full": 1e-4}
    rows = finetune.aggregate("sst2", [r for r in recs if r["config"]["lr"] in (1e-3, 1e-4)])
    lora = next(r for r in rows if r["method"] == "lora")
    assert lora["seeds"] == 2 and lora["accuracy_mean"] == pytest.approx(0.65)
    assert lora["accuracy_std"] == pytest.approx(((0.15**2) * 2) ** 0.5)  # sample std of (0.8, 0.5)


def test_resume_reuses_matching_runs_only(data_dir, tmp_path):
    out = tmp_path / "r"
    first = finetune.run_finetune("sst2", ["lora"], out_dir=out, data_dir=data_dir, **TINY)
    f = out / "sst2_lora_lr0.001_seed0.json"
    stamp = f.read_text()
    again = finetune.run_finetune("sst2", ["lora"], out_dir=out, data_dir=data_dir, resume=True, **TINY)
    assert again[0]["steps"] == first[0]["steps"] and again[0]["environment"] == first[0]["environment"]
    assert f.read_text() == stamp  # reused, not retrained
    changed = finetune.run_finetune(
        "sst2", ["lora"], out_dir=out, data_dir=data_dir, resume=True, **{**TINY, "steps": 3}
    )
    assert len(changed[0]["steps"]) == 3


def test_method_warmup_longer_than_the_run_warns(data_dir, tmp_path):
    with pytest.warns(UserWarning, match="will never be applied: the run has 4 optimizer steps and warmup_steps=9"):
        finetune.run_finetune("sst2", ["reflora"], out_dir=tmp_path, data_dir=data_dir, **{**TINY, "method_warmup": 9})
