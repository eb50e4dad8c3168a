"""The per-task report of an lr sweep (``bench/glue_report.py``, docs/RESULTS.md), from run records alone.

Works on a finished or a **partial** sweep: what is missing is marked, never a reason to fail.

* :func:`method_grids` -- per method, the first seed's runs by lr, the lrs it needs (the recorded selection's
  grid and extension points, else the expected grid and what was run) and its lr: the recorded final
  selection, else the provisional best held-out score so far (:func:`provisional_lr`, the rule of
  :func:`optlora_experiments.schedule.select`: best finite score, the smaller lr on ties, a diverged run never).
* :func:`grid_table` -- every method's grid: held-out score / dev score / final training loss per lr,
  diverged and missing runs marked, scores not above the majority class flagged.
* :func:`chosen_table` -- at each method's lr: dev score over seeds (mean ± std; one seed: no spread, no
  test), the paired difference to LoRA with t-test / Wilcoxon p-values, steps and process-CPU seconds to
  LoRA's final smoothed training loss (LoRA itself: "-"), CPU ms/step, final training loss, ScaLoRA telemetry,
  and the seeds still missing.
* :func:`plot_sensitivity` -- held-out score and final training loss against lr (log x), one line per method.
* :func:`task_markdown` -- all of it for one task, with links to the figures.
"""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from .aggregate import (
    REFERENCE,
    aggregate,
    convergence_cell,
    describe_scoring,
    majority_footnote,
    majority_mark,
    majority_score,
    score_cell,
    vs_lora_cell,
)
from .compact import telemetry_summary

#: table order: LoRA first, then optlora's methods, then the other baselines
ORDER = ("lora", "reflora", "reflora_s", "scalora", "scalora_i", "lora_r32", "dora", "pissa", "loraplus", "riemannian",
         "balora", "full", "galore")  # fmt: skip


def _order(method: str) -> tuple[int, str]:
    return (ORDER.index(method) if method in ORDER else len(ORDER), method)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class Expected:
    """What the sweep was asked to run (e.g. from its plan); empty fields are inferred from the records."""

    methods: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    lrs: tuple[float, ...] = ()


@dataclass
class MethodGrid:
    """One method's lr grid on the first seed: its runs, the lrs it needs, its lr and whether that is final."""

    method: str
    runs: dict[float, dict] = field(default_factory=dict)  # lr -> record (first seed)
    needed: list[float] = field(default_factory=list)
    lr: float | None = None
    final: bool = False
    reason: str = ""

    @property
    def missing(self) -> list[float]:
        return [lr for lr in self.needed if lr not in self.runs]


def provisional_lr(runs: dict[float, dict]) -> float | None:
    """The best finite held-out score among ``runs`` (lr -> record); ties: the smaller lr; None if none is finite."""
    scored = [lr for lr in sorted(runs) if _finite(runs[lr]["final"].get("selection_score"))]
    if not scored:
        return min(runs) if len(runs) == 1 else None  # a single-lr grid needs no score
    return max(scored, key=lambda lr: runs[lr]["final"]["selection_score"])


def method_grids(records: list[dict], expected: Expected | None = None) -> tuple[dict[str, MethodGrid], int]:
    """``({method: MethodGrid}, first seed)`` over the expected methods and every method with a record."""
    expected = expected or Expected()
    methods = sorted({*expected.methods, *(r["method"] for r in records)}, key=_order)
    seeds = sorted({r["seed"] for r in records})
    first = expected.seeds[0] if expected.seeds else (seeds[0] if seeds else 0)
    grids = {}
    for m in methods:
        g = MethodGrid(m, {r["config"]["lr"]: r for r in records if r["method"] == m and r["seed"] == first})
        sels = [r["selection"] for r in records if r["method"] == m and (r.get("selection") or {}).get("selected_lr")]
        if sels:  # the sweep's final selection, written into the records
            sel = sels[0]
            g.needed = sorted({*sel["grid"], *sel.get("extended", [])})
            g.lr, g.final, g.reason = sel["selected_lr"], True, sel.get("reason", "")
        else:
            g.needed = sorted({*expected.lrs, *g.runs})
            g.lr = provisional_lr(g.runs)
            done = len([lr for lr in g.needed if lr in g.runs])
            g.reason = f"provisional: {done} of {len(g.needed)} grid runs done" if g.runs else "no runs yet"
        grids[m] = g
    return grids, first


# ----------------------------------------------------------------------------------------------- tables
def heldout_below_majority(rec: dict) -> bool:
    """Whether the run's held-out score is not above the majority class's on the held-out part."""
    held, base = rec["final"].get("selection_score"), majority_score(rec, "holdout")
    return _finite(held) and base is not None and held <= base


