"""Closed forms of RefLoRA, RefLoRA-S, ScaLoRA and ScaLoRA-I as pure functions.

Nothing here touches a model, an optimizer or any state: each function maps tensors to
tensors, works on a batch of layers at once (leading dimensions ``...``), and never
synchronises with the device (no ``.item()``, no Python branches on tensor values).
Degenerate inputs are reported through boolean masks instead of exceptions, so that the
caller decides whether to skip a layer or raise.

Notation follows the papers (README, "How it works", gives the PEFT mapping):
``A`` is m x r, ``B`` is n x r, the adapter product is ``A @ B.T``, ``G`` is the gradient
w.r.t. the full weight, ``dA = G @ B`` and ``dB = G.T @ A`` are the LoRA gradients.
Only r x r (or 2r x 2r) Gram matrices enter the functions below; they are built by
the caller from the factors and gradients, so ``G`` is never formed.

References
    RefLoRA:  Zhang, Li, Giannakis, arXiv:2505.18877 (NeurIPS 2025).
    ScaLoRA:  Zhang, Yang, Cai, Giannakis, arXiv:2510.23818 (ICML 2026).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "Refactor",
    "Rescaling",
    "ScalarQuantities",
    "Scalings",
    "chain_rule_rescaling",
    "geometric_mean",
    "inverse_gram",
    "reflora_bound_minimizers",
    "reflora_precondition",
    "reflora_preconditioner",
    "reflora_s_factor_scalings",
    "reflora_s_scale",
    "scaledgd_precondition",
    "scalora_merge_coefficient",
    "scalora_merge_growth",
    "scalora_column_scaling",
    "scalora_column_system",
    "scalora_scalar_quantities",
    "scalora_scalar_scaling",
    "scalora_scalings",
]

#: relative eigenvalue floor under which a factor counts as rank deficient (Assumption 1).
RANK_TOL = 1e-10


def _sym(M: torch.Tensor) -> torch.Tensor:
    return 0.5 * (M + M.mT)


def _finite(*tensors: torch.Tensor, dims: int) -> torch.Tensor:
    """Per-batch-element finiteness of several tensors whose last ``dims`` dims are data."""
    out = None
    for t in tensors:
        f = torch.isfinite(t).flatten(-dims).all(-1) if dims else torch.isfinite(t)
        out = f if out is None else out & f
    return out


def _safe_eigh(M: torch.Tensor, ok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``eigh`` of symmetric PSD ``M`` that never sees NaN/Inf or an extreme scale; returns ``(w, V, ok)``.

    ``M`` is divided by its largest diagonal entry (the largest entry of a PSD matrix) before the
    decomposition and ``w`` multiplied back, so that float32 inputs near the ends of the float range
    cannot overflow inside LAPACK/cuSOLVER (which raises ``torch._C._LinAlgError``). Rows with
    ``ok == False``, or whose symmetrised/normalised matrix is not finite, are replaced by I and
    reported in the returned ``ok``.
    """
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device).expand_as(M)
    scale = M.diagonal(dim1=-2, dim2=-1).amax(-1)
    ok = ok & torch.isfinite(scale) & (scale > 0)
    scale = torch.where(ok, scale, torch.ones_like(scale))
    M = _sym(M / scale[..., None, None])  # entries in [-1, 1]: M + M^T cannot overflow
    ok = ok & _finite(M, dims=2)
    w, V = torch.linalg.eigh(torch.where(ok[..., None, None], M, eye))
    return w.clamp_min(0.0) * scale[..., None], V, ok


# --------------------------------------------------------------------------- RefLoRA


class Refactor(NamedTuple):
    """RefLoRA's refactoring matrix ``S`` (SPD, r x r), its inverse, and validity."""

    S: torch.Tensor
    S_inv: torch.Tensor
    ok: torch.Tensor  # bool, batch shape: factors full rank and everything finite
    nuclear_norm: torch.Tensor  # ||A B^T||_*, free by-product (needed by Theorem 3 case 2)


