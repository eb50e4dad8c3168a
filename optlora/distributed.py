"""Multi-process training: what works (DDP) and what is refused (sharded parameters).

Every optlora method computes, per LoRA layer, a closed form from the *whole* factors
``lora_A``, ``lora_B`` and their gradients (RefLoRA Theorem 3, ScaLoRA Theorems 3/5) and
ScaLoRA merges ``B diag(1 - alpha beta) A`` into the *whole* base weight. So:

* **DDP** works unchanged. Gradients are all-reduced during ``backward``, the method runs
  in the optimizer's step pre-hook on identical factors and gradients on every rank,
  and the stochastic-rounding generator of :class:`optlora.ScaLoRA` is seeded identically,
  so every rank takes the same step. :func:`assert_replicas_in_sync` checks it.
* **FSDP** (FSDP1 ``FullyShardedDataParallel``, also with ``use_orig_params=True``; FSDP2
  ``fully_shard``/``DTensor`` parameters) and **DeepSpeed ZeRO-3** keep only a shard of each
  parameter and gradient on a rank at ``optimizer.step()``: the closed forms cannot be
  evaluated there. :func:`check_not_sharded` refuses them (called by
  :class:`optlora.LoRAMethod` at construction and at ``attach``).

This module imports only ``torch`` (it is part of the core).
"""

from __future__ import annotations

import torch
from torch import nn

ADVICE = (
    "optlora needs the full LoRA factors, their gradients and (ScaLoRA) the full base weight on every rank at "
    "optimizer.step(). Use DDP instead: `accelerate launch --multi_gpu train.py` (no FSDP/DeepSpeed config) or "
    "`torchrun --nproc_per_node N train.py` with torch.nn.parallel.DistributedDataParallel. LoRA's trainable state "
    "is small, so sharding it saves little; to fit a large frozen base, load it in bfloat16 and use gradient "
    "checkpointing. Optimizer-state sharding that keeps full parameters and "
    "gradients on every rank (ZeRO-1/2 style) is compatible in principle but not tested."
)


def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return None
    return DTensor


def _fsdp_classes() -> tuple[type, ...]:
    classes: list[type] = []
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        classes.append(FullyShardedDataParallel)
    except ImportError:  # pragma: no cover - torch built without distributed
        pass
    try:
        from torch.distributed.fsdp import FSDPModule

        classes.append(FSDPModule)
    except ImportError:  # pragma: no cover - torch < 2.6
        pass
    return tuple(classes)


def _param_problem(p: torch.Tensor) -> str | None:
    dtensor = _dtensor_cls()
    if dtensor is not None and isinstance(p, dtensor):
        return "DTensor parameters (FSDP2 `fully_shard` or tensor parallelism)"
    if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
        return "FSDP1 flattened parameters (FullyShardedDataParallel, use_orig_params=True or not)"
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return "DeepSpeed ZeRO-3 partitioned parameters"
    return None


def sharding_problem(model: nn.Module | None = None, optimizer=None) -> str | None:
    """Why ``model``/``optimizer`` cannot be used with optlora (sharded parameters), or ``None``.

    Detects FSDP1 (a ``FullyShardedDataParallel`` module anywhere in ``model`` or
    flattened parameters), FSDP2 (an ``FSDPModule`` or ``DTensor`` parameters) and
    DeepSpeed ZeRO-3 (partitioned parameters), in the model or in the optimizer's groups.
    """
    classes = _fsdp_classes()
    if model is not None:
        for name, module in model.named_modules():
            if classes and isinstance(module, classes):
                kind = "FSDP2 fully_shard" if type(module).__name__ != "FullyShardedDataParallel" else "FSDP1"
                return f"module {name or type(module).__name__!r} is wrapped by {kind}"
        for name, p in model.named_parameters():
            why = _param_problem(p)
            if why is not None:
                return f"parameter {name!r}: {why}"
    if optimizer is not None:
        for group in getattr(optimizer, "param_groups", []):
            for p in group["params"]:
                why = _param_problem(p)
                if why is not None:
                    return f"the optimizer holds {why}"
    return None


def check_not_sharded(model: nn.Module | None = None, optimizer=None) -> None:
    """Raise ``RuntimeError`` naming the problem and what to use instead if parameters are sharded."""
    why = sharding_problem(model, optimizer)
    if why is not None:
        raise RuntimeError(f"optlora cannot run with sharded parameters: {why}. {ADVICE}")


def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def assert_replicas_in_sync(method, *, atol: float = 0.0) -> None:
    """Check (collectively, on every rank) that all ranks hold the same LoRA factors and base weights.

    Call it on every rank (it runs an all-reduce). Useful after a few steps of a new
    DDP setup: a mismatch means the ranks took different steps (e.g. different
    ``seed`` for ScaLoRA, or parameters not covered by DDP). A no-op without
    ``torch.distributed``.

    Raises:
        RuntimeError: the largest absolute difference between ranks exceeds ``atol``.
    """
    if not is_distributed():
        return
    dist = torch.distributed
    names, tensors = [], []
    for f in method.factors:
        for what, t in (("lora_A", f.lora_A), ("lora_B", f.lora_B), ("base", f.base_weight)):
            names.append(f"{f.name}.{what}")
            tensors.append(t.detach().double().flatten())
    flat = torch.cat(tensors)
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    gap = hi - lo
    worst = float(gap.max()) if gap.numel() else 0.0
    if worst > atol:
        sizes = [t.numel() for t in tensors]
        idx = int(gap.argmax())
        owner = names[next(i for i, c in enumerate(torch.tensor(sizes).cumsum(0).tolist()) if idx < c)]
        raise RuntimeError(
            f"ranks disagree on the LoRA state (max difference {worst:.3g} in {owner}); make sure every rank builds "
            "the model from the same seed/weights, uses the same optlora settings (incl. ScaLoRA's seed) and wraps "
            "the model in DistributedDataParallel"
        )
