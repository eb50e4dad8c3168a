"""Figures from optlora result files (``optlora plot RESULTS.json|DIR ...``).

* matrix-factorisation results (:mod:`optlora_experiments.mf`): ``loss.png`` (log-scale loss
  per method, RefLoRA Fig. 2a) and ``balance.png`` (``||A||_F``, ``||B||_F`` and their
  gradient norms, Fig. 2b);
* per-run records (:mod:`optlora_experiments.results`, e.g. ``optlora finetune``), grouped by
  method over seeds: ``loss_vs_step.png`` and ``loss_vs_cpu.png`` (against process-CPU time,
  which compares methods on a shared machine; wall time would measure the neighbours too; mean,
  shaded +/- one standard deviation over 2+ seeds), ``final_metrics.png`` (bars from 0: mean,
  with standard-deviation error bars only over 2+ seeds, per final metric; the majority-class
  accuracy dashed) and, when the runs log them, ``scalora.png`` (rank of the cumulative update
  and fraction of layers on the column-scaling branch).

Uses matplotlib's object API (``Figure``), so it never touches the pyplot state or the
user's interactive backend.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections import defaultdict
from pathlib import Path

from optlora.cliutil import HelpFormatter

from . import results as res

COLORS = {
    "lora": "tab:gray",
    "scaledgd": "tab:olive",
    "reflora": "tab:blue",
    "reflora_s": "tab:cyan",
    "scalora": "tab:red",
    "scalora_i": "tab:orange",
    "dora": "tab:purple",
    "loraplus": "tab:brown",
    "pissa": "tab:pink",
    "lora_r32": "darkgray",
    "riemannian": "goldenrod",
    "balora": "teal",
    "full": "black",
    "galore": "tab:green",
}
VIEW = 1e4  # log plots show at most VIEW x the largest starting value (diverged runs leave the view)


def _figure(nrows: int = 1, ncols: int = 1, w: float = 6.0, h: float = 4.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w * ncols, h * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    """Save atomically enough for our purposes: write a temp file then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def _color(name: str):
    return COLORS.get(name)


def _positive(values):
    """Values for a log axis: zeros (e.g. B = 0 at the LoRA init) and non-finite values are not drawn."""
    return [v if isinstance(v, (int, float)) and math.isfinite(v) and v > 0 else math.nan for v in values]


def _cap(ax, series: list[list[float]]) -> None:
    """Keep diverging curves from squashing the others: cap the view at VIEW x the largest early value."""
    early = [v for s in series for v in _positive(s[:3]) if not math.isnan(v)]
    late = [v for s in series for v in _positive(s) if not math.isnan(v)]
    if early and late and max(late) > VIEW * max(early):
        ax.set_ylim(top=VIEW * max(early))


def _label(name: str, s: dict) -> str:
    loss = s["loss"]
    bad = next((t for t, v in enumerate(loss) if not (isinstance(v, (int, float)) and math.isfinite(v))), None)
    return name if bad is None else f"{name} (diverged at step {bad})"


# ----------------------------------------------------------------------------- matrix factorisation
def _mf_loss_axis(ax, result: dict, title: str) -> None:
    for name, s in result["methods"].items():
        ax.semilogy(range(len(s["loss"])), _positive(s["loss"]), label=_label(name, s), color=_color(name))
    _cap(ax, [s["loss"] for s in result["methods"].values()])
    ax.set_xlabel("step")
    ax.set_ylabel(r"loss $\frac{1}{2}\|AB^\top - Y\|_F^2$")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small")