def reflora_preconditioner(gram_A: torch.Tensor, gram_B: torch.Tensor, rank_tol: float = RANK_TOL) -> Refactor:
    """Balanced RefLoRA refactoring ``S~ = (A^T A)^{-1} # (B^T B)`` (RefLoRA, Theorem 3, case 1).

    ``S~`` is the matrix geometric mean of ``(A^T A)^{-1}`` and ``B^T B``: the unique SPD
    solution of ``S A^T A S = B^T B``. It minimises ``tr(S A^T A) + tr(S^{-1} B^T B)``
    (value ``2 ||A B^T||_*``), hence the loss upper bound of RefLoRA's Prop. 2 whenever
    ``1/(L eta) <= 2 ||A B^T||_*``, and it is what the paper uses for every ``L eta``.
    The refactored GD step is the preconditioned step (RefLoRA, Sec. 3.2)::

        A <- A - eta * dA @ S^{-1},      B <- B - eta * dB @ S.

    Computed as in the official code, from two symmetric eigendecompositions::

        A^T A = V_A diag(s_A^2) V_A^T,  M^T M = (V_A S_A)^T B^T B (V_A S_A) = V_M diag(s_M^2) V_M^T
        S     = (V_A S_A^{-1} V_M) diag(s_M) (V_A S_A^{-1} V_M)^T
        S^-1  = (V_A S_A V_M) diag(s_M^{-1}) (V_A S_A V_M)^T

    where ``s_M`` are the singular values of ``A B^T``.

    Args:
        gram_A: ``A^T A``, shape ``(..., r, r)``; in PEFT layout ``lora_A @ lora_A.T``.
        gram_B: ``B^T B``, shape ``(..., r, r)``; in PEFT layout ``lora_B.T @ lora_B``.
        rank_tol: a factor whose smallest Gram eigenvalue is below ``rank_tol`` times its
            largest is rank deficient (violates the paper's Assumption 1).

    Returns:
        :class:`Refactor`; where ``ok`` is False, ``S`` and ``S_inv`` are the identity,
        i.e. the plain LoRA step.
    """
    # Scale covariance: (a X)^{-1} # (b Y) = sqrt(b / a) (X^{-1} # Y). The Grams are normalised to a
    # largest diagonal entry of 1 first, so that no intermediate (e.g. M^T M ~ ||A||^2 ||B||^2) can
    # overflow in float32; the scale is put back at the end, where a non-finite result is reported.
    ok = _finite(gram_A, gram_B, dims=2)
    one = torch.ones_like(gram_A[..., 0, 0])
    a, b = gram_A.diagonal(dim1=-2, dim2=-1).amax(-1), gram_B.diagonal(dim1=-2, dim2=-1).amax(-1)
    ok = ok & (a > 0) & (b > 0)
    a, b = torch.where(ok, a, one), torch.where(ok, b, one)
    gram_A, gram_B = gram_A / a[..., None, None], gram_B / b[..., None, None]
    sA2, VA, ok = _safe_eigh(gram_A, ok)
    ok = ok & (sA2[..., 0] > rank_tol * sA2[..., -1]) & (sA2[..., -1] > 0)
    sA = torch.where(ok[..., None], sA2, torch.ones_like(sA2)).sqrt()
    VAsA = VA * sA[..., None, :]
    sM2, VM, ok = _safe_eigh(VAsA.mT @ gram_B @ VAsA, ok)
    ok = ok & (sM2[..., 0] > rank_tol * sM2[..., -1]) & (sM2[..., -1] > 0)
    sM = torch.where(ok[..., None], sM2, torch.ones_like(sM2)).sqrt()
    L = (VA / sA[..., None, :]) @ VM
    R = VAsA @ VM
    root_a, root_b = a.sqrt()[..., None, None], b.sqrt()[..., None, None]
    S = _sym((L * sM[..., None, :]) @ L.mT) * (root_b / root_a)
    S_inv = _sym((R / sM[..., None, :]) @ R.mT) * (root_a / root_b)
    ok = ok & _finite(S, S_inv, dims=2)
    eye = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device)
    S = torch.where(ok[..., None, None], S, eye)
    S_inv = torch.where(ok[..., None, None], S_inv, eye)
    nuclear = torch.where(ok, sM.sum(-1) * root_a[..., 0, 0] * root_b[..., 0, 0], torch.zeros_like(sM[..., 0]))
    return Refactor(S, S_inv, ok, nuclear)


def geometric_mean(gram_A: torch.Tensor, gram_B: torch.Tensor) -> torch.Tensor:
    """``(A^T A)^{-1} # (B^T B)`` alone; see :func:`reflora_preconditioner`."""
    return reflora_preconditioner(gram_A, gram_B).S


