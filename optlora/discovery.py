"""Find the LoRA factors of a PEFT model and check that a method can handle them.

This is the only module that knows PEFT's classes. It turns a model into a list of
:class:`LoRAFactors` records (one per layer and adapter) that the methods work on.

Supported: every PEFT LoRA layer that computes ``base(x) + scaling * lora_B(lora_A(dropout(x)))``
with plain ``nn.Linear`` factors around a base layer that optlora does not need to touch:
``peft.tuners.lora.Linear`` (plain LoRA, rsLoRA, any ``lora_alpha``, ``fan_in_fan_out`` such
as GPT-2's ``Conv1D``, several adapters and ranks per model) and the quantised-base layers
PEFT dispatches to (bitsandbytes ``Linear8bitLt`` / ``Linear4bit``, HQQ, GPTQ, AWQ, EETQ, AQLM,
torchao, ...). This is decided from the layer's structure, not from a list of classes.
Not supported: LoRA variants that change the forward pass (DoRA and every other
``lora_variant``), and the PEFT layers that are not a linear map around a base layer
(``Embedding``, ``Conv1d/2d/3d``, ``MultiheadAttention``, parameter-targeting LoRA), or whose
factors are not ``nn.Linear`` (tensor-parallel layers). ScaLoRA additionally needs a plain
floating-point base weight it can merge into: a quantised base weight is reported by
:func:`merge_problem`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .distributed import is_dtensor

SUPPORTED = (
    "PEFT LoRA layers on linear base layers (`Linear` incl. fan_in_fan_out / GPT-2 Conv1D, rsLoRA, several "
    "adapters; quantised bases such as bitsandbytes 4/8-bit)"
)
#: what to do when ScaLoRA cannot merge into a base weight (shown with the refusal)
MERGE_ADVICE = (
    "ScaLoRA merges each step's increment into the base weight, which a quantised weight cannot hold exactly "
    "(re-quantising rounds the increment away; see docs/QUANTIZED.md). On a quantised base: pass "
    "ScaLoRA(residual_rank=R) to keep the merged increments in a rank-R residual beside the quantised weight "
    "(error reported by stats()), use optlora.RefLoRA (or scalar=True for RefLoRA-S), which only touches the "
    "LoRA factors, or load the base in bfloat16."
)
#: PEFT LoRA layer classes (in ``peft.tuners.lora.layer``) that are not ``base(x) + s * B A x`` on a linear base
_NOT_LINEAR = ("Embedding", "_ConvNd", "MultiheadAttention", "ParamWrapper")


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
        from peft.tuners.lora import Linear, LoraLayer, layer
    except ImportError as exc:  # pragma: no cover - peft is a hard dependency
        raise ImportError("optlora needs `peft` (pip install peft)") from exc
    not_linear = tuple(c for c in (getattr(layer, n, None) for n in _NOT_LINEAR) if isinstance(c, type))
    return LoraLayer, Linear, not_linear


def _unsupported_reason(module: nn.Module, adapter: str, not_linear: tuple[type, ...]) -> str | None:
    """Why ``module``'s ``adapter`` is not ``base(x) + scaling * lora_B(lora_A(x))`` on a linear base (None: it is)."""
    if isinstance(module, not_linear) or adapter not in getattr(module, "lora_A", {}):
        return f"{type(module).__name__} LoRA layers are not supported"
    if getattr(module, "use_dora", {}).get(adapter, False):
        return "DoRA (use_dora=True) is not supported"
    variant = getattr(module, "lora_variant", {}).get(adapter)
    if variant is not None:
        return f"the LoRA variant {type(variant).__name__} is not supported"
    A = module.lora_A[adapter]
    B = module.lora_B[adapter] if adapter in getattr(module, "lora_B", {}) else None
    if type(A) is not nn.Linear or type(B) is not nn.Linear:
        return f"lora_A/lora_B are not nn.Linear ({type(A).__name__}/{type(B).__name__}: sharded or custom factors)"
    shape = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    if shape != (A.in_features, B.out_features):
        return (
            f"the factors ({A.in_features} -> {B.out_features}) do not match the base layer ({shape[0]} -> {shape[1]})"
        )
    return None


def quantized_base(f: LoRAFactors) -> bool:
    """Whether ``f``'s base layer has no plain floating-point ``weight`` tensor (quantised, packed or absent)."""
    w = getattr(f.module.get_base_layer(), "weight", None)
    plain = type(w) in (torch.Tensor, nn.Parameter) or is_dtensor(w)  # FSDP2 shards a float weight: not quantised
    return not plain or not w.is_floating_point()


