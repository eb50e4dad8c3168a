"""FSDP2 scenario of the guarded ``save_pretrained`` (optlora.persist_fsdp), run by tests/fsdp_worker.py.

``persist_save(rank, world, out)`` runs on every rank: ScaLoRA and RefLoRA on a tiny Llama whose
pretrained weights live in ``out/persist-base`` (safetensors, so the originals are read from the file,
as for a hub model), sharded with ``fully_shard`` and trained ``STEPS`` steps (warm-up 1). Then, per
method, into ``out/persist-<method>-<way>``:

* ``every``: every rank calls ``model.save_pretrained(dir, is_main_process=rank == 0)``;
* ``whole``: ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` on every rank, then the
  main rank alone calls ``model.save_pretrained(dir, state_dict=full)``;
* ``refused``: the main rank alone, neither: the error is recorded, the folder must not exist;
* ``resumed``: a fresh sharded model and method ``load_adapter(every, "default")`` on every rank;
* ``mismatch``: the same with a method of another configuration (``interval``): refused on every rank.

Rank 0 leaves ``out/persist_save.pt``: per method the trained (gathered) tensors, logits of fixed ids,
stats, the refusal and what the resumed model holds; tests/test_persist_fsdp.py checks the folders.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

STEPS = 5
EVAL_IDS = (4, 10, 9)  # token_batches(n, seq, seed) of the logits the test compares


def _model(base: str, init_b: bool):
    import peft
    from eco_helpers import lora_config
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora_config(4))
    if init_b:  # small random lora_B, so that every method acts from its first due step
        g = torch.Generator().manual_seed(12)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def _full(model) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in model.named_parameters():
        if "lora_" in n or "base_layer" in n:
            out[n] = p.full_tensor().detach().clone()
    return out


def _sharded(base: str, name: str, init_b: bool = True, **options):
    import fsdp_worker as W

    c = W.case(name, **options)
    model = W.shard(_model(base, init_b), c)
    return model, W.make(c, model)


def _gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def persist_save(rank: int, world: int, out: str) -> None:
    import fsdp_worker as W
    from eco_helpers import token_batches
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from optlora.testing import models

    base = os.path.join(out, "persist-base")
    if rank == 0:
        models.tiny_llama(vocab=64, seed=11).save_pretrained(base)
    dist.barrier()
    ids = token_batches(W.GLOBAL_BATCH, 12, seed=4)[rank::world]
    result = {}
    for name in ("scalora", "reflora"):
        folder = os.path.join(out, f"persist-{name}")
        model, method = _sharded(base, name)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        method.attach(opt)
        for _ in range(STEPS):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        model.save_pretrained(f"{folder}-every", is_main_process=rank == 0)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            model.save_pretrained(f"{folder}-whole", state_dict=full)
            try:
                model.save_pretrained(f"{folder}-refused")
                refused = None
            except RuntimeError as exc:
                refused = str(exc)
        dist.barrier()
        model.eval()
        with torch.no_grad():
            logits = model(input_ids=token_batches(*EVAL_IDS)).logits
        trained = _full(model)

        fresh, fresh_method = _sharded(base, name, init_b=False)  # another adapter init: it must come from the state
        try:
            fresh.load_adapter(f"{folder}-every", "default", is_trainable=True)
            resumed = {"error": None, "equal": all(torch.equal(trained[n], v) for n, v in _full(fresh).items())}
        except Exception as exc:  # noqa: BLE001 - recorded for the test, which reports it
            resumed = {"error": f"{type(exc).__name__}: {exc}", "equal": False}
        resumed["steps"] = (fresh_method.steps, fresh_method.method_steps)
        other, _ = _sharded(base, name, interval=2)  # another configuration: refused on every rank
        before = _full(other)
        try:
            other.load_adapter(f"{folder}-every", "default", is_trainable=True)
            mismatch = {"error": None}
        except ValueError as exc:
            mismatch = {"error": str(exc)}
        mismatch["unchanged"] = all(torch.equal(before[n], v) for n, v in _full(other).items())
        mismatch = _gather(mismatch, world)
        if rank == 0:
            result[name] = {
                "trained": trained,
                "logits": logits,
                "stats": method.stats(),
                "steps": (method.steps, method.method_steps),
                "refused": refused,
                "refused_wrote": os.path.exists(f"{folder}-refused"),
                "resumed": resumed,
                "mismatch": mismatch,
            }
    if rank == 0:
        torch.save(result, os.path.join(out, "persist_save.pt"))
