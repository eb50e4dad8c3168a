"""FSDP2 worker for tests/test_fsdp.py: ``python tests/fsdp_worker.py OUT_DIR WORLD CASES``.

Spawns WORLD CPU processes (gloo, file rendezvous: no ports). Each process runs every case of
CASES (comma-separated names of :data:`CASES`) on a tiny PEFT model sharded with FSDP2
``fully_shard`` (every decoder block, then the root), training on its rows ``rank::WORLD`` of
a fixed global batch, and checks on the way that every rank took the same decisions
(``assert_replicas_in_sync``). Rank 0 saves, per case, the full (gathered) LoRA factors and
base weights and the method's stats to OUT_DIR/CASE.pt; :func:`train` with ``world=1`` and
no sharding is the single-process run the test compares against.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

STEPS, GLOBAL_BATCH = 5, 8
OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.2, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
}


def case(method="lora", opt="adamw", dtype="float32", model="llama", r=4, placement=None, **options) -> dict:
    return {"method": method, "opt": opt, "dtype": dtype, "model": model, "r": r, "placement": placement, **options}


CASES = {
    f"{m}-{o}-{d}": case(m, o, d)
    for m in ("lora", "reflora", "reflora_s", "scalora", "scalora_i", "scaledgd")
    for o in ("sgd", "adamw")
    for d in ("float32", "bfloat16")
}
CASES.update(
    {
        "scalora-gpt2": case("scalora", model="gpt2"),  # fan_in_fan_out: W is in x out, sharded over in
        "reflora-gpt2": case("reflora", model="gpt2"),
        "scalora-r3": case("scalora", r=3),  # uneven: ranks hold 2 and 1 rows of lora_A
        "reflora-r3": case("reflora", r=3),
        "scalora-shard1": case("scalora", placement=1),  # Shard(1) for every 2-D parameter
        "reflora-shard1": case("reflora", placement=1),
        "reflora_s-shard1": case("reflora_s", placement=1),
        "scalora-kahan": case("scalora", dtype="bfloat16", merge_precision="kahan"),
        # FSDP2 mixed precision (bf16 compute, fp32 shards and reductions) against a float32 single process
        "lora-mp": case("lora", mp=True),
        "reflora-mp": case("reflora", mp=True),
        "scalora-mp": case("scalora", mp=True),
        # for 4 processes: r = 2 leaves ranks 2 and 3 without rows of lora_A
        "reflora-r2": case("reflora", r=2),
        "reflora_s-r2": case("reflora_s", r=2),
        "scalora-r2": case("scalora", r=2),
        "scalora-r2-gpt2": case("scalora", r=2, model="gpt2"),
    }
)
#: range guards whose decision needs a value another rank holds (see :func:`tamper`); 2 processes
GUARD_CASES = {
    "scalora-guard-moment": case("scalora", tamper="moment_rows"),
    "reflora_s-guard-moment": case("reflora_s", tamper="moment_rows"),
    "scalora-guard-tiny_B": case("scalora", tamper="tiny_B_rows"),
    "reflora-guard-grad_B": case("reflora", tamper="huge_grad_B_row"),
    "scaledgd-guard-grad_B": case("scaledgd", tamper="huge_grad_B_row"),
}
CASES.update(GUARD_CASES)
TAMPERED_LAYER = 2  # layers.0.mlp.up_proj: one of two layers of its shape group (a partial skip)


def build_model(c: dict, seed: int = 11):
    import peft
    from eco_helpers import tiny_peft

    from optlora.testing import models

    dtype = getattr(torch, c["dtype"])
    if c["model"] == "gpt2":
        base = models.tiny_gpt2(embd=16, layers=2, heads=2, vocab=64, positions=16, dtype=torch.float32, seed=seed)
        cfg = peft.LoraConfig(
            r=c["r"], lora_alpha=2 * c["r"], target_modules=["c_attn", "c_fc", "c_proj"], fan_in_fan_out=True
        )
        model = peft.get_peft_model(base, cfg)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    else:
        model = tiny_peft(seed=seed, r=c["r"])
    return model.to(dtype)


def blocks(model):
    inner = model.get_base_model()
    return inner.transformer.h if hasattr(inner, "transformer") else inner.model.layers


def shard(model, c: dict):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    kw = {}
    if c.get("mp"):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if c["placement"] is not None:
        kw["shard_placement_fn"] = lambda p: Shard(c["placement"]) if p.dim() == 2 else Shard(0)
    for block in blocks(model):
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def tamper(c: dict, method, opt) -> None:
    """Before the last step's ``opt.step()``: put into one layer a value only one rank's shard holds.

    Written through the full tensor, so a single process gets the same values. With 2 processes
    (``Shard(0)``: rank 0 holds rows ``[0, n/2)``, rank 1 the rest):

    * ``moment_rows``: ``exp_avg_sq`` of ``lora_A`` and ``lora_B`` (rank 1's rows) at half the float32 maximum:
      a rescaling that grows any rank index overflows them (the moment maxima guard);
    * ``tiny_B_rows``: rank 0's rows of ``lora_B`` x 1e-38 (subnormal): only rank 0's own column maxima say
      that a rescaling would flush ``lora_B``'s columns below the normal range; the whole columns' do not;
    * ``huge_grad_B_row``: rank 1's last row of ``lora_B.grad`` at half the float32 maximum: the preconditioned
      gradient (computed on rank 1's rows only) leaves the float32 range where it grows that row.
    """
    from optlora.distributed import copy_into_

    f = method.factors[TAMPERED_LAYER]
    kind = c["tamper"]
    big = torch.finfo(torch.float32).max / 2
    with torch.no_grad():
        if kind == "moment_rows":
            targets = [opt.state[f.lora_A]["exp_avg_sq"], opt.state[f.lora_B]["exp_avg_sq"]]
        else:
            targets = [f.lora_B if kind == "tiny_B_rows" else f.lora_B.grad]
        for t in targets:
            full = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
            half = full.shape[0] // 2
            if kind == "moment_rows":
                full[half:] = big
            elif kind == "tiny_B_rows":
                full[:half] *= 1e-38
            else:
                full[-1] = big
            copy_into_(t, full)


def make(c: dict, model):
    import optlora

    skip = ("method", "opt", "dtype", "model", "r", "placement", "mp", "tamper")
    opts = {k: v for k, v in c.items() if k not in skip}
    if c["method"] in ("scalora", "scalora_i"):
        opts.setdefault("kappa", 0.5)
    if c["method"] == "scalora_i":
        opts["interval"] = 2
    return optlora.make_method(c["method"], model, warmup_steps=1, **opts)


def train(c: dict, rank: int = 0, world: int = 1, sharded: bool = False) -> dict:
    """``STEPS`` steps on rows ``rank::world`` of the global batch; the full LoRA state and stats."""
    from eco_helpers import token_batches

    model = build_model(c)
    if sharded:
        shard(model, c)
    method = make(c, model)  # built on the sharded model; the Trainer path builds it before (test_fsdp_hf)
    cls, kw = OPTIMIZERS[c["opt"]]
    opt = cls([p for p in model.parameters() if p.requires_grad], **kw)
    if method is not None:
        method.attach(opt)
    ids = token_batches(GLOBAL_BATCH, 12, seed=4)[rank::world]
    for step in range(STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        if c.get("tamper") and step == STEPS - 1:
            tamper(c, method, opt)
        opt.step()
        opt.zero_grad()
    if method is not None and sharded:
        from optlora.distributed import assert_replicas_in_sync

        assert_replicas_in_sync(method)
    state = {}
    for n, p in model.named_parameters():
        if "lora_" in n or "base_layer" in n:
            state[n] = (p.full_tensor() if sharded else p).detach().clone()
    stats = {} if method is None else method.stats()
    out = {"state": state, "stats": stats}
    if sharded:  # every rank's stats: the same layers skipped, for the same reasons
        out["rank_stats"] = [None] * world
        dist.all_gather_object(out["rank_stats"], stats)
    return out


def _worker(rank: int, world: int, out: str, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        import fsdp_persist
        import fsdp_scenarios

        for name in names:
            if name in CASES:
                result = train(CASES[name], rank, world, sharded=True)
                if rank == 0:
                    torch.save(result, os.path.join(out, f"{name}.pt"))
            else:
                scenario = getattr(fsdp_scenarios, name, None) or getattr(fsdp_persist, name)
                scenario(rank, world, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = os.path.abspath(sys.argv[1])
    world_size = int(sys.argv[2])
    cases = sys.argv[3].split(",") if len(sys.argv) > 3 and sys.argv[3] != "all" else list(CASES)
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(world_size, out_dir, cases), nprocs=world_size, join=True)
