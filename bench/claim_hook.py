"""Per-step cost of the global optimizer step pre-hook of ``optlora.methods.claims`` (CPU, one thread).

    python bench/claim_hook.py --model minilm
    python bench/claim_hook.py --model tiny-llama

From the first method built on a model, every ``optimizer.step()`` in the process runs the hook that
refuses a step on the method's LoRA parameters without the method attached. This measures, in one run:

* the hook call alone (``claims._refuse_unattached_step``, min and median of ``--calls`` calls), when no
  method is alive (an empty table), when the method's own attached optimizer steps (the training loop),
  when it steps through accelerate's ``AcceleratedOptimizer``, and when another optimizer (of another
  model: a reward or value model, a second run) steps, which the hook must look at parameter by parameter;
* a whole ``AdamW.step()`` of that other model's LoRA parameters with the hook not registered, registered
  with an empty table, and registered with a method alive, in interleaved rounds (min per state), as a
  ratio to the step without the hook.

Which methods are alive is set per row by editing the hook's table (the hook then sees what it sees once
the other methods were collected); "not registered" removes the hook's handle for the round. Both are put
back at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

import optlora
from optlora.methods import claims
from optlora.testing import models


def _times(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _set_hook(on: bool) -> None:
    if on and not claims._HOOK:
        claims._HOOK.append(register_optimizer_step_pre_hook(claims._refuse_unattached_step))
    elif not on and claims._HOOK:
        claims._HOOK.pop().remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(models.SPECS), default="minilm")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="AdamW steps per state and round")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from accelerate import Accelerator

    spec = models.SPECS[args.model]
    batch = models.make_batch(spec, 4, 32, "cpu")
    model = models.build(spec, rank=args.rank, dtype=torch.float32, device="cpu")
    other = models.build(spec, rank=args.rank, dtype=torch.float32, device="cpu", seed=1)
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-5)
    other_opt = torch.optim.AdamW(models.lora_parameters(other), lr=1e-5)
    method = optlora.ScaLoRA(model, warmup_steps=1).attach(opt)
    third = models.build(spec, rank=args.rank, dtype=torch.float32, device="cpu", seed=2)
    wrapped = Accelerator(cpu=True).prepare_optimizer(torch.optim.AdamW(models.lora_parameters(third), lr=1e-5))
    wrapped_method = optlora.ScaLoRA(third, warmup_steps=1)
    wrapped_method.attach(wrapped)  # attached through accelerate's wrapper; the hook is called with the inner one
    for m in (model, other):
        m(**batch).loss.backward()
    other_opt.step()  # AdamW's state exists
    n_params = len(other_opt.param_groups[0]["params"])
    print(f"{spec.label()}, r={args.rank}, float32, 1 thread; the other optimizer holds {n_params} LoRA tensors")

    hook = claims._refuse_unattached_step
    owners = dict(claims._OWNERS.items())

    def alive(*ms) -> None:  # the hook's table holds exactly these models' methods
        claims._OWNERS.clear()
        claims._OWNERS.update({m: owners[m] for m in ms})

    calls = {  # label: (call, models whose method is alive)
        "no method alive (empty table)": (lambda: hook(other_opt, (), {}), ()),
        "the method's attached optimizer steps": (lambda: hook(opt, (), {}), (model,)),
        "AcceleratedOptimizer (inner) steps": (lambda: hook(wrapped.optimizer, (), {}), (third,)),
        "another model's optimizer steps": (lambda: hook(other_opt, (), {}), (model,)),
        "another model's optimizer, 2 methods alive": (lambda: hook(other_opt, (), {}), (model, third)),
    }
    print("\n| hook call alone | min us | median us |\n|---|---|---|")
    for label, (fn, ms) in calls.items():
        alive(*ms)
        ts = _times(fn, args.calls)
        print(f"| {label} | {1e6 * min(ts):.1f} | {1e6 * statistics.median(ts):.1f} |", flush=True)

    states = {"hook not registered": (False, ()), "registered, empty table": (True, ())}
    states["registered, a method alive"] = (True, (model,))
    best = {s: float("inf") for s in states}
    for _ in range(args.rounds):
        for label, (registered, ms) in states.items():
            _set_hook(registered)
            alive(*ms)
            best[label] = min(best[label], min(_times(other_opt.step, args.steps)))
    _set_hook(True)
    alive(*owners)
    base = best["hook not registered"]
    print("\n| AdamW.step of the other model's LoRA parameters | min ms | ratio |\n|---|---|---|")
    for label, t in best.items():
        print(f"| {label} | {1e3 * t:.3f} | {t / base:.3f} |")
    assert method.optimizer is opt and wrapped_method.optimizer is wrapped.optimizer
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