def _cell(rec: dict, selected: bool, final: bool) -> str:
    fin = rec["final"]
    if fin.get("diverged_at_step") is not None:
        return f"diverged (step {fin['diverged_at_step']})"
    vals = ["–" if not _finite(v) else f"{v:.3f}" for v in (fin.get("selection_score"), fin.get("score"),
                                                              fin.get("train_loss_last10"))]  # fmt: skip
    if heldout_below_majority(rec):
        vals[0] += "†"
    text = " / ".join(vals)
    return (f"**{text}**" if final else f"*{text}*") if selected else text


def grid_table(grids: dict[str, MethodGrid]) -> str:
    """Markdown: one row per method, one column per lr (see the module docstring)."""
    lrs = sorted({lr for g in grids.values() for lr in (*g.needed, *g.runs)})
    lines = ["| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | lr |", "|---|" + "---|" * (len(lrs) + 1)]
    for m, g in grids.items():
        cells = []
        for lr in lrs:
            if lr in g.runs:
                cells.append(_cell(g.runs[lr], lr == g.lr, g.final))
            else:
                cells.append("missing" if lr in g.needed else "")
        lr = "-" if g.lr is None else f"{g.lr:g}"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {lr} ({g.reason}) |")
    return "\n".join(lines)


def telemetry(runs: list[dict]) -> dict:
    """Mean over seeds of: final update rank (mean over layers), column-branch and skipped fractions."""
    per_run = [telemetry_summary(r) for r in runs]

    def mean(key):
        vals = [t[key] for t in per_run if _finite(t.get(key))]
        return statistics.mean(vals) if vals else None

    return {"rank": mean("update_rank"), "column": mean("column_fraction"), "skipped": mean("skipped_fraction")}


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def chosen_records(records: list[dict], grids: dict[str, MethodGrid]) -> list[dict]:
    """The records at each method's (final or provisional) lr, every seed."""
    return [r for r in records if grids.get(r["method"]) and r["config"]["lr"] == grids[r["method"]].lr]