def _mf_balance_axes(ax_norm, ax_grad, result: dict, title: str) -> None:
    for name, s in result["methods"].items():
        c = _color(name)
        steps = range(len(s["loss"]))
        ax_norm.semilogy(steps, _positive(s["norm_A"]), color=c, label=f"{name} A")
        ax_norm.semilogy(steps, _positive(s["norm_B"]), color=c, ls="--", label=f"{name} B")
        ax_grad.semilogy(steps, _positive(s["grad_norm_A"]), color=c, label=f"{name} A")
        ax_grad.semilogy(steps, _positive(s["grad_norm_B"]), color=c, ls="--", label=f"{name} B")
    _cap(ax_norm, [s[k] for s in result["methods"].values() for k in ("norm_A", "norm_B")])
    _cap(ax_grad, [s[k] for s in result["methods"].values() for k in ("grad_norm_A", "grad_norm_B")])
    ax_norm.set_title(f"factor norms $\\|A\\|_F$ (solid), $\\|B\\|_F$ (dashed){title}")
    ax_grad.set_title(f"gradient norms of A (solid), B (dashed){title}")
    for ax in (ax_norm, ax_grad):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    ax_norm.legend(fontsize="x-small", ncol=2)


def _lr_title(result: dict) -> str:
    lr = result.get("config", {}).get("lr")
    return f"lr = {lr:g}" if isinstance(lr, (int, float)) else "matrix factorisation"


def plot_mf(result: dict, out_dir: str | Path) -> list[Path]:
    """``loss.png`` and ``balance.png`` for one MF results dict (one learning rate)."""
    res.validate_mf_results(result)
    out_dir = Path(out_dir)
    fig, ax = _figure()
    _mf_loss_axis(ax[0, 0], result, f"matrix factorisation, {_lr_title(result)}")
    written = [_save(fig, out_dir / "loss.png")]
    fig, ax = _figure(1, 2)
    _mf_balance_axes(ax[0, 0], ax[0, 1], result, f", {_lr_title(result)}")
    written.append(_save(fig, out_dir / "balance.png"))
    return written


def plot_mf_comparison(all_results: dict, out_dir: str | Path) -> list[Path]:
    """``loss.png`` (one panel per lr) and ``balance.png`` (one row per lr) for ``{lr: result}``."""
    out_dir = Path(out_dir)
    results = list(all_results.values())
    fig, ax = _figure(1, len(results))
    for i, r in enumerate(results):
        _mf_loss_axis(ax[0, i], r, _lr_title(r))
    written = [_save(fig, out_dir / "loss.png")]
    fig, ax = _figure(len(results), 2)
    for i, r in enumerate(results):
        _mf_balance_axes(ax[i, 0], ax[i, 1], r, f", {_lr_title(r)}")
    written.append(_save(fig, out_dir / "balance.png"))
    return written


# ----------------------------------------------------------------------------- per-run records
def _mean_std(rows: list[list[float]]) -> tuple[list[float], list[float]]:
    n = min(len(r) for r in rows)
    mean, std = [], []
    for i in range(n):
        col = [r[i] for r in rows if isinstance(r[i], (int, float)) and math.isfinite(r[i])]
        m = sum(col) / len(col) if col else math.nan
        var = sum((x - m) ** 2 for x in col) / (len(col) - 1) if len(col) > 1 else 0.0
        mean.append(m)
        std.append(math.sqrt(var))
    return mean, std


def _ema(values: list[float], smooth: float) -> list[float]:
    if not smooth:
        return values
    out, acc = [], None
    for v in values:
        acc = v if acc is None or not math.isfinite(acc) else smooth * acc + (1 - smooth) * v
        out.append(acc)
    return out


def _by_method(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups[r["method"]].append(r)
    return dict(groups)


def _cpu_seconds(steps: list[dict]) -> list[float] | None:
    """Cumulative process-CPU seconds at each step (the records' ``cpu_ms``); None if a step has none."""
    ms = [s.get("cpu_ms") for s in steps]
    if not ms or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in ms):
        return None
    return list(itertools.accumulate(v / 1000.0 for v in ms))


def _pairs(run: dict, xkey: str, ykey: str, smooth: float) -> tuple[list[float], list[float]]:
    """``(x, y)`` over the logged steps that have both keys (telemetry is logged every k steps only).

    ``xkey="cpu_s"``: the cumulative CPU seconds (:func:`_cpu_seconds`); no pairs when the run lacks them.
    """
    steps = run["steps"]
    if xkey == "cpu_s":
        cpu = _cpu_seconds(steps)
        steps = [{**s, "cpu_s": c} for s, c in zip(steps, cpu)] if cpu is not None else []
    rows = [(s[xkey], s[ykey]) for s in steps if s.get(xkey) is not None and s.get(ykey) is not None]
    return [x for x, _ in rows], _ema([y for _, y in rows], smooth)


