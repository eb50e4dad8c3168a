"""lr selection on held-out data only, mean +- std, paired tests against LoRA, the convergence metric, the table."""

from __future__ import annotations

import math

import pytest

from optlora_experiments import aggregate as agg


def rec(method, lr, seed, score, sel=None, losses=None, dt=0.5):
    losses = losses or [1.0 / (1 + t) for t in range(20)]
    steps = [{"step": t + 1, "loss": v, "wall_time": dt * (t + 1)} for t, v in enumerate(losses)]
    final = {"score": score, "accuracy": score, "ms_per_step": 10.0, "dev_examples": 8, "dev_total": 100}
    if sel is not None:
        final["selection_score"] = sel
    return {"method": method, "seed": seed, "config": {"lr": lr, "task": "t"}, "steps": steps, "final": final}


def test_lr_is_selected_on_the_held_out_score_never_on_dev():
    recs = [
        rec("lora", 1e-3, 0, score=0.90, sel=0.70),  # best on dev, worse held out
        rec("lora", 1e-2, 0, score=0.80, sel=0.75),
        rec("lora", 1e-3, 1, score=0.99),
        rec("full", 1e-4, 0, score=0.5, sel=math.nan),  # a diverged run never wins
        rec("full", 1e-5, 0, score=0.4, sel=0.1),
        rec("reflora", 1e-3, 0, score=0.7),  # a single lr: nothing to select
    ]
    assert agg.select_lrs(recs) == {"lora": 1e-2, "full": 1e-5, "reflora": 1e-3}


