"""Find the LoRA factors of a PEFT model and check that a method can handle them.

This is the only module that knows PEFT's classes. It turns a model into a list of
:class:`LoRAFactors` records (one per layer and adapter) that the methods work on.

Supported: ``peft.tuners.lora.Linear`` adapters (plain LoRA, rsLoRA, any ``lora_alpha``,
``fan_in_fan_out`` such as GPT-2's ``Conv1D``, several adapters and ranks per model).
Not supported: LoRA variants that change the forward pass (DoRA and other
``lora_variant``s), ``Embedding``, ``Conv1d/2d/3d``, ``MultiheadAttention`` and
parameter-targeting LoRA. ScaLoRA additionally needs a plain floating-point base weight
it can merge into (no quantised base layers).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import is_dtensor

SUPPORTED = "peft LoRA `Linear` layers (incl. fan_in_fan_out / GPT-2 Conv1D, rsLoRA, several adapters)"


@dataclass(eq=False)
class LoRAFactors:
    """One adapter of one LoRA layer.

    PEFT layout: ``lora_A`` is ``r x in``, ``lora_B`` is ``out x r`` and the layer computes
    ``base(x) + scaling * lora_B(lora_A(x))``. In the papers' notation (mapping M1)
    ``A = lora_A.T`` (in x r) and ``B = lora_B`` (out x r).
    """

    name: str  # "<module path>[<adapter>]"
    module: nn.Module  # the peft LoraLayer
    adapter: str

    @property
    def lora_A(self) -> nn.Parameter:
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        return float(self.module.scaling[self.adapter])

    @property
    def rank(self) -> int:
        return self.lora_A.shape[0]

    @property
    def base_weight(self) -> torch.Tensor:
        """Frozen base weight, as stored (``in x out`` when ``fan_in_fan_out``)."""
        return self.module.get_base_layer().weight

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))


def _lora_classes():
    try:
        from peft.tuners.lora import Linear, LoraLayer
    except ImportError as exc:  # pragma: no cover - peft is a hard dependency
        raise ImportError("optlora needs `peft` (pip install peft)") from exc
    return LoraLayer, Linear


def _unsupported_reason(module: nn.Module, adapter: str, linear_cls: type) -> str | None:
    if not isinstance(module, linear_cls):
        return f"{type(module).__name__} LoRA layers are not supported"
    if getattr(module, "use_dora", {}).get(adapter, False):
        return "DoRA (use_dora=True) is not supported"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"the LoRA variant {type(variant).__name__} is not supported"
    if not isinstance(module.lora_A[adapter], nn.Linear) or not isinstance(module.lora_B[adapter], nn.Linear):
        return "lora_A/lora_B are not nn.Linear"
    return None


def _check_mergeable(f: LoRAFactors) -> str | None:
    base = f.module.get_base_layer()
    w = getattr(base, "weight", None)
    if (type(w) not in (torch.Tensor, nn.Parameter) and not is_dtensor(w)) or not w.is_floating_point():
        return f"base layer {type(base).__name__} has no plain floating-point weight to merge into (quantised?)"
    expected = (f.lora_B.shape[0], f.lora_A.shape[1])
    shape = tuple(w.shape[::-1]) if f.fan_in_fan_out else tuple(w.shape)
    if shape != expected:
        return f"base weight shape {tuple(w.shape)} does not match the adapter ({expected}, fan_in_fan_out={f.fan_in_fan_out})"
    return None


def _memory_key(t: torch.Tensor | None) -> tuple | None:
    """What ``t``'s memory is known by: ``(device, storage pointer)``, an FSDP2 DTensor's identity, or ``None``."""
    if t is None or t.device.type == "meta":
        return None
    if is_dtensor(t):
        return ("dtensor", id(t))
    return None if t.untyped_storage().nbytes() == 0 else (t.device, t.untyped_storage().data_ptr())


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[start, end)`` of the bytes ``t`` can touch in its storage (a DTensor: all of it)."""
    if is_dtensor(t):
        return 0, 1
    size = t.element_size()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride())) if t.numel() else -1
    return t.storage_offset() * size, (t.storage_offset() + last + 1) * size


