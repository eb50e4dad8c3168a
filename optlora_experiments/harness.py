"""One fine-tuning run through ``transformers.Trainer`` with the ``optlora.hf`` integration.

:func:`prepare` turns a :class:`~optlora_experiments.data.TaskData` into ``datasets.Dataset``\\ s
once per sweep: a deterministic held-out part of train (for learning-rate selection), the rest
for training (optionally a random subset), and the evaluation sets (optionally subsampled).
Subsets are ``sorted(random.Random(split_seed).sample(...))``: the same rows in file order for
a given file, whoever loads it.

:func:`train_one` builds the method (:func:`~optlora_experiments.baselines.build`), runs
``Trainer.train`` (AdamW, linear warm-up/decay, clipping, batching with dynamic padding, seeded
data order, logging, optional checkpoints: all the Trainer's own), the recording callbacks of
:mod:`~optlora_experiments.callbacks`, then scores every evaluation set: ``Trainer.evaluate``
with scikit-learn/scipy ``compute_metrics`` for classification / regression; for generation the
answer-token loss (``Trainer.evaluate``) and greedy decoding + answer extraction
(:mod:`~optlora_experiments.metrics`). It returns one run record (:mod:`~optlora_experiments.results`).
"""

from __future__ import annotations

import math
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import metrics as M
from . import results
from .baselines import LORA_FAMILY, build
from .callbacks import Heartbeat, QuietProgress, StepRecorder, TelemetryCallback
from .data import DataError, TaskData
from .data.encode import collator, encode_causal, encode_classification
from .models import load_causal_lm, load_classifier
from .telemetry import UpdateRankTracker


@dataclass
class EvalSet:
    """Rows of one evaluation set (after subsampling), their encoding, and the size before subsampling."""

    rows: list[dict]
    dataset: object
    total: int


@dataclass
class Prepared:
    """A task encoded once for a whole sweep."""

    task: TaskData
    tokenizer: object
    train: object  # datasets.Dataset
    evals: dict[str, EvalSet]
    holdout: EvalSet | None
    info: dict = field(default_factory=dict)


def subset(n: int, k: int | None, seed: int) -> list[int]:
    """``k`` of ``range(n)`` drawn with ``random.Random(seed)``, in increasing order (all if ``k`` is None or >= n)."""
    if k is None or k >= n:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(n), k))


def split_train(n: int, holdout_frac: float, holdout_max: int | None, train_samples: int | None, seed: int):
    """``(train, holdout)`` index lists: a deterministic held-out part, the rest (or a random ``train_samples`` of it)."""
    if not 0 <= holdout_frac < 1:
        raise ValueError(f"holdout_frac must be in [0, 1), got {holdout_frac}")
    perm = random.Random(seed).sample(range(n), n)
    k = 0 if holdout_frac == 0 else max(1, round(holdout_frac * n))
    if holdout_max is not None:
        k = min(k, holdout_max)
    rest = perm[k:] if train_samples is None else perm[k:][:train_samples]
    return sorted(rest), sorted(perm[:k])


def load_model(task: TaskData, name: str, dtype: torch.dtype):
    """``(model, tokenizer)`` for ``task``; transformers' load report (a new head is expected) is not printed."""
    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        if task.kind == "generation":
            return load_causal_lm(name, dtype)
        return load_classifier(name, task.num_labels, dtype)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def _encode(task: TaskData, tokenizer, rows: list[dict], max_len: int):
    if task.kind == "generation":
        return encode_causal(tokenizer, rows, max_len)
    return encode_classification(tokenizer, rows, max_len, regression=task.kind == "regression"), 0


def prepare(task: TaskData, tokenizer, cfg: dict) -> Prepared:
    """Split, subsample and encode ``task`` for the options in ``cfg`` (see :func:`default_config`)."""
    seed = cfg["split_seed"]
    tr_idx, ho_idx = split_train(len(task.train), cfg["holdout_frac"], cfg["holdout_max"], cfg["train_samples"], seed)
    if not tr_idx:
        raise DataError("no training examples left after the held-out split; lower --holdout-frac")
    train, dropped = _encode(task, tokenizer, [task.train[i] for i in tr_idx], cfg["max_len"])
    if len(train) == 0:
        raise DataError(f"every training prompt is longer than --max-len {cfg['max_len']} tokens; raise --max-len")
    info = {"train_examples": len(train), "train_dropped_too_long": dropped, "train_total": len(task.train)}
    holdout = None
    if ho_idx:
        rows = [task.train[i] for i in ho_idx]
        holdout = EvalSet(rows, _encode(task, tokenizer, rows, cfg["max_len"])[0], len(rows))
        info["holdout_examples"] = len(rows)
    evals = {}
    for name, rows in task.evals.items():
        keep = [rows[i] for i in subset(len(rows), cfg["eval_samples"], seed)]
        evals[name] = EvalSet(keep, _encode(task, tokenizer, keep, cfg["max_len"])[0], len(rows))
    return Prepared(task, tokenizer, train, evals, holdout, info)


