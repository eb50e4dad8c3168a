"""Gradient clipping and accumulation under ScaLoRA, measured on the real MiniLM (SST-2).

    python bench/clip_accum.py                      # float32 and float64, 20 steps, ~10 min on 1 busy core
    python bench/clip_accum.py --dtypes float32 --steps 30

Two questions, answered side by side in one run, LoRA against ScaLoRA from the same initial model on
the same SST-2 batches (AdamW, LoRA r=8 on every linear layer, classifier trained in full, dropout off
so that 2 micro-batches and 1 batch see the same function):

1. **Gradient norms.** ``max_grad_norm`` clips the norm of the LoRA factor gradients *before* the
   method runs. ScaLoRA rescales the factors at each scaling step (``A~ = A diag(alpha)``), so the
   gradients of the next step are those of rescaled factors. Reported: the ratio of the global
   gradient norm ScaLoRA's run sees to LoRA's at the same step, and the share of steps that a
   ``max_grad_norm`` of 1.0 (the Trainer default) would clip.
2. **Accumulation.** One batch of 16 against 2 micro-batches of 8 (gradients summed, loss halved):
   ``max |dlogit|`` on held-out sentences after the last step. As a yardstick, a third run takes the
   1 x 16 gradients with a relative perturbation of 1e-7 (float32 rounding size) added before every
   step. The first step at which ScaLoRA's hybrid rule picks a different branch (column vs scalar,
   Theorems 5/3) for some layer in the 2 x 8 run is reported too.

In float64 every effect of rounding is ~1e-9 times smaller: if 2 x 8 and 1 x 16 then agree, the float32
difference is float rounding amplified by the method, not a difference in what the method computes.
"""

from __future__ import annotations

import argparse
import statistics

import torch

import optlora
from optlora_experiments import data as D
from optlora_experiments.models import default_model, load_classifier, lora_targets


def _build(name: str, dtype: torch.dtype, method_name: str, args):
    import peft

    torch.manual_seed(0)
    base, tok = load_classifier(name, 2, dtype)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=lora_targets(base), task_type="SEQ_CLS")
    model = peft.get_peft_model(base, cfg).to(dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    method = None
    if method_name == "scalora":
        method = optlora.ScaLoRA(model, warmup_steps=args.warmup, kappa=args.kappa).attach(opt)
    model.eval()  # dropout off: 2 micro-batches would draw other dropout masks than 1 batch (gradients still flow)
    return model, opt, method, params, tok


def _lora_norm(model) -> float:
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and "lora_" in n]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])))


def run(method_name: str, dtype: torch.dtype, args, train: dict, held: dict) -> dict:
    name = default_model("sst2")
    runs = {k: _build(name, dtype, method_name, args) for k in ("1x16", "2x8", "1x16+noise")}
    noise_gen = torch.Generator().manual_seed(1)
    norms, columns, first_flip = [], {"1x16": [], "2x8": []}, None
    for step in range(args.steps):
        sl = slice(step * args.batch, (step + 1) * args.batch)
        batch = {k: v[sl] for k, v in train.items()}
        for key, (model, opt, method, params, _) in runs.items():
            if key == "2x8":
                half = args.batch // 2
                for part in (slice(0, half), slice(half, args.batch)):
                    (model(**{k: v[part] for k, v in batch.items()}).loss / 2).backward()
            else:
                model(**batch).loss.backward()
            if key == "1x16+noise":
                with torch.no_grad():
                    for p in params:
                        p.grad.mul_(1 + 1e-7 * torch.randn(p.shape, generator=noise_gen).to(p.dtype))
            if key == "1x16":
                norms.append(_lora_norm(model))
            opt.step()
            opt.zero_grad()
            if method is not None and key in columns and method._last:
                columns[key].append(method._last["column"].tolist())
        if first_flip is None and columns["1x16"] and columns["1x16"][-1] != columns["2x8"][-1]:
            first_flip = step + 1

    def logits(model):
        model.eval()
        with torch.no_grad():
            return model(**held).logits.double()

    ref = logits(runs["1x16"][0])
    return {
        "norms": norms,
        "dlogit_2x8": float((logits(runs["2x8"][0]) - ref).abs().max()),
        "dlogit_noise": float((logits(runs["1x16+noise"][0]) - ref).abs().max()),
        "max_logit": float(ref.abs().max()),
        "first_flip": first_flip,
        "flips": sum(a != b for a, b in zip(columns["1x16"], columns["2x8"])),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2, help="ScaLoRA warm-up steps")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--kappa", type=float, default=1.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--clip", type=float, default=1.0, help="the max_grad_norm whose activity is reported")
    p.add_argument("--dtypes", default="float32,float64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    _, tok = load_classifier(default_model("sst2"), 2)
    sents, labels = D.load_sst2("train", args.data_dir, limit=args.batch * args.steps)
    train = D.encode_sst2(tok, sents, labels, args.max_len)
    dev_s, dev_l = D.load_sst2("dev", args.data_dir, limit=32)
    held = {k: v for k, v in D.encode_sst2(tok, dev_s, dev_l, args.max_len).items() if k != "labels"}

    print(f"MiniLM ({default_model('sst2')}), {args.steps} steps, AdamW lr={args.lr}, ScaLoRA warm-up {args.warmup}")
    print(
        "| dtype | method | max abs dlogit 2x8 vs 1x16 | 1x16 with 1e-7 noise | max abs logit | ScaLoRA branch flips (first) |"
    )
    print("|---|---|---|---|---|---|")
    norm_rows = []
    for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
        res = {
            m: run(m, dtype, args, {k: v.to(dtype) if v.is_floating_point() else v for k, v in train.items()}, held)
            for m in ("lora", "scalora")
        }
        for m, r in res.items():
            flips = f"{r['flips']} ({r['first_flip']})" if m == "scalora" else "-"
            print(
                f"| {str(dtype)[6:]} | {m} | {r['dlogit_2x8']:.2e} | {r['dlogit_noise']:.2e} | {r['max_logit']:.2f} | {flips} |"
            )
        after = range(args.warmup + 1, args.steps)  # steps whose gradients follow a scaling step
        ratios = [res["scalora"]["norms"][s] / res["lora"]["norms"][s] for s in after]
        clipped = {m: sum(n > args.clip for n in r["norms"][args.warmup + 1 :]) / len(after) for m, r in res.items()}
        norm_rows.append((str(dtype)[6:], statistics.median(ratios), min(ratios), max(ratios), clipped))
    print(
        "\n| dtype | grad-norm ratio ScaLoRA / LoRA after the first scaling step: median (min-max) | "
        f"steps clipped at {args.clip}: LoRA | ScaLoRA |"
    )
    print("|---|---|---|---|")
    for dt, med, lo, hi, clipped in norm_rows:
        print(f"| {dt} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {clipped['lora']:.0%} | {clipped['scalora']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
