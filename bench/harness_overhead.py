"""Step time of the Trainer harness vs the hand-written loop it replaced, side by side on one model.

    python bench/harness_overhead.py --steps 40 --threads 1             # MiniLM, SST-2 (or the GSM8K sample)

Both train the same PEFT LoRA model (all-MiniLM-L6-v2, r = 8 on every linear layer) with AdamW,
a linear schedule and clipping, on the same training sentences and batch size:

* **old loop** -- the loop ``optlora finetune`` had before it moved to ``transformers.Trainer``:
  pre-tokenised tensors padded to ``--max-len``, each batch trimmed to its longest row, forward,
  backward, clip, step, schedule, zero_grad, ``float(loss)``; timed per step around exactly that;
* **Trainer harness** -- :func:`optlora_experiments.harness.train_one` (``datasets.Dataset``,
  ``DataCollatorWithPadding``, ``logging_steps=1``, the recording callbacks); its ``ms_per_step``
  is timed from ``on_step_begin`` to ``on_step_end`` (collation is outside, as in the old loop),
  and ``train_seconds / steps`` is reported too (everything, incl. data loading and logging).

The two alternate (old, Trainer, old, Trainer ...) for ``--repeats`` rounds so that load from
other processes hits both alike; the mean over steps 2.. of each run, then the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from optlora_experiments import harness
from optlora_experiments.baselines import build
from optlora_experiments.data import DataError, load_task
from optlora_experiments.finetune import default_config
from optlora_experiments.models import default_model, load_classifier


def old_loop(rows, model_name, steps, batch_size, max_len, lr, seed) -> tuple[list[float], list[float]]:
    """The pre-Trainer loop of ``optlora finetune``: (wall ms, process-CPU ms) per step."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    model, tok = load_classifier(model_name, 2)
    setup = build("lora", model, task_type="SEQ_CLS", lr=lr)
    opt = setup.loop_optimizer(lr)
    enc = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    data = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    data["labels"] = torch.tensor([r["label"] for r in rows])
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * steps), steps)
    gen = torch.Generator().manual_seed(seed)
    order, pos, times, cpu = torch.randperm(len(rows), generator=gen), 0, [], []
    model = setup.model.train()
    for _ in range(steps):
        if pos + batch_size > len(rows):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        batch = {k: v[idx] for k, v in data.items()}
        width = max(int(batch["attention_mask"].sum(1).max()), 1)
        batch = {k: (v[:, :width] if v.dim() == 2 else v) for k, v in batch.items()}
        t0, c0 = time.perf_counter(), time.process_time()
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss.detach())
        times.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    return times, cpu


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--task", default="sst2", help="classification task (falls back to gsm8k_match on the embedded sample)"
    )
    p.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences per step (default 16)")
    p.add_argument("--max-len", type=int, default=64, help="max tokens per sentence (default 64)")
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        task = load_task(args.task)
    except DataError as exc:
        print(f"{args.task}: {exc}; using the embedded GSM8K sample (gsm8k_match) instead")
        task = load_task("gsm8k_match", allow_sample=True)
    model = args.model or default_model("classification")
    n = args.steps * args.batch_size
    cfg = default_config("classification", task.name)
    cfg.update(model=model, steps=args.steps, batch_size=args.batch_size, max_len=args.max_len, holdout_frac=0.0,
               train_samples=n, eval_samples=16, telemetry_every=0, progress=False)  # fmt: skip
    prep = harness.prepare(task, harness.load_model(task, model, torch.float32)[1], cfg)
    rows = [task.train[i] for i in harness.split_train(len(task.train), 0.0, None, n, cfg["split_seed"])[0]]
    old, new, new_total, old_cpu, new_cpu = [], [], [], [], []
    for _ in range(args.repeats):
        wall, cpu = old_loop(rows, model, args.steps, args.batch_size, args.max_len, 1e-3, 0)
        old.append(statistics.mean(wall[1:]))
        old_cpu.append(statistics.mean(cpu[1:]))
        with tempfile.TemporaryDirectory() as tmp:
            rec = harness.train_one(prep, "lora", 1e-3, 0, cfg, score_holdout=False, run_dir=Path(tmp) / "run")
        new.append(rec["final"]["ms_per_step"])
        new_cpu.append(rec["final"]["cpu_ms_per_step"])
        new_total.append(1000 * rec["final"]["train_seconds"] / args.steps)
        print(
            f"round: old {old[-1]:.0f} ms/step ({old_cpu[-1]:.0f} CPU), Trainer {new[-1]:.0f} ms/step "
            f"({new_cpu[-1]:.0f} CPU; {new_total[-1]:.0f} wall incl. everything)"
        )
    o, t, tt = statistics.median(old), statistics.median(new), statistics.median(new_total)
    oc, tc = statistics.median(old_cpu), statistics.median(new_cpu)
    print(
        f"{task.name}, batch {args.batch_size} x <= {args.max_len} tokens, {args.threads} thread(s), {args.steps} steps:"
    )
    print(f"  old loop {o:.0f} ms/step | Trainer harness {t:.0f} ms/step (ratio {t / o:.2f}); "
          f"Trainer incl. data/logging/callbacks {tt:.0f} ms/step (ratio {tt / o:.2f})")  # fmt: skip
    print(f"  process CPU: old loop {oc:.0f} ms/step | Trainer harness {tc:.0f} ms/step (ratio {tc / oc:.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
