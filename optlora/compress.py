"""Low-rank compression of a weight update: truncated SVD, exact or randomized, and the dtype's rounding floor.

Pure math on torch tensors (no model, no PEFT). :func:`svd_compress` is the Eckart-Young optimum
(the best rank-k approximation in Frobenius norm); :func:`lowrank_compress` reaches nearly the same
rank in ``O(m n k)`` by a randomized range finder and states the exact error of what it returns;
:func:`rounding_floor` is the error that storing a weight in its own dtype costs, below which an
update is not worth compressing. Used by :mod:`optlora.export` and, through it, :mod:`optlora.persist`.
:func:`truncate_low_rank` re-truncates a product of factors without forming it (the residuals of
:mod:`optlora.residual`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


def rank_for_error(singular_values: torch.Tensor, tol: float) -> int:
    """Smallest ``k`` with ``sqrt(sum_{i>k} s_i^2) / sqrt(sum_i s_i^2) <= tol`` (0 for a zero matrix)."""
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    s2 = singular_values.double().square()
    total = float(s2.sum())
    if total == 0.0:
        return 0
    tail = s2.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i>=k} s_i^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = (tail.sqrt() / total**0.5 <= tol).nonzero()
    return int(ok[0])


@dataclass
class Compressed:
    """``Delta ~ lora_B @ lora_A`` (PEFT layout, scaling 1) with its relative Frobenius error."""

    lora_A: torch.Tensor  # k x in
    lora_B: torch.Tensor  # out x k
    rank: int
    rel_error: float
    norm: float  # ||Delta||_F
    singular_values: torch.Tensor


def svd_compress(delta: torch.Tensor, *, rank: int | None = None, tol: float | None = None) -> Compressed:
    """Truncated SVD of ``delta`` (out x in) at ``rank``, or the smallest rank meeting ``tol`` (capped by ``rank``).

    The factors split the singular values evenly: ``lora_B = U_k sqrt(S_k)``, ``lora_A = sqrt(S_k) V_k^T``.
    A zero ``delta`` gives rank 1 zero factors (PEFT needs ``r >= 1``) and error 0.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    if rank is None and tol is None:
        raise ValueError("give rank=, tol= or both")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    d = delta.float() if delta.dtype not in (torch.float32, torch.float64) else delta
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    full = S.numel()
    k = rank_for_error(S, tol) if tol is not None else full
    if rank is not None:
        k = min(k, rank) if tol is not None else min(rank, full)
    k = max(k, 1)
    norm = float(S.double().square().sum().sqrt())
    resid = float(S[k:].double().square().sum().sqrt())
    root = S[:k].sqrt()
    return Compressed(
        lora_A=root[:, None] * Vh[:k],
        lora_B=U[:, :k] * root[None, :],
        rank=k,
        rel_error=resid / norm if norm > 0 else 0.0,
        norm=norm,
        singular_values=S,
    )


