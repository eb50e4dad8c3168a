"""``save_pretrained`` of a guarded model whose method runs under FSDP2 (:mod:`optlora.persist`).

Under FSDP2 a rank holds one block of every base weight and LoRA factor, while the adapter a
guarded ``save_pretrained`` writes needs whole tensors: for ScaLoRA the accumulated update
``W_now - W_pretrained`` of every layer (ScaLoRA Sec. 3.1), for RefLoRA PEFT's own adapter. Two
ways are supported; each writes the same artifact one process would, or raises before writing:

* **every rank calls it**, with ``is_main_process`` given explicitly (``model.save_pretrained(dir,
  is_main_process=rank == 0)``, as accelerate documents it). The ranks first agree on exactly one
  main rank (one ``all_gather_object``), gather the LoRA parameters whole, and then, one layer at
  a time, each base weight (``DTensor.full_tensor``): the main rank subtracts the pretrained
  weight it reads from the base model's files (:class:`optlora.originals.OriginalWeights`),
  compresses and writes. If the main rank fails on a layer it still joins the remaining gathers
  and then every rank raises, so no rank hangs and nothing is written. The exact state is written
  by every rank as ``optlora_state.dcp`` (:mod:`optlora.sharded_checkpoint`).
* **the main rank alone**, with ``state_dict=`` a *whole* model state dict gathered before (what
  the Trainer does with ``FULL_STATE_DICT``; accelerate's ``get_state_dict``): no collective; the
  weights come from that state dict. The exact state (shards of every rank, rounding generators,
  Kahan buffers) cannot be written by one rank: the folder holds the adapter only and its card says
  where the state is (the Trainer callback writes ``optlora_state.dcp`` into every checkpoint).

A call on the main rank alone without a whole ``state_dict`` and without ``is_main_process`` is
refused with these two ways (it would otherwise wait forever for the other ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .discovery import lora_layers
from .distributed import is_dtensor

SHARDED_NOTE = (
    "`optlora_state.dcp` (one shard per rank, torch.distributed.checkpoint) holds the exact training state for "
    "resuming with optlora (method step {steps})."
)
NO_STATE_NOTE = (
    "This folder holds no optlora training state: under FSDP2 every rank writes it (`optlora_state.dcp`: "
    "Trainer checkpoints via optlora.hf.callback, or optlora.hf.save_state on every rank)."
)


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective: every rank calls it, in the same order)."""
    return t.detach().full_tensor() if is_dtensor(t) else t.detach()


def _refusal(world: int) -> RuntimeError:
    return RuntimeError(
        f"this model's weights are FSDP2 shards over {world} ranks, so save_pretrained needs every rank or a whole "
        "state dict. Call it on every rank with is_main_process given: model.save_pretrained(dir, "
        "is_main_process=(rank == 0)); or gather a whole state dict on every rank first and pass it on the main rank: "
        "full = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
        "full_state_dict=True, cpu_offload=True)); model.save_pretrained(dir, state_dict=full) on rank 0 (what the "
        "Trainer does with FULL_STATE_DICT). Or save the sharded checkpoint and export it later: "
        "`optlora export --checkpoint CKPT --base MODEL`. Nothing was written."
    )


def _find(state_dict: dict, keys: list[str], what: str) -> torch.Tensor:
    for k in keys:
        if k in state_dict:
            return state_dict[k]
    raise ValueError(
        f"the state_dict passed to save_pretrained has no {what} (looked for {keys[:2]}); nothing was written"
    )


def save_pretrained(guard, model, original, opts: dict, extra: dict, directory: str, explicit_main: bool) -> None:
    """The guarded ``save_pretrained`` of a model with FSDP2-sharded LoRA layers (see the module docstring)."""
    m = guard.method
    mesh = m.factors[0].lora_A.device_mesh
    state_dict = extra.get("state_dict")
    whole = state_dict is not None and not any(is_dtensor(v) for v in state_dict.values())
    if whole:
        if opts.get("is_main_process", True):
            _save_from_state_dict(guard, model, original, opts, extra, directory)
        return
    if not explicit_main:
        raise _refusal(mesh.size())
    group = mesh.get_group()
    flags = [None] * dist.get_world_size(group)
    dist.all_gather_object(flags, bool(opts.get("is_main_process", True)), group=group)
    if sum(bool(x) for x in flags) != 1:
        raise RuntimeError(
            f"under FSDP2 exactly one rank saves (is_main_process=True), got {sum(bool(x) for x in flags)} of "
            f"{len(flags)}: pass is_main_process=(rank == 0) on every rank. Nothing was written."
        )
    is_main = bool(opts.get("is_main_process", True))
    # every LoRA / trainable parameter whole, in one fixed order on every rank (small: the adapters)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad or ".lora_" in n)
    params = dict(model.named_parameters())
    full = {n: _whole(params[n]).cpu() for n in names}
    extra = {k: v for k, v in extra.items() if k != "state_dict"}
    error = None
    if not m.merges:
        if is_main:
            try:
                original(model, directory, **opts, **extra, state_dict=full)
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                error = exc
    else:
        error = _save_update_collective(guard, model, full, opts, directory, is_main)
    _agree(error, group)
    if guard.exact_state:
        guard.write_state(model, directory)  # every rank: optlora_state.dcp