def shared_base_weights(model: nn.Module, factors: list[LoRAFactors]) -> dict[str, list[str]]:
    """Adapters whose base weight shares memory with a tensor of another module, and who shares it.

    Tied weights (``tie_word_embeddings``: ``lm_head.weight is embed_tokens.weight``) or one
    ``nn.Linear`` registered under two names: merging into such a weight (ScaLoRA) also changes
    the other module. Adapters of the same LoRA layer share their base weight legitimately.
    FSDP2 parameters are compared by identity: ``fully_shard`` keeps a tied parameter as one DTensor,
    and a rank's local shard may be empty, so its storage would tell nothing (and ranks would disagree).
    """
    owners: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    paths: dict[int, list[str]] = {}  # a module reused under several names (shared layers) has several paths
    for mod_name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(mod_name)
        for kind in (module.named_parameters(recurse=False), module.named_buffers(recurse=False)):
            for name, t in kind:
                key = _memory_key(t)
                if key is not None:
                    owners.setdefault(key, []).append((f"{mod_name}.{name}" if mod_name else name, t))
    out: dict[str, list[str]] = {}
    for f in factors:
        w = f.base_weight
        key = _memory_key(w)
        if key is None:
            continue
        own = [f"{p}." if p else "" for p in paths.get(id(f.module), [])]
        lo, hi = _byte_range(w)
        others = []
        for name, t in owners.get(key, []):
            a, b = _byte_range(t)
            # this LoRA layer's own base layer (through ``base_layer``, possibly nested) is not a share
            mine = any(name.startswith(o) and set(name[len(o) :].split(".")[:-1]) <= {"base_layer"} for o in own)
            if a < hi and lo < b and not mine:
                others.append(name)
        if others:
            out[f.name] = others
    return out


def find_lora_factors(
    model: nn.Module, *, mergeable: bool = False, skip_unsupported: bool = False
) -> list[LoRAFactors]:
    """All trainable LoRA adapters of ``model``, checked for support.

    Args:
        model: a ``PeftModel`` or any module containing PEFT LoRA layers.
        mergeable: also require a base weight that can absorb ``B @ A`` (ScaLoRA).
        skip_unsupported: warn about and leave out unsupported adapters instead of raising.

    Raises:
        ValueError: no trainable LoRA adapter, or an unsupported one (naming the layer).
    """
    lora_layer, linear_cls = _lora_classes()
    found, problems = [], []
    for path, module in model.named_modules():
        if not isinstance(module, lora_layer) or not any(p.requires_grad for p in module.parameters()):
            continue  # not LoRA, or nothing in it is trained
        adapters = list(getattr(module, "lora_A", {}).keys()) + list(getattr(module, "lora_embedding_A", {}).keys())
        for adapter in adapters:
            name = f"{path}[{adapter}]"
            reason = _unsupported_reason(module, adapter, linear_cls)
            f = LoRAFactors(name, module, adapter)
            if reason is None and not (f.lora_A.requires_grad and f.lora_B.requires_grad):
                continue  # a frozen adapter: not being trained, nothing to do
            if reason is None and mergeable:
                reason = _check_mergeable(f)
            if reason is None:
                found.append(f)
            else:
                problems.append(f"{name}: {reason}")
    if mergeable:
        for name, others in shared_base_weights(model, found).items():
            found = [f for f in found if f.name != name]
            problems.append(
                f"{name}: its base weight is shared with {', '.join(others[:3])} (tied weights, e.g. "
                "tie_word_embeddings=True): merging into it would also change that module. Untie the weights, "
                "leave this layer out of target_modules, or use RefLoRA (it never modifies base weights)"
            )
    if problems:
        msg = f"unsupported LoRA layer(s); optlora supports {SUPPORTED}:\n  " + "\n  ".join(problems)
        if not skip_unsupported:
            raise ValueError(msg + "\nPass skip_unsupported=True to train those as plain LoRA.")
        warnings.warn(msg + "\nThey are trained as plain LoRA.", stacklevel=3)
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no trainable PEFT LoRA layer; wrap it first, e.g. "
            "`model = peft.get_peft_model(model, LoraConfig(r=8, target_modules='all-linear'))`"
        )
    return found


def lora_layers(model: nn.Module, adapter: str | None = None) -> list[LoRAFactors]:
    """Every PEFT LoRA ``Linear`` adapter ``adapter`` of ``model``, trainable or not.

    Unlike :func:`find_lora_factors` (what a method trains), this lists what a saved or
    exported model holds. Names are module paths inside the *base* model (no ``[adapter]``
    suffix), as PEFT's own state dicts and ``target_modules`` use them. ``adapter`` defaults
    to the model's active adapter.
    """
    _, linear_cls = _lora_classes()
    if adapter is None:
        adapter = getattr(model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = [
        LoRAFactors(path, module, adapter)
        for path, module in inner.named_modules()
        if isinstance(module, linear_cls) and adapter in module.lora_A
    ]
    if not out:
        raise ValueError(f"{type(model).__name__} has no PEFT LoRA Linear layer with adapter {adapter!r}")
    return out


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` contains any PEFT LoRA layer (a ``PeftModel`` or a module with LoRA layers inside)."""
    lora_layer, _ = _lora_classes()
    return hasattr(model, "get_base_model") or any(isinstance(m, lora_layer) for m in model.modules())
