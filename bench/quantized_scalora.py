"""ScaLoRA on a 4-bit (QLoRA) base: what each way of handling its merge costs, side by side in one run.

    python bench/quantized_scalora.py                                   # all runs, 300 steps (~30 min, 1 thread)
    python bench/quantized_scalora.py --steps 60 --runs lora scalora_exact scalora_r16
    python bench/quantized_scalora.py --breakdown 16                    # where scalora_r16's step time goes

The setting of docs/RESULTS.md section 2: the real all-MiniLM-L6-v2 on SST-2 (fresh classifier
head), LoRA r=8, alpha=16 on every linear layer of the encoder, AdamW lr 1e-3 (6% linear warm-up,
then linear decay), clipping 1.0, batch 16 x 64 tokens, method warm-up 30 steps, ScaLoRA kappa=1,
the same data order for every run. The encoder's linear layers are loaded in 4-bit NF4
(``BitsAndBytesConfig``, blocksize 64, float32 compute). Runs:

* ``lora``, ``reflora``: on the 4-bit model (QLoRA, and RefLoRA on it);
* ``scalora_exact``: ScaLoRA on a float32 copy of the *dequantised* 4-bit weights, merging
  exactly: what ScaLoRA does if one keeps a float copy of the base (+4 bytes per weight);
* ``scalora_requant``: the same, but every merged weight is re-quantised to NF4 after each step
  (dequantise -> merge -> requantise, emulated exactly with bitsandbytes' own quantiser);
* ``scalora_r<R>``: ``ScaLoRA(residual_rank=R)`` on the 4-bit model (the shipped mode).

Printed per run: train loss (mean of the last 10 steps), dev accuracy and loss (872 sentences),
CPU ms/step of the run, its CPU time per step relative to ``lora`` measured *interleaved* (all
models built at once, methods active, ``--timing-rounds`` rounds of 5 steps each in rotated
order; median and range over rounds of the ratio within a round), the persistent memory the
run adds relative to the 4-bit weights of the LoRA layers, and:

* requant: per merge and layer, the share of the increment ``D`` that the re-quantised weight
  carries, ``<dW_q, D> / ||D||^2`` (1 = all of it), and the error ``||dW_q - D|| / ||D||``
  (medians over all merges and layers, and the error's 90th percentile);
* residual: per layer the summed norm truncation cut off over the summed norm of the merged
  increments, ``sum_t ||E_t|| / sum_t ||D_t||`` (max and mean over layers; ``sum_t ||E_t||``
  bounds how far the weights are from exact ScaLoRA's on the same trajectory). It is the
  counterpart of the requant error, which is per merge ``||E_t|| / ||D_t||``.

bitsandbytes (0.50) repacks 4-bit weights in place at the first eval-mode no-grad forward on
CPUs with AVX512-BF16, after which training gradients through those layers are wrong; this
script turns that path off (``support_avx512bf16_for_cpu = False``), see docs/QUANTIZED.md.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
import time

import torch

import optlora
from optlora import residual
from optlora_experiments import data as D
from optlora_experiments.models import default_model

RUNS = ("lora", "reflora", "scalora_exact", "scalora_requant", "scalora_r8", "scalora_r16", "scalora_r32")


def load(name: str, seed: int, dequantize: bool):
    """MiniLM for SST-2 with its encoder's linear layers in 4-bit NF4 (or a float32 copy of the dequantised weights)."""
    from transformers import AutoModelForSequenceClassification, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=["classifier"],
    )
    torch.manual_seed(seed)  # the fresh classifier head: the same in every run
    model = AutoModelForSequenceClassification.from_pretrained(
        name, num_labels=2, quantization_config=quant, device_map="cpu"
    )
    if dequantize:
        return model.dequantize()
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False  # bitsandbytes' CPU inference repack breaks later gradients
    return model


class Requantizer:
    """After each optimizer step, round every LoRA layer's (float) base weight back to NF4, measuring the loss."""

    def __init__(self, factors, blocksize: int = 64):
        import bitsandbytes.functional as bnbf

        self.bnbf, self.blocksize = bnbf, blocksize
        self.weights = list({id(f.base_weight): f.base_weight for f in factors}.values())
        self.before: list[torch.Tensor] = []
        self.carried: list[float] = []
        self.errors: list[float] = []
        for w in self.weights:  # the start is on the NF4 grid: re-quantising it must change nothing
            assert torch.equal(self.requantize(w), w), "the dequantised weights are not on the NF4 grid"

    def requantize(self, w: torch.Tensor) -> torch.Tensor:
        q, state = self.bnbf.quantize_4bit(w.detach(), blocksize=self.blocksize, quant_type="nf4")
        return self.bnbf.dequantize_4bit(q, state).to(w.dtype)

    def pre(self, *_):
        self.before = [w.detach().clone() for w in self.weights]

    @torch.no_grad()
    def post(self, *_):
        for w, w0 in zip(self.weights, self.before):
            inc = w - w0  # what ScaLoRA merged this step (zero on plain steps)
            if not inc.any():
                continue
            w.copy_(self.requantize(w))
            got = w - w0
            n2 = float(inc.square().sum())
            self.carried.append(float((got * inc).sum()) / n2)
            self.errors.append(float((got - inc).norm()) / math.sqrt(n2))


