"""Multi-process training: DDP and FSDP2 work, FSDP1 and DeepSpeed ZeRO-3 are refused.

Every optlora method computes, per LoRA layer, a closed form from r x r Grams and norms of
``lora_A``, ``lora_B`` and their gradients (RefLoRA Theorem 3, ScaLoRA Theorems 3/5), and
ScaLoRA merges ``B diag(1 - alpha beta) A`` into the base weight. So:

* **DDP** works unchanged. Gradients are all-reduced during ``backward``, the method runs
  in the optimizer's step pre-hook on identical factors and gradients on every rank,
  and the stochastic-rounding generator of :class:`optlora.ScaLoRA` is seeded identically,
  so every rank takes the same step.
* **FSDP2** (``fully_shard``: DTensor parameters, gradients and optimizer state on a 1-D
  mesh, ``Shard(0)`` or ``Shard(1)``) works through :mod:`optlora.methods.sharded`: the
  Grams, norms and non-finite flags of all layers, plus the rows of the thin factors a
  rank needs, travel in one collective per step; every rank then computes the same closed
  forms from the same bytes, so every decision (finite, skip, column or scalar) agrees by
  construction, and each rank writes only its own shards (ScaLoRA merges into its own rows).
* **FSDP1** (``FullyShardedDataParallel``) and **DeepSpeed ZeRO-3** flatten parameters into
  1-D buffers split at arbitrary element offsets, so a rank may hold part of a row of a
  factor; :func:`check_sharding` refuses them and points to FSDP2. Tensor parallelism and
  HSDP (2-D meshes) are refused too.

:func:`assert_replicas_in_sync` checks a run: every tensor finite, replicated tensors equal,
the method's counters and last decisions equal on every rank.

This module imports only ``torch`` (it is part of the core).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

ADVICE = (
    "Use FSDP2 instead: torch.distributed.fsdp.fully_shard on a 1-D mesh (Trainer/accelerate: "
    'fsdp_config={"version": 2}; accelerate launch with fsdp_version: 2), or DDP (`accelerate launch '
    "--multi_gpu train.py` without FSDP/DeepSpeed config, or torch.nn.parallel.DistributedDataParallel). "
    "See the README, 'Scaling out'."
)


# --------------------------------------------------------------------------- DTensor primitives
@functools.cache
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (FSDP2 parameter, gradient or state)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank stores: a DTensor's local shard (same storage, writes go through), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def placement_problem(t: torch.Tensor) -> str | None:
    """Why optlora cannot work on DTensor ``t`` (``None``: plain tensor, or 1-D mesh with ``Shard(d)``)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Shard

    if t.device_mesh.ndim != 1:
        return f"DTensor on a {t.device_mesh.ndim}-D device mesh (HSDP or tensor parallelism)"
    (p,) = t.placements
    if type(p) is not Shard:
        return f"DTensor placement {p!r} (only FSDP2's Shard(d) on a 1-D mesh is supported)"
    return None


def shard_dim(t: torch.Tensor) -> int | None:
    """The dimension ``t`` is sharded on (``None`` for a plain tensor); refuses other layouts."""
    if not is_dtensor(t):
        return None
    why = placement_problem(t)
    if why is not None:
        raise RuntimeError(f"optlora cannot work on this sharded tensor: {why}. {ADVICE}")
    return t.placements[0].dim


