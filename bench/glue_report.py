"""The GLUE tables and figures of docs/RESULTS.md, from the run records ``optlora finetune`` wrote.

    python bench/glue_report.py runs/glue/mrpc runs/glue/cola --img docs/img

For each task folder (``<task>_<method>_lr<lr>_seed<k>.json``: the full records ``optlora finetune --out``
writes, or the compact copies of ``--records-dir`` kept in the repository, ``docs/results/records/<task>``): the lr grid on the held-out part (seed 0), the per-method table at the selected lr (mean ±
std over seeds, paired t-test / Wilcoxon against LoRA on the same seeds, steps and process-CPU
seconds to reach LoRA's final smoothed training loss), the ScaLoRA telemetry (rank of the
accumulated update, column-branch fraction, skipped layers), and, with ``--img``, the figures
(training loss smoothed by an EMA, final metrics, update rank / column fraction). Every number is
read from the records; nothing is typed in. Wall-clock seconds are printed too, but on a shared
machine only the CPU seconds compare methods fairly (both come from the same records).
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from optlora.experiments.aggregate import aggregate, convergence, select_lrs
from optlora.experiments.compact import load_run, telemetry_summary
from optlora.experiments.plots import plot_runs

ORDER = (
    "lora",
    "reflora",
    "reflora_s",
    "scalora",
    "scalora_i",
    "lora_r32",
    "dora",
    "pissa",
    "loraplus",
    "riemannian",
    "balora",
    "full",
    "galore",
)


def _order(method: str) -> int:
    return ORDER.index(method) if method in ORDER else len(ORDER)


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def cpu_seconds_to(run: dict, reference: dict) -> float | None:
    """Process-CPU seconds ``run`` took to reach ``reference``'s final smoothed loss (the records' ``cpu_ms``)."""
    step, _ = convergence(run, reference)
    if step is None:
        return None
    return sum(s.get("cpu_ms", 0.0) for s in run["steps"] if s["step"] <= step) / 1000.0


def telemetry(runs: list[dict]) -> dict:
    """Mean over seeds of: final update rank (mean over layers), column-branch and skipped fractions."""
    per_run = [telemetry_summary(r) for r in runs]

    def mean(key):
        vals = [t[key] for t in per_run if t.get(key) is not None]
        return statistics.mean(vals) if vals else None

    return {"rank": mean("update_rank"), "column": mean("column_fraction"), "skipped": mean("skipped_fraction")}


def report(folder: Path, img: Path | None, smooth: float) -> None:
    records = [r for r in (load_run(f) for f in sorted(folder.glob("*_seed*.json"))) if r and "final" in r]
    if not records:
        raise SystemExit(f"no run records in {folder}")
    task = records[0]["config"]["task"]
    metric = records[0]["config"].get("primary_metric", "score")
    print(f"\n### {task} ({len(records)} runs; score = {metric} on dev)\n")
    print("lr grid (seed 0, scored on the held-out part of train):\n")
    print("| method | lr | held-out score | dev score |\n|---|---|---|---|")
    for r in sorted((r for r in records if r["seed"] == 0), key=lambda r: (_order(r["method"]), r["config"]["lr"])):
        f = r["final"]
        print(f"| {r['method']} | {r['config']['lr']:g} | {_fmt(f.get('selection_score'))} | {_fmt(f.get('score'))} |")
    best = select_lrs(records)
    chosen = [r for r in records if r["config"]["lr"] == best[r["method"]]]
    rows = sorted(aggregate(chosen), key=lambda row: _order(row["method"]))
    lora = {r["seed"]: r for r in chosen if r["method"] == "lora"}
    print("\n| method | lr | seeds | dev score (mean ± std) | vs LoRA: diff (p t-test / p Wilcoxon) | steps to LoRA's "
          "final loss (reached) | CPU s to it | CPU ms/step | train loss (last 10) | update rank | column branch | "
          "skipped |\n|" + "---|" * 12)  # fmt: skip
    for row in rows:
        m = row["method"]
        runs = [r for r in chosen if r["method"] == m]
        d = row.get("vs_lora_diff_mean")
        vs = "-" if m == "lora" or d is None else (
            f"{d:+.4f} ({_fmt(row.get('vs_lora_ttest_p'), 3)} / {_fmt(row.get('vs_lora_wilcoxon_p'), 3)})"
        )  # fmt: skip
        cpu = [cpu_seconds_to(r, lora[r["seed"]]) for r in runs if r["seed"] in lora]
        cpu = [c for c in cpu if c is not None]
        st = row.get("steps_to_lora_loss_mean")
        t = telemetry(runs)
        loss = statistics.mean(r["final"]["train_loss_last10"] for r in runs)
        print(
            f"| {m} | {row['lr']:g} | {row['seeds']} | {row['score_mean']:.4f} ± {row['score_std']:.4f} | {vs} | "
            f"{'never' if st is None else f'{st:.0f}'} ({row.get('reached_lora_loss', '-')}) | "
            f"{_fmt(statistics.mean(cpu) if cpu else None, 0)} | {row['cpu_ms_per_step_mean']:.0f} | {loss:.4f} | "
            f"{_fmt(t['rank'], 1)} | {_fmt(t['column'], 2)} | {_fmt(t['skipped'], 3)} |"
        )
    if img is not None:
        out = img / f"glue_{task}"
        for p in plot_runs(chosen, out, smooth):
            print(f"figure: {p}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="optlora finetune --out folders, one per task")
    p.add_argument("--img", type=Path, default=None, help="write the figures to IMG/glue_<task>/")
    p.add_argument("--smooth", type=float, default=0.95, help="EMA factor of the training-loss curves (default 0.95)")
    args = p.parse_args(argv)
    for folder in args.folders:
        report(folder, args.img, args.smooth)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