def test_smoothing_and_convergence():
    assert agg.smoothed([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    lora = rec("lora", 1e-3, 0, 0.8, losses=[1.0] * 10 + [0.5] * 10)
    fast = rec("reflora", 1e-3, 0, 0.8, losses=[0.4] * 20, dt=2.0)
    slow = rec("scalora", 1e-3, 0, 0.8, losses=[0.9] * 20)
    # LoRA's final trailing mean (window 5) is 0.5; the fast run is below it from step 1, the slow one never
    assert agg.convergence(fast, lora, window=5) == (1, 2.0)
    assert agg.convergence(slow, lora, window=5) == (None, None)
    assert agg.convergence(lora, lora, window=5) == (15, 7.5)  # 5 steps of 0.5 fill the window


def test_aggregate_rows_with_paired_test_and_convergence():
    recs = [rec("lora", 1e-3, s, 0.80 + 0.01 * s) for s in range(3)]
    recs += [rec("reflora", 1e-3, s, 0.82 + 0.01 * s + 0.001 * (s == 1), losses=[0.01] * 20) for s in range(3)]
    rows = {r["method"]: r for r in agg.aggregate(recs, window=5)}
    lo, rl = rows["lora"], rows["reflora"]
    assert lo["seeds"] == 3 and lo["score_mean"] == pytest.approx(0.81) and lo["score_std"] == pytest.approx(0.01)
    assert "vs_lora_diff_mean" not in lo and "reached_lora_loss" not in lo and rl["vs_lora_pairs"] == 3  # not vs itself
    assert rl["vs_lora_diff_mean"] == pytest.approx(0.02 + 0.001 / 3)
    assert 0 < rl["vs_lora_ttest_p"] < 0.01 and rl["vs_lora_wilcoxon_p"] == pytest.approx(0.25)
    assert rl["reached_lora_loss"] == "3/3" and rl["steps_to_lora_loss_mean"] == 1
    assert rl["dev_examples"] == 8 and rl["dev_total"] == 100  # how much of dev was scored
    table = agg.format_table(list(rows.values()))
    assert "| reflora | 0.001 | 3 | 0.8303 ± 0.0100 | +0.0203 (p 0.000269 / 0.25) | 1 (- CPU s), 3/3 |" in table
    assert "| update rank | column branch |" in table and table.splitlines()[2].endswith("| - | - |")
    assert "| lora | 0.001 | 3 | 0.8100 ± 0.0100 | - | - |" in table  # LoRA is not compared with itself
    assert "steps (CPU s) to LoRA's loss" in table and "| ms/step" not in table  # CPU time, not wall time


def test_cpu_seconds_and_single_seed_cells():
    fast = rec("reflora", 1e-3, 0, 0.7, losses=[0.01] * 20)
    for k, s in enumerate(fast["steps"]):
        s["cpu_ms"] = 100.0 * (k + 1)
    assert agg.cpu_seconds(fast, 3) == pytest.approx(0.6) and agg.cpu_seconds(fast, None) is None
    fast["steps"][1]["cpu_ms"] = None  # e.g. a step before a resume without its timing
    assert agg.cpu_seconds(fast, 3) is None and agg.cpu_seconds(fast, 1) == pytest.approx(0.1)
    rows = {r["method"]: r for r in agg.aggregate([rec("lora", 1e-3, 0, 0.80), rec("reflora", 1e-3, 0, 0.82)])}
    table = agg.format_table([rows["lora"], rows["reflora"]])
    assert "| reflora | 0.001 | 1 | 0.8200 (1 seed) | +0.0200 (1 seed: no test) |" in table
    assert "n/a" not in table and "±" not in table  # one seed: no spread, no p-value
    same = agg.aggregate([rec("lora", 1e-3, s, 0.8) for s in (0, 1)] + [rec("dora", 1e-3, s, 0.8) for s in (0, 1)])
    assert "+0.0000 (same score on all 2 seeds)" in agg.format_table(same)


def test_scores_not_above_the_majority_class_are_flagged():
    acc = [rec("lora", 1e-3, s, 0.50) for s in (0, 1)] + [rec("reflora", 1e-3, s, 0.60) for s in (0, 1)]
    for r in acc:
        r["config"]["primary_metric"] = "accuracy"
        r["final"]["majority_baseline"] = 0.55
    rows = agg.aggregate(acc)
    assert [r.get("below_majority") for r in rows] == [True, False] and rows[0]["majority_score"] == 0.55
    table = agg.format_table(rows)
    assert "| 0.5000 ± 0.0000 ≤ majority† |" in table and "0.6000 ± 0.0000 |" in table
    assert table.endswith("† lora: not above the majority-class baseline (always answering the most frequent "
                          "label scores 0.5500 here)")  # fmt: skip
    mcc = rec("lora", 1e-3, 0, 0.0)
    mcc["config"]["primary_metric"] = "matthews"  # a constant prediction has Matthews correlation 0
    assert agg.majority_score(mcc) == 0.0 and agg.aggregate([mcc])[0]["below_majority"]
    reg = rec("lora", 1e-3, 0, 0.1)
    reg["config"]["primary_metric"] = "pearson"  # no majority class for a regression
    assert agg.majority_score(reg) is None and "below_majority" not in agg.aggregate([reg])[0]


def test_telemetry_columns_come_from_the_records():
    recs = [rec("scalora", 1e-3, s, 0.8) for s in range(2)]
    for s, r in enumerate(recs):
        r["telemetry"] = {"final_ranks": {"l1": 10 + s, "l2": 12 + s}}
        r["steps"][5]["column_fraction"], r["steps"][6]["column_fraction"] = 0.5, 1.0
    (row,) = agg.aggregate(recs)
    assert row["update_rank_mean"] == pytest.approx(11.5) and row["update_rank_std"] == pytest.approx(2**-0.5)
    assert row["column_fraction_mean"] == pytest.approx(0.75)
    assert agg.format_table([row]).splitlines()[2].endswith("| 11.5 | 0.75 |")


def test_describe_scoring_says_what_was_subsampled():
    r = rec("lora", 1e-3, 0, 0.8)
    r["config"]["primary_metric"] = "accuracy"
    r["final"].update(majority_baseline=0.55)
    assert agg.describe_scoring([r]) == "score = accuracy on dev 8 of 100 examples; majority baseline 0.5500"