def _curves(ax, groups, xkey: str, ykey: str, smooth: float) -> bool:
    """Mean over seeds (aligned by logged position) with a +/- one standard deviation band."""
    drawn = False
    for name, runs in groups.items():
        pairs = [_pairs(r, xkey, ykey, smooth) for r in runs]
        pairs = [p for p in pairs if p[0]]
        if not pairs:
            continue
        x, _ = _mean_std([p[0] for p in pairs])
        y, sd = _mean_std([p[1] for p in pairs])
        marker = "o" if len(x) < 30 else None
        ax.plot(x, y, label=f"{name} (n={len(pairs)})", color=_color(name), marker=marker, ms=3)
        if len(pairs) > 1:
            ax.fill_between(
                x, [a - b for a, b in zip(y, sd)], [a + b for a, b in zip(y, sd)], color=_color(name), alpha=0.2
            )
        drawn = True
    if drawn:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return drawn


def _metric_bars(ax, groups: dict[str, list[dict]], metric: str) -> None:
    """Mean of ``metric`` per method; error bars (one std) only over 2+ seeds; the axis includes 0.

    Bars start at 0, so a difference looks as large as it is; the majority-class accuracy is drawn as a dashed
    line where the records hold it (``accuracy`` panels).
    """
    names, means, errs = [], [], []
    for name, runs in groups.items():
        vals = [r["final"].get(metric) for r in runs]
        vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        if vals:
            (m,), (s,) = _mean_std([[v] for v in vals])
            names.append(f"{name}\n({len(vals)} seed{'s' if len(vals) > 1 else ''})")
            means.append(m)
            errs.append(s if len(vals) > 1 else math.nan)  # NaN: no error bar drawn for one seed
    colors = [_color(n.split("\n")[0]) or "tab:purple" for n in names]
    ax.bar(names, means, yerr=errs, capsize=4, color=colors)
    ax.set_title(metric)
    ax.tick_params(axis="x", labelsize="small")
    base = {r["final"].get("majority_baseline") for rs in groups.values() for r in rs}
    if metric == "accuracy" and len(base) == 1 and isinstance(next(iter(base)), (int, float)):
        ax.axhline(next(iter(base)), color="black", ls="--", lw=1, label="majority class")
        ax.legend(fontsize="x-small")
    include_zero(ax)


def include_zero(ax) -> None:
    """Extend the y axis to 0 (scores and losses read against 0, not against a cut axis), with a 5% top margin."""
    lo, hi = ax.get_ylim()
    lo2, hi2 = min(lo, 0.0), max(hi, 0.0)
    if (lo2, hi2) != (lo, hi):
        hi2 += 0.05 * (hi2 - lo2) if hi2 > 0 else 0.0
    ax.set_ylim(lo2, hi2)


