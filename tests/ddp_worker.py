"""DDP worker for tests/test_distributed.py: ``python tests/ddp_worker.py OUT_DIR [WORLD]``.

Spawns WORLD (default 2) CPU processes (gloo, file rendezvous: no ports), each training the same tiny
PEFT Llama wrapped in DistributedDataParallel on its share of a fixed global batch with ScaLoRA and
RefLoRA-S, checks the replicas with optlora.distributed.assert_replicas_in_sync and saves every rank's
LoRA factors and base weights to OUT_DIR/rank{r}.pt, with what an optimizer step without the method
attached did on that rank (``unattached``).
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from optlora.methods import claims  # noqa: E402

STEPS, GLOBAL_BATCH = 4, 8


def build(kind: str, model):
    import optlora

    if kind == "scalora":
        return optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    return optlora.RefLoRA(model, scalar=True, warmup_steps=1)


def train(kind: str, rank: int = 0, world: int = 1, ddp: bool = False) -> dict[str, torch.Tensor]:
    """``STEPS`` AdamW steps on rows ``rank::world`` of the global batch; returns the LoRA state."""
    from eco_helpers import tiny_peft, token_batches

    model = tiny_peft(seed=11)
    method = build(kind, model)  # built on the plain PEFT model, before the DDP wrapper
    net = torch.nn.parallel.DistributedDataParallel(model) if ddp else model
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    method.attach(opt)
    assert claims.hook_registered()  # the unattached-step hook sees every step below: it must not misfire
    ids = token_batches(GLOBAL_BATCH, 12, seed=4)[rank::world]
    for _ in range(STEPS):
        net(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    if ddp:
        from optlora.distributed import assert_replicas_in_sync

        assert_replicas_in_sync(method)
    assert method.method_steps == STEPS - 1
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}


def unattached(rank: int, world: int) -> dict:
    """A method built but never attached, its model under DDP: every rank refuses the step, nothing changed."""
    from eco_helpers import tiny_peft, token_batches

    model = tiny_peft(seed=11)
    build("scalora", model)
    net = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    ids = token_batches(GLOBAL_BATCH, 12, seed=4)[rank::world]
    net(input_ids=ids, labels=ids).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    try:
        opt.step()
        error = ""
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error, "unchanged": all(torch.equal(a, b) for a, b in zip(before, model.parameters()))}


def _worker(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/rendezvous", rank=rank, world_size=world)
    try:
        result = {kind: train(kind, rank, world, ddp=True) for kind in ("scalora", "reflora_s")}
        result["unattached"] = unattached(rank, world)
        torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir = os.path.abspath(sys.argv[1])
    world_size = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_worker, args=(world_size, out_dir), nprocs=world_size, join=True)