def quant_bytes(factors) -> int:
    """Bytes of the 4-bit LoRA-layer weights (packed NF4 + one float32 absmax per block of 64)."""
    return sum(f.lora_B.shape[0] * f.lora_A.shape[1] * (0.5 + 4 / 64) for f in factors)


def setup(run: str, args, steps: int, method_warmup: int):
    """``(model, optimizer, scheduler, method, requantizer)`` for one run."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    model = load(args.model, args.seed, dequantize=run in ("scalora_exact", "scalora_requant"))
    cfg = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=["query", "key", "value", "dense"],
        task_type="SEQ_CLS",
    )
    model = get_peft_model(model, cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, round(0.06 * steps), steps)
    requant = None
    if run == "scalora_requant":
        requant = Requantizer(optlora.find_lora_factors(model))
        opt.register_step_pre_hook(requant.pre)  # before the method's hook: sees the weights before the merge
    if run == "lora":
        method = None
    elif run == "reflora":
        method = optlora.RefLoRA(model, warmup_steps=method_warmup)
    elif re.fullmatch(r"scalora_r\d+", run):
        rank = int(run[len("scalora_r") :])
        method = optlora.ScaLoRA(model, warmup_steps=method_warmup, kappa=args.kappa, residual_rank=rank)
    else:
        method = optlora.ScaLoRA(model, warmup_steps=method_warmup, kappa=args.kappa)
    if method is not None:
        method.attach(opt)
    if requant is not None:
        opt.register_step_post_hook(requant.post)
    return model, opt, sched, method, requant


def step(model, opt, sched, batch) -> torch.Tensor:
    loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def timing(args, tensors) -> dict[str, list[float]]:
    """CPU time per step of every run but ``scalora_requant`` (an emulation), interleaved: ratios to ``lora`` per round."""
    runs = [r for r in args.runs if r != "scalora_requant"]
    built = {r: setup(r, args, 10**6, method_warmup=1)[:3] for r in runs}
    batch = D.trim_padding({k: v[: args.batch_size] for k, v in tensors["train"].items()})
    for model, opt, sched in built.values():
        for _ in range(3):  # untimed: the methods are active from here on
            step(model, opt, sched, batch)
    ratios: dict[str, list[float]] = {r: [] for r in runs}
    for k in range(args.timing_rounds):
        order = runs[k % len(runs) :] + runs[: k % len(runs)]
        cpu = {}
        for r in order:
            t0 = time.process_time()
            for _ in range(5):
                step(*built[r], batch)
            cpu[r] = time.process_time() - t0
        for r in runs:
            ratios[r].append(cpu[r] / cpu["lora"])
    return ratios


def breakdown(args, tensors, rank: int, rounds: int = 7) -> dict[str, float]:
    """Where ``scalora_r<rank>``'s time goes, against ``lora`` (CPU ms, medians over interleaved rounds)."""
    batch = D.trim_padding({k: v[: args.batch_size] for k, v in tensors["train"].items()})
    lora = setup("lora", args, 10**6, 1)[:3]
    model, opt, sched, method, _ = setup(f"scalora_r{rank}", args, 10**6, 1)
    for _ in range(3):
        step(*lora, batch)
        step(model, opt, sched, batch)

    def timed(fn) -> float:
        t0 = time.process_time()
        fn()
        return 1e3 * (time.process_time() - t0)

    def forward_backward(active: bool):
        for r in method.residuals.values():
            r.active = active
        model(**batch).loss.backward()
        opt.zero_grad(set_to_none=True)
        for r in method.residuals.values():
            r.active = True

    def fold_only():  # what a merge adds: fold a zero increment into every residual, grouped as the method does
        for g in method._groups:
            rs = [method.residuals[f.name] for f in g.factors]
            left = torch.zeros(len(rs), *g.factors[0].lora_B.shape, dtype=torch.float64)
            right = torch.stack([f.lora_A.detach() for f in g.factors])
            residual.fold_(rs, left, right, method.compute_dtype)

    cols: dict[str, list[float]] = {
        k: [] for k in ("lora step", "residual step", "fwd+bwd", "fwd+bwd, no hook", "fold")
    }
    for _ in range(rounds):
        cols["lora step"].append(timed(lambda: step(*lora, batch)))
        cols["residual step"].append(timed(lambda: step(model, opt, sched, batch)))
        cols["fwd+bwd"].append(timed(lambda: forward_backward(True)))
        cols["fwd+bwd, no hook"].append(timed(lambda: forward_backward(False)))
        cols["fold"].append(timed(fold_only))
    return {k: statistics.median(v) for k, v in cols.items()}


