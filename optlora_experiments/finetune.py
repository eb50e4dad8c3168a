"""``optlora finetune``: fine-tune any GLUE-format task, LLM-Adapters set or GSM8K with every method.

Every method gets the same model, LoRA rank, steps, data order (seed), AdamW, linear warm-up /
decay schedule and gradient clipping -- ``transformers.Trainer`` runs them all
(:mod:`optlora_experiments.harness`); only the learning rate differs.

**Learning rates are chosen on data held out from train, never on dev/test.** A deterministic
part of train (``--holdout-frac``, at most ``--holdout-max`` examples, drawn with
``--split-seed``) is set aside for every run. With several ``--lrs`` each method runs the grid on
the first seed, the lr whose run scores best on the held-out part is kept (classification /
regression: the task's primary metric; generation: the lowest answer loss), and the other seeds
train at that lr on the same split. Every run is then scored on dev / test.

Outputs in ``--out``: one JSON per run, written the moment it finishes
(``<task>_<method>_lr<lr>_seed<seed>.json``, :mod:`optlora_experiments.results` format plus
``sample_outputs`` for generation), ``summary.csv`` (every run), ``aggregate.csv`` (per method at
its selected lr: mean +- std over seeds, a paired t-test / Wilcoxon test against LoRA on the
same seeds, and the step / second at which the smoothed training loss reaches LoRA's final one,
:mod:`optlora_experiments.aggregate`) and ``plots/``. ``--resume`` reuses finished runs whose
config matches (a key missing from an older record counts as its default; ``--epochs`` and the
equivalent ``--steps`` are the same run), so an interrupted sweep continues where it stopped; with
``--save-steps`` an unfinished run also resumes from its last Trainer checkpoint. Several processes may
run the same sweep in one ``--out`` (:mod:`~optlora_experiments.runner`: each run is claimed, each
keeps its own checkpoint folder); one that finds nothing it can run exits with status 3.
``--lr-extend`` extends a grid whose best lr is at an edge (:mod:`~optlora_experiments.schedule`);
``--records-dir`` gets a compact copy of every record (:mod:`~optlora_experiments.compact`).

Full GPU run, SmolLM2 on the math mix::

    optlora finetune --task math --methods lora reflora scalora scalora_i --steps 2000 --batch-size 16 \\
        --max-len 512 --lrs 1e-4 2e-4 5e-4 --seeds 0 1 2 --eval-samples 1000 --gen-tokens 256 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import math
import sys
from pathlib import Path

import torch

from . import runner, schedule
from .baselines import FULL_METHODS, METHODS, galore_unavailable
from .data import DataError, TaskData, describe, load_task
from .harness import prepare
from .models import ModelError, default_model, load_tokenizer

DEFAULT_LRS = {"classification": [1e-3], "regression": [1e-3], "generation": [5e-4]}
DEFAULT_FULL_LRS = {"classification": [5e-5], "regression": [5e-5], "generation": [2e-5]}
QUICK = dict(
    task="gsm8k_match", methods=["lora", "reflora", "scalora"], steps=16, batch_size=16, max_len=96, eval_samples=200
)


class UsageError(ValueError):
    """A bad combination of options."""


def default_config(kind: str, task: str | None = None, data: TaskData | None = None) -> dict:
    """Every option of a run and its default for a task of ``kind``."""
    gen = kind == "generation"
    options_only = data is not None and all(r and r[0].get("answer_type") == "option" for r in data.evals.values())
    return {
        "model": None,  # default: packaged MiniLM (classification/regression) or SmolLM2 (generation)
        "data_dir": None,
        "train_sets": None,
        "eval_sets": None,
        "device": "auto",
        "dtype": "float32",
        "steps": 20 if gen else 300,
        "epochs": None,  # sets steps (see epochs_to_steps); the record keeps both
        "batch_size": 8 if gen else 16,
        "grad_accum": 1,
        # covers every training example of the local data: SST-2 / CoLA <= 57 tokens, MRPC <= 103, STS-B <= 88,
        # commonsense prompt + answer <= 220 (SmolLM2), math p99 383 / max 506
        "max_len": (256 if options_only else 512) if gen else (64 if task in ("sst2", "cola") else 128),
        "rank": 8,
        "alpha": None,
        "weight_decay": 0.0,
        "lr_warmup_frac": 0.06,
        "max_grad_norm": 1.0,
        "method_warmup": None,
        "interval_i": 10,
        "kappa": 1.0,
        "holdout_frac": 0.1,
        "holdout_max": 2000,
        "split_seed": 0,
        "train_samples": None,
        "eval_samples": 16 if gen else None,
        "gen_samples": None,
        "eval_batch_size": 8 if gen else 64,
        "gen_tokens": 32 if options_only else 160,
        "telemetry_every": 0 if gen else 50,
        "rank_rtol": 1e-3,
        "group_by_length": False,
        "save_steps": 0,
        "smooth_window": None,
        "threads": None,
        "progress": True,
    }


def run_finetune(
    task: str,
    methods: list[str],
    *,
    out_dir: str | Path,
    seeds=(0,),
    lrs=None,
    full_lrs=None,
    resume: bool = False,
    allow_sample: bool = False,
    plots: bool = True,
    lr_extend: bool = False,
    lr_min: float = schedule.LR_MIN,
    lr_max: float = schedule.LR_MAX,
    records_dir: str | Path | None = None,
    **opts,
) -> list[dict]:
    """Run the sweep (see the module docstring) and return the run records.

    ``opts`` override :func:`default_config` (e.g. ``steps=50, model="tiny"``; ``epochs=N`` sets ``steps``
    to ``ceil(N * train examples / (batch_size * grad_accum))``); ``allow_sample`` lets the data fall back
    to the embedded sample (``optlora demo``); ``plots=False`` skips the figures; ``lr_extend`` extends a
    grid whose best lr is at an edge within ``[lr_min, lr_max]`` (:mod:`~optlora_experiments.schedule`);
    ``records_dir`` receives a compact copy of every record (:mod:`~optlora_experiments.compact`).
    Raises :class:`~optlora_experiments.runner.SweepPending` when other processes sharing ``out_dir``
    hold every remaining run.
    """
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise UsageError(f"give at least one seed, each once (got {seeds})")
    unknown = set(opts) - set(default_config("classification"))
    if unknown:
        raise UsageError(f"unknown option(s) {sorted(unknown)}")
    if opts.get("epochs") is not None and opts.get("steps") is not None:
        raise UsageError("give --steps or --epochs, not both")
    if opts.get("epochs") is not None and not opts["epochs"] > 0:
        raise UsageError(f"--epochs must be > 0, got {opts['epochs']}")
    if not 0 < lr_min <= lr_max:
        raise UsageError(f"need 0 < --lr-min <= --lr-max, got {lr_min} and {lr_max}")
    data = load_task(task, opts.get("data_dir"), train_sets=opts.get("train_sets"), eval_sets=opts.get("eval_sets"),
                     allow_sample=allow_sample)  # fmt: skip
    cfg, defaults = run_config(data.kind, data.name, opts, data)
    lrs, full_lrs = list(lrs or DEFAULT_LRS[data.kind]), list(full_lrs or DEFAULT_FULL_LRS[data.kind])
    if (len(lrs) > 1 or len(full_lrs) > 1) and cfg["holdout_frac"] == 0:
        raise UsageError("an lr grid needs a held-out part of train to choose on: set --holdout-frac > 0")
    if lr_extend and len(set(lrs)) < 2:
        raise UsageError("--lr-extend needs a grid of at least 2 lrs")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    prep = prepare(data, load_tokenizer(cfg["model"], data.kind), cfg)
    if cfg["epochs"] is not None:
        cfg["steps"] = epochs_to_steps(cfg["epochs"], prep.info["train_examples"], cfg["batch_size"], cfg["grad_accum"])
    print(describe(data))
    print(
        f"train on {prep.info['train_examples']} examples, lr selection on {prep.info.get('holdout_examples', 0)} "
        f"held out; {cfg['steps']} steps of {cfg['batch_size'] * cfg['grad_accum']} examples"
    )
    run_methods = []
    for method in methods:
        if method == "galore" and galore_unavailable():
            print(f"skipping galore: {galore_unavailable()}")
        else:
            run_methods.append(method)
    grids = {m: (full_lrs if m in FULL_METHODS else lrs) for m in run_methods}
    # Every run collects garbage several times (memory baseline, the Trainer's clean-up); with the
    # libraries' and the data's long-lived objects frozen out of the collector that takes ms, not ~1 s.
    gc.freeze()
    try:
        return runner.sweep(prep, cfg, defaults, run_methods, seeds, grids, resume=resume, out=Path(out_dir),
                            plots=plots, extend=lr_extend, lr_min=lr_min, lr_max=lr_max,
                            records_dir=records_dir)  # fmt: skip
    finally:
        gc.unfreeze()


def run_config(kind: str, task: str, opts: dict, data: TaskData | None = None) -> tuple[dict, dict]:
    """``(cfg, defaults)`` of a run: :func:`default_config` with ``opts`` (None: the default) over it, the model
    resolved to the task's default. ``--resume`` compares records with ``cfg``, a missing key as its default
    (:func:`optlora_experiments.runner.matches`); ``steps`` is set from ``epochs`` once the data is known."""
    defaults = default_config(kind, task, data)
    cfg = {**defaults, **{k: v for k, v in opts.items() if v is not None}}
    cfg["model"] = cfg["model"] or default_model(kind)
    return cfg, defaults


def epochs_to_steps(epochs: float, examples: int, batch_size: int, grad_accum: int) -> int:
    """Optimizer steps of ``epochs`` passes over ``examples``: ``ceil(epochs * examples / (batch_size * grad_accum))``."""
    return max(1, math.ceil(epochs * examples / (batch_size * grad_accum)))


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``optlora finetune``."""
    from optlora.cliutil import HelpFormatter

    p = subparsers.add_parser(
        "finetune",
        help="fine-tune GLUE / commonsense / math / GSM8K tasks with LoRA baselines and optlora methods",
        description=__doc__.split("\n\n")[0] + " Learning rates are chosen on a part held out from train.",
        formatter_class=HelpFormatter,
    )
    a = p.add_argument
    a("--task", default="sst2", help="GLUE task (sst2, cola, mrpc, stsb, qnli, rte, qqp, mnli, wnli) or GLUE-format "
      "folder; gsm8k; gsm8k_match; commonsense; math; an LLM-Adapters set (boolq, piqa, AQuA, ...) or folder")  # fmt: skip
    a("--methods", nargs="+", choices=METHODS, default=None, help="methods to compare (default: all)")
    a("--quick", action="store_true", help="short preset: " + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    a("--out", default="runs/finetune", help="output folder for JSON/CSV/plots")
    a("--model", default=None, help="local path, hub id, 'minilm', 'smollm2' or 'tiny' (default: MiniLM / SmolLM2)")
    a("--data-dir", default=None, help="folder with the data: a task folder or a parent holding glue/, commonsense/, "
      "math/, gsm8k/ (default: ../shared/data, then the hub unless HF_HUB_OFFLINE)")  # fmt: skip
    a("--train-sets", nargs="+", default=None, help="generation tasks: training sets to mix (e.g. boolq ARC-Easy)")
    a("--eval-sets", nargs="+", default=None, help="generation tasks: sets to evaluate on (e.g. gsm8k SVAMP AQuA)")
    a("--seeds", nargs="+", type=int, default=[0], help="seeds; the lr grid runs on the first")
    a("--lrs", nargs="+", type=float, default=None, help="lr grid for adapter methods (default 1e-3; generation 5e-4)")
    a(
        "--full-lrs",
        nargs="+",
        type=float,
        default=None,
        help="lr grid for full fine-tuning and GaLore (default 5e-5 / 2e-5)",
    )
    a("--holdout-frac", type=float, default=None, help="fraction of train held out for lr selection (default 0.1)")
    a("--holdout-max", type=int, default=None, help="at most this many held-out examples (default 2000)")
    a("--split-seed", type=int, default=None, help="seed of the held-out split and of the subsets (default 0)")
    a("--steps", type=int, default=None, help="optimizer steps per run (default 300; generation 20)")
    a("--epochs", type=float, default=None, help="instead of --steps: passes over the training examples "
      "(steps = ceil(epochs * examples / (batch size * grad accum)))")  # fmt: skip
    a("--batch-size", type=int, default=None, help="training batch size per step (default 16; generation 8)")
    a("--grad-accum", type=int, default=None, help="gradient accumulation steps (default 1)")
    a("--max-len", type=int, default=None, help="max tokens per example (default 64 sst2/cola, else 128; "
      "generation 256 commonsense, 512 math)")  # fmt: skip
    a("--rank", type=int, default=None, help="LoRA rank r (GaLore projection rank too; default 8)")
    a("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    a("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    a("--lr-warmup-frac", type=float, default=None, help="linear lr warm-up fraction (default 0.06)")
    a("--max-grad-norm", type=float, default=None, help="gradient clipping norm, 0 = off (default 1)")
    a("--method-warmup", type=int, default=None, help="plain LoRA steps before optlora (default 10%% of steps)")
    a("--interval-i", type=int, default=None, help="ScaLoRA-I interval (default 10)")
    a("--kappa", type=float, default=None, help="ScaLoRA kappa = 1/(L eta) (default 1.0)")
    a(
        "--train-samples",
        type=int,
        default=None,
        help="train on a random subset of N examples (after the held-out split)",
    )
    a("--eval-samples", type=int, default=None, help="score a random subset of N examples per eval set (default: all; "
      "generation 16 -- greedy decoding on a CPU is slow)")  # fmt: skip
    a("--gen-samples", type=int, default=None, help="generation: decode only the first N of those (default: all)")
    a("--eval-batch-size", type=int, default=None, help="evaluation batch size (default 64; generation 8)")
    a(
        "--gen-tokens",
        type=int,
        default=None,
        help="max new tokens of greedy decoding (default 32 option answers, else 160)",
    )
    a(
        "--telemetry-every",
        type=int,
        default=None,
        help="update-rank telemetry every k steps, 0 = off (default 50; gen 0)",
    )
    a("--rank-rtol", type=float, default=None, help="relative tolerance of the numerical rank (default 1e-3)")
    a(
        "--group-by-length",
        action="store_true",
        default=None,
        help="Trainer's group_by_length (batches of similar length)",
    )
    a(
        "--save-steps",
        type=int,
        default=None,
        help="Trainer checkpoint every N steps (with --resume: resume unfinished runs)",
    )
    a(
        "--smooth-window",
        type=int,
        default=None,
        help="trailing-mean window of the convergence metric (default steps/20)",
    )
    a("--device", choices=["auto", "cpu", "cuda"], default=None, help="auto (default), cpu or cuda")
    a("--dtype", choices=["float32", "bfloat16"], default=None, help="model dtype (default float32)")
    a("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on a busy machine)")
    a("--resume", action="store_true", help="reuse finished runs' JSONs in --out (same config); several processes "
      f"may share one --out (each run is claimed); exit status {runner.EXIT_PENDING} when the runs left are all "
      "held by others")  # fmt: skip
    a("--lr-extend", action="store_true", help="extend a grid whose best lr is at an edge with the next 1-2-5 point")
    a("--lr-min", type=float, default=schedule.LR_MIN, help="--lr-extend goes no lower (default %(default)g)")
    a("--lr-max", type=float, default=schedule.LR_MAX, help="--lr-extend goes no higher (default %(default)g)")
    a("--records-dir", default=None, help="also write a compact copy of every run record here (for the repository)")
    a("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def options(args: argparse.Namespace) -> tuple[str, list[str] | None, dict]:
    """``(task, methods, opts)`` of parsed ``optlora finetune`` arguments, with the ``--quick`` preset applied."""
    opts = {k: getattr(args, k) for k in default_config("classification") if hasattr(args, k)}
    task, methods = args.task, args.methods
    if args.quick:
        task = QUICK["task"]
        methods = methods or QUICK["methods"]
        for k in ("steps", "batch_size", "max_len", "eval_samples"):
            opts[k] = opts.get(k) if opts.get(k) is not None else QUICK[k]
        opts["holdout_frac"] = opts.get("holdout_frac") if opts.get("holdout_frac") is not None else 0.0
    opts["progress"] = not args.no_progress
    return task, methods, opts


def run(args: argparse.Namespace) -> int:
    task, methods, opts = options(args)
    try:
        run_finetune(task, methods or list(METHODS), out_dir=args.out, seeds=args.seeds, lrs=args.lrs,
                     full_lrs=args.full_lrs, resume=args.resume, lr_extend=args.lr_extend, lr_min=args.lr_min,
                     lr_max=args.lr_max, records_dir=args.records_dir, **opts)  # fmt: skip
    except (DataError, ModelError, UsageError) as exc:
        print(f"optlora finetune: error: {exc}", file=sys.stderr)
        return 2
    except runner.SweepPending as exc:
        print(f"optlora finetune: {exc}", flush=True)
        return runner.EXIT_PENDING
    return 0