def _agree(error: Exception | None, group) -> None:
    """Every rank raises if one failed (the failing rank its own error)."""
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, None if error is None else f"{type(error).__name__}: {error}", group=group)
    if error is not None:
        raise error
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"saving failed on rank {rank}, so nothing was written: {message}")


def _trained_adapter(guard, model, opts: dict) -> str | None:
    """The adapter the method trains, if selected; refuses what cannot be written (shared base weights)."""
    trained, mine, others = guard.split_adapters(model, opts)
    if others:
        raise ValueError(
            f"under FSDP2 the guarded save_pretrained writes the adapter the method trains ({trained}), not {others}: "
            "pass selected_adapters=" + repr(trained) + ". Nothing was written."
        )
    return mine[0] if mine else None


def _save_update_collective(guard, model, full: dict, opts: dict, directory: str, is_main: bool):
    """ScaLoRA's accumulated update, base weights gathered one layer at a time; returns the main rank's error."""
    from peft.utils import get_peft_model_state_dict

    error = None
    adapter = None
    try:
        adapter = _trained_adapter(guard, model, opts)
        if adapter is not None and is_main:
            guard.originals.require([f.name for f in lora_layers(model, adapter)])
    except Exception as exc:  # noqa: BLE001 - every rank decides the same, the main rank also on the originals
        error = exc
    _agree(error, _group(guard))
    if adapter is None:
        return None
    layers = lora_layers(model, adapter)
    done = [0]

    def tensors_of(f):
        expect = layers[done[0]]
        if expect.name != f.name:  # every rank gathers in this order: a different order would deadlock
            raise RuntimeError(f"optlora internal error: layer {f.name} gathered out of order (expected {expect.name})")
        done[0] += 1
        prefix = f"base_model.model.{f.name}"
        return (
            _whole(f.base_weight),
            full[f"{prefix}.lora_A.{adapter}.weight"],
            full[f"{prefix}.lora_B.{adapter}.weight"],
        )

    written = None
    if is_main:
        try:
            peft_state = get_peft_model_state_dict(model, state_dict=full, adapter_name=adapter)
            written = guard.update_adapter(model, adapter, directory, tensors_of=tensors_of, peft_state=peft_state)
        except Exception as exc:  # noqa: BLE001 - join the remaining gathers, then every rank raises
            error = exc
    for f in layers[done[0] :]:  # the other ranks gather every layer; a failed main rank the rest
        _whole(f.base_weight)
    if written is not None and error is None:
        try:
            guard.write_update(model, directory, adapter, written, opts, SHARDED_NOTE.format(steps=guard.method.steps))
        except Exception as exc:  # noqa: BLE001
            error = exc
    return error


def _group(guard):
    return guard.method.factors[0].lora_A.device_mesh.get_group()


def _save_from_state_dict(guard, model, original, opts: dict, extra: dict, directory: str) -> None:
    """The main rank alone, with a whole model state dict (Trainer ``FULL_STATE_DICT``): no collective."""
    from peft.utils import get_peft_model_state_dict

    m = guard.method
    state_dict = extra["state_dict"]
    if not m.merges:
        original(model, directory, **opts, **extra)
        return
    adapter = _trained_adapter(guard, model, opts)
    if adapter is None:
        return
    guard.originals.require([f.name for f in lora_layers(model, adapter)])

    def tensors_of(f):
        keys = [f"base_model.model.{f.name}", f.name]
        return (
            _find(state_dict, [f"{k}.base_layer.weight" for k in keys], f"base weight of {f.name}"),
            _find(state_dict, [f"{k}.lora_A.{adapter}.weight" for k in keys], f"lora_A of {f.name}"),
            _find(state_dict, [f"{k}.lora_B.{adapter}.weight" for k in keys], f"lora_B of {f.name}"),
        )

    peft_state = get_peft_model_state_dict(model, state_dict=state_dict, adapter_name=adapter)
    written = guard.update_adapter(model, adapter, directory, tensors_of=tensors_of, peft_state=peft_state)
    guard.write_update(model, directory, adapter, written, opts, NO_STATE_NOTE)