def train(run: str, args, tensors) -> dict:
    model, opt, sched, method, requant = setup(run, args, args.steps, args.method_warmup)
    float_base = run in ("scalora_exact", "scalora_requant")
    factors = optlora.find_lora_factors(model)
    train_set, n = tensors["train"], tensors["train"]["labels"].shape[0]
    gen = torch.Generator().manual_seed(args.seed)
    order, pos, losses, cpu = torch.randperm(n, generator=gen), 0, [], []
    for k in range(1, args.steps + 1):
        if pos + args.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        batch = D.trim_padding({k: v[order[pos : pos + args.batch_size]] for k, v in train_set.items()})
        pos += args.batch_size
        t0 = time.process_time()
        loss = step(model, opt, sched, batch)
        cpu.append(time.process_time() - t0)
        losses.append(float(loss))
        if args.progress and k % 50 == 0:
            print(f"  {run} step {k}: loss {statistics.mean(losses[-10:]):.4f}", flush=True)
    out = {
        "run": run,
        "train_loss": statistics.mean(losses[-10:]),
        "cpu_ms": 1e3 * statistics.mean(cpu[1:]),
        **D.evaluate_sst2(model, tensors["eval"], None),
        "extra_memory": 0.0,
    }
    if float_base:
        out["extra_memory"] = sum(4 * f.base_weight.numel() for f in factors) / quant_bytes(factors)
    if requant is not None:
        errs = sorted(requant.errors)
        out.update(
            carried=statistics.median(requant.carried),
            requant_err=statistics.median(errs),
            requant_err_p90=errs[int(0.9 * (len(errs) - 1))],
        )
    if method is not None and getattr(method, "residuals", None):
        rep = method.residual_report().values()
        rel = [r["dropped"] / r["merged"] if r["merged"] > 0 else 0.0 for r in rep]
        res_bytes = sum(4 * (r.left.numel() + r.right.numel()) for r in method.residuals.values())
        out.update(
            dropped_max=max(rel), dropped_mean=statistics.mean(rel), extra_memory=res_bytes / quant_bytes(factors)
        )
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", default=list(RUNS), help="any of " + " ".join(RUNS) + " (scalora_r<R>)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--kappa", type=float, default=1.0)
    ap.add_argument("--method-warmup", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=872)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--timing-rounds", type=int, default=7, help="interleaved timing rounds (0: skip; needs lora)")
    ap.add_argument(
        "--breakdown", type=int, default=None, metavar="R", help="only time where scalora_rR's step time goes, and exit"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    args.model = args.model or default_model("sst2")
    tok = AutoTokenizer.from_pretrained(args.model)
    s, y = D.load_sst2("train", args.data_dir)
    ds, dy = D.load_sst2("dev", args.data_dir, args.eval_samples)
    tensors = {"train": D.encode_sst2(tok, s, y, args.max_len), "eval": D.encode_sst2(tok, ds, dy, args.max_len)}
    if args.breakdown:
        parts = breakdown(args, tensors, args.breakdown)
        print(
            f"CPU ms per step (median of 7 interleaved rounds), MiniLM SST-2 4-bit, r={args.rank}, R={args.breakdown}:"
        )
        for k, v in parts.items():
            print(f"  {k:<18} {v:7.1f}")
        return 0
    ratios = timing(args, tensors) if args.timing_rounds and "lora" in args.runs else {}
    rows = []
    for run in args.runs:
        rows.append(train(run, args, tensors))
        print(f"done {run}: {rows[-1]}", flush=True)
    base_ms = next((r["cpu_ms"] for r in rows if r["run"] == "lora"), None)
    print(
        f"\nMiniLM SST-2, 4-bit NF4 base, r={args.rank}, {args.steps} steps, lr {args.lr:g}, kappa {args.kappa:g}, seed {args.seed}"
    )
    print(
        "| run | train loss | dev acc | dev loss | CPU ms/step | vs lora (interleaved: median [min-max]) "
        "| extra memory / 4-bit weights | merge error |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['cpu_ms'] / base_ms:.2f}x (sequential)" if base_ms else "-"
        if ratios.get(r["run"]):
            q = ratios[r["run"]]
            ratio = f"{statistics.median(q):.3f}x [{min(q):.2f}-{max(q):.2f}]"
        if "carried" in r:
            err = (
                f"increment carried {r['carried']:.2f}, error {r['requant_err']:.2f} "
                f"(p90 {r['requant_err_p90']:.2f}) x ||D||"
            )
        elif "dropped_max" in r:
            err = f"dropped / merged: max {r['dropped_max']:.3f}, mean {r['dropped_mean']:.3f}"
        else:
            err = "exact" if r["run"] == "scalora_exact" else "-"
        print(
            f"| {r['run']} | {r['train_loss']:.4f} | {100 * r['accuracy']:.2f} | {r['eval_loss']:.4f} | "
            f"{r['cpu_ms']:.0f} | {ratio} | {r['extra_memory']:.3f} | {err} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