# ---------------------------------------------------------------------------------------- generation
@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batches), decoded without special tokens."""
    device = next(model.parameters()).device
    side, out = tokenizer.padding_side, []
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was = model.training
    model.eval()
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            seqs = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, temperature=None, top_p=None,
                top_k=None,
            )  # fmt: skip
            out += tokenizer.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        model.train(was)
    return out


def evaluate_set(trainer, prep: Prepared, name: str, ev: EvalSet, cfg: dict, generate_answers: bool, samples=None):
    """Metrics of one evaluation set, keys prefixed with ``name_``; the first generated answers go into ``samples``."""
    out = {f"{name}_examples": len(ev.rows), f"{name}_total": ev.total}
    if len(ev.dataset):
        m = trainer.evaluate(eval_dataset=ev.dataset, metric_key_prefix=name)
        keep = ("loss", *prep.task.metrics) if prep.task.kind != "generation" else ("loss",)
        out.update({f"{name}_{k}": m[f"{name}_{k}"] for k in keep if f"{name}_{k}" in m})
    if prep.task.kind == "classification":
        out[f"{name}_majority"] = M.majority_baseline([r["label"] for r in ev.rows])
    if prep.task.kind == "generation" and generate_answers:
        rows = ev.rows[: cfg["gen_samples"]] if cfg["gen_samples"] is not None else ev.rows
        texts = generate(
            trainer.model, prep.tokenizer, [r["prompt"] for r in rows], cfg["eval_batch_size"], cfg["gen_tokens"]
        )
        out[f"{name}_accuracy"] = M.generation_accuracy(rows, texts)
        out[f"{name}_gen_examples"] = len(rows)
        if samples is not None:
            samples[name] = [
                {"prompt": r["prompt"][-200:], "output": t, "answer": r["answer"]} for r, t in zip(rows, texts[:3])
            ]
    return out


def summarize_evals(task: TaskData, per_set: dict) -> dict:
    """Unprefixed headline metrics: the only set's metrics, or the mean over sets; ``score`` = primary metric."""
    names = list(task.evals)
    primary = task.metrics[0]
    out = {}
    for key in (*task.metrics, "loss"):
        vals = [per_set.get(f"{n}_{key}") for n in names]
        vals = [v for v in vals if isinstance(v, (int, float))]
        if vals:
            out["eval_loss" if key == "loss" else key] = statistics.mean(vals)
    out["score"] = out.get(primary)
    if len(names) == 1 and f"{names[0]}_majority" in per_set:
        out["majority_baseline"] = per_set[f"{names[0]}_majority"]
    return out


# ---------------------------------------------------------------------------------------- one run
def _device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def training_args(cfg: dict, lr: float, seed: int, output_dir: Path, extra: dict):
    from transformers import TrainingArguments

    device = _device(cfg["device"])
    save = cfg["save_steps"] and cfg["save_steps"] > 0
    extra = {"optim": "adamw_torch", **extra}  # GaLore brings its own
    return TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg["steps"],
        per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["eval_batch_size"],
        gradient_accumulation_steps=cfg["grad_accum"],
        learning_rate=lr,
        lr_scheduler_type="linear",
        warmup_steps=cfg["lr_warmup_frac"],  # a float < 1 is a fraction of max_steps
        weight_decay=cfg["weight_decay"],
        max_grad_norm=cfg["max_grad_norm"],
        logging_steps=1,
        logging_nan_inf_filter=False,
        save_strategy="steps" if save else "no",
        save_steps=cfg["save_steps"] if save else 500,
        save_total_limit=1,
        seed=seed,
        data_seed=seed,
        train_sampling_strategy="group_by_length" if cfg["group_by_length"] else "random",
        label_names=["labels"],
        remove_unused_columns=False,
        report_to=[],
        disable_tqdm=not cfg["progress"],
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        **extra,
    )


