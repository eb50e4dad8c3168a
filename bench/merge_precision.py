"""How much of ScaLoRA's merged update survives in a bfloat16 base weight, per merge mode.

    python bench/merge_precision.py                  # 512 x 512, 500 merges, 3 increment sizes
    python bench/merge_precision.py --size 1024 --steps 2000

A bfloat16 weight ``W0`` (entries ~ N(0, 0.02^2), like LLaMA's) receives ``--steps`` rank-r
merges ``W += s * B diag(c_t) A`` through :func:`optlora.merge.merge_low_rank_`. The factors
are fixed and ``c_t ~ U(0.5, 1.5)``, so the increments drift in one direction as a fine-tuning
update does; their RMS is ``rho`` times the RMS of ``W0``. The exact result is the float64
sum. Reported per mode and ``rho``:

* ``lost``: ``1 - <dW_merged, dW_exact> / ||dW_exact||^2``, the fraction of the accumulated
  update missing from the bfloat16 weight the model uses;
* ``rel err``: ``||dW_merged - dW_exact|| / ||dW_exact||``; ``floor``: the same for the exact
  result rounded once to bfloat16 (no mode can do better in a bfloat16 weight);
* ``extra memory``: persistent bytes the mode adds, relative to the weight's bytes;
* ``ms/merge``: CPU time of one merge (noisy on a shared machine).
"""

from __future__ import annotations

import argparse
import time

import torch

from optlora import merge


def run(mode: str, rho: float, size: int, rank: int, steps: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    W0 = (0.02 * torch.randn(size, size, generator=g, dtype=torch.float64)).to(torch.bfloat16)
    lora_A = torch.randn(rank, size, generator=g, dtype=torch.float64)
    lora_B = torch.randn(size, rank, generator=g, dtype=torch.float64)
    # scale the factors so that one increment (c = 1) has RMS rho * RMS(W0)
    unit = (lora_B @ lora_A).square().mean().sqrt()
    lora_B *= rho * W0.double().square().mean().sqrt() / unit
    coeffs = 0.5 + torch.rand(steps, rank, generator=g, dtype=torch.float64)
    exact = (lora_B * coeffs.sum(0)) @ lora_A  # the float64 sum of all increments
    W = W0.clone()
    buffer = merge.new_buffer(W, mode)
    rng = torch.Generator().manual_seed(seed + 1)
    A32, B32 = lora_A.float(), lora_B.float()
    t0 = time.perf_counter()
    for c in coeffs:
        merge.merge_low_rank_(W, B32, A32, c.float(), 1.0, mode=mode, buffer=buffer, generator=rng)
    ms = 1e3 * (time.perf_counter() - t0) / steps
    got = W.double() - W0.double()
    lost = 1.0 - float((got * exact).sum() / exact.square().sum())
    rel = float((got - exact).norm() / exact.norm())
    extra = 0 if buffer is None else buffer.numel() * buffer.element_size()
    target = W0.double() + exact  # the floor: the exact result rounded once to bfloat16
    floor = float((target.to(torch.bfloat16).double() - target).norm() / exact.norm())
    return {"lost": lost, "rel": rel, "floor": floor, "extra": extra / (W.numel() * W.element_size()), "ms": ms}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--rhos", default="1e-2,1e-3,1e-4")
    ap.add_argument("--modes", default="nearest,stochastic,kahan,fp32")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"bfloat16 weight {args.size}x{args.size}, rank {args.rank}, {args.steps} merges")
    print("| mode | rho | lost | rel err | floor | extra memory (x weight) | ms/merge |")
    print("|---|---|---|---|---|---|---|")
    for mode in args.modes.split(","):
        for rho in (float(x) for x in args.rhos.split(",")):
            r = run(mode, rho, args.size, args.rank, args.steps)
            print(
                f"| {mode} | {rho:g} | {r['lost']:.4f} | {r['rel']:.4f} | {r['floor']:.4f} | {r['extra']:.1f} | {r['ms']:.2f} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
