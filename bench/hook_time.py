"""Host time of one method pre-hook call (the whole per-step overhead on CPU), robust to a busy machine.

    python bench/hook_time.py --model minilm
    python bench/hook_time.py --model tiny-llama --rank 16
    python bench/hook_time.py --model tiny-llama --fsdp          # the FSDP2 path, one rank (gloo)

After the warm-up, one backward pass provides gradients; the due pre-hook is then called
``--repeats`` times on them and the minimum and median are reported (the minimum is the
least disturbed by other processes). For reference the same statistics are given for one
plain ``AdamW.step()`` on the LoRA parameters. CPU only; on CUDA use ``bench_step.py``.
``--fsdp`` shards every model with ``fully_shard`` on a one-rank gloo group first: the sharded
code path (packing, the one collective, shard bookkeeping) without any other rank to wait for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from optlora import make_method  # noqa: E402
from optlora.testing import models  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), 1e3 * statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(models.SPECS), default="minilm")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--methods", default="reflora,reflora_s,scalora")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard (one rank, gloo)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.fsdp:
        import tempfile

        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/pg", rank=0, world_size=1)
    spec = models.SPECS[args.model]
    batch = models.make_batch(spec, 4, 32, "cpu")
    print(f"{spec.label()}, r={args.rank}, float32, threads={args.threads}, {args.repeats} calls, fsdp={args.fsdp}")
    print(f"| {'what':28s} | min ms | median ms |")
    print("|---|---|---|")
    for kind in ["lora"] + args.methods.split(","):
        model = models.build(spec, rank=args.rank, dtype=torch.float32, device="cpu")
        if args.fsdp:
            from torch.distributed.fsdp import fully_shard

            for block in model.get_base_model().model.layers:
                fully_shard(block)
            fully_shard(model)
        opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-5)
        method = make_method(kind, model, warmup_steps=1)
        if method is not None:
            method.attach(opt)
        for _ in range(2):
            model(**batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        if method is None:
            lo, med = timed(lambda opt=opt: opt.step(), args.repeats)
            label = "AdamW.step (LoRA, reference)"
        else:  # called directly, still attached (detached, RefLoRA-S/ScaLoRA would skip the moment work)
            lo, med = timed(lambda m=method, o=opt: m._pre_step(o, (), {}), args.repeats)
            label = f"{kind} pre-hook"
        print(f"| {label:28s} | {lo:6.2f} | {med:9.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
