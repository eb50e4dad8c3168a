"""From run records to the comparison: lr selection, mean +- std, paired tests, convergence, table.

* :func:`select_lrs` -- per method, the lr whose grid run (first seed) scored best on the part
  held out from train (``final["selection_score"]``: the primary metric, or minus the answer loss
  for generation). Dev / test scores are never looked at.
* :func:`aggregate` -- per method at its selected lr: mean and sample std over seeds of every
  numeric final metric; a paired comparison with LoRA on ``score`` over the seeds both have
  (mean difference, ``scipy.stats.ttest_rel`` and ``wilcoxon`` p-values); and the convergence
  metric of :func:`convergence`.
* :func:`convergence` -- the first step (and wall-clock second) at which a run's smoothed
  training loss (trailing mean over ``window`` steps) reaches LoRA's final smoothed training
  loss on the same seed; :func:`cpu_seconds` -- the process-CPU seconds of those steps (what the
  tables compare: on a shared machine wall time measures the neighbours too).
* :func:`majority_score` -- what always answering the most frequent label scores on the primary
  metric; the tables flag a score that is not above it (:func:`format_table`).

Honest displays: one seed gets no spread and no test (the cells say "1 seed"), LoRA is not compared
with itself, and methods are compared by CPU time, never wall time.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from . import results
from .compact import telemetry_summary
from .metrics import paired_tests

REFERENCE = "lora"
_SKIP = ("_examples", "_total", "_gen_examples", "resumed_from_step", "diverged_at_step", "selection_score")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select_lrs(records: list[dict]) -> dict[str, float]:
    """Best lr per method on the held-out part of train, judged on each method's first (smallest) seed.

    A method whose records carry the sweep's final selection (``record["selection"]``, see
    :mod:`~optlora_experiments.schedule`) keeps that lr.
    """
    best: dict[str, float] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        recorded = {(r.get("selection") or {}).get("selected_lr") for r in rs} - {None}
        if len(recorded) == 1:
            best[method] = recorded.pop()
            continue
        seed0 = min(r["seed"] for r in rs)
        grid = [r for r in rs if r["seed"] == seed0]

        def key(r):
            v = r["final"].get("selection_score")
            return v if _finite(v) else -math.inf

        best[method] = max(grid, key=key)["config"]["lr"] if len(grid) > 1 else grid[0]["config"]["lr"]
    return best


def smoothed(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` values (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def default_window(n_steps: int) -> int:
    return max(5, n_steps // 20)


def convergence(run: dict, reference: dict, window: int | None = None) -> tuple[int | None, float | None]:
    """``(step, seconds)`` at which ``run``'s smoothed loss first reaches ``reference``'s final smoothed loss."""
    ref = [s["loss"] for s in reference["steps"]]
    if not ref or not all(map(math.isfinite, ref)):
        return None, None
    w = window or default_window(len(ref))
    target = smoothed(ref, w)[-1]
    steps = [s for s in run["steps"] if _finite(s.get("loss"))]
    for s, v in zip(steps, smoothed([s["loss"] for s in steps], w)):
        if v <= target:
            return s["step"], s["wall_time"]
    return None, None


def cpu_seconds(run: dict, step: int | None) -> float | None:
    """Process-CPU seconds of ``run``'s steps up to ``step`` (the records' per-step ``cpu_ms``).

    None when ``step`` is None or a step up to it has no finite ``cpu_ms`` (e.g. the steps before a resume).
    """
    if step is None:
        return None
    ms = [s.get("cpu_ms") for s in run["steps"] if s["step"] <= step]
    if not ms or not all(_finite(v) for v in ms):
        return None
    return sum(ms) / 1000.0


def majority_score(record: dict, scored_set: str | None = None) -> float | None:
    """The score on the primary metric of always predicting the most frequent label, or None if unknown.

    Accuracy: the recorded share of the most frequent label in the scored set (``majority_baseline`` for the
    headline score, ``<set>_majority`` for ``scored_set``, e.g. ``"holdout"``); Matthews correlation: 0 (a
    constant prediction has no correlation; scikit-learn returns 0). Other metrics (F1, Pearson/Spearman,
    generation accuracy) have no recorded baseline: None.
    """
    metric = record["config"].get("primary_metric")
    share = record["final"].get(f"{scored_set}_majority" if scored_set else "majority_baseline")
    if metric == "accuracy" and _finite(share):
        return float(share)
    if metric == "matthews":
        return 0.0
    return None


def aggregate(records: list[dict], window: int | None = None) -> list[dict]:
    """One row per method (records already restricted to each method's selected lr)."""
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    ref = {r["seed"]: r for r in by_method.get(REFERENCE, [])}
    rows = []
    for method, rs in by_method.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        row = {"task": rs[0]["config"].get("task"), "method": method, "lr": rs[0]["config"]["lr"], "seeds": len(rs)}
        keys = [k for k in dict.fromkeys(k for r in rs for k in r["final"]) if not k.endswith(_SKIP)]
        keys = [k for k in keys if not k.startswith("holdout_")]  # lr-selection data: seen by the grid seed only
        for k in keys:
            vals = [r["final"][k] for r in rs if _finite(r["final"].get(k))]
            if vals:
                row[f"{k}_mean"] = statistics.mean(vals)
                row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        for k in ("update_rank", "column_fraction"):  # telemetry (compact.telemetry_summary)
            vals = [t[k] for t in map(telemetry_summary, rs) if _finite(t.get(k))]
            if vals:
                row[f"{k}_mean"] = statistics.mean(vals)
                row[f"{k}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        for key, v in rs[0]["final"].items():  # how much of each evaluation set was scored
            if key.endswith(("_examples", "_total")):
                row[key] = v
        if ref and method != REFERENCE:
            seeds = [r["seed"] for r in rs if r["seed"] in ref]
            mine = {r["seed"]: r for r in rs}
            test = paired_tests(
                [mine[s]["final"].get("score") for s in seeds], [ref[s]["final"].get("score") for s in seeds]
            )
            row.update({f"vs_lora_{k}": v for k, v in test.items()})
        if ref and method != REFERENCE:  # LoRA against its own final loss says nothing
            hits = [(r, convergence(r, ref[r["seed"]], window)) for r in rs if r["seed"] in ref]
            reached = [(r, h) for r, h in hits if h[0] is not None]
            row["reached_lora_loss"] = f"{len(reached)}/{len(hits)}"
            row["steps_to_lora_loss_mean"] = statistics.mean(h[0] for _, h in reached) if reached else None
            cpu = [cpu_seconds(r, h[0]) for r, h in reached]
            row["cpu_seconds_to_lora_loss_mean"] = statistics.mean(cpu) if reached and None not in cpu else None
            secs = [h[1] for _, h in reached if h[1] is not None]  # wall (CSV only); compact records keep none
            row["seconds_to_lora_loss_mean"] = statistics.mean(secs) if secs else None
        base = {majority_score(r) for r in rs}
        if len(base) == 1 and None not in base and "score_mean" in row:
            row["majority_score"] = base.pop()
            row["below_majority"] = row["score_mean"] <= row["majority_score"]
        rows.append(row)
    return rows


MAJORITY_NOTE = "not above the majority-class baseline (always answering the most frequent label scores {:.4f} here)"


def score_cell(row: dict, key: str = "score", digits: int = 4, pm: str = "±") -> str:
    """``mean ± std`` over seeds; one seed: ``value (1 seed)`` (no spread); no finite value: ``none finite``."""
    m, s, n = row.get(f"{key}_mean"), row.get(f"{key}_std"), row.get("seeds", 0)
    if m is None:
        return "none finite (diverged?)"
    return f"{m:.{digits}f} (1 seed)" if n == 1 else f"{m:.{digits}f} {pm} {s:.{digits}f}"


def majority_mark(row: dict, mark: str = "†") -> str:
    """`` ≤ majority†`` when the row's mean score is not above :func:`majority_score` (see :data:`MAJORITY_NOTE`)."""
    return f" ≤ majority{mark}" if row.get("below_majority") else ""


def vs_lora_cell(row: dict) -> str:
    """Mean paired difference to LoRA with the p-values; ``1 seed: no test`` for a single pair; ``-`` for LoRA."""
    if row["method"] == REFERENCE:
        return "-"
    pairs, d = row.get("vs_lora_pairs"), row.get("vs_lora_diff_mean")
    if not pairs or d is None:
        return "no LoRA run on these seeds" if "vs_lora_pairs" in row else "no LoRA runs"
    if pairs == 1:
        return f"{d:+.4f} (1 seed: no test)"
    t, w = row.get("vs_lora_ttest_p"), row.get("vs_lora_wilcoxon_p")
    if t is None and w is None:
        return f"{d:+.4f} (same score on all {pairs} seeds)"
    return f"{d:+.4f} (p {_p(t)} / {_p(w)})"


def convergence_cell(row: dict) -> str:
    """``steps (CPU s), reached/seeds`` to LoRA's final smoothed loss; ``-`` for LoRA itself."""
    if row["method"] == REFERENCE or "reached_lora_loss" not in row:
        return "-"
    st = row.get("steps_to_lora_loss_mean")
    if st is None:
        return f"never, {row['reached_lora_loss']}"
    secs = row.get("cpu_seconds_to_lora_loss_mean")
    secs = "-" if secs is None else (f"{secs:.0f}" if secs >= 10 else f"{secs:.2g}")
    return f"{st:.0f} ({secs} CPU s), {row['reached_lora_loss']}"


def majority_footnote(rows: list[dict], mark: str = "†") -> str:
    """The footnote of the flagged rows (empty when none is flagged)."""
    flagged = [r for r in rows if r.get("below_majority")]
    if not flagged:
        return ""
    return f"{mark} {', '.join(r['method'] for r in flagged)}: " + MAJORITY_NOTE.format(flagged[0]["majority_score"])


def format_table(rows: list[dict], metric: str = "score") -> str:
    """Markdown table of :func:`aggregate` rows, compared by CPU time (wall time is in ``aggregate.csv`` only)."""
    head = ["method", "lr", "seeds", metric, "vs LoRA: diff (p t-test / p Wilcoxon)", "steps (CPU s) to LoRA's loss",
            "CPU ms/step", "peak MB", "update rank", "column branch"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        nums = [_num(r.get(k + "_mean"), 0) for k in ("cpu_ms_per_step", "peak_memory_mb")]
        nums += [_num(r.get("update_rank_mean"), 1), _num(r.get("column_fraction_mean"), 2)]
        cells = [r["method"], f"{r['lr']:g}", str(r["seeds"]), score_cell(r, metric) + majority_mark(r)]
        lines.append("| " + " | ".join([*cells, vs_lora_cell(r), convergence_cell(r), *nums]) + " |")
    note = majority_footnote(rows)
    return "\n".join(lines) + (f"\n\n{note}" if note else "")


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def describe_scoring(records: list[dict]) -> str:
    """What ``score`` is and on how much data, e.g. ``score = accuracy on test (500 of 1319 examples)``."""
    if not records:
        return ""
    r = records[0]
    cfg, fin = r["config"], r["final"]
    metric = cfg.get("primary_metric", "score")
    sets = [k[: -len("_examples")] for k in fin if k.endswith("_examples") and not k.endswith("_gen_examples")]
    sets = [s for s in sets if s != "holdout"]
    parts = []
    for s in sets:
        part = f"{s} {fin[s + '_examples']} of {fin.get(s + '_total')}"
        if fin.get(s + "_gen_examples") is not None and fin[s + "_gen_examples"] != fin[s + "_examples"]:
            part += f" (generation on {fin[s + '_gen_examples']})"
        parts.append(part)
    avg = " averaged over the sets" if len(sets) > 1 else ""
    base, maj = "", majority_score(r)
    if maj is not None and metric != "accuracy":  # e.g. Matthews: 0, whatever the label shares
        acc = fin.get("majority_baseline")
        base = f"; majority baseline {maj:.4f} {metric}" + (f" (accuracy {acc:.4f})" if _finite(acc) else "")
    elif maj is not None:
        base = f"; majority baseline {maj:.4f}"
    return f"score = {metric}{avg} on {', '.join(parts)} examples{base}"


def summarize(records: list[dict], out_dir: str | Path, window: int | None = None, plots: bool = True,
              selected: dict[str, float] | None = None) -> list[dict]:  # fmt: skip
    """``summary.csv`` (every run), ``aggregate.csv`` (per method at ``selected`` lr, default :func:`select_lrs`),
    plots; prints the table."""
    out = Path(out_dir)
    results.write_summary_csv(out / "summary.csv", records)
    best = selected or select_lrs(records)
    chosen = [r for r in records if r["config"]["lr"] == best[r["method"]]]
    rows = aggregate(chosen, window)
    results.write_csv(out / "aggregate.csv", rows)
    print(describe_scoring(chosen))
    print(format_table(rows))
    if plots:
        try:
            from .plots import plot_runs

            plot_runs(chosen, out / "plots")
        except ImportError as exc:  # matplotlib is an optional extra
            print(f"no plots: {exc}")
    return rows