def train_one(prep: Prepared, method: str, lr: float, seed: int, cfg: dict, *, score_holdout: bool, run_dir: Path):
    """Train ``method`` at ``lr`` with ``seed`` and return its run record (see the module docstring)."""
    from transformers import Trainer, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from transformers.trainer_utils import get_last_checkpoint

    import optlora.hf

    task, device, steps = prep.task, _device(cfg["device"]), cfg["steps"]
    set_seed(seed)
    model, _ = load_model(task, cfg["model"], getattr(torch, cfg["dtype"]))
    warm = cfg["method_warmup"] if cfg["method_warmup"] is not None else max(1, round(0.1 * steps))
    # on_nonfinite="skip": a diverging run (NaN loss) ends as diverged for every method alike (StepRecorder),
    # instead of the optlora method raising and ending the sweep; its skips are counted in optlora_stats
    setup = build(method, model, task_type=task.task_type, lr=lr, rank=cfg["rank"], alpha=cfg["alpha"],
                  weight_decay=cfg["weight_decay"], warmup_steps=warm, interval_i=cfg["interval_i"], kappa=cfg["kappa"],
                  on_nonfinite="skip")  # fmt: skip
    recorder = StepRecorder(device)
    tracker = None
    if cfg["telemetry_every"] > 0 and method in LORA_FAMILY:
        tracker = UpdateRankTracker(setup.model, rtol=cfg["rank_rtol"])
    callbacks = [recorder, TelemetryCallback(recorder, setup.method, tracker, cfg["telemetry_every"])]
    if setup.method is not None:
        callbacks.append(optlora.hf.callback(setup.method))
    trainer = Trainer(
        model=setup.model,
        args=training_args(cfg, lr, seed, run_dir, setup.training_args),
        train_dataset=prep.train,
        data_collator=collator(prep.tokenizer, task.kind),
        compute_metrics=None if task.kind == "generation" else M.compute_metrics_fn(task.kind, task.metrics),
        callbacks=callbacks,
        optimizers=(setup.optimizer, None),
    )
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
    trainer.add_callback(QuietProgress if cfg["progress"] else Heartbeat())
    resume = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() and cfg["save_steps"] else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_s = time.perf_counter() - t0
    log = [s for s in recorder.steps if "loss" in s]
    final = recorder.summary()
    final.update(
        trainable_params=setup.trainable_params,
        train_loss_last10=statistics.mean(s["loss"] for s in log[-10:]) if log else None,
        train_seconds=train_s,
        resumed_from_step=int(resume.rsplit("-", 1)[1]) if resume else None,
    )
    t_eval = time.perf_counter()
    diverged = final["diverged_at_step"] is not None
    if prep.holdout is not None and score_holdout and not diverged:
        h = evaluate_set(trainer, prep, "holdout", prep.holdout, cfg, generate_answers=False)
        final.update(h)
        sel = -h.get("holdout_loss", math.inf) if task.kind == "generation" else h.get(f"holdout_{task.metrics[0]}")
        final["selection_score"] = sel
    per_set, samples = {}, {}
    if not diverged:
        for name, ev in prep.evals.items():
            per_set.update(evaluate_set(trainer, prep, name, ev, cfg, generate_answers=True, samples=samples))
    final.update(per_set)
    final.update(summarize_evals(task, per_set) if per_set else {"score": None})
    final["eval_seconds"] = time.perf_counter() - t_eval
    run_cfg = {**{k: v for k, v in cfg.items() if k != "progress"}, "task": task.name, "lr": lr}
    run_cfg.update(kind=task.kind, primary_metric=task.metrics[0], method_info=setup.info, method_warmup_steps=warm if setup.method else None,
                   data_sources=task.sources, data=prep.info)  # fmt: skip
    record = results.make_run(method, seed, run_cfg, log, final, results.environment(str(device)))
    if tracker is not None:
        record["telemetry"] = {"rank_rtol": tracker.rtol, "final_ranks": tracker.ranks()}
    if setup.method is not None:
        record["optlora_stats"] = results.to_jsonable(setup.method.stats())
    if samples:
        record["sample_outputs"] = samples
    del trainer, model, setup  # the Trainer's own clean-up has collected garbage at the end of train()
    return record  # run_dir (checkpoints) is deleted by the caller once the record is written
