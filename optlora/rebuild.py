"""The exact trained model from a checkpoint folder and the original base model, without a method object.

Used by :func:`optlora.persist.rebuild` (which also guards the result) and ``optlora export``.
The folder's optlora state holds everything a base-modifying run changed: the live LoRA factors,
the merged base weights (ScaLoRA Sec. 3.1) and, in its metadata, the live PEFT configuration. It
may be a safetensors state or an FSDP2 ``optlora_state.dcp`` folder, read whole in this process
(:func:`optlora.checkpoint.read_state`).
"""

from __future__ import annotations

import json
import os

import torch

from . import checkpoint, export
from .discovery import lora_layers


def adapter_extras(model, folder: str, adapter: str) -> dict[str, torch.Tensor]:
    """The non-LoRA entries (``modules_to_save``, biases) of the adapter in ``folder``, checked against ``model``."""
    from peft.utils import get_peft_model_state_dict, load_peft_weights

    live = {k: v for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items() if ".lora_" not in k}
    if not live:
        return {}
    saved = {k: v for k, v in load_peft_weights(folder, device="cpu").items() if ".lora_" not in k}
    if set(saved) != set(live):
        raise ValueError(
            f"the adapter in {folder} has non-LoRA entries {sorted(saved)[:4]}, this model {sorted(live)[:4]}: "
            "it was saved from another configuration; nothing was loaded"
        )
    for k, v in live.items():
        if saved[k].shape != v.shape:
            raise ValueError(f"{folder}: {k} has shape {tuple(saved[k].shape)}, the model {tuple(v.shape)}")
    return saved


def peft_configs(found: str | None) -> dict:
    """The live PEFT configuration(s) saved with a state, by adapter name (``{}`` if none)."""
    return json.loads(checkpoint.read_metadata(found).get("peft_config", "{}")) if found else {}


def rebuild_model(base_model, folder: str | os.PathLike, *, adapter: str = "default"):
    """``(peft_model, base_changed)``: the trained model rebuilt on ``base_model`` from ``folder``.

    Uses the live adapter configuration and tensors of the folder's optlora state: LoRA factors,
    merged base weights and the adapter's non-LoRA entries. Without a state, or for a state without
    factors, the folder's adapter is loaded with plain PEFT (and merged base weights of an older
    state are applied). ``base_changed``: base weights of a run that merged (``method_steps > 0``) were
    written into ``base_model``.
    """
    import peft

    folder = os.fspath(folder)
    found = checkpoint.find_state(folder)
    state = checkpoint.read_state(found) if found else {}
    configs = peft_configs(found)
    if "factors" not in state or adapter not in configs:
        model = peft.PeftModel.from_pretrained(base_model, folder)
        changed = export.apply_method_state(model, state) if state else 0
        return model, changed > 0 and state.get("method_steps", 1) > 0
    config = peft.PeftConfig.from_peft_type(**configs[adapter])
    model = peft.get_peft_model(base_model, config, adapter_name=adapter, autocast_adapter_dtype=False)
    layers = {f"{f.name}[{adapter}]": f for f in lora_layers(model, adapter)}
    weights = {k.rsplit("[", 1)[0] if k.endswith("]") else k: v for k, v in state["base_weights"].items()}
    with torch.no_grad():
        for name, f in layers.items():
            key = next((k for k in state["factors"] if k == name or k.endswith("." + name)), None)
            if key is None:
                raise ValueError(f"{found} has no factors for LoRA layer {name}")
            f.lora_A.copy_(state["factors"][key]["lora_A"])
            f.lora_B.copy_(state["factors"][key]["lora_B"])
        residuals = state.get("residuals", {})  # ScaLoRA(residual_rank) on quantised bases: attached and filled
        changed = export.apply_method_state(model, {"base_weights": weights, "residuals": residuals})
    extras = adapter_extras(model, folder, adapter)
    if extras:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(model, extras, adapter_name=adapter)
    return model, changed > 0 and state.get("method_steps", 1) > 0
