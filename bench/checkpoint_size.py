"""What a ScaLoRA checkpoint holds, how big it is, and how right plain PEFT loads it (real SmolLM2-135M).

    python bench/checkpoint_size.py                          # float32, ScaLoRA-I, 2 warm-up + 6 scaling steps
    python bench/checkpoint_size.py --dtype bfloat16 --tols 1e-2,1e-3

Fine-tunes SmolLM2-135M-Instruct (``optlora_experiments.models.default_model("gsm8k")``, offline) on
GSM8K with LoRA r=8 on every linear layer of the blocks and ScaLoRA, then saves it the usual way
(``model.save_pretrained``) and reports, side by side in one run:

* sizes: the exact resume state (``optlora_state.safetensors``), the saved adapter (the accumulated
  update ``W_now - W_pretrained`` by truncated SVD), PEFT's own adapter of the live factors, the
  pre-0.2 ``optlora_state.pt`` (a pickle of the merged base weights) and the full merged model;
* ``max |dlogit|`` on held-out prompts between the trained model and the original base loaded with
  plain ``PeftModel.from_pretrained`` from (a) PEFT's adapter of the live factors (what saving did
  before: the merged increments are missing) and (b) the optlora adapter at each ``--tols``;
* the exact restore through ``load_adapter`` (must be 0), the merged model stored in the model's dtype
  (the floor any copy in that dtype has) and the time ``save_pretrained`` takes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch

import optlora
from optlora_experiments import data as D
from optlora_experiments.models import default_model, load_causal_lm, lora_targets


def _size(path: str) -> int:
    return os.path.getsize(path) if os.path.isfile(path) else 0


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=8, help="optimizer steps in all (warm-up included)")
    p.add_argument("--interval", type=int, default=1, help="ScaLoRA-I interval (1: ScaLoRA)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=128)
    p.add_argument("--tols", default="1e-2,1e-3,1e-4")
    p.add_argument("--max-ranks", default="", help="also save with these rank caps (at the first tol), e.g. 16,32")
    p.add_argument("--merge-precision", default="auto", help="ScaLoRA merge_precision (bf16: stochastic, fp32, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import peft

    dtype = getattr(torch, args.dtype)
    name = default_model("gsm8k")
    base, tok = load_causal_lm(name, dtype)
    cfg = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=lora_targets(base),
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(base, cfg)
    method = optlora.ScaLoRA(
        model, warmup_steps=args.warmup, interval=args.interval, merge_precision=args.merge_precision
    )
    guard = optlora.persist.guard_of(model)
    print(f"model {name} ({args.dtype}); original weights: {guard.originals.describe()}")
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=args.lr, weight_decay=0.0)
    method.attach(opt)

    train = D.encode_gsm8k(tok, D.load_gsm8k("train", args.data_dir, limit=args.batch * args.steps), args.max_len)
    held = D.encode_gsm8k(tok, D.load_gsm8k("test", args.data_dir, limit=4), args.max_len)
    model.train()
    for s in range(args.steps):
        batch = D.trim_padding({k: v[s * args.batch : (s + 1) * args.batch] for k, v in train.items()})
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained: {method.stats()}")
    model.eval()
    held = D.trim_padding(held)
    inputs = {"input_ids": held["input_ids"], "attention_mask": held["attention_mask"]}

    def logits(m) -> torch.Tensor:
        with torch.no_grad():
            return m(**inputs).logits.float()

    want = logits(model)
    scale = float(want.abs().max())

    def fresh():
        return load_causal_lm(name, dtype)[0]

    work = tempfile.mkdtemp(prefix="optlora-ckpt-")
    rows = []
    try:
        live = os.path.join(work, "peft_live")
        type(model).save_pretrained(model, live)  # PEFT's own save: the live factors only (what saving did before)
        plain = peft.PeftModel.from_pretrained(fresh(), live).eval()
        live_err = float((logits(plain) - want).abs().max())
        del plain
        legacy = os.path.join(work, "optlora_state.pt")
        torch.save({"base_weights": {f.name: f.base_weight.detach() for f in method.factors}}, legacy)
        merged = os.path.join(work, "merged")
        optlora.export.export_merged(model, merged)
        from transformers import AutoModelForCausalLM

        stored = AutoModelForCausalLM.from_pretrained(merged, dtype=dtype).eval()  # the trained model in its dtype
        floor_err = float((logits(stored) - want).abs().max())
        del stored

        tols = [float(t) for t in args.tols.split(",")]
        caps = [int(k) for k in args.max_ranks.split(",") if k]
        for tol, cap in [(t, None) for t in tols] + [(tols[0], k) for k in caps]:
            optlora.persist.install(method, tol=tol, max_rank=cap)
            out = os.path.join(work, f"tol{tol:g}-cap{cap}")
            t0 = time.perf_counter()
            model.save_pretrained(out)
            secs = time.perf_counter() - t0
            plain = peft.PeftModel.from_pretrained(fresh(), out).eval()
            err = float((logits(plain) - want).abs().max())
            del plain
            with open(os.path.join(out, optlora.export.REPORT_FILE)) as fh:
                rep = json.load(fh)
            ranks = [v["rank"] for v in rep["layers"].values()]
            size = _size(os.path.join(out, "adapter_model.safetensors"))
            rows.append(
                (
                    f"{tol:g}" + (f", max_rank {cap}" if cap else ""),
                    ranks,
                    rep["rel_error"],
                    rep["rounding_floor"],
                    err,
                    size,
                    secs,
                )
            )
        state = os.path.join(work, f"tol{tols[0]:g}-capNone", optlora.checkpoint.STATE_FILE)
        twin = peft.get_peft_model(fresh(), cfg)
        twin_method = optlora.ScaLoRA(
            twin, warmup_steps=args.warmup, interval=args.interval, merge_precision=args.merge_precision
        )
        twin.load_adapter(os.path.dirname(state), "default", is_trainable=True)
        exact = float((logits(twin.eval()) - want).abs().max())
        assert twin_method.steps == method.steps

        print(f"\nmax |logit| of the trained model on 4 held-out GSM8K prompts: {scale:.2f}")
        print(f"plain PEFT on the original base, PEFT's adapter of the live factors: max |dlogit| = {live_err:.3g}")
        print(f"exact restore through load_adapter (optlora_state.safetensors): max |dlogit| = {exact:.3g}")
        print(f"the merged model stored in {args.dtype} (export_merged: the dtype's own floor): {floor_err:.3g}\n")
        print(
            "| tol | ranks (min..max, sum) | rel. Frobenius error | dtype rounding floor | plain PEFT max abs dlogit "
            "| adapter size | save time |"
        )
        print("|---|---|---|---|---|---|---|")
        for tol, ranks, rel, floor, err, size, secs in rows:
            print(
                f"| {tol} | {min(ranks)}..{max(ranks)}, {sum(ranks)} | {rel:.2e} | {floor:.2e} | {err:.3g} "
                f"| {_mib(size)} | {secs:.1f} s |"
            )
        print("\n| file | size |")
        print("|---|---|")
        for label, path in (
            ("optlora_state.safetensors (exact resume state)", state),
            ("PEFT adapter of the live factors (r=8)", os.path.join(live, "adapter_model.safetensors")),
            ("legacy optlora_state.pt (pickled merged base weights)", legacy),
            ("full merged model (export_merged)", os.path.join(merged, "model.safetensors")),
        ):
            print(f"| {label} | {_mib(_size(path))} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
