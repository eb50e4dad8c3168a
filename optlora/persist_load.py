"""Loading into a guarded model (:mod:`optlora.persist`): ``model.load_adapter(dir, name)`` restores the exact state.

What the Trainer calls on resume and for ``load_best_model_at_end``, and what a user's own loop calls.
For an adapter the method trains, the folder's optlora state (``optlora_state.safetensors``, or the
FSDP2 ``optlora_state.dcp``) is restored through ``method.load_state_dict``, which checks every name,
shape, dtype, the configuration, the counters (the fault guards' skip counts included) and the
generator states before it writes anything (under FSDP2 on every rank, agreed before any write). A
base-modifying method (ScaLoRA Sec. 3.1) refuses a folder without that state unless its base weights
are still the pretrained ones: the adapter in it is an update for the original base.
"""

from __future__ import annotations

import inspect
import json
import os

import torch

from . import checkpoint, export
from .discovery import lora_layers, quantized_base
from .originals import OriginalsUnavailable
from .rebuild import adapter_extras
from .residual import residuals_of

__all__ = ["changed_layers", "load_adapter"]


def load_adapter(guard, model, original, args, kwargs):
    """The guarded ``model.load_adapter`` (``original``: PEFT's): the exact state where the folder has it."""
    bound = inspect.signature(original).bind(model, *args, **kwargs)
    model_id, adapter_name = bound.arguments["model_id"], bound.arguments["adapter_name"]
    extra = bound.arguments.get("kwargs", {})
    folder = os.fspath(model_id)
    if extra.get("subfolder"):
        folder = os.path.join(folder, extra["subfolder"])
    m = guard.method
    if m is None or adapter_name not in {f.adapter for f in m.factors}:
        if guard.merges and m is None:
            raise RuntimeError("this copy of a model whose base weights were rewritten cannot load adapters safely")
        return original(model, *args, **kwargs)
    state_file = checkpoint.find_state(folder, sharded=m.sharded) if os.path.isdir(folder) else None
    if state_file is None:
        if not m.merges:
            return original(model, *args, **kwargs)
        _refuse_without_state(guard, model, folder)
        return original(model, *args, **kwargs)
    if m.sharded:
        return _load_sharded(guard, model, original, args, kwargs, folder, state_file, adapter_name)
    state = checkpoint.read_state(state_file)
    m.check_state_dict(state)
    if not m.merges or "factors" not in state:  # RefLoRA, or a state saved before factors were in it
        result = original(model, *args, **kwargs)
        m.load_state_dict(state)
    else:
        extras = adapter_extras(model, folder, adapter_name)  # checked against the model before any write
        m.load_state_dict(state)
        if extras:
            from peft.utils import set_peft_model_state_dict

            set_peft_model_state_dict(model, extras, adapter_name=adapter_name)
        result = torch.nn.modules.module._IncompatibleKeys([], [])
    guard.loaded_from = (os.path.abspath(folder), int(state["steps"]))
    return result


def _load_sharded(guard, model, original, args, kwargs, folder: str, state_file: str, adapter_name: str):
    """FSDP2 (every rank): the state loaded shard by shard, checked on every rank and agreed before any write."""
    m = guard.method
    if not m.merges:  # the counters (checked first), then PEFT's own adapter
        state = checkpoint.read_state(state_file)
        m.load_state_dict(state)
        result = original(model, *args, **kwargs)
    else:
        whole = not os.path.isdir(state_file)  # a safetensors state (one process wrote it): read by every rank
        if whole and "factors" not in json.loads(checkpoint.read_metadata(state_file).get("state", "{}")):
            raise RuntimeError(
                f"{state_file} holds no live factors (an older state that relies on its PEFT adapter), which the "
                "guard cannot load into FSDP2 shards: resume it in one process. Nothing was loaded."
            )
        if adapter_extras(model, folder, adapter_name):
            raise RuntimeError(
                f"the adapter in {folder} has non-LoRA entries (modules_to_save, biases), which the guard cannot "
                "load into FSDP2 shards; load them with the Trainer's FSDP checkpoint or torch.distributed.checkpoint. "
                "Nothing was loaded."
            )
        state = checkpoint.load_state(m, state_file)  # every rank its shards; transactional, agreed
        result = torch.nn.modules.module._IncompatibleKeys([], [])
    guard.loaded_from = (os.path.abspath(folder), int(state["steps"]))
    return result


def _refuse_without_state(guard, model, folder: str) -> None:
    """A base-modifying model loads an adapter without optlora state only while its base is untouched."""
    if os.path.isfile(os.path.join(folder, export.REPORT_FILE)) or not os.path.isdir(folder):
        raise RuntimeError(
            f"{folder} holds no {checkpoint.STATE_FILE}: its adapter is an accumulated update for the original "
            f"base, and {type(guard.method).__name__}'s exact state (merged base weights, live factors, counters) "
            "is missing, so training would continue on wrong base weights. Resume from a checkpoint that has it, "
            "or load the adapter for inference on the original base: PeftModel.from_pretrained(base, folder)."
        )
    changed = [] if guard.method.sharded else changed_layers(guard, model)  # FSDP2: the counters decide
    if guard.base_changed or changed:
        where = f"{len(changed)} base weight(s) (e.g. {changed[0]})" if changed else "the base weights"
        raise RuntimeError(
            f"{type(guard.method).__name__} has already merged updates into {where}; the plain adapter in "
            f"{folder} (no {checkpoint.STATE_FILE}) belongs on the original base and would be applied on top of "
            "them. Load it into a freshly loaded model."
        )


def changed_layers(guard, model) -> list[str]:
    """LoRA layers whose live base weight differs from the pretrained one (reads the originals); a quantised
    layer (never written) differs where ScaLoRA's low-rank residual beside it holds merged increments."""
    names = sorted({f.adapter for f in guard.method.factors})
    out = []
    for f in (f for a in names for f in lora_layers(model, a)):
        if quantized_base(f):
            same = not getattr(residuals_of(f.module.get_base_layer()).get(f.adapter), "active", False)
        else:
            try:
                same = torch.equal(guard.originals.get(f.name, f.base_weight.device), f.base_weight.detach())
            except OriginalsUnavailable:
                same = False
        if not same:
            out.append(f.name)
    return out
