"""Compact records: small, lossless where it matters, and every table rebuilt from them equals the full records'."""

from __future__ import annotations

import importlib.util
import json
import math
import random
from pathlib import Path

import pytest

from optlora_experiments import aggregate as agg
from optlora_experiments import compact, results

ROOT = Path(__file__).resolve().parents[2]


def full_record(method="scalora", seed=0, lr=1e-3, n=1200, score=0.8, sel=None, exact=False):
    """A full record like optlora finetune writes: every step with wall/CPU time, lr, grad norm, telemetry."""
    rnd = random.Random(f"{method}{seed}{lr}")
    steps = []
    for k in range(1, n + 1):
        loss = 0.7 * math.exp(-k / 400) + 0.05 * rnd.random()
        cpu = 60 + 5 * rnd.random()
        if exact:  # values the compact form keeps exactly
            loss, cpu = float(f"{loss:.4g}"), float(round(cpu))
        s = {"step": k, "loss": loss, "wall_time": 0.1 * k, "lr": 1e-3 * (1 - k / n), "grad_norm": rnd.random(),
             "step_ms": 90 + rnd.random(), "cpu_ms": cpu}  # fmt: skip
        if method == "scalora" and k > 1:
            s.update(column_fraction=rnd.random(), skipped_fraction=0.0)
        if k % 50 == 0:
            s.update(rank_mean=8 + k / 100, rank_min=8, rank_max=9, lora_rank=8)
        steps.append(s)
    cfg = {"task": "cola", "lr": lr, "steps": n, "epochs": 5, "primary_metric": "matthews", "model": "minilm",
           "data": {"train_examples": 7696}, "method_info": {"targets": [f"layer.{i}.dense" for i in range(37)]}}  # fmt: skip
    final = {"score": score, "matthews": score, "dev_matthews": score, "dev_examples": 1043, "dev_total": 1043,
             "cpu_ms_per_step": 62.0, "ms_per_step": 90.0, "train_loss_last10": 0.1, "diverged_at_step": None}  # fmt: skip
    if sel is not None:
        final["selection_score"] = sel
    rec = results.make_run(method, seed, cfg, steps, final, env={"torch": "2.13", "argv": ["optlora", "finetune"]})
    rec["telemetry"] = {"rank_rtol": 1e-3, "final_ranks": {f"layer.{i}": 8 + i % 5 for i in range(37)}}
    rec["optlora_stats"] = {"steps": n, "skipped": {"nonfinite": 0}, "last_skipped_layers": ["a", "b"]}
    return rec


def test_a_1200_step_record_compacts_under_30_kb_and_expands_back(tmp_path):
    rec = full_record()
    full_size = len(json.dumps(rec, indent=1))
    small = compact.compact_record(rec)
    size = compact.write(tmp_path / "r.json", rec).stat().st_size
    assert size < 30_000 < full_size, (size, full_size)
    assert results.read_json(tmp_path / "r.json") == json.loads(json.dumps(small))
    assert compact.write(tmp_path / "sst2.json", full_record(n=2100)).stat().st_size < 30_000  # SST-2: 1 epoch
    assert compact.is_compact(small) and small["config"] == rec["config"] and small["final"] == rec["final"]
    assert "last_skipped_layers" not in small["optlora_stats"] and small["optlora_stats"]["steps"] == 1200
    back = compact.expand_record(json.loads(json.dumps(small)))
    results.validate_run(back)
    assert [s["step"] for s in back["steps"]] == list(range(1, 1201))
    for a, b in zip(rec["steps"], back["steps"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3) and b["cpu_ms"] == pytest.approx(a["cpu_ms"], rel=5e-3)
        assert b["wall_time"] is None and ("rank_mean" in b) == ("rank_mean" in a)
    assert compact.telemetry_summary(back) == {**compact.telemetry_summary(rec), "rank_rtol": 1e-3}
    assert compact.telemetry_summary(rec)["update_rank"] == pytest.approx(sum(8 + i % 5 for i in range(37)) / 37)


def test_non_consecutive_steps_and_other_files_are_refused(tmp_path):
    rec = full_record(n=5)
    del rec["steps"][2]
    with pytest.raises(ValueError, match="consecutive"):
        compact.compact_record(rec)
    with pytest.raises(ValueError, match="not a compact run record"):
        compact.expand_record({"format": "other"})
    results.write_json(tmp_path / "mf.json", {"methods": {"a": {"loss": [1.0]}}, "config": {}})
    assert compact.load_run(tmp_path / "mf.json") is None


def _records(exact):
    recs = []
    for m in ("lora", "scalora"):
        recs += [full_record(m, 0, lr, n=200, score=0.5 + lr, sel=0.4 + lr, exact=exact) for lr in (1e-3, 2e-3)]
        recs += [full_record(m, s, 2e-3, n=200, score=0.5 + 0.01 * s, exact=exact) for s in (1, 2)]
    return recs


def test_aggregate_and_glue_report_from_compact_records_equal_the_full_ones(tmp_path, capsys):
    recs = _records(exact=True)
    full_dir, small_dir = tmp_path / "runs" / "cola", tmp_path / "records" / "cola"
    for r in recs:
        name = f"cola_{r['method']}_lr{r['config']['lr']:g}_seed{r['seed']}.json"
        results.write_run(full_dir / name, r)
        results.write_json(small_dir / name, compact.compact_record(r))
    loaded = [compact.load_run(p) for p in sorted(small_dir.glob("*.json"))]
    rows_full = agg.aggregate([r for r in recs if r["config"]["lr"] == 2e-3])
    rows_small = agg.aggregate([r for r in loaded if r["config"]["lr"] == 2e-3])
    assert "seconds_to_lora_loss_mean" not in rows_full[0]  # LoRA is not compared with itself
    a, b = rows_full[1], rows_small[1]
    assert a.pop("seconds_to_lora_loss_mean") is not None and b.pop("seconds_to_lora_loss_mean") is None  # no wall
    assert rows_full == rows_small and a["cpu_seconds_to_lora_loss_mean"] > 0  # CPU time: kept
    assert rows_full[1]["update_rank_mean"] == pytest.approx(sum(8 + i % 5 for i in range(37)) / 37)
    assert "column_fraction_mean" in rows_full[1] and "column_fraction_mean" not in rows_full[0]  # LoRA has none

    spec = importlib.util.spec_from_file_location("glue_report", ROOT / "bench" / "glue_report.py")
    glue_report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue_report)
    glue_report.report(full_dir, None, 0.9)
    from_full = capsys.readouterr().out
    glue_report.report(small_dir, None, 0.9)
    assert capsys.readouterr().out == from_full and "| scalora | 0.002 (provisional) | 3 |" in from_full
    assert "![cola" not in from_full  # no --img: no figures
