"""Low-rank residuals: where ScaLoRA keeps the increments that a quantised base weight cannot hold.

ScaLoRA merges ``s * lora_B diag(1 - alpha beta) lora_A`` into the frozen base weight at every
scaling step (ScaLoRA Sec. 3.1). A quantised weight (bitsandbytes NF4 / int8, GPTQ, HQQ, ...)
cannot take it: re-quantising rounds a small increment away (docs/QUANTIZED.md measures it).
With ``ScaLoRA(residual_rank=R)`` such a layer instead carries a frozen rank-``R`` residual
``U V`` (``U``: out x R, ``V``: R x in, float32) next to its base layer, so that it computes

    y = base(x) + x V^T U^T + s * lora_B(lora_A(x)),

i.e. the weight ``W_q + U V + s B A``. Each merge adds the rank-r increment to ``U V`` and
truncates the sum back to rank ``R`` (:func:`optlora.compress.truncate_low_rank`). While
the merged increments span at most ``R`` dimensions this is exact up to float rounding; after
that each truncation drops the smallest singular directions, and their Frobenius norm is
added to :attr:`LowRankResidual.dropped`: the weight then differs from exact ScaLoRA's by at
most ``dropped`` (triangle inequality over the merges). :attr:`LowRankResidual.merged` adds up
the norms of the merged increments; ``method.stats()["residual_dropped"]`` reports the largest
``dropped / merged`` over layers (0: exact; dequantise-merge-requantise would be about 1).

The residual is applied by a forward hook on the base layer, so it belongs to the model (it
stays with it after the method is gone; a second method built on the model adopts it, and
PEFT's ``disable_adapter()`` keeps it, as it keeps increments merged into a float base).
:func:`residuals_of` finds the residuals of a layer.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from .compress import low_rank_sqnorm, truncate_low_rank
from .discovery import LoRAFactors

#: attribute of a base layer holding ``{adapter: LowRankResidual}``
ATTR = "optlora_residuals"
#: the tensors of :meth:`LowRankResidual.state_dict` (a method state's ``residuals`` entry per adapter)
STATE_KEYS = ("left", "right", "dropped", "merged")


class LowRankResidual:
    """A frozen ``x -> x V^T U^T`` added to a base layer's output (a forward hook); not a parameter.

    Attributes:
        left: ``U``, out x R.  right: ``V``, R x in.
        dropped: sum over merges of the Frobenius norm cut off by truncation (float64 scalar tensor).
        merged: sum over merges of the Frobenius norm of the merged increment (float64 scalar tensor).
        norm: ``||U V||_F`` after the last merge (float64 scalar tensor).
        base_norm: ``||W_q||_F`` of the (dequantised) base weight, measured once (:func:`weight_norm`);
            ScaLoRA's merge guard weighs the merge against it, as against a float base weight.
    """

    def __init__(self, adapter: str, out_features: int, in_features: int, rank: int, *, dtype, device):
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"residual_rank must be an int >= 1, got {rank!r}")
        self.adapter = adapter
        self.left = torch.zeros(out_features, rank, dtype=dtype, device=device)
        self.right = torch.zeros(rank, in_features, dtype=dtype, device=device)
        self.dropped = torch.zeros((), dtype=torch.float64, device=device)
        self.merged = torch.zeros((), dtype=torch.float64, device=device)
        self.norm = torch.zeros((), dtype=torch.float64, device=device)
        self.base_norm = torch.zeros((), dtype=torch.float64, device=device)
        self.active = False  # all zeros until the first merge: the hook then costs nothing
        self.handle = None

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self) -> torch.Tensor:
        """``U V`` (out x in)."""
        return self.left @ self.right

    def __call__(self, module: nn.Module, args: tuple, output):
        if not self.active:
            return None
        if not args or not isinstance(output, torch.Tensor):
            raise TypeError(
                f"optlora's low-rank residual on {type(module).__name__} needs the input as the first positional "
                f"argument and a tensor output, got {len(args)} positional argument(s) and {type(output).__name__}"
            )
        x = args[0]
        y = F.linear(F.linear(x.to(self.right.dtype), self.right), self.left)
        return output + y.to(output.dtype)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in STATE_KEYS}

    def load_state_dict(self, state: dict) -> None:
        for key in ("left", "right"):
            if tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(
                    f"saved residual {key} has shape {tuple(state[key].shape)}, this one {tuple(getattr(self, key).shape)}"
                )
        with torch.no_grad():
            self.left.copy_(state["left"])
            self.right.copy_(state["right"])
            self.dropped.copy_(state["dropped"])
            self.merged.copy_(state["merged"])
            self.norm.copy_(torch.linalg.matrix_norm(self.dense().double()))
        self.active = bool(self.norm > 0)


@torch.no_grad()
def weight_norm(layer: nn.Module, in_features: int, device, chunk: int = 1024) -> torch.Tensor:
    """``||W||_F`` of a linear layer ``x -> W x + b`` from its outputs, whatever stores ``W`` (float64 scalar).

    ``||W||_F^2 = sum_j ||layer(e_j) - layer(0)||^2`` over the unit vectors ``e_j``, fed in chunks:
    exact for any quantised storage (4-bit, int8, packed, ...) without knowing its format. The
    layer runs in training mode (bitsandbytes repacks 4-bit weights for its CPU inference
    kernel on eval-mode calls without gradients, which breaks later training; docs/QUANTIZED.md).
    """
    w = getattr(layer, "weight", None)
    dtype = w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32  # what it computes in
    was = layer.training
    layer.train()
    try:
        zero = layer(torch.zeros(1, in_features, dtype=dtype, device=device)).double()
        total = torch.zeros((), dtype=torch.float64, device=device)
        for start in range(0, in_features, chunk):
            k = min(chunk, in_features - start)
            units = torch.zeros(k, in_features, dtype=dtype, device=device)
            units[torch.arange(k), start + torch.arange(k)] = 1.0
            total += (layer(units).double() - zero).square().sum()
        return total.sqrt()
    finally:
        layer.train(was)


def residuals_of(layer: nn.Module) -> dict[str, LowRankResidual]:
    """The residuals a base layer carries, by adapter name (empty if none)."""
    return getattr(layer, ATTR, {})


def attach(f: LoRAFactors, rank: int) -> LowRankResidual:
    """The residual of ``f``'s base layer for ``f``'s adapter: the existing one, or a new zero one (hook registered)."""
    base = f.module.get_base_layer()
    out_features, in_features = f.lora_B.shape[0], f.lora_A.shape[1]
    found = residuals_of(base).get(f.adapter)
    if found is not None:
        if found.left.shape != (out_features, rank) or found.right.shape != (rank, in_features):
            raise ValueError(
                f"{f.name} already carries a residual of rank {found.rank}, not {rank}: build the method with "
                f"residual_rank={found.rank} (the residual holds increments merged by an earlier method)"
            )
        return found
    dtype = torch.promote_types(f.lora_A.dtype, torch.float32)
    res = LowRankResidual(f.adapter, out_features, in_features, rank, dtype=dtype, device=f.lora_A.device)
    others = list(residuals_of(base).values())  # another adapter's residual on this layer: not part of W_q
    active = [r.active for r in others]
    for r in others:
        r.active = False
    try:
        res.base_norm.copy_(weight_norm(base, in_features, f.lora_A.device))
    finally:
        for r, a in zip(others, active):
            r.active = a
    res.handle = base.register_forward_hook(res)
    if not hasattr(base, ATTR):
        setattr(base, ATTR, {})
    getattr(base, ATTR)[f.adapter] = res
    return res


def fold_(
    residuals: list[LowRankResidual], left: torch.Tensor, right: torch.Tensor, compute_dtype: torch.dtype
) -> None:
    """``U V <- best rank-R approximation of (U V + left @ right)`` for every residual, batched.

    ``left`` is ``(L, out, r)``, ``right`` ``(L, r, in)``: layer ``l``'s increment is ``left[l] @ right[l]``.
    All residuals must have the same shapes.
    """
    U = torch.stack([r.left for r in residuals]).to(compute_dtype)
    V = torch.stack([r.right for r in residuals]).to(compute_dtype)
    left, right = left.to(compute_dtype), right.to(compute_dtype)
    low = truncate_low_rank(torch.cat([U, left], -1), torch.cat([V, right], -2), residuals[0].rank)
    merged = low_rank_sqnorm(left, right).clamp_min(0).to(torch.float64).sqrt()
    torch._foreach_copy_([r.left for r in residuals], list(low.left.unbind(0)))
    torch._foreach_copy_([r.right for r in residuals], list(low.right.unbind(0)))
    dropped = low.dropped_sq.to(torch.float64).sqrt()
    kept = low.kept_sq.to(torch.float64).sqrt()
    torch._foreach_add_([r.dropped for r in residuals], list(dropped.unbind(0)))
    torch._foreach_add_([r.merged for r in residuals], list(merged.unbind(0)))
    torch._foreach_copy_([r.norm for r in residuals], list(kept.unbind(0)))
    for r in residuals:
        r.active = True
