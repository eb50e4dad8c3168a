"""The checks that keep a method from ever leaving a model silently wrong (docs/RELIABILITY.md).

Every fault ends in a clear error before anything is modified, or in a reported safe skip
(``stats()`` names the layer, gives the reason and counts it). This module holds the checks
that are not closed forms of the papers:

* **arguments** (:func:`check_int`, :func:`check_kappa`, :func:`check_rank_tol`): refused at construction;
* **every optimizer step** the method is attached to: :func:`refuse_merged_adapters` (PEFT's
  ``merge_adapter()`` between ``backward`` and ``step``), :func:`nonfinite_layers` (one fused
  reduction and one device sync, also on warm-up and between intervals) and
  :func:`evaluate_closure` (``optimizer.step(closure)``: the gradient must exist before the method runs);
* **floating-point range** (:func:`multiplier_limits`, :func:`within_limits`): a rescaling is
  applied only if every factor, gradient and optimizer moment it multiplies stays finite and
  every factor row stays in the normal range of its dtype.

Under FSDP2 every check reads this rank's shards (:func:`optlora.distributed.local`, never a
DTensor collective per tensor); what the range guards need of the whole tensors (row and moment
maxima, weight norms) arrives in the step's one exchange, and the per-layer flags are ANDed over
the ranks before the host sync (:mod:`optlora.methods.sharded`), so every rank raises, skips and
applies the same layers.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable

import torch

from ..distributed import local

#: skip reasons reported by ``stats()``
NONFINITE, OUT_OF_RANGE, DEGENERATE = "nonfinite", "out_of_range", "degenerate"
REASONS = (NONFINITE, OUT_OF_RANGE, DEGENERATE)

#: ScaLoRA's kappa is refused outside this range (see :func:`check_kappa`)
KAPPA_RANGE = (1e-12, 1e12)


# ---------------------------------------------------------------------------------------- arguments
def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an ``int >= minimum``; ``ValueError`` for bools, floats, strings and smaller values."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_kappa(kappa) -> float:
    """ScaLoRA's ``kappa = 1/(L eta)``: a real number in :data:`KAPPA_RANGE`.

    ``kappa`` sets the squared column norms of the rescaled effective factors (``A~^T A~ ~ kappa``),
    and the merge's rounding error grows with it (:func:`optlora.functional.scalora_merge_growth`).
    Outside ``[1e-12, 1e12]`` the rescaled factors are 10^6 times larger or smaller than any
    weight they are added to; the per-layer guard would skip every layer, so the value is refused.
    """
    lo, hi = KAPPA_RANGE
    if isinstance(kappa, bool) or not isinstance(kappa, numbers.Real) or not (lo <= kappa <= hi):
        raise ValueError(
            f"kappa must be a real number in [{lo:g}, {hi:g}] (1/(L*eta) in effective coordinates; the default 1.0 "
            f"keeps the factors at PEFT's initial scale), got {kappa!r}"
        )
    return float(kappa)


def check_rank_tol(rank_tol, compute_dtype: torch.dtype) -> float:
    """A relative eigenvalue floor in ``[eps(compute_dtype), 1)``: below ``eps`` no eigenvalue is resolved."""
    eps = torch.finfo(compute_dtype).eps
    if isinstance(rank_tol, bool) or not isinstance(rank_tol, numbers.Real) or not (eps <= rank_tol < 1):
        raise ValueError(
            f"rank_tol must be a real number in [{eps:g}, 1) for compute_dtype {compute_dtype}, got {rank_tol!r}"
        )
    return float(rank_tol)


# ---------------------------------------------------------------------------------------- every step
def refuse_merged_adapters(factors) -> None:
    """Raise if an adapter with a pending gradient is merged into its base weight (PEFT ``merge_adapter()``).

    A merged adapter's factors are also inside the base weight; stepping them (and ScaLoRA's merge)
    makes PEFT's later ``unmerge`` subtract a different product, corrupting the weight.
    """
    merged = [
        f.name
        for f in factors
        if f.adapter in getattr(f.module, "merged_adapters", ())
        and (f.lora_A.grad is not None or f.lora_B.grad is not None)
    ]
    if merged:
        raise RuntimeError(
            f"{len(merged)} LoRA adapter(s) are merged into their base weights while they have gradients: "
            + ", ".join(merged[:5])
            + ". Stepping them now would corrupt the base weights when PEFT unmerges them. Call "
            "model.unmerge_adapter() before optimizer.step() (merge only for evaluation). Nothing was modified."
        )


def amax(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Largest absolute entry of each tensor (NaN if it holds a NaN) as float64 ``(len,)``.

    Per device and dtype one fused reduction (a maximum cannot overflow), one stack and one cast:
    no per-tensor kernels on CUDA. An empty tensor (an FSDP2 rank that holds no rows of it) gives 0.
    """
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    if not groups:
        return torch.zeros(len(tensors), dtype=torch.float64, device=tensors[0].device if tensors else None)
    parts, order = [], []
    for (device, _), idx in groups.items():
        ts = [tensors[i] for i in idx]
        if device.type == "cpu":  # _foreach_norm(inf) is a slow per-tensor loop on CPU; aminmax is ~5x faster
            lows, highs = zip(*(torch.aminmax(t) for t in ts))
            top = torch.maximum(torch.stack(highs), -torch.stack(lows))
        else:  # one fused max-abs kernel
            top = torch.stack(torch._foreach_norm(ts, math.inf))
        parts.append(top.to(torch.float64))
        order += idx
    device = parts[0].device
    values = torch.cat([part.to(device) for part in parts])
    if len(order) < len(tensors):  # empty tensors: 0
        out = torch.zeros(len(tensors), dtype=torch.float64, device=device)
        return out.index_copy_(0, torch.tensor(order, device=device), values)
    if order != sorted(order):
        values = values[torch.tensor(order, device=device).argsort()]
    return values