def plot_runs(records: list[dict], out_dir: str | Path, smooth: float = 0.0) -> list[Path]:
    """Loss vs step / wall time, final-metric bars and ScaLoRA curves for per-run records."""
    if not records:
        raise ValueError("no run records to plot")
    for r in records:
        res.validate_run(r)
    out_dir, groups, written = Path(out_dir), _by_method(records), []
    for xkey, xlabel, fname in (
        ("step", "step", "loss_vs_step.png"),
        ("cpu_s", "process CPU time (s)", "loss_vs_cpu.png"),  # not wall time: it measures the neighbours too
    ):
        fig, ax = _figure()
        if not _curves(ax[0, 0], groups, xkey, "loss", smooth):
            continue  # e.g. records without per-step CPU time
        ax[0, 0].set_xlabel(xlabel)
        ax[0, 0].set_ylabel("training loss" + (f" (EMA {smooth:g})" if smooth else ""))
        written.append(_save(fig, out_dir / fname))
    present = [k for k in dict.fromkeys(k for r in records for k in r["final"])]
    metrics = [k for k in res.FINAL_KEYS if k in present] or present  # the known metrics, in a fixed order
    if metrics:
        fig, ax = _figure(1, len(metrics), w=4.0)
        for i, metric in enumerate(metrics):
            _metric_bars(ax[0, i], groups, metric)
        written.append(_save(fig, out_dir / "final_metrics.png"))
    scal = {
        n: rs
        for n, rs in groups.items()
        if any("rank_mean" in s or "column_fraction" in s for r in rs for s in r["steps"])
    }
    if scal:
        fig, ax = _figure(1, 2)
        _curves(ax[0, 0], scal, "step", "rank_mean", 0.0)
        ax[0, 0].set_ylabel("mean rank of the cumulative update")
        _curves(ax[0, 1], scal, "step", "column_fraction", 0.0)
        ax[0, 1].set_ylabel("fraction of layers on the column branch")
        for a in ax[0]:
            a.set_xlabel("step")
        written.append(_save(fig, out_dir / "scalora.png"))
    return written


def plot_paths(paths, out: str | Path | None = None, smooth: float = 0.0) -> list[Path]:
    """Plot every result file under ``paths``.

    MF files are plotted next to themselves (or in ``out/<folder>``); an ``optlora mf``
    output folder (``DIR/lr_<lr>/results.json``) also gets the side-by-side comparison in
    ``DIR`` (or ``out``), and its ``DIR/results.json`` copy of the primary lr is skipped.
    Per-run records are plotted together in ``out`` (default: the first record's folder).
    """
    files = res.find_result_files(paths)
    if not files:
        raise FileNotFoundError(f"no *.json result files under {[str(p) for p in paths]}")
    runs, runs_dir, written = [], None, []
    sweeps: dict[Path, dict] = defaultdict(dict)  # mf output folder -> {lr: result}
    for f in files:
        obj = res.read_json(f)
        k = res.kind(obj)
        if k == "mf":
            if f.name == "results.json" and any(d.name.startswith("lr_") for d in f.parent.iterdir() if d.is_dir()):
                if len(files) > 1:
                    continue  # the copy of the primary lr: plotted from its lr_<lr>/ folder
            if f.parent.name.startswith("lr_"):
                sweeps[f.parent.parent][obj.get("config", {}).get("lr", f.parent.name)] = obj
            target = Path(out) / f.parent.name if out is not None and len(files) > 1 else Path(out or f.parent)
            written += plot_mf(obj, target)
        elif k == "run":
            runs.append(obj)
            runs_dir = runs_dir or f.parent
    for folder, by_lr in sweeps.items():
        written += plot_mf_comparison(by_lr, Path(out) if out is not None else folder)
    if runs:
        written += plot_runs(runs, Path(out) if out is not None else runs_dir, smooth)
    if not written:
        raise ValueError(f"none of {len(files)} JSON file(s) is an optlora result file")
    return written


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "plot",
        help="re-plot result files (mf results.json, finetune run JSONs)",
        description=__doc__.split("\n\n")[0]
        + " Matrix-factorisation files get loss.png and balance.png; per-run records are grouped by method "
        "(mean and spread over seeds).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("paths", nargs="+", help="result JSON files or folders (searched recursively for *.json)")
    p.add_argument(
        "--out", default=None, help="folder for the PNGs (default: next to the MF file / the first run record)"
    )
    p.add_argument("--smooth", type=float, default=0.0, help="EMA factor in [0, 1) for training-loss curves (0: none)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    if not 0.0 <= args.smooth < 1.0:
        print(f"optlora plot: error: --smooth must be in [0, 1), got {args.smooth}", file=sys.stderr)
        return 2
    try:
        written = plot_paths(args.paths, args.out, args.smooth)
    except (FileNotFoundError, ValueError) as exc:
        print(f"optlora plot: error: {exc}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    return 0
