"""Adding a rank-r increment into a frozen base weight, in place, without losing it.

ScaLoRA merges ``s * lora_B @ diag(c) @ lora_A`` into the base weight at every scaling
step. In bfloat16 (8 significant bits) most of a small increment is rounded away when
it is added with round-to-nearest, and the loss compounds over thousands of steps.
The modes below trade memory for exactness:

=============  =====================================  ==========================================
mode           extra memory (per merged weight)       what is kept
=============  =====================================  ==========================================
``nearest``    none                                   one round-to-nearest per merge (biased:
                                                      increments below half an ulp vanish)
``stochastic`` none                                   unbiased stochastic rounding: the expected
                                                      merged weight is exact
``kahan``      one buffer in the weight's dtype       compensated summation: the rounding error
                                                      is carried into the next merge
``fp32``       one float32 master copy                the sum kept in float32, rounded on copy
=============  =====================================  ==========================================

For float32/float64 weights every mode is a plain in-place ``addmm_``.
"""

from __future__ import annotations

import torch

MODES = ("auto", "nearest", "stochastic", "kahan", "fp32")
_LOW = (torch.bfloat16, torch.float16)
#: rows per chunk of the float32 temporary (bounds the transient memory of a merge).
CHUNK_ELEMENTS = 1 << 24


def resolve_mode(mode: str, dtype: torch.dtype) -> str:
    """``auto`` is ``stochastic`` for bfloat16/float16 weights and ``nearest`` otherwise."""
    if mode not in MODES:
        raise ValueError(f"merge_precision must be one of {MODES}, got {mode!r}")
    if dtype not in _LOW:
        return "nearest"
    return "stochastic" if mode == "auto" else mode


def new_buffer(weight: torch.Tensor, mode: str) -> torch.Tensor | None:
    """The per-weight buffer a mode needs (zeros for Kahan, a float32 copy for fp32)."""
    mode = resolve_mode(mode, weight.dtype)
    if mode == "kahan":
        return torch.zeros_like(weight)
    if mode == "fp32":
        return weight.detach().float().clone()
    return None


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` up or down with probability given by the distance.

    ``E[stochastic_round(x)] = x`` for every ``x`` inside the range of ``dtype``.
    bfloat16 uses the exact bit trick (add uniform noise below the kept 16 bits, then
    truncate); float16 picks between the two neighbouring values.
    """
    if x.dtype != torch.float32:
        raise TypeError("stochastic_round expects float32 input")
    if dtype == torch.bfloat16:
        bits = x.view(torch.int32)
        noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
        finite = torch.isfinite(x)
        rounded = ((bits + noise) & -65536).view(torch.float32)
        return torch.where(finite, rounded, x).to(torch.bfloat16)
    if dtype == torch.float16:
        near = x.to(torch.float16)
        nf = near.float()
        toward = torch.where(nf > x, torch.full_like(x, -torch.inf), torch.full_like(x, torch.inf)).to(torch.float16)
        other = torch.nextafter(near, toward)
        gap = other.float() - nf
        p = torch.where(gap != 0, (x - nf) / gap, torch.zeros_like(x))
        u = torch.rand(x.shape, device=x.device, generator=generator)
        return torch.where(u < p, other, near)
    return x.to(dtype)


def _stochastic_round_bf16_into_(out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None) -> None:
    """``out.copy_(stochastic_round(x, bfloat16))`` in place on ``x`` (float32, contiguous, overwritten).

    Three passes instead of seven and no float32 temporaries: add uniform 16-bit noise to the
    bits, clear the low 16 bits, copy (exactly) into ``out``. For finite ``x`` this is the same
    rounding as :func:`stochastic_round`; infinities stay infinite (their low bits are zero and
    the noise cannot carry past them).
    """
    bits = x.view(torch.int32)
    bits.add_(torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator))
    bits.bitwise_and_(-65536)
    out.copy_(x)


def merge_low_rank_(
    weight: torch.Tensor,
    lora_B: torch.Tensor,
    lora_A: torch.Tensor,
    coeff: torch.Tensor,
    scaling: float,
    *,
    fan_in_fan_out: bool = False,
    mode: str = "auto",
    buffer: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> None:
    """``weight += scaling * lora_B @ diag(coeff) @ lora_A`` in place (ScaLoRA's merge, Sec. 3.1).

    Args:
        weight: base weight, ``out x in`` (``in x out`` if ``fan_in_fan_out``).
        lora_B: ``out x r``; lora_A: ``r x in``; coeff: ``r`` (ScaLoRA: ``1 - alpha * beta``).
        mode: see the module docstring; ``buffer`` is :func:`new_buffer`'s tensor for
            ``kahan``/``fp32``; ``generator`` drives ``stochastic`` (for reproducible runs).
    """
    mode = resolve_mode(mode, weight.dtype)
    # the thin factor times coeff in float32 (or better); a single rounding happens when it meets the weight
    work = torch.promote_types(torch.promote_types(lora_B.dtype, weight.dtype), torch.float32)
    # lora_B * coeff in the wider of coeff's dtype and ``work``, rounded once: a coefficient beyond the
    # float32 range (ScaLoRA on tiny factors) can still give a representable product
    wide = torch.promote_types(work, coeff.dtype)
    left, right = (lora_B.to(wide) * coeff.to(wide)[None, :]).to(work), lora_A.to(work)
    if fan_in_fan_out:  # weight stored as in x out: W^T += s * A^T diag(c) B^T
        left, right = right.mT, left.mT
    if mode == "nearest":
        weight.addmm_(left.to(weight.dtype), right.to(weight.dtype), alpha=scaling)  # a single rounding
        return
    if mode == "fp32":
        if buffer is None or buffer.dtype != torch.float32:
            raise ValueError("merge mode 'fp32' needs its float32 master buffer")
        buffer.addmm_(left.float(), right.float(), alpha=scaling)
        weight.copy_(buffer)
        return
    if mode == "kahan" and (buffer is None or buffer.shape != weight.shape):
        raise ValueError("merge mode 'kahan' needs its compensation buffer")
    step = max(1, CHUNK_ELEMENTS // max(1, weight.shape[1]))
    left32, right32 = left.float() * scaling, right.float()  # scale the thin factor, not the product
    for i in range(0, weight.shape[0], step):
        w = weight[i : i + step]
        inc = torch.mm(left32[i : i + step], right32)
        if mode == "stochastic" and weight.dtype == torch.bfloat16:
            _stochastic_round_bf16_into_(w, inc.add_(w), generator)
        elif mode == "stochastic":
            w.copy_(stochastic_round(inc.add_(w), weight.dtype, generator))
        else:  # kahan: buffer holds the part of earlier increments that rounding dropped
            c = buffer[i : i + step]
            y = inc.sub_(c.float())
            w32 = w.float()
            t = (w32 + y).to(weight.dtype)
            c.copy_((t.float() - w32).sub_(y))
            w.copy_(t)