def nonfinite_layers(factors, agree: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[str]:
    """Names of the adapters whose ``lora_A``/``lora_B`` or their gradients hold NaN/Inf.

    One fused max-abs reduction per device and dtype (:func:`amax`; NaN propagates through the
    maximum, Inf is its own maximum, a maximum cannot overflow) and one device sync. FSDP2
    shards are read locally (no DTensor collective per tensor); ``agree`` (e.g.
    :func:`optlora.methods.sharded.and_over_ranks`) then ANDs the per-layer flags over the ranks
    on the device before the sync, so that every rank finds the same layers, a NaN in another
    rank's shard included. With ``agree`` every rank must call this (it is a collective).
    """
    tensors, owner = [], []
    for i, f in enumerate(factors):
        for t in (f.lora_A, f.lora_B, f.lora_A.grad, f.lora_B.grad):
            if t is not None:
                tensors.append(t.detach() if agree is None else local(t).detach())
                owner.append(i)
    if agree is None:
        if not tensors:
            return []
        finite = torch.isfinite(amax(tensors))
        if bool(finite.all()):  # the one sync
            return []
        return list(dict.fromkeys(factors[i].name for i, ok in zip(owner, finite.tolist()) if not ok))
    # per layer (a layout every rank shares, whichever gradients exist), then ANDed over the ranks
    values = amax(tensors) if tensors else torch.zeros(0, dtype=torch.float64, device=factors[0].lora_A.device)
    bad = (~torch.isfinite(values)).to(torch.float64)
    if len(tensors) == 4 * len(factors):  # every gradient exists: a regular layout, no index tensor
        per_layer = bad.view(len(factors), 4).sum(1)
    else:
        index = torch.tensor(owner, device=values.device, dtype=torch.long)
        per_layer = torch.zeros(len(factors), dtype=torch.float64, device=values.device).index_add_(0, index, bad)
    finite = agree(per_layer == 0)
    if bool(finite.all()):  # the one sync
        return []
    return [f.name for f, ok in zip(factors, finite.tolist()) if not ok]


def nonfinite_error(method: str, names: list[str]) -> RuntimeError:
    return RuntimeError(
        f"{method}: non-finite gradient or factor in {len(names)} LoRA layer(s): "
        + ", ".join(names[:5])
        + ". Nothing was modified. Use a GradScaler/clipping, lower the learning rate, or pass "
        "on_nonfinite='skip' to leave such layers to the plain optimizer step."
    )


def evaluate_closure(args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """``optimizer.step(closure)``: evaluate the closure now, hand the optimizer its result.

    The method transforms the gradient inside ``step``'s pre-hook, so the gradient must exist
    there. The closure (forward + backward) runs once, here, under ``torch.enable_grad()``; the
    optimizer receives a closure that returns that loss without recomputing the gradient (which
    would undo the method). Optimizers that evaluate the closure more than once (LBFGS) are refused
    at ``attach``; a second call raises. Returns the new ``(args, kwargs)``, or ``None`` without a closure.
    """
    positional = len(args) > 1
    closure = args[1] if positional else kwargs.get("closure")
    if closure is None:
        return None
    with torch.enable_grad():
        loss = closure()
    calls = []

    def evaluated():
        if calls:
            raise RuntimeError(
                "this optimizer evaluates the closure more than once per step; optlora evaluated it once before "
                "transforming the gradient and cannot re-evaluate it. Call loss.backward() yourself, then step()."
            )
        calls.append(1)
        return loss

    if positional:
        return (args[0], evaluated, *args[2:]), kwargs
    return args, {**kwargs, "closure": evaluated}


# ---------------------------------------------------------------------------------------- misuse
def never_applied_note(method, planned_steps: int | None = None) -> str | None:
    """A sentence if ``method`` was never applied in its ``steps`` steps (or cannot be in ``planned_steps``)."""
    name = type(method).__name__
    if planned_steps is not None and planned_steps <= method.warmup_steps:
        return (
            f"{name} will never be applied: the run has {planned_steps} optimizer steps and "
            f"warmup_steps={method.warmup_steps} (plain LoRA steps first). Lower warmup_steps."
        )
    if method.steps > 0 and method.method_steps == 0:
        why = (
            f"all {method.steps} steps were warm-up (warmup_steps={method.warmup_steps})"
            if method.steps <= method.warmup_steps
            else f"every layer was skipped on every due step (stats()['skipped']: {method.skipped})"
        )
        return f"{name} has not been applied in {method.steps} optimizer steps: {why}; this was plain LoRA."
    return None


# ---------------------------------------------------------------------------------------- floating-point range
def multiplier_limits(
    amax: torch.Tensor, power: int, dtype: torch.dtype, *, keep_normal: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Range ``[lo, hi]`` of multipliers ``m`` that a tensor with largest entry ``amax`` can take as ``m ** power``.

    ``hi``: ``amax * m**power`` stays below half the largest finite value of ``dtype``, and
    ``m**power`` itself is finite in the dtype the rescale computes it in (``dtype`` promoted to
    float32). ``lo``: ``m**power`` is a normal number there and, with ``keep_normal`` (factors),
    ``amax * m**power`` stays at least the smallest normal number of ``dtype`` (so that no factor row is
    flushed into the subnormal range, where it would lose precision). ``amax`` is float64.
    """
    info, scale = torch.finfo(dtype), torch.finfo(torch.promote_types(dtype, torch.float32))
    p = float(power)
    inf = torch.full_like(amax, math.inf)
    hi = torch.where(amax > 0, (info.max / 2 / amax) ** (1 / p), inf).clamp_max(scale.max ** (1 / p))
    lo = torch.full_like(amax, scale.tiny ** (1 / p))
    if keep_normal:
        lo = torch.maximum(lo, torch.where(amax > 0, (info.tiny / amax) ** (1 / p), torch.zeros_like(amax)))
    nan = ~torch.isfinite(amax)
    return torch.where(nan, inf, lo), torch.where(nan, torch.zeros_like(amax), hi)


def rescaling_in_range(group, alpha: torch.Tensor, beta: torch.Tensor, rows: dict[str, torch.Tensor], moments):
    """Per layer: the chain-rule rescaling keeps every tensor it multiplies finite, and factor rows normal.

    ``alpha`` multiplies ``lora_A``'s rows and ``lora_B.grad``'s columns, ``beta`` ``lora_B``'s
    columns and ``lora_A.grad``'s rows, and the moments by the power of their rule
    (:func:`optlora.functional.chain_rule_rescaling`). ``rows`` holds the largest |entry| of each
    rank index of ``lora_A``, ``grad_A``, ``lora_B``, ``grad_B`` (``(L, r)``); ``moments`` is
    ``(optimizer, rule)`` of the moments the rescaling multiplies, or ``None``.
    """
    f = group.factors[0]
    dA, dB = f.lora_A.dtype, f.lora_B.dtype
    r = {k: v.to(torch.float64) for k, v in rows.items()}
    lim_alpha = [multiplier_limits(r["lora_A"], 1, dA, keep_normal=True), multiplier_limits(r["grad_B"], 1, dB)]
    lim_beta = [multiplier_limits(r["lora_B"], 1, dB, keep_normal=True), multiplier_limits(r["grad_A"], 1, dA)]
    if moments is not None:
        for (which, power, dtype), a in group.moment_amax(*moments).items():
            (lim_beta if which == "grad_A" else lim_alpha).append(multiplier_limits(a[:, None], power, dtype))
    return within_limits(alpha, lim_alpha) & within_limits(beta, lim_beta)


def within_limits(m: torch.Tensor, limits: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Per layer (leading dim): every ``m`` is finite and 0 (exact: ScaLoRA's one-sided optimum) or inside every ``[lo, hi]``."""
    m = m.to(torch.float64)
    ok = torch.isfinite(m).flatten(1).all(1)
    zero = m == 0
    for lo, hi in limits:
        ok = ok & (zero | ((m >= lo) & (m <= hi))).flatten(1).all(1)
    return ok


def fits(values_amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values_amax`` (float64) is finite and at most half the largest finite value of ``dtype``."""
    return torch.isfinite(values_amax) & (values_amax <= torch.finfo(dtype).max / 2)
