"""Where the per-step overhead of a method goes: torch.profiler (ops) and cProfile (Python).

    python bench/profile_step.py --model minilm --method scalora
    python bench/profile_step.py --model tiny-llama --method reflora --python

Only ``optimizer.step()`` (the method's pre-hook plus AdamW) is profiled, after the method's
warm-up, over ``--steps`` steps; forward/backward run outside the profiled region.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from optlora import make_method  # noqa: E402
from optlora.testing import models  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(models.SPECS), default="minilm")
    ap.add_argument("--method", default="scalora", choices=["lora", "reflora", "reflora_s", "scalora", "scalora_i"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", default="8x64", help="batch x seq")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--python", action="store_true", help="cProfile of the Python side instead of torch ops")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: no OpenMP stalls on a shared machine)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = models.SPECS[args.model]
    model = models.build(spec, rank=args.rank, dtype=getattr(torch, args.dtype), device=args.device)
    optimizer = torch.optim.AdamW(models.lora_parameters(model), lr=1e-4)
    method = make_method(args.method, model, warmup_steps=1)
    if method is not None:
        method.attach(optimizer)
    bs, seq = (int(x) for x in args.batch.split("x"))
    batch = models.make_batch(spec, bs, seq, args.device)

    def backward():
        model(**batch).loss.backward()

    for _ in range(3):
        backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    total = 0.0
    if args.python:
        prof = cProfile.Profile()
        for _ in range(args.steps):
            backward()
            prof.enable()
            optimizer.step()
            prof.disable()
            optimizer.zero_grad(set_to_none=True)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(args.rows)
        return 0
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            backward()
            t0 = time.perf_counter()
            with torch.profiler.record_function("optimizer.step"):
                optimizer.step()
            total += time.perf_counter() - t0
            optimizer.zero_grad(set_to_none=True)
    print(f"{args.method} on {spec.label()}: optimizer.step() {1e3 * total / args.steps:.2f} ms/step (host)")
    agg: dict[str, list[float]] = {}
    for e in prof.events():
        parent = e.cpu_parent
        while parent is not None and parent.name != "optimizer.step":
            parent = parent.cpu_parent
        if parent is None:
            continue  # not inside optimizer.step (forward/backward)
        row = agg.setdefault(e.name, [0, 0.0])
        row[0] += 1
        row[1] += e.self_cpu_time_total
    print(f"{'op':50s} {'calls/step':>10s} {'self ms/step':>12s}")
    for name, (n, us) in sorted(agg.items(), key=lambda kv: -kv[1][1])[: args.rows]:
        print(f"{name[:50]:50s} {n / args.steps:10.1f} {us / 1e3 / args.steps:12.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