def merge_problem(f: LoRAFactors) -> str | None:
    """Why ScaLoRA cannot merge ``B diag(c) A`` exactly into ``f``'s base weight (None: it can).

    A quantised base weight (bitsandbytes ``Params4bit`` / ``Int8Params``, HQQ, GPTQ, torchao
    tensor subclasses, ...) cannot absorb a small increment exactly: re-quantising rounds it
    away (docs/QUANTIZED.md measures by how much).
    """
    base = f.module.get_base_layer()
    w = getattr(base, "weight", None)
    if quantized_base(f):
        kind = "none" if w is None else f"{type(w).__name__}, {w.dtype}"
        return f"base layer {type(base).__name__} has no plain floating-point weight to merge into (quantised? weight: {kind})"
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
    model: nn.Module, *, mergeable: bool = False, skip_unsupported: bool = False, quantized_ok: bool = False
) -> list[LoRAFactors]:
    """All trainable LoRA adapters of ``model``, checked for support.

    Args:
        model: a ``PeftModel`` or any module containing PEFT LoRA layers.
        mergeable: also require a base weight that can absorb ``B @ A`` (ScaLoRA).
        skip_unsupported: warn about and leave out unsupported adapters instead of raising.
        quantized_ok: with ``mergeable``, accept quantised bases (:func:`quantized_base`): the method
            keeps their merges elsewhere (ScaLoRA's ``residual_rank``) and never writes them.

    Raises:
        ValueError: no trainable LoRA adapter, or an unsupported one (naming the layer).
    """
    lora_layer, _, not_linear = _lora_classes()
    found, problems, cannot_merge = [], [], False
    for path, module in model.named_modules():
        if not isinstance(module, lora_layer) or not any(p.requires_grad for p in module.parameters()):
            continue  # not LoRA, or nothing in it is trained
        adapters = list(getattr(module, "lora_A", {}).keys()) + list(getattr(module, "lora_embedding_A", {}).keys())
        for adapter in adapters:
            name = f"{path}[{adapter}]"
            reason = _unsupported_reason(module, adapter, not_linear)
            f = LoRAFactors(name, module, adapter)
            if reason is None and not (f.lora_A.requires_grad and f.lora_B.requires_grad):
                continue  # a frozen adapter: not being trained, nothing to do
            if reason is None and mergeable and not (quantized_ok and quantized_base(f)):
                reason = merge_problem(f)
                cannot_merge = cannot_merge or reason is not None
            if reason is None:
                found.append(f)
            else:
                problems.append(f"{name}: {reason}")
    if mergeable:  # a quantised weight is never written: sharing it is harmless
        for name, others in shared_base_weights(model, [f for f in found if not quantized_base(f)]).items():
            found = [f for f in found if f.name != name]
            problems.append(
                f"{name}: its base weight is shared with {', '.join(others[:3])} (tied weights, e.g. "
                "tie_word_embeddings=True): merging into it would also change that module. Untie the weights, "
                "leave this layer out of target_modules, or use RefLoRA (it never modifies base weights)"
            )
    if problems:
        msg = f"unsupported LoRA layer(s); optlora supports {SUPPORTED}:\n  " + "\n  ".join(problems)
        if cannot_merge:
            msg += "\n" + MERGE_ADVICE
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
    """Every PEFT LoRA adapter ``adapter`` on a linear base layer of ``model`` (quantised too), trainable or not.

    Unlike :func:`find_lora_factors` (what a method trains), this lists what a saved or
    exported model holds. Names are module paths inside the *base* model (no ``[adapter]``
    suffix), as PEFT's own state dicts and ``target_modules`` use them. ``adapter`` defaults
    to the model's active adapter.
    """
    lora_layer, _, not_linear = _lora_classes()
    if adapter is None:
        adapter = getattr(model, "active_adapter", None) or "default"
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = [
        LoRAFactors(path, module, adapter)
        for path, module in inner.named_modules()
        if isinstance(module, lora_layer) and _unsupported_reason(module, adapter, not_linear) is None
    ]
    if not out:
        raise ValueError(f"{type(model).__name__} has no PEFT LoRA layer on a linear base with adapter {adapter!r}")
    return out


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` contains any PEFT LoRA layer (a ``PeftModel`` or a module with LoRA layers inside)."""
    lora_layer, _, _ = _lora_classes()
    return hasattr(model, "get_base_model") or any(isinstance(m, lora_layer) for m in model.modules())
