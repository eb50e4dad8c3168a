"""Per-rank step time and memory of every method under FSDP2, side by side with FSDP2 LoRA.

One command (CPU, gloo; on GPUs add ``--device cuda`` for NCCL)::

    python bench/bench_fsdp.py --world 2                 # tiny Llama, r=8, batch 4x64 per rank, float32

It spawns ``--world`` processes. In each, every method gets its own copy of the same model
(same seed), sharded with ``fully_shard`` (every decoder block, then the root), its own AdamW,
and the method attached. Timing is interleaved as in ``bench_step.py``: each round runs
``--steps`` optimizer steps per method in a rotated order; a round's time for a method is the
slowest rank's (the ranks step in lockstep). Reported per method:

* ``ms/step``: median over rounds; ``ratio``: median over rounds of (method / FSDP2 LoRA in the
  same round), with the min-max spread;
* ``hook ms``: time inside the method's pre-hook per step, ``of which all_gather``: inside the
  step's one collective (this includes waiting for the slowest rank to arrive);
* ``sent KiB``: bytes one rank puts into the step's single ``all_gather`` (it receives that
  many from every rank), from ``method.stats()["exchange_bytes"]``;
* ``extra MiB``: persistent memory the method adds per rank (merge buffers: Kahan/fp32 modes);
* ``step MiB``: what a due step holds on top (the gathered bytes, the whole ``lora_A`` and its
  gradient in the compute dtype, the r x r Grams), computed from the shapes;
* ``peak MiB`` (CUDA only): the rank's ``max_memory_allocated`` during the method's steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

METHODS = ("lora", "reflora", "reflora_s", "scalora", "scalora_i")
MiB = 1 << 20


def _shard(model):
    from torch.distributed.fsdp import fully_shard

    for block in model.get_base_model().model.layers:
        fully_shard(block)
    fully_shard(model)
    return model


def _step_bytes(method, world: int) -> int:
    """Transient bytes of one due step on one rank, from the shapes (see the module docstring)."""
    if method is None:
        return 0
    item = torch.finfo(method.compute_dtype).bits // 8
    whole = 0
    for f in method.factors:
        r, n = f.lora_A.shape
        if method.reads != "sqnorms":  # RefLoRA-S exchanges norms only
            whole += 2 * r * n * item + (2 * r) ** 2 * item  # lora_A and its gradient, whole; the pair Grams
    return world * method.stats().get("exchange_bytes", 0) + whole


def _worker(rank: int, world: int, args, out: str) -> None:
    from optlora import make_method
    from optlora.testing import models

    torch.set_num_threads(args.threads)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if args.device == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if args.device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    from optlora.methods import sharded

    gather = [0.0]  # time inside the step's all_gather (waiting for the slowest rank included)
    inner_gather = sharded._Pack.all_gather

    def timed_gather(self, *a, _inner=inner_gather):
        t = time.perf_counter()
        _inner(self, *a)
        gather[0] += time.perf_counter() - t

    sharded._Pack.all_gather = timed_gather
    spec = models.SPECS[args.model]
    dtype = getattr(torch, args.dtype)
    runs = {}
    for name in args.methods:
        model = _shard(models.build(spec, rank=args.rank, dtype=dtype, device=device))
        method = make_method(name, model, warmup_steps=1)
        opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-4)
        hook = [0.0, 0.0]  # pre-hook time, all_gather time
        if method is not None:
            method.attach(opt)
            inner = method._pre_step

            def timed(*a, _inner=inner, _hook=hook):
                t, g = time.perf_counter(), gather[0]
                _inner(*a)
                _hook[0] += time.perf_counter() - t
                _hook[1] += gather[0] - g

            method._handle.remove()
            method._handle = opt.register_step_pre_hook(timed)
        runs[name] = (model, method, opt, hook)
    batch = models.make_batch(spec, args.batch, args.seq, device, seed=1 + rank)

    def steps(name: int, n: int) -> float:
        model, _, opt, _ = runs[name]
        if args.device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / n

    for name in args.methods:  # warm-up: past the method's own warm-up, allocator and caches settled
        steps(name, 12)
        runs[name][3][:] = [0.0, 0.0]
    times = {name: [] for name in args.methods}
    peak = dict.fromkeys(args.methods, 0.0)
    for rnd in range(args.rounds):
        order = args.methods[rnd % len(args.methods) :] + args.methods[: rnd % len(args.methods)]
        for name in order:
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = torch.tensor(steps(name, args.steps), dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            times[name].append(float(t))
            if args.device == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / MiB)
    rows = []
    for name in args.methods:
        _, method, _, hook = runs[name]
        ratios = [m / b for m, b in zip(times[name], times["lora"])]
        extra = 0 if method is None else sum(b.to_local().numel() * b.element_size() for b in _buffers(method))
        rows.append(
            {
                "method": name,
                "ms": 1e3 * statistics.median(times[name]),
                "ratio": statistics.median(ratios),
                "lo": min(ratios),
                "hi": max(ratios),
                "hook_ms": 1e3 * hook[0] / (args.rounds * args.steps),
                "gather_ms": 1e3 * hook[1] / (args.rounds * args.steps),
                "sent_kib": 0 if method is None else method.stats().get("exchange_bytes", 0) / 1024,
                "extra_mib": extra / MiB,
                "step_mib": _step_bytes(method, world) / MiB,
                "peak_mib": peak[name],
            }
        )
    if rank == 0:
        torch.save(rows, os.path.join(out, "rows.pt"))
    dist.destroy_process_group()


def _buffers(method):
    seen = {}
    for buf in getattr(method, "buffers", {}).values():
        seen[id(buf)] = buf
    return list(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--model", default="tiny-llama", help="a key of optlora.testing.models.SPECS")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="per rank")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="steps per method per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    args = p.parse_args(argv)
    args.methods = args.methods.split(",")
    if args.methods[0] != "lora":
        args.methods = ["lora"] + [m for m in args.methods if m != "lora"]
    out = tempfile.mkdtemp(prefix="bench_fsdp_")
    mp.spawn(_worker, args=(args.world, args, out), nprocs=args.world, join=True)
    rows = torch.load(os.path.join(out, "rows.pt"))
    print(
        f"FSDP2, {args.world} x {args.device} ({'gloo' if args.device == 'cpu' else 'nccl'}), {args.model} r={args.rank}, "
        f"batch {args.batch}x{args.seq} per rank, {args.dtype}, {args.rounds} rounds x {args.steps} steps, "
        f"torch {torch.__version__}"
    )
    head = "| method | ms/step | ratio to FSDP2 LoRA (min-max) | hook ms | of which all_gather | sent KiB | extra MiB "
    head += "| step MiB |"
    head += " peak MiB |" if args.device == "cuda" else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        line = (
            f"| {r['method']} | {r['ms']:.1f} | {r['ratio']:.3f} ({r['lo']:.3f}-{r['hi']:.3f}) | {r['hook_ms']:.2f} "
            f"| {r['gather_ms']:.2f} | {r['sent_kib']:.1f} | {r['extra_mib']:.2f} | {r['step_mib']:.2f} |"
        )
        print(line + (f" {r['peak_mib']:.0f} |" if args.device == "cuda" else ""))


if __name__ == "__main__":
    sys.exit(main())
