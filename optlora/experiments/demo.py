"""optlora demo: a short end-to-end comparison on the CPU (a few minutes).

1. The matrix-factorisation toy (RefLoRA Fig. 2) at both learning rates -- LoRA, ScaledGD,
   RefLoRA, RefLoRA-S, ScaLoRA, ScaLoRA-I -- through :mod:`optlora.experiments.mf`
   (well under a minute);
2. a short SST-2 fine-tune (batch 16, 64 tokens, one pass over ``steps x 16`` training
   sentences), LoRA vs RefLoRA vs ScaLoRA, through
   :func:`optlora.experiments.finetune.run_finetune` (skipped, with a message, if that
   module or the data is unavailable).

Tables are printed; results and figures go to ``--out`` (``mf/`` and ``sst2/``, figures in ``sst2/plots/``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from ..cliutil import HelpFormatter
from . import mf

FT_METHODS = ("lora", "reflora", "scalora")
FULL = {"mf_steps": mf.FULL_STEPS, "ft_steps": 150, "eval_samples": 872}
QUICK = {"mf_steps": mf.QUICK_STEPS, "ft_steps": 60, "eval_samples": 200}
FT_BATCH, FT_MAX_LEN = 16, 64


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="short CPU demo: matrix factorisation (both lrs) + SST-2 LoRA vs RefLoRA vs ScaLoRA",
        description=__doc__.split("\n\n")[0]
        + " Matrix factorisation (RefLoRA Fig. 2) at two learning rates, then a short SST-2 fine-tune.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/demo", help="output folder (mf/ and sst2/ inside)")
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
        help=f"SST-2 steps (default {FULL['ft_steps']}; quick {QUICK['ft_steps']})",
    )
    p.add_argument(
        "--eval-samples",
        type=int,
        default=None,
        help=f"SST-2 dev examples to score (default {FULL['eval_samples']}; quick {QUICK['eval_samples']})",
    )
    p.add_argument("--model", default=None, help="SST-2 model: local path, hub id or 'tiny' (default: finetune's)")
    p.add_argument("--data-dir", default=None, help="folder holding glue/SST-2 (default: finetune's)")
    p.add_argument("--seed", type=int, default=0, help="seed of both experiments")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of the fine-tune (1 on a busy machine)")
    p.add_argument("--skip-finetune", action="store_true", help="run the matrix factorisation only")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a TTY)")
    p.set_defaults(func=run)
    return p


def _preset(args, key: str):
    value = getattr(args, key)
    if value is not None:
        if value < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {value}")
        return value
    return (QUICK if args.quick else FULL)[key]


def run(args: argparse.Namespace) -> int:
    try:
        mf_steps, ft_steps, eval_samples = (_preset(args, k) for k in ("mf_steps", "ft_steps", "eval_samples"))
    except ValueError as exc:
        print(f"optlora demo: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    progress = not args.no_progress and sys.stderr.isatty()
    t0 = time.perf_counter()

    print("== 1. matrix factorisation (RefLoRA Sec. 4.1 / Fig. 2), plain SGD through optlora ==")
    cfg = mf.MFConfig(steps=mf_steps, seed=args.seed)
    results = mf.run_mf(cfg, progress=progress)
    print(mf.format_table(mf.summary_rows(results, cfg.target), cfg.target, cfg.steps))
    mf.write_results(results, out / "mf", cfg)
    print(f"-> {out / 'mf'} ({time.perf_counter() - t0:.0f} s)\n")

    if args.skip_finetune:
        return 0
    print(f"== 2. SST-2 fine-tune: {' vs '.join(FT_METHODS)}, {ft_steps} steps ==")
    try:
        finetune = importlib.import_module("optlora.experiments.finetune")
    except Exception as exc:  # noqa: BLE001 - part 2 may be missing or broken: keep the MF part
        print(f"skipped: optlora.experiments.finetune is not importable ({type(exc).__name__}: {exc})")
        return 0
    t1 = time.perf_counter()
    try:
        records = finetune.run_finetune(
            "sst2",
            list(FT_METHODS),
            out_dir=out / "sst2",
            seeds=(args.seed,),
            steps=ft_steps,
            batch_size=FT_BATCH,
            max_len=FT_MAX_LEN,
            train_samples=ft_steps * FT_BATCH,  # every training example seen once; skips encoding the rest
            eval_samples=eval_samples,
            threads=args.threads,
            model=args.model,
            data_dir=args.data_dir,
            progress=progress,
        )
    except (FileNotFoundError, OSError, ValueError) as exc:
        print(f"optlora demo: the SST-2 fine-tune failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if not (out / "sst2" / "plots").is_dir():  # finetune draws its own figures there
        from .plots import plot_runs

        plot_runs(records, out / "sst2" / "plots")
    print(f"-> {out / 'sst2'} ({time.perf_counter() - t1:.0f} s); total {time.perf_counter() - t0:.0f} s")
    return 0
