"""Host CPU time of the fault checks (docs/RELIABILITY.md), side by side in one run, CPU, one thread.

    python bench/guard_overhead.py --model minilm
    python bench/guard_overhead.py --model tiny-llama --rank 16

Rows, each the min and median over ``--repeats`` calls on the same gradients:

* ``AdamW.step``: the optimizer's own update on the LoRA parameters (the reference);
* ``plain step, on_nonfinite=raise``: the pre-hook on a warm-up step, i.e. the fused NaN/Inf check
  (one ``_foreach_norm(inf)`` per dtype and one sync), against ``on_nonfinite=skip`` (no check);
* ``<method> due step``: the pre-hook on a due step with the range guards (rescaling limits, optimizer
  moment maxima, ScaLoRA's base-weight norms and merge growth) against the same hook with the guards
  replaced by "always in range". Calls are interleaved; the ratio is of the minima (least disturbed).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optlora import make_method
from optlora.testing import models


def timed(fns: list, repeats: int) -> list[tuple[float, float]]:
    """Interleaved timing: each round calls every ``fn`` once, so load spikes hit all of them alike."""
    ts: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for t, fn in zip(ts, fns):
            t0 = time.thread_time()  # CPU time of this thread: time spent descheduled on a busy machine is not counted
            fn()
            t.append(time.thread_time() - t0)
    return [(1e3 * min(t), 1e3 * statistics.median(t)) for t in ts]


def unguarded(method):
    """The same method with every range guard answering "in range" (what the hook cost before issue #8)."""

    def always(self_or_group, *args, **kwargs):
        alpha = args[1] if len(args) > 1 else args[0]
        return torch.ones(alpha.shape[0], dtype=torch.bool, device=alpha.device)

    method._rescaling_in_range = lambda group, alpha, beta, rows: always(None, alpha)
    if hasattr(method, "_merge_in_range"):
        method._merge_in_range = lambda group, pg, alpha, beta: always(None, alpha)
    return method


def setup(spec, kind: str, rank: int, batch, **options):
    model = models.build(spec, rank=rank, dtype=torch.float32, device="cpu")
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-5)
    method = make_method(kind, model, **options).attach(opt) if kind != "lora" else None
    for _ in range(2):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    model(**batch).loss.backward()
    # the hook is called directly, with the method still attached: a detached method has no optimizer, so its
    # moment range guards and its moment transfer (RefLoRA-S, ScaLoRA) would not run
    return method, opt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(models.SPECS), default="minilm")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--methods", default="reflora,reflora_s,scalora")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = models.SPECS[args.model]
    batch = models.make_batch(spec, 4, 32, "cpu")
    print(f"{spec.label()}, r={args.rank}, float32, threads={args.threads}, {args.repeats} calls")
    print(f"| {'what':34s} | min ms | median ms | ratio (median) |")
    print("|---|---|---|---|")
    _, opt = setup(spec, "lora", args.rank, batch)
    hooks = {}
    for mode in ("skip", "raise"):
        method, o = setup(spec, "reflora", args.rank, batch, warmup_steps=10**9, on_nonfinite=mode)
        hooks[mode] = lambda m=method, o=o: m._pre_step(o, (), {})
    (ref_lo, ref_med), skip, raise_ = timed([opt.step, hooks["skip"], hooks["raise"]], args.repeats)
    print(f"| {'AdamW.step (LoRA, reference)':34s} | {ref_lo:6.3f} | {ref_med:9.3f} | |", flush=True)
    print(f"| {'plain step, on_nonfinite=skip':34s} | {skip[0]:6.3f} | {skip[1]:9.3f} | |")
    ratio = f"{raise_[1] / ref_med:.2f}x AdamW.step"
    print(f"| {'plain step, on_nonfinite=raise':34s} | {raise_[0]:6.3f} | {raise_[1]:9.3f} | {ratio} |", flush=True)
    for kind in args.methods.split(","):
        fns = []
        for guarded in (False, True):
            method, o = setup(spec, kind, args.rank, batch, warmup_steps=1)
            if not guarded:
                unguarded(method)
            fns.append(lambda m=method, o=o: m._pre_step(o, (), {}))
        res = timed(fns, args.repeats)
        for guarded, (lo, med) in zip((False, True), res):
            ratio = f"{res[1][0] / res[0][0]:.2f}x (min)" if guarded else ""
            label = f"{kind} due step, " + ("guarded" if guarded else "unguarded")
            print(f"| {label:34s} | {lo:6.3f} | {med:9.3f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