def chunk_ranges(n: int, world: int) -> list[tuple[int, int]]:
    """``(offset, size)`` of every rank's block of ``n`` rows under ``torch.chunk`` (FSDP2) sharding.

    Blocks hold ``ceil(n / world)`` rows; the last ranks may hold fewer, or none.
    """
    c = -(-n // world)
    return [(min(k * c, n), max(0, min((k + 1) * c, n) - k * c)) for k in range(world)]


def shard_range(t: torch.Tensor) -> tuple[int, int, int] | None:
    """``(dim, offset, size)`` of this rank's block of DTensor ``t`` (``None`` for a plain tensor)."""
    d = shard_dim(t)
    if d is None:
        return None
    mesh = t.device_mesh
    offset, size = chunk_ranges(t.shape[d], mesh.size())[mesh.get_local_rank()]
    if t.to_local().shape[d] != size:
        raise RuntimeError(
            f"unexpected FSDP2 shard: {tuple(t.to_local().shape)} of {tuple(t.shape)} on rank "
            f"{mesh.get_local_rank()} (expected {size} along dim {d}, torch.chunk layout)"
        )
    return d, offset, size


def local_block(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's block of the full tensor ``full``, laid out as DTensor ``like`` is (``full`` if plain)."""
    rng = shard_range(like)
    return full if rng is None else full.narrow(*rng)


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor laid out as ``like`` that holds (a copy of) this rank's block of the full tensor ``full``."""
    from torch.distributed.tensor import DTensor

    block = local_block(full, like).to(local(like).device).clone()
    return DTensor.from_local(block, like.device_mesh, like.placements, shape=like.shape, stride=like.stride())


def copy_into_(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for plain tensors and DTensors alike: a full ``src`` fills ``dst``'s local block."""
    if is_dtensor(src):
        src = src.full_tensor() if not is_dtensor(dst) or src.placements != dst.placements else src.to_local()
        if is_dtensor(dst):
            local(dst).copy_(src)
            return
    local(dst).copy_(local_block(src, dst) if is_dtensor(dst) else src)


# --------------------------------------------------------------------------- refusals
_FLAT = (
    ": they split parameters into flat buffers at arbitrary element offsets, so a rank may hold part of a row "
    "of a LoRA factor, where the closed forms need whole rows"
)


def _fsdp1_class():
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return FullyShardedDataParallel


def _param_problem(p: torch.Tensor) -> str | None:
    if is_dtensor(p):
        return placement_problem(p)
    if getattr(p, "_fsdp_flattened", False) or type(p).__name__ == "FlatParameter":
        return "FSDP1 flattened parameters (FullyShardedDataParallel, use_orig_params=True or not)" + _FLAT
    if hasattr(p, "ds_id") or hasattr(p, "ds_status"):
        return "DeepSpeed ZeRO-3 partitioned parameters" + _FLAT
    return None


def sharding_problem(model: nn.Module | None = None, optimizer=None) -> str | None:
    """Why ``model``/``optimizer`` are sharded in a way optlora cannot work with, or ``None``.

    Refused: FSDP1 (a ``FullyShardedDataParallel`` module or flattened parameters), DeepSpeed
    ZeRO-3 (partitioned parameters), DTensors on a 2-D mesh (HSDP, tensor parallelism) or with
    a placement other than ``Shard(d)``. FSDP2 ``fully_shard`` on a 1-D mesh is supported.
    """
    fsdp1 = _fsdp1_class()
    if model is not None:
        for name, module in model.named_modules():
            if fsdp1 is not None and isinstance(module, fsdp1):
                return (
                    f"module {name or type(module).__name__!r} is wrapped by FSDP1 (FullyShardedDataParallel)" + _FLAT
                )
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


def check_sharding(model: nn.Module | None = None, optimizer=None) -> None:
    """Raise ``RuntimeError`` naming the problem and what to use instead (FSDP2 or DDP) for unsupported sharding."""
    why = sharding_problem(model, optimizer)
    if why is not None:
        raise RuntimeError(f"optlora cannot run with these sharded parameters: {why}. {ADVICE}")


check_not_sharded = check_sharding  # the name before FSDP2 support


# --------------------------------------------------------------------------- checks
def is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def assert_replicas_in_sync(method, *, atol: float = 0.0) -> None:
    """Check (collectively, on every rank) that the ranks' LoRA state is finite and agrees.

    Call it on every rank (one all-reduce). Checks that every rank's LoRA factors and base
    weights (or, under FSDP2, its shards of them) are finite, that replicated tensors (DDP)
    are equal to ``atol``, and that the method's step counters and last per-layer decisions
    (finite, applied, column scaling) are the same on every rank. Without ``torch.distributed``
    only the finiteness is checked.

    Raises:
        RuntimeError: a non-finite value (naming the tensor), or ranks that disagree.
    """
    names, values, finite = [], [], []
    for f in method.factors:
        for what, t in (("lora_A", f.lora_A), ("lora_B", f.lora_B), ("base", f.base_weight)):
            x = local(t.detach()).double().flatten()
            ok = bool(torch.isfinite(x).all())
            finite.append(0.0 if ok else 1.0)
            if not is_dtensor(t):  # FSDP2 shards exist once: nothing to compare them with
                names.append(f"{f.name}.{what}")
                values.append(torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0))
    decisions = [torch.tensor([float(method.steps), float(method.method_steps)], dtype=torch.float64)]
    decisions += [method._last[k].double().cpu() for k in sorted(method._last)]
    flat = torch.cat(values + decisions) if values else torch.cat(decisions)
    bad = torch.tensor(finite, dtype=torch.float64)
    nccl = is_distributed() and torch.distributed.get_backend() == "nccl"  # NCCL reduces accelerator tensors only
    device = method.factors[0].lora_A.device if nccl else "cpu"
    packed = torch.cat([bad, flat, -flat]).to(device)
    if is_distributed():
        torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.MAX)
    packed = packed.cpu()
    n = bad.numel()
    bad, hi, neg_lo = packed[:n], packed[n : n + flat.numel()], packed[n + flat.numel() :]
    if bool((bad > 0).any()):
        idx = int((bad > 0).nonzero()[0])
        f = method.factors[idx // 3]
        raise RuntimeError(
            f"non-finite values in {f.name}.{('lora_A', 'lora_B', 'base')[idx % 3]} on at least one rank: the run "
            "has diverged (NaN/Inf); check the learning rate, loss scaling and on_nonfinite"
        )
    gap = hi + neg_lo  # max over ranks minus min over ranks
    n_values = sum(v.numel() for v in values)
    if n_values and float(gap[:n_values].max()) > atol:
        idx = int(gap[:n_values].argmax())
        bounds = torch.tensor([v.numel() for v in values]).cumsum(0).tolist()
        owner = names[next(i for i, c in enumerate(bounds) if idx < c)]
        raise RuntimeError(
            f"ranks disagree on the LoRA state (max difference {float(gap[:n_values].max()):.3g} in {owner}); make "
            "sure every rank builds the model from the same seed/weights, uses the same optlora settings (incl. "
            "ScaLoRA's seed) and wraps the model in DistributedDataParallel or fully_shard"
        )
    if float(gap[n_values:].max()) > 0:
        raise RuntimeError(
            "ranks disagree on the method's step counters or its last per-layer decisions (skipped layers, column "
            "scaling): every rank must attach the same method to the same optimizer and step together"
        )
