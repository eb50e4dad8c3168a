"""``optlora finetune``: real fine-tunes with baselines (SST-2 / all-MiniLM-L6-v2, GSM8K / SmolLM2-135M).

Every method gets the same model, LoRA rank, steps, batches (same seed -> same data order),
AdamW, linear warm-up/decay schedule and gradient clipping; only the learning rate is tuned
per method. With several ``--lrs`` the first seed runs the whole grid, the best lr per method
is picked (SST-2: dev accuracy, GSM8K: test loss on answers -- selection and report use the
same split, as in the papers' GLUE tables) and the remaining seeds run at that lr. Results:
one JSON per run (:mod:`optlora.experiments.results` format) and ``summary.csv`` /
``aggregate.csv`` (mean +- std over seeds at the selected lr) under ``--out``.

Measured per run: train loss per step, wall time per step (``ms_per_step``: mean over steps
2.., telemetry and evaluation excluded; ``cpu_ms_per_step``: process CPU time per step, less
sensitive to a shared machine), memory (CUDA: ``torch.cuda.max_memory_allocated``;
CPU: the process's peak resident set size sampled with psutil after every step, and
``memory_delta_mb`` = that peak minus the RSS right before training starts, after the model
and optimizer are built), and for LoRA-family methods the numerical rank of the accumulated
update and ScaLoRA's column-scaling fraction (:mod:`optlora.experiments.telemetry`).

Full GPU run (SmolLM2 on GSM8K, about 1 epoch)::

    optlora finetune --task gsm8k --methods lora reflora scalora scalora_i --steps 900 --batch-size 8 \\
        --max-len 384 --lrs 1e-4 2e-4 5e-4 --seeds 0 1 2 --eval-samples 1319 --gen-tokens 256 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from . import data as D
from . import results
from .baselines import LORA_FAMILY, METHODS, build, galore_unavailable
from .models import default_model, load_causal_lm, load_classifier
from .telemetry import UpdateRankTracker, column_fraction, rss_mb, trim_memory

TASKS = {"sst2": "SEQ_CLS", "gsm8k": "CAUSAL_LM"}
DEFAULTS = {
    "sst2": dict(steps=300, batch_size=16, max_len=64, lrs=[1e-3], full_lrs=[5e-5], eval_samples=872),
    "gsm8k": dict(steps=20, batch_size=8, max_len=128, lrs=[5e-4], full_lrs=[2e-5], eval_samples=16),
}
QUICK = dict(
    task="sst2", methods=["lora", "reflora", "scalora"], steps=150, batch_size=16, max_len=64, eval_samples=872
)


_NOT_COMPARED = ("progress", "threads", "data_dir")  # options that do not change a run's result


def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def _load(task: str, model_name: str, dtype: torch.dtype):
    return load_classifier(model_name, 2, dtype) if task == "sst2" else load_causal_lm(model_name, dtype)


def prepare_data(task: str, tokenizer, cfg: dict) -> dict:
    """Encoded train tensors and the raw/encoded evaluation set of ``task``."""
    if task == "sst2":
        s, y = D.load_sst2("train", cfg["data_dir"], cfg.get("train_samples"))
        ds, dy = D.load_sst2("dev", cfg["data_dir"], cfg["eval_samples"])
        return {
            "train": D.encode_sst2(tokenizer, s, y, cfg["max_len"]),
            "eval": D.encode_sst2(tokenizer, ds, dy, cfg["max_len"]),
        }
    train = D.load_gsm8k("train", cfg["data_dir"], cfg.get("train_samples"))
    test = D.load_gsm8k("test", cfg["data_dir"], max(cfg["eval_samples"], cfg["eval_loss_samples"]))
    return {
        "train": D.encode_gsm8k(tokenizer, train, cfg["max_len"]),
        "eval": D.encode_gsm8k(tokenizer, test[: cfg["eval_loss_samples"]], cfg["max_len"]),
        "eval_examples": test[: cfg["eval_samples"]],
    }


def train_one(task: str, method: str, lr: float, seed: int, cfg: dict, tokenizer, tensors: dict) -> dict:
    """Train one (method, lr, seed) and return its per-run record."""
    from transformers import get_linear_schedule_with_warmup

    device, steps = _device(cfg["device"]), cfg["steps"]
    dtype = getattr(torch, cfg["dtype"])
    torch.manual_seed(seed)
    model, _ = _load(task, cfg["model"], dtype)
    warm = cfg["method_warmup"] if cfg["method_warmup"] is not None else max(1, round(0.1 * steps))
    setup = build(
        method,
        model,
        task_type=TASKS[task],
        lr=lr,
        rank=cfg["rank"],
        alpha=cfg["alpha"],
        weight_decay=cfg["weight_decay"],
        warmup_steps=warm,
        interval_i=cfg["interval_i"],
        kappa=cfg["kappa"],
    )
    model = setup.model.to(device)
    note = setup.method.never_applied_note(planned_steps=steps) if setup.method is not None else None
    if note:  # e.g. --steps 50 --method-warmup 100: the run would be plain LoRA
        warnings.warn(note, UserWarning, stacklevel=2)
    sched = get_linear_schedule_with_warmup(setup.optimizer, round(cfg["lr_warmup_frac"] * steps), steps)
    tracker = None
    if cfg["telemetry_every"] > 0 and method in LORA_FAMILY:
        tracker = UpdateRankTracker(model, rtol=cfg["rank_rtol"])
    train = tensors["train"]
    n = train["labels"].shape[0]
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    pos = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    trim_memory()
    rss0 = peak = rss_mb()
    log, step_times, t_start, cpu0 = [], [], time.perf_counter(), time.process_time()
    model.train()
    from tqdm.auto import tqdm

    bar = tqdm(range(1, steps + 1), desc=f"{task} {method} lr={lr:g} seed={seed}", disable=not cfg["progress"])
    for step in bar:
        if pos + cfg["batch_size"] > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + cfg["batch_size"]]
        pos += cfg["batch_size"]
        batch = D.trim_padding({k: v[idx] for k, v in train.items()}, device)
        t0 = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        if cfg["max_grad_norm"] > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg["max_grad_norm"])
        setup.optimizer.step()
        sched.step()
        setup.optimizer.zero_grad(set_to_none=True)
        loss_v = float(loss.detach())  # synchronises
        step_times.append(time.perf_counter() - t0)
        peak = max(peak, rss_mb())
        entry = {"step": step, "loss": loss_v, "wall_time": time.perf_counter() - t_start, "lr": sched.get_last_lr()[0]}
        cf = column_fraction(setup.method)
        if cf is not None:
            entry["column_fraction"] = cf
        if tracker is not None and (step % cfg["telemetry_every"] == 0 or step == steps):
            entry.update(tracker.summary())
        log.append(entry)
        if not math.isfinite(loss_v):
            bar.write(f"{method} lr={lr:g}: loss is {loss_v} at step {step}; stopping this run")
            break
        bar.set_postfix(loss=f"{loss_v:.4f}", ex_s=f"{cfg['batch_size'] / step_times[-1]:.1f}")
    bar.close()
    timed = step_times[1:] or step_times
    final = {
        "ms_per_step": 1000 * statistics.mean(timed),
        "cpu_ms_per_step": 1000 * (time.process_time() - cpu0) / len(step_times),  # incl. telemetry
        "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak,
        "memory_delta_mb": None if device.type == "cuda" else peak - rss0,
        "trainable_params": setup.trainable_params,
        "train_loss_last10": statistics.mean(e["loss"] for e in log[-10:]),
    }
    t_eval = time.perf_counter()
    if task == "sst2":
        final.update(D.evaluate_sst2(model, tensors["eval"], device, cfg["eval_batch_size"]))
    else:
        final.update(
            D.evaluate_gsm8k(
                model,
                tokenizer,
                tensors["eval"],
                tensors["eval_examples"],
                device,
                cfg["eval_batch_size"],
                cfg["gen_tokens"],
            )
        )
    final["eval_seconds"] = time.perf_counter() - t_eval
    run_cfg = {**{k: v for k, v in cfg.items() if k not in ("progress",)}, "task": task, "lr": lr}
    run_cfg.update(method_info=setup.info, method_warmup_steps=warm if setup.method is not None else None)
    record = results.make_run(method, seed, run_cfg, log, final, results.environment(str(device)))
    if tracker is not None:
        record["telemetry"] = {"rank_rtol": tracker.rtol, "final_ranks": tracker.ranks()}
    if setup.method is not None:
        record["optlora_stats"] = results.to_jsonable(setup.method.stats())
    del model, setup
    gc.collect()
    return record


def _score(task: str, record: dict) -> float:
    """Higher is better: dev accuracy (SST-2) or minus the test answer loss (GSM8K); NaN runs lose."""
    v = record["final"].get("accuracy") if task == "sst2" else -record["final"].get("eval_loss", math.inf)
    return v if v is not None and math.isfinite(v) else -math.inf


def aggregate(task: str, records: list[dict]) -> list[dict]:
    """mean +- std over seeds per (method, lr) of every final metric."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["method"], r["config"]["lr"]), []).append(r)
    rows = []
    for (method, lr), rs in groups.items():
        row = {"task": task, "method": method, "lr": lr, "seeds": len(rs)}
        for key in ("accuracy", "eval_loss", "exact_match", "ms_per_step", "cpu_ms_per_step", "peak_memory_mb"):
            vals = [r["final"][key] for r in rs if r["final"].get(key) is not None]
            if vals:
                row[f"{key}_mean"] = statistics.mean(vals)
                row[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return rows


def run_finetune(
    task: str, methods: list[str], *, out_dir: str | Path, seeds=(0,), lrs=None, full_lrs=None, resume=False, **opts
):
    """Run every method (lr grid on the first seed, then the other seeds at the best lr); returns the records.

    ``opts`` override the defaults of :func:`default_config` (e.g. ``steps=50, model="tiny"``).
    Writes ``<task>_<method>_lr<lr>_seed<seed>.json``, ``summary.csv`` and ``aggregate.csv`` to ``out_dir``.
    ``resume=True`` reuses a run's JSON already in ``out_dir`` when its config matches.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    cfg = default_config(task)
    unknown = set(opts) - set(cfg)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}")
    cfg.update({k: v for k, v in opts.items() if v is not None})
    if cfg["model"] is None:
        cfg["model"] = default_model(task)
    lrs = list(lrs or DEFAULTS[task]["lrs"])
    full_lrs = list(full_lrs or DEFAULTS[task]["full_lrs"])
    seeds = list(seeds)
    if not seeds:
        raise ValueError("give at least one seed")
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _, tokenizer = _load(task, cfg["model"], torch.float32)
    tensors = prepare_data(task, tokenizer, cfg)
    records: list[dict] = []

    def path(rec):
        return out / f"{task}_{rec['method']}_lr{rec['config']['lr']:g}_seed{rec['seed']}.json"

    def one(method, lr, seed):
        done = path({"method": method, "config": {"lr": lr}, "seed": seed})
        if resume and done.is_file():
            rec = results.read_json(done)
            if all(rec["config"].get(k) == v for k, v in cfg.items() if k not in _NOT_COMPARED):
                print(f"reusing {done}")
                records.append(rec)
                return rec
        rec = train_one(task, method, lr, seed, cfg, tokenizer, tensors)
        results.write_run(path(rec), rec)  # written at once: an interrupted sweep keeps its finished runs
        records.append(rec)
        return rec

    for method in methods:
        if method == "galore" and galore_unavailable():
            print(f"skipping galore: {galore_unavailable()}")
            continue
        grid = full_lrs if method in ("full", "galore") else lrs
        tried = [one(method, lr, seeds[0]) for lr in grid]
        best = select_lrs(task, tried)[method]
        for seed in seeds[1:]:
            one(method, best, seed)
        for r in records:
            if r["method"] == method:
                r["config"]["selected_lr"] = best
                results.write_run(path(r), r)
    summarize(task, records, out)
    return records


def select_lrs(task: str, records: list[dict]) -> dict[str, float]:
    """Best lr per method, judged on the grid seed (each method's smallest seed)."""
    best: dict[str, float] = {}
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        seed0 = min(r["seed"] for r in rs)
        best[method] = max((r for r in rs if r["seed"] == seed0), key=lambda r: _score(task, r))["config"]["lr"]
    return best


def summarize(task: str, records: list[dict], out_dir: str | Path) -> list[dict]:
    """``summary.csv`` (every run), ``aggregate.csv`` (selected lr, mean +- std), plots; returns the rows."""
    out = Path(out_dir)
    results.write_summary_csv(out / "summary.csv", records)
    best = select_lrs(task, records)
    chosen = [r for r in records if r["config"]["lr"] == best[r["method"]]]
    rows = aggregate(task, chosen)
    results.write_csv(out / "aggregate.csv", rows)
    print(format_table(task, rows))
    try:
        from .plots import plot_runs

        plot_runs(chosen, out / "plots")
    except ImportError as exc:  # matplotlib is an optional extra
        print(f"no plots: {exc}")
    return rows


def format_table(task: str, rows: list[dict]) -> str:
    """Markdown table of :func:`aggregate` rows."""
    metric = ["accuracy"] if task == "sst2" else ["eval_loss", "exact_match"]
    head = ["method", "lr", "seeds", *metric, "ms/step", "CPU ms/step", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["method"], f"{r['lr']:g}", str(r["seeds"])]
        cells += [f"{r.get(m + '_mean', math.nan):.4f} +- {r.get(m + '_std', math.nan):.4f}" for m in metric]
        cells += [f"{r.get(k + '_mean', math.nan):.0f}" for k in ("ms_per_step", "cpu_ms_per_step", "peak_memory_mb")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def default_config(task: str) -> dict:
    d = DEFAULTS[task]
    return {
        "model": None,
        "data_dir": None,
        "device": "auto",
        "dtype": "float32",
        "steps": d["steps"],
        "batch_size": d["batch_size"],
        "max_len": d["max_len"],
        "rank": 8,
        "alpha": None,
        "weight_decay": 0.0,
        "lr_warmup_frac": 0.06,
        "max_grad_norm": 1.0,
        "method_warmup": None,
        "interval_i": 10,
        "kappa": 1.0,
        "train_samples": None,
        "eval_samples": d["eval_samples"],
        "eval_loss_samples": 64,
        "eval_batch_size": 64 if task == "sst2" else 8,
        "gen_tokens": 160,
        "telemetry_every": 50 if task == "sst2" else 0,
        "rank_rtol": 1e-3,
        "threads": None,
        "progress": True,
    }


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``optlora finetune``."""
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune SST-2 (MiniLM) or GSM8K (SmolLM2-135M) with LoRA baselines and optlora methods",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--task", choices=list(TASKS), default="sst2", help="sst2 (classification) or gsm8k (causal LM)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="methods to compare (default: all)")
    p.add_argument("--quick", action="store_true", help="demo preset: short SST-2 run, LoRA vs RefLoRA vs ScaLoRA")
    p.add_argument("--out", default="runs/finetune", help="output folder for JSON/CSV (default runs/finetune)")
    p.add_argument("--model", default=None, help="local path, hub id or 'tiny' (default: packaged MiniLM / SmolLM2)")
    p.add_argument("--data-dir", default=None, help="folder holding glue/ and gsm8k/ (default ../shared/data)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], help="seeds; the lr grid runs on the first")
    p.add_argument("--lrs", nargs="+", type=float, default=None, help="lr grid for adapter methods")
    p.add_argument("--full-lrs", nargs="+", type=float, default=None, help="lr grid for full fine-tuning and GaLore")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run")
    p.add_argument("--batch-size", type=int, default=None, help="training batch size")
    p.add_argument("--max-len", type=int, default=None, help="max tokens per example")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank r (GaLore projection rank too; default 8)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    p.add_argument("--lr-warmup-frac", type=float, default=None, help="linear lr warm-up fraction (default 0.06)")
    p.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping norm, 0 = off (default 1)")
    p.add_argument("--method-warmup", type=int, default=None, help="plain LoRA steps before optlora (default 10%%)")
    p.add_argument("--interval-i", type=int, default=None, help="ScaLoRA-I interval (default 10)")
    p.add_argument("--kappa", type=float, default=None, help="ScaLoRA kappa = 1/(L eta) (default 1.0)")
    p.add_argument("--train-samples", type=int, default=None, help="use only the first N training examples")
    p.add_argument("--eval-samples", type=int, default=None, help="dev examples (SST-2) / generated answers (GSM8K)")
    p.add_argument("--eval-loss-samples", type=int, default=None, help="GSM8K test examples for the answer loss")
    p.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch size")
    p.add_argument("--gen-tokens", type=int, default=None, help="GSM8K: max new tokens for greedy decoding")
    p.add_argument("--telemetry-every", type=int, default=None, help="update-rank telemetry every k steps, 0 = off")
    p.add_argument("--rank-rtol", type=float, default=None, help="relative tolerance of the numerical rank")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="model dtype (default float32)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; 1 on a busy box)")
    p.add_argument("--resume", action="store_true", help="reuse finished runs' JSONs in --out (same config)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    opts = {k: getattr(args, k) for k in default_config(args.task) if hasattr(args, k)}
    task, methods = args.task, args.methods
    if args.quick:
        task = QUICK["task"]
        methods = methods or QUICK["methods"]
        for k in ("steps", "batch_size", "max_len", "eval_samples"):
            opts[k] = opts.get(k) if opts.get(k) is not None else QUICK[k]
    methods = methods or list(METHODS)
    opts["progress"] = not args.no_progress
    run_finetune(
        task,
        methods,
        out_dir=args.out,
        seeds=args.seeds,
        lrs=args.lrs,
        full_lrs=args.full_lrs,
        resume=args.resume,
        **opts,
    )
    return 0