def lowrank_compress(
    delta: torch.Tensor, *, rank: int | None = None, tol: float | None = None, niter: int = 2, seed: int = 0
) -> Compressed:
    """:func:`svd_compress` by a randomized range finder (Halko, Martinsson, Tropp 2011, Alg. 4.4), for large layers.

    ``O(m n q)`` instead of a full SVD's ``O(m n min(m, n))``: a ``q``-column basis ``Q`` of the range
    of ``delta`` (``niter`` power iterations, ``q`` doubled until ``tol`` is met), then the exact SVD of
    the small ``Q^T delta``. The result ``Q Q^T delta`` truncated to rank ``k`` is written, and its
    ``rel_error`` is computed from the residual ``delta - lora_B lora_A`` itself, so the stated error
    is the error of these factors; the rank may exceed the Eckart-Young minimum by a little. Deterministic (own generator: the global RNG is not touched).
    Falls back to :func:`svd_compress` where ``q`` reaches a quarter of ``min(m, n)``.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    if rank is None and tol is None:
        raise ValueError("give rank=, tol= or both")
    if tol is not None and not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    d = delta.float() if delta.dtype not in (torch.float32, torch.float64) else delta
    full = min(d.shape)
    cap = full if rank is None else min(rank, full)
    total2 = float(d.double().square().sum())
    gen = torch.Generator(device=d.device).manual_seed(seed)
    q = min(cap, 32) + 8
    while total2 > 0 and 4 * q < full:
        Q, Uc, S, Vh = _range_svd(d, q, niter, gen)
        resid2 = total2 - S.double().square().cumsum(0)  # residual of the rank-(i+1) projection (a first guess)
        ok = (resid2 <= (tol**2) * total2).nonzero() if tol is not None else resid2.new_zeros(0, 1)
        if ok.numel() or q - 8 >= cap:
            k = max(1, min(int(ok[0]) + 1 if ok.numel() else cap, cap))
            left = Q @ Uc
            err2 = _residual2(d, left[:, :k] * S[:k], Vh[:k])  # exact, unlike the float32 difference above
            while tol is not None and err2 > tol**2 * total2 and k < min(cap, S.numel()):
                k += 1
                err2 = _residual2(d, left[:, :k] * S[:k], Vh[:k])
            root = S[:k].sqrt()
            return Compressed(
                lora_A=root[:, None] * Vh[:k],
                lora_B=left[:, :k] * root[None, :],
                rank=k,
                rel_error=(err2 / total2) ** 0.5,
                norm=total2**0.5,
                singular_values=S,
            )
        q = min(2 * (q - 8), cap) + 8
    return svd_compress(delta, rank=rank, tol=tol)


def _range_svd(d: torch.Tensor, q: int, niter: int, gen: torch.Generator):
    """Orthonormal ``Q`` (m x q) spanning ``d``'s dominant range, and the SVD ``Uc S Vh`` of ``Q^T d``."""
    Y = d @ torch.randn(d.shape[1], q, dtype=d.dtype, device=d.device, generator=gen)
    Q = torch.linalg.qr(Y).Q
    for _ in range(niter):  # power iterations sharpen the basis where the spectrum decays slowly
        Q = torch.linalg.qr(d @ torch.linalg.qr(d.mT @ Q).Q).Q
    Uc, S, Vh = torch.linalg.svd(Q.mT @ d, full_matrices=False)
    return Q, Uc, S, Vh


def noise_rank(delta: torch.Tensor, *, niter: int = 2, seed: int = 0) -> int:
    """How many singular values of ``delta`` stand above a noise bulk: ``sigma (sqrt m + sqrt n)``.

    ``sigma (sqrt m + sqrt n)`` is the largest singular value of an ``m x n`` matrix of i.i.d. noise of
    standard deviation ``sigma`` (the Marchenko-Pastur edge). ``sigma`` is estimated self-consistently:
    the energy outside the ``k`` components above the edge, per remaining degree of freedom,
    ``(||delta||^2 - sum_{i<=k} s_i^2) / ((m - k)(n - k))``, iterated to a fixed point (the top singular
    values come from a randomized range finder of size ``q``, doubled while ``k`` reaches ``q / 2``).
    For the dense rounding noise that half-precision merges leave in ``W_now - W_pretrained`` this
    separates the update from the noise; noise whose size follows the weights (not i.i.d.) spreads
    above the edge, so the count errs on the side of keeping some noise, never of dropping the update.
    """
    d = delta.float() if delta.dtype not in (torch.float32, torch.float64) else delta
    m, n = d.shape
    total2 = float(d.double().square().sum())
    if total2 == 0:
        return 1
    gen = torch.Generator(device=d.device).manual_seed(seed)
    q = 32
    while True:
        q = min(q, min(m, n) - 1)
        _, _, S, _ = _range_svd(d, q, niter, gen)
        energy = S.double().square().cumsum(0)
        k = 0
        for _ in range(50):
            rest = max(total2 - (float(energy[k - 1]) if k else 0.0), 0.0)
            sigma = (rest / ((m - k) * (n - k))) ** 0.5
            above = int((S > sigma * (m**0.5 + n**0.5)).sum())
            if above == k:
                break
            k = above
        if 2 * k < q or q >= min(m, n) - 1:
            return max(k, 1)
        q *= 2