def chosen_table(records: list[dict], grids: dict[str, MethodGrid], seeds: tuple[int, ...] = (),
                 window: int | None = None) -> str:  # fmt: skip
    """Markdown: one row per method at its lr (see the module docstring); ``seeds``: the seeds expected."""
    chosen = chosen_records(records, grids)
    rows = {row["method"]: row for row in aggregate(chosen, window)}
    head = ["method", "lr", "seeds", "dev score (mean ± std)", "vs LoRA: diff (p t-test / p Wilcoxon)",
            "steps (CPU s) to LoRA's final loss, reached", "CPU ms/step", "train loss (last 10)", "update rank",
            "column branch", "skipped"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, g in grids.items():
        row = rows.get(m)
        if row is None:
            why = "no runs yet" if not g.runs else ("every grid run diverged" if g.lr is None else "no run at its lr")
            lines.append(f"| {m} | - | 0 | {why} |" + " |" * (len(head) - 4))
            continue
        runs = [r for r in chosen if r["method"] == m]
        have = sorted(r["seed"] for r in runs)
        lost = [s for s in seeds if s not in have]
        n = f"{len(have)}" + (f" (seeds {', '.join(map(str, lost))} missing)" if lost else "")
        lr = f"{g.lr:g}" + ("" if g.final else " (provisional)")
        t = telemetry(runs)
        losses = [r["final"].get("train_loss_last10") for r in runs]
        losses = [v for v in losses if _finite(v)]
        cells = [m, lr, n, score_cell(row) + majority_mark(row), vs_lora_cell(row), convergence_cell(row),
                 _num(row.get("cpu_ms_per_step_mean"), 0), _num(statistics.mean(losses) if losses else None, 4),
                 _num(t["rank"], 1), _num(t["column"], 2), _num(t["skipped"], 3)]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    notes = [majority_footnote(list(rows.values()))]
    if REFERENCE not in rows:
        notes.append("No LoRA run at its lr yet: nothing to compare against.")
    return "\n".join(lines) + "".join(f"\n\n{n}" for n in notes if n)


def missing_summary(grids: dict[str, MethodGrid], records: list[dict], seeds: tuple[int, ...]) -> str:
    """One sentence: how many grid runs and seed runs are still missing (empty when none is)."""
    grid_left = {m: g.missing for m, g in grids.items() if g.missing}
    seed_left = {}
    for m, g in grids.items():
        have = {r["seed"] for r in records if r["method"] == m and g.lr is not None and r["config"]["lr"] == g.lr}
        lost = [s for s in seeds if s not in have and (g.lr is not None or s != seeds[0])]
        if lost:
            seed_left[m] = lost
    if not grid_left and not seed_left:
        return ""
    parts = []
    if grid_left:
        parts.append(f"{sum(map(len, grid_left.values()))} grid run(s) ({', '.join(grid_left)})")
    if seed_left:
        parts.append(f"{sum(map(len, seed_left.values()))} seed run(s) ({', '.join(seed_left)})")
    return "**Partial sweep**: missing " + " and ".join(parts) + "; lrs marked provisional may still change."


# ----------------------------------------------------------------------------------------------- figure
def plot_sensitivity(grids: dict[str, MethodGrid], path: str | Path, metric: str = "score") -> Path:
    """Held-out score and final training loss against lr (log x), one line per method, first seed.

    Both y axes include 0 (a score axis may go below it: Matthews correlation). A diverged run is an ``x`` on the
    bottom edge; the method's lr is a star (filled: final selection; open: provisional).
    """
    from matplotlib.transforms import blended_transform_factory

    from .plots import _color, _figure, _save, include_zero

    fig, ax = _figure(1, 2, w=6.5, h=4.5)
    panels = ((ax[0, 0], "selection_score", f"held-out {metric}"), (ax[0, 1], "train_loss_last10", "final train loss"))
    for a, key, label in panels:
        bottom = blended_transform_factory(a.transData, a.transAxes)
        for m, g in grids.items():
            if not g.runs:
                continue
            lrs = sorted(g.runs)
            fins = [g.runs[lr]["final"] for lr in lrs]
            ys = [f.get(key) if _finite(f.get(key)) and f.get("diverged_at_step") is None else math.nan for f in fins]
            style = "-" if m in ("lora", "reflora", "reflora_s", "scalora", "scalora_i") else "--"
            (line,) = a.plot(lrs, ys, style, marker="o", ms=3, label=m, color=_color(m))
            bad = [lr for lr in lrs if g.runs[lr]["final"].get("diverged_at_step") is not None]
            if bad:
                a.plot(bad, [0.03] * len(bad), "x", color=line.get_color(), transform=bottom, ms=7)
            if key == "selection_score" and g.lr in g.runs and _finite(ys[lrs.index(g.lr)]):
                face = line.get_color() if g.final else "none"
                a.plot([g.lr], [ys[lrs.index(g.lr)]], "*", ms=12, mfc=face, mec=line.get_color())
        a.set_xscale("log")
        a.set_xlabel("learning rate")
        a.set_ylabel(label)
        a.grid(True, which="both", alpha=0.3)
        include_zero(a)
    ax[0, 0].set_title("x: diverged; star: the method's lr (open: provisional)", fontsize="small")
    handles, labels = ax[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize="small")
    return _save(fig, Path(path))


# ----------------------------------------------------------------------------------------------- one task
def task_markdown(records: list[dict], expected: Expected | None = None, img: Path | None = None,
                  link_base: Path | None = None, smooth: float = 0.95, window: int | None = None) -> str:  # fmt: skip
    """The markdown of one task; with ``img`` the figures go to ``img/glue_<task>/`` and are linked relative to
    ``link_base`` (the folder of the markdown file; default: the current folder)."""
    if not records:
        raise ValueError("no run records")
    expected = expected or Expected()
    task = records[0]["config"].get("task", "task")
    metric = records[0]["config"].get("primary_metric", "score")
    grids, first = method_grids(records, expected)
    seeds = tuple(expected.seeds) or tuple(sorted({r["seed"] for r in records}))
    chosen = chosen_records(records, grids)
    out = [f"### {task} ({len(records)} runs; {describe_scoring(chosen or records)})", ""]
    gap = missing_summary(grids, records, seeds)
    out += [gap, ""] if gap else []
    out += [f"lr grid (seed {first}); each cell: held-out {metric} / dev {metric} / final training loss (mean of "
            "the last 10 steps); the method's lr in bold (final selection) or italics (provisional):", "",
            grid_table(grids), ""]  # fmt: skip
    if any(heldout_below_majority(r) for g in grids.values() for r in g.runs.values()):
        out += ["† held-out score not above the majority class's (always answering the most frequent label).", ""]
    figures = []
    if img is not None:
        folder = Path(img) / f"glue_{task}"
        figures.append(("lr sensitivity", plot_sensitivity(grids, folder / "sensitivity.png", metric)))
    out += [f"At each method's lr (seeds {', '.join(map(str, seeds))}):", "",
            chosen_table(records, grids, seeds, window), ""]  # fmt: skip
    if img is not None and chosen:
        from .plots import plot_runs

        names = {"loss_vs_step": "training loss", "loss_vs_cpu": "training loss against CPU time",
                 "final_metrics": "final metrics", "scalora": "ScaLoRA telemetry"}  # fmt: skip
        figures += [(names.get(p.stem, p.stem), p) for p in plot_runs(chosen, folder, smooth)]
    base = Path(link_base) if link_base is not None else Path.cwd()
    out += [f"![{task} {name}]({Path(os.path.relpath(p, base)).as_posix()})" for name, p in figures]
    return "\n".join(out).rstrip() + "\n"