def reflora_bound_minimizers(
    gram_A: torch.Tensor, gram_B: torch.Tensor, c: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimisers of RefLoRA's bound ``f(S) = (tr(S A^T A) + tr(S^{-1} B^T B) - c)^2`` (Theorem 3).

    ``c = 1/(L eta)``. Case 1 (``c <= 2 ||A B^T||_*``): the unique minimiser is ``S~``, returned
    twice. Case 2: ``f`` reaches zero at ``kappa_+- S~`` with
    ``kappa_+- = (c +- sqrt(c^2 - 4 N^2)) / (2N)``, ``N = ||A B^T||_*`` (roots of
    ``N k^2 - c k + N = 0``). The practical method uses ``S~`` for every ``c`` because ``L``
    is unknown; this function exists to state and test the theorem.
    """
    ref = reflora_preconditioner(gram_A, gram_B)
    N = ref.nuclear_norm
    c = torch.as_tensor(c, dtype=N.dtype, device=N.device)
    disc = (c * c - 4 * N * N).clamp_min(0).sqrt()
    case2 = c > 2 * N
    k_plus = torch.where(case2, (c + disc) / (2 * N), torch.ones_like(N))
    k_minus = torch.where(case2, (c - disc) / (2 * N), torch.ones_like(N))
    return k_plus[..., None, None] * ref.S, k_minus[..., None, None] * ref.S


def reflora_s_scale(sqnorm_A: torch.Tensor, sqnorm_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RefLoRA-S scalar ``s* = ||B||_F / ||A||_F`` (RefLoRA, Theorem 5, case 1).

    Minimises ``h(s) = (s ||A||^2 + ||B||^2 / s - c)^2`` when ``c <= 2 ||A|| ||B||``; used for
    every ``c`` in practice. The refactoring is ``A <- sqrt(s*) A``, ``B <- B / sqrt(s*)``
    (equal Frobenius norms afterwards); the plain-GD step it induces is
    ``A <- A - eta dA / s*``, ``B <- B - eta s* dB``.

    Returns ``(s*, ok)``; ``s* = 1`` where either norm is zero or non-finite, or where ``s*``
    itself is not representable (``||B|| / ||A||`` beyond the range of the dtype).
    """
    ok = torch.isfinite(sqnorm_A) & torch.isfinite(sqnorm_B) & (sqnorm_A > 0) & (sqnorm_B > 0)
    one = torch.ones_like(sqnorm_A)
    s = torch.where(ok, sqnorm_B, one).sqrt() / torch.where(ok, sqnorm_A, one).sqrt()  # no overflowing ratio
    ok = ok & torch.isfinite(s) & (s > 0)
    return torch.where(ok, s, one), ok


def reflora_precondition(
    grad_A: torch.Tensor, grad_B: torch.Tensor, S: torch.Tensor, S_inv: torch.Tensor, ok: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """RefLoRA's refactored step as preconditioned gradients (RefLoRA Sec. 3.2; "refactor back").

    Refactoring with ``P P^T = S``, stepping and refactoring back is, in the original
    coordinates, ``A <- A - eta dA S^{-1}``, ``B <- B - eta dB S``. In PEFT layout
    (``grad_A = lora_A.grad = dA^T``, r x in; ``grad_B = lora_B.grad = dB``, out x r)::

        lora_A.grad <- S^{-1} lora_A.grad,      lora_B.grad <- lora_B.grad S.

    Batched over leading dims; where ``ok`` is False the gradients are returned unchanged
    (bit for bit: even an identity product would turn ``0 * Inf`` into NaN).
    """
    keep = ok[..., None, None]
    return torch.where(keep, S_inv @ grad_A, grad_A), torch.where(keep, grad_B @ S, grad_B)


def reflora_s_factor_scalings(s: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RefLoRA-S's refactoring ``A <- sqrt(s) A``, ``B <- B / sqrt(s)`` as column scalings (RefLoRA Thm 5).

    Returns ``(alpha, beta)`` of shape ``(..., rank)`` for :func:`chain_rule_rescaling`.
    """
    root = s.sqrt()[..., None]
    return root.expand(*s.shape, rank), (1 / root).expand(*s.shape, rank)


def inverse_gram(gram: torch.Tensor, rank_tol: float = RANK_TOL) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched inverse of SPD ``r x r`` Grams through ``eigh``; ``ok`` False (and I returned) if rank deficient."""
    ok = _finite(gram, dims=2)
    w, V, ok = _safe_eigh(gram, ok)
    ok = ok & (w[..., -1] > 0) & (w[..., 0] > rank_tol * w[..., -1])
    w = torch.where(ok[..., None], w, torch.ones_like(w))
    inv = (V / w[..., None, :]) @ V.mT
    ok = ok & _finite(inv, dims=2)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return torch.where(ok[..., None, None], inv, eye), ok


def scaledgd_precondition(
    grad_A: torch.Tensor, grad_B: torch.Tensor, gram_A: torch.Tensor, gram_B: torch.Tensor, rank_tol: float = RANK_TOL
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ScaledGD (Tong, Ma & Chi, JMLR 2021, eq. (5)): ``dA <- dA (B^T B)^{-1}``, ``dB <- dB (A^T A)^{-1}``.

    The baseline of RefLoRA Fig. 2. PEFT layout: ``lora_A.grad <- (B^T B)^{-1} lora_A.grad``,
    ``lora_B.grad <- lora_B.grad (A^T A)^{-1}``. Returns the new gradients and ``ok``
    (False where a Gram is singular or non-finite; the gradients are then unchanged).
    """
    inv_B, ok_B = inverse_gram(gram_B, rank_tol)
    inv_A, ok_A = inverse_gram(gram_A, rank_tol)
    ok = ok_A & ok_B
    keep = ok[..., None, None]
    return torch.where(keep, inv_B @ grad_A, grad_A), torch.where(keep, grad_B @ inv_A, grad_B), ok


# --------------------------------------------------------------------------- ScaLoRA


def scalora_column_system(gram_SA: torch.Tensor, gram_SB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ScaLoRA's column-scaling system ``K v = lambda`` (ScaLoRA, Theorem 5 / ICML Thm 3.7).

    With ``S^A = [A, dA]`` (m x 2r) and ``S^B = [dB, B]`` (n x 2r)::

        K      = (S^A^T S^A) o (S^B^T S^B)                       (2r x 2r, PSD)
        lambda = [ ||dB_i||^2 (i <= r) ; ||dA_j||^2 (j <= r) ]   (diagonals of the Grams)

    so that the first-order bound is ``Phi(w) = c^2 ||G||^2 - 2 c lambda^T w + w^T K w`` in
    ``w = [alpha^2; beta^2]``.

    Args:
        gram_SA: ``S^A^T S^A``, shape ``(..., 2r, 2r)``.
        gram_SB: ``S^B^T S^B``, shape ``(..., 2r, 2r)``.
    """
    r = gram_SA.shape[-1] // 2
    K = gram_SA * gram_SB
    lam = torch.cat([gram_SB.diagonal(dim1=-2, dim2=-1)[..., :r], gram_SA.diagonal(dim1=-2, dim2=-1)[..., r:]], -1)
    return K, lam


def scalora_column_scaling(
    K: torch.Tensor, lam: torch.Tensor, kappa: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal column scalings ``[alpha; beta] = sqrt(kappa v)``, ``K v = lambda`` (ScaLoRA Thm 5).

    ``kappa = 1/(L eta)``. The theorem holds when the solution is non-negative; this
    function accepts it only when every ``v_i > 0`` (a zero ``v_i`` would freeze a pair of
    columns for good; it has probability zero anyway). The solve is Jacobi-equilibrated
    (``d = sqrt(diag K)``) and uses Cholesky, which fails cleanly on singular ``K``.

    Returns ``(alpha, beta, ok)`` with ``alpha, beta`` of shape ``(..., r)``; where ``ok`` is
    False they are ones.
    """
    r = K.shape[-1] // 2
    d = K.diagonal(dim1=-2, dim2=-1).clamp_min(0).sqrt()
    ok = _finite(K, dims=2) & _finite(lam, dims=1) & (d > 0).all(-1)
    d_safe = torch.where(ok[..., None], d, torch.ones_like(d))
    eye = torch.eye(2 * r, dtype=K.dtype, device=K.device)
    Kn = torch.where(ok[..., None, None], K / (d_safe[..., :, None] * d_safe[..., None, :]), eye)
    chol, info = torch.linalg.cholesky_ex(Kn)
    ok = ok & (info == 0)
    chol = torch.where(ok[..., None, None], chol, eye)
    rhs = torch.where(ok[..., None], lam / d_safe, torch.zeros_like(lam))
    v = torch.cholesky_solve(rhs[..., None], chol)[..., 0] / d_safe
    ok = ok & (v > 0).all(-1) & _finite(v, dims=1)
    w = torch.where(ok[..., None], kappa * v, torch.ones_like(v)).sqrt()
    ok = ok & _finite(w, dims=1) & (w > 0).all(-1)  # kappa * v may leave the range of a float32 compute dtype
    w = torch.where(ok[..., None], w, torch.ones_like(w))
    return w[..., :r], w[..., r:], ok


class ScalarQuantities(NamedTuple):
    """The five numbers of ScaLoRA's scalar theorem (ScaLoRA Thm 3 / ICML Thm 3.5)."""

    g_A: torch.Tensor  # ||A^T G||^2   = ||dB||^2
    g_B: torch.Tensor  # ||G B||^2     = ||dA||^2
    p_A: torch.Tensor  # ||A A^T G||^2 = <A^T A, dB^T dB>
    p_B: torch.Tensor  # ||G B B^T||^2 = <dA^T dA, B^T B>
    p_AB: torch.Tensor  # ||A^T G B||^2


def scalora_scalar_quantities(K: torch.Tensor, lam: torch.Tensor) -> ScalarQuantities:
    """Scalar quantities as block sums of the column system: ``[[p_A, p_AB], [p_AB, p_B]] = E^T K E``."""
    r = K.shape[-1] // 2
    return ScalarQuantities(
        g_A=lam[..., :r].sum(-1),
        g_B=lam[..., r:].sum(-1),
        p_A=K[..., :r, :r].sum((-2, -1)),
        p_B=K[..., r:, r:].sum((-2, -1)),
        p_AB=K[..., :r, r:].sum((-2, -1)),
    )


def scalora_scalar_scaling(
    q: ScalarQuantities, kappa: float | torch.Tensor, interior_tol: float = 1e-12
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Optimal scalar scalings ``A~ = alpha A``, ``B~ = beta B`` (ScaLoRA, Theorem 3).

    With ``C^A = p_B g_A - p_AB g_B``, ``C^B = p_A g_B - p_AB g_A``, ``C = p_A p_B - p_AB^2``::

        C^A > 0 >= C^B:       alpha^2 = kappa g_A / p_A,  beta = 0
        C^B > 0 >= C^A:       alpha = 0,  beta^2 = kappa g_B / p_B
        C^A, C^B >= 0, C > 0: alpha^2 = kappa C^A / C,  beta^2 = kappa C^B / C

    Implemented as the exact minimum of the convex quadratic
    ``q(x, y) = x^2 p_A + y^2 p_B + 2 x y p_AB - 2 kappa (x g_A + y g_B)`` over ``x, y >= 0``
    (``x = alpha^2``, ``y = beta^2``) by comparing its KKT candidates. This equals the
    theorem on every non-degenerate input and is also defined at LoRA's init ``B = 0``.
    (The one-sided case is ``alpha^2 = kappa g_A / p_A``: the summary's unsquared form is a
    typo: the minimiser of the one-sided quadratic is ``kappa g_A / p_A``.)

    Returns ``(alpha, beta, ok)`` (batch-shaped scalars); ``ok`` is False where there is
    nothing to gain (``p_A = p_B = 0``: a LoRA stationary point) or inputs are not finite;
    there ``alpha = beta = 1``.
    """
    gA, gB, pA, pB, pAB = q
    ok = _finite(gA, gB, pA, pB, pAB, dims=0) & ((pA > 0) | (pB > 0))
    if isinstance(kappa, torch.Tensor):  # a Python float needs no host-to-device copy
        kappa = kappa.to(gA.dtype)
    one, zero = torch.ones_like(gA), torch.zeros_like(gA)

    def value(x, y):
        return x * x * pA + y * y * pB + 2 * x * y * pAB - 2 * kappa * (x * gA + y * gB)

    best_x, best_y, best = zero, zero, zero  # candidate (0, 0), value 0
    xa = torch.where(pA > 0, kappa * gA / torch.where(pA > 0, pA, one), zero)
    yb = torch.where(pB > 0, kappa * gB / torch.where(pB > 0, pB, one), zero)
    C = pA * pB - pAB * pAB
    interior = C > interior_tol * pA * pB
    C_safe = torch.where(interior, C, one)
    xi, yi = kappa * (pB * gA - pAB * gB) / C_safe, kappa * (pA * gB - pAB * gA) / C_safe
    interior = interior & (xi >= 0) & (yi >= 0)
    for x, y, valid in ((xa, zero, pA > 0), (zero, yb, pB > 0), (xi, yi, interior)):
        val = value(x, y)
        better = valid & (val < best)
        best_x, best_y, best = (
            torch.where(better, x, best_x),
            torch.where(better, y, best_y),
            torch.where(better, val, best),
        )
    ok = ok & (best < 0)
    # LoRA init (B = 0): beta does not enter the bound; keep B (and its moments) as they are.
    best_y = torch.where((pB == 0) & (pAB == 0) & (best_y == 0), one, best_y)
    ok = ok & torch.isfinite(best_x) & torch.isfinite(best_y)
    alpha = torch.where(ok, best_x, one).sqrt()
    beta = torch.where(ok, best_y, one).sqrt()
    return alpha, beta, ok


class Scalings(NamedTuple):
    """Per-layer ScaLoRA decision: ``A~ = A diag(alpha)``, ``B~ = B diag(beta)``."""

    alpha: torch.Tensor  # (..., r)
    beta: torch.Tensor  # (..., r)
    column: torch.Tensor  # bool: the column theorem applied (else scalar)
    ok: torch.Tensor  # bool: scale this layer (else alpha = beta = 1, nothing changes)


def scalora_scalings(
    gram_SA: torch.Tensor, gram_SB: torch.Tensor, kappa: float | torch.Tensor, mode: str = "hybrid"
) -> Scalings:
    """ScaLoRA's per-layer rule: column scaling where ``K v = lambda`` has ``v > 0``, else scalar.

    ``mode`` is ``"hybrid"`` (the paper's algorithm), ``"column"`` (column theorem only; layers
    without a positive solution are left unchanged) or ``"scalar"`` (Theorem 3 everywhere).
    Inputs are the Grams of ``S^A = [A, dA]`` and ``S^B = [dB, B]`` in *effective*
    coordinates (the PEFT scale absorbed into both factors).
    """
    if mode not in ("hybrid", "column", "scalar"):
        raise ValueError(f"mode must be 'hybrid', 'column' or 'scalar', got {mode!r}")
    K, lam = scalora_column_system(gram_SA, gram_SB)
    r = K.shape[-1] // 2
    if mode != "scalar":
        a_col, b_col, col_ok = scalora_column_scaling(K, lam, kappa)
    else:
        col_ok = torch.zeros(K.shape[:-2], dtype=torch.bool, device=K.device)
    if mode == "column":
        return Scalings(a_col, b_col, col_ok, col_ok)
    a_s, b_s, sc_ok = scalora_scalar_scaling(scalora_scalar_quantities(K, lam), kappa)
    a_s, b_s = a_s[..., None].expand(*a_s.shape, r), b_s[..., None].expand(*b_s.shape, r)
    if mode == "scalar":
        return Scalings(a_s, b_s, col_ok, sc_ok)
    alpha = torch.where(col_ok[..., None], a_col, a_s)
    beta = torch.where(col_ok[..., None], b_col, b_s)
    return Scalings(alpha, beta, col_ok, col_ok | sc_ok)


def scalora_merge_coefficient(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """``1 - alpha * beta``: ScaLoRA's merge ``W <- W + A diag(1 - alpha beta) B^T`` (ScaLoRA Sec. 3.1).

    Rewriting ``W = (W_pt + A B^T - A~ B~^T) + A~ B~^T`` with ``A~ = A diag(alpha)``,
    ``B~ = B diag(beta)`` leaves the model's function unchanged; the first part is merged.
    """
    return 1.0 - alpha * beta


def scalora_merge_growth(
    gram_A: torch.Tensor, gram_B: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, weight_norm: torch.Tensor
) -> torch.Tensor:
    """How much ScaLoRA's merge enlarges the rounding error of the layer's function (ScaLoRA Sec. 3.1).

    The merge stores ``W' = W + B diag(1 - alpha beta) A^T`` in the weight's dtype and keeps
    ``B~ A~^T = B diag(alpha beta) A^T`` in the adapter; in exact arithmetic ``W' + B~ A~^T = W + A B^T``.
    In floating point with unit roundoff ``u`` (standard model, Higham, *Accuracy and Stability of
    Numerical Algorithms*, Sec. 2.2) both parts are rounded relative to their own size, so to first order::

        ||(W' + B~ A~^T) - (W + B A^T)||_F <= u (||W|| + ||B diag(1 - alpha beta) A^T|| + ||B diag(alpha beta) A^T||)

    whereas the function before the merge is only known to ``u (||W|| + ||B A^T||)`` (the same
    bound with ``alpha = beta = 1``). The ratio of the two is returned::

        G = (||W|| + ||B diag(1 - alpha beta) A^T|| + ||B diag(alpha beta) A^T||) / (||W|| + ||B A^T||)  >= 1

    ``G = 1`` for ``alpha beta = 1`` (nothing merged); ``G ~ 2 alpha beta ||B A^T|| / ||W||`` when the
    rescaled adapter dwarfs the weight (large ``kappa``): the merged part and the new adapter then
    cancel and their rounding errors, not the weight's, dominate. Frobenius norms, exact from the
    Grams: ``||B diag(d) A^T||^2 = sum_ij d_i d_j (A^T A)_ij (B^T B)_ij``.

    Args:
        gram_A, gram_B: ``A^T A`` and ``B^T B`` (``(..., r, r)``; effective coordinates: PEFT scale absorbed).
        alpha, beta: the scalings, ``(..., r)``.
        weight_norm: ``||W||_F`` of the base weight, batch-shaped.

    Returns:
        ``G`` (batch-shaped); ``inf`` or NaN where a norm is not finite.
    """

    def norm(d: torch.Tensor) -> torch.Tensor:
        return ((d[..., :, None] * d[..., None, :]) * gram_A * gram_B).sum((-2, -1)).clamp_min(0).sqrt()

    ab = alpha * beta
    before = weight_norm + norm(torch.ones_like(ab))
    after = weight_norm + norm(1.0 - ab) + norm(ab)
    one = torch.ones_like(before)
    degenerate = torch.where(after > 0, torch.full_like(after, float("inf")), one)  # 0 before: only 0 after is exact
    return torch.where(before > 0, after / torch.where(before > 0, before, one), degenerate)


class Rescaling(NamedTuple):
    """Per-rank-index multipliers of one column rescaling at the same full weight (PEFT layout).

    ``lora_A`` (r x in) rows by ``lora_A``, ``lora_B`` (out x r) columns by ``lora_B``; their
    gradients by ``grad_A`` / ``grad_B``. An optimizer state that is a per-element average of
    gradients to the power ``p`` (Adam's ``exp_avg``: 1, ``exp_avg_sq``: 2) scales by the
    gradient multiplier to the power ``p``.
    """

    lora_A: torch.Tensor  # (..., r)
    lora_B: torch.Tensor
    grad_A: torch.Tensor
    grad_B: torch.Tensor


def chain_rule_rescaling(alpha: torch.Tensor, beta: torch.Tensor) -> Rescaling:
    """``A~ = A diag(alpha)``, ``B~ = B diag(beta)`` and what follows by the chain rule.

    With ``G`` unchanged (the weight is unchanged), ``dA~ = G B~ = dA diag(beta)`` and
    ``dB~ = G^T A~ = dB diag(alpha)`` (ScaLoRA, Lemmas 3.3 / 3.6; RefLoRA Sec. 3.3 for the
    scalar case). Moments re-express the whole gradient history exactly because the map is
    diagonal: ``m_A~ = m_A diag(beta)``, ``v_A~ = v_A diag(beta^2)``, ``m_B~ = m_B diag(alpha)``,
    ``v_B~ = v_B diag(alpha^2)``. So ``lora_A`` (= ``A^T``) takes ``alpha`` on its rows and
    its gradient and moments take ``beta``; ``lora_B`` the other way round.
    """
    return Rescaling(lora_A=alpha, lora_B=beta, grad_A=beta, grad_B=alpha)