def _residual2(d: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> float:
    """``||d - left @ right||_F^2`` in float64 accumulation."""
    return float(torch.addmm(d, left, right, alpha=-1).double().square().sum())


def rounding_floor(weight: torch.Tensor) -> float:
    """Frobenius norm of the error of storing ``weight``'s values in its own dtype: ``ulp / sqrt(12)`` per element.

    Any copy of a model kept in that dtype (e.g. :func:`export_merged` of a bfloat16 model) is off by about
    this much, so an update is never compressed below it: in bfloat16 with stochastic rounding,
    ``W_now - W_pretrained`` carries dense rounding noise of this size that no low rank holds.
    """
    w = weight.detach().float()
    _, exponent = torch.frexp(w)
    ulp = torch.ldexp(torch.full_like(w, torch.finfo(weight.dtype).eps / 2), exponent)
    return float(torch.where(w == 0, 0.0, ulp).double().square().sum() / 12) ** 0.5


class LowRank(NamedTuple):
    """``X ~ left @ right`` with the Frobenius norms of what was kept and what was cut off."""

    left: torch.Tensor  # (..., m, k)
    right: torch.Tensor  # (..., k, n)
    kept_sq: torch.Tensor  # (...,)  ||left @ right||_F^2
    dropped_sq: torch.Tensor  # (...,)  ||X - left @ right||_F^2


def truncate_low_rank(left: torch.Tensor, right: torch.Tensor, rank: int) -> LowRank:
    """Best rank-``rank`` approximation of ``X = left @ right`` (``(..., m, p) @ (..., p, n)``) from its factors.

    Eckart-Young-Mirsky: the truncated SVD is the best approximation of its rank in Frobenius
    norm, and the error is the norm of the dropped singular values. ``X`` is never formed:
    ``left = Q1 R1``, ``right^T = Q2 R2`` (thin QR), ``X = Q1 (R1 R2^T) Q2^T``, and the SVD of
    the small core ``R1 R2^T`` gives ``X``'s, in ``O((m + n) p^2 + p^3)``. The factors split the
    kept singular values evenly (``left = U_k sqrt(S_k)``, ``right = sqrt(S_k) V_k^T``) and are
    zero-padded to ``rank`` columns when ``X`` has fewer singular values.

    ScaLoRA on a quantised base keeps its merged increments (ScaLoRA Sec. 3.1) in such a
    residual (:mod:`optlora.residual`); ``dropped_sq`` is exactly how far the truncation moves
    the model's weight.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    Q1, R1 = torch.linalg.qr(left)
    Q2, R2 = torch.linalg.qr(right.mT)
    U, S, Vh = torch.linalg.svd(R1 @ R2.mT)
    k = min(rank, S.shape[-1])
    root = S[..., :k].sqrt()
    new_left = Q1 @ (U[..., :k] * root[..., None, :])
    new_right = (root[..., :, None] * Vh[..., :k, :]) @ Q2.mT
    if k < rank:
        new_left = torch.cat([new_left, new_left.new_zeros(*new_left.shape[:-1], rank - k)], -1)
        new_right = torch.cat(
            [new_right, new_right.new_zeros(*new_right.shape[:-2], rank - k, new_right.shape[-1])], -2
        )
    s2 = S.square()
    return LowRank(new_left, new_right, s2[..., :k].sum(-1), s2[..., k:].sum(-1))


def low_rank_sqnorm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``||left @ right||_F^2 = sum((left^T left) o (right right^T))`` without forming the product (``(...,)``)."""
    return ((left.mT @ left) * (right @ right.mT)).sum((-2, -1))
