"""Independent float64 numpy reference of the RefLoRA / ScaLoRA formulas.

Written straight from the two papers (theorems cited below) without
importing optlora, so that the tests compare two independent implementations.
Paper layout: ``A`` is m x r, ``B`` is n x r, ``W = W_pt + A B^T``,
``dA = G B``, ``dB = G^T A``. PEFT layout: ``Ap`` r x in, ``Bp`` out x r,
``Wp`` out x in, ``W_eff = Wp + s Bp Ap``.
"""

from __future__ import annotations

import itertools

import numpy as np

# --------------------------------------------------------------------------- linear algebra


def spd_power(M: np.ndarray, p: float) -> np.ndarray:
    """``M^p`` for a symmetric positive (semi-)definite matrix, via ``eigh``."""
    w, V = np.linalg.eigh(0.5 * (M + M.T))
    w = np.clip(w, 0.0, None)
    return (V * w**p) @ V.T


def nuclear_norm(M: np.ndarray) -> float:
    return float(np.linalg.svd(M, compute_uv=False).sum())


def fro2(M: np.ndarray) -> float:
    return float(np.sum(M * M))


# --------------------------------------------------------------------------- RefLoRA (RefLoRA Sec. 3)


def geometric_mean(AtA: np.ndarray, BtB: np.ndarray) -> np.ndarray:
    """``S~ = X^{-1/2} (X^{1/2} Y X^{1/2})^{1/2} X^{-1/2}`` with ``X = A^T A``, ``Y = B^T B`` (RefLoRA Thm 3)."""
    Xh, Xmh = spd_power(AtA, 0.5), spd_power(AtA, -0.5)
    return Xmh @ spd_power(Xh @ BtB @ Xh, 0.5) @ Xmh


def reflora_g(S: np.ndarray, AtA: np.ndarray, BtB: np.ndarray) -> float:
    """``g(S) = tr(S A^T A) + tr(S^{-1} B^T B)`` (RefLoRA Thm 3)."""
    return float(np.trace(S @ AtA) + np.trace(np.linalg.solve(S, BtB)))


def reflora_f(S: np.ndarray, AtA: np.ndarray, BtB: np.ndarray, c: float) -> float:
    """Theorem 3 objective ``f(S) = (g(S) - c)^2``."""
    return (reflora_g(S, AtA, BtB) - c) ** 2


def kappa_pm(N: float, c: float) -> tuple[float, float]:
    """Theorem 3 case 2 roots of ``N k^2 - c k + N = 0`` (requires ``c > 2N``)."""
    disc = np.sqrt(c * c - 4 * N * N)
    return (c + disc) / (2 * N), (c - disc) / (2 * N)


def reflora_s_scale(A: np.ndarray, B: np.ndarray) -> float:
    """RefLoRA-S ``s* = ||B||_F / ||A||_F`` (RefLoRA Thm 5, case 1)."""
    return float(np.linalg.norm(B) / np.linalg.norm(A))


def reflora_h(s: float, a: float, b: float, c: float) -> float:
    """Theorem 5 objective ``h(s) = (s a + b / s - c)^2`` with ``a = ||A||^2``, ``b = ||B||^2``."""
    return (s * a + b / s - c) ** 2


def reflora_s_roots(a: float, b: float, c: float) -> tuple[float, float]:
    """Theorem 5 case 2 minimisers ``s_+- = (c +- sqrt(c^2 - 4ab)) / (2a)``."""
    disc = np.sqrt(c * c - 4 * a * b)
    return (c + disc) / (2 * a), (c - disc) / (2 * a)


# --------------------------------------------------------------------------- ScaLoRA (ScaLoRA Sec. 3)


def column_system(A, B, dA, dB):
    """``K = (S^A^T S^A) o (S^B^T S^B)``, ``lambda = [colnorm2(dB); colnorm2(dA)]`` (ScaLoRA Thm 5)."""
    SA = np.concatenate([A, dA], 1)
    SB = np.concatenate([dB, B], 1)
    K = (SA.T @ SA) * (SB.T @ SB)
    lam = np.concatenate([(dB * dB).sum(0), (dA * dA).sum(0)])
    return K, lam


def phi(w: np.ndarray, G, A, B, c: float) -> float:
    """ScaLoRA surrogate ``||c G - G B diag(w_B) B^T - A diag(w_A) A^T G||^2`` (ScaLoRA's first-order loss bound), ``w = [a^2; b^2]``."""
    r = A.shape[1]
    return fro2(c * G - G @ (B * w[r:]) @ B.T - (A * w[:r]) @ A.T @ G)


def column_scaling(K, lam, kappa):
    """Column theorem: ``[alpha; beta] = sqrt(kappa v)``, ``K v = lambda``; ok iff all ``v > 0`` (ScaLoRA Thm 5, hybrid rule)."""
    v = np.linalg.solve(K, lam)
    r = K.shape[0] // 2
    ok = bool(np.all(v > 0))
    w = np.sqrt(kappa * np.clip(v, 0, None))
    return w[:r], w[r:], v, ok


def nnls_enumerate(K, lam, kappa):
    """Exact ``argmin_{w >= 0} w^T K w - 2 kappa lam^T w`` by trying every support (brute force)."""
    n = len(lam)
    best_w, best = np.zeros(n), 0.0
    for size in range(1, n + 1):
        for sup in itertools.combinations(range(n), size):
            idx = list(sup)
            try:
                ws = np.linalg.solve(K[np.ix_(idx, idx)], kappa * lam[idx])
            except np.linalg.LinAlgError:
                continue
            if np.any(ws < 0):
                continue
            w = np.zeros(n)
            w[idx] = ws
            val = w @ K @ w - 2 * kappa * lam @ w
            if val < best - 1e-14 * max(1.0, abs(best)):
                best_w, best = w, val
    return best_w, best


def scalar_quantities(A, B, dA, dB):
    """``g_A, g_B, p_A, p_B, p_AB`` from LoRA quantities only (ScaLoRA Thm 3)."""
    return {
        "gA": fro2(dB),
        "gB": fro2(dA),
        "pA": float(np.sum((A.T @ A) * (dB.T @ dB))),
        "pB": float(np.sum((dA.T @ dA) * (B.T @ B))),
        "pAB": fro2(A.T @ dA),
    }


def scalar_quantities_from_G(A, B, G):
    """The same five numbers from their definitions with the full gradient ``G``."""
    return {
        "gA": fro2(A.T @ G),
        "gB": fro2(G @ B),
        "pA": fro2(A @ A.T @ G),
        "pB": fro2(G @ B @ B.T),
        "pAB": fro2(A.T @ G @ B),
    }


def scalar_theorem(q, kappa):
    """The literal three cases of the scalar theorem (ScaLoRA Thm 3; one-sided case squared, see functional.scalora_scalar_scaling). ``None`` if no case applies."""
    CA = q["pB"] * q["gA"] - q["pAB"] * q["gB"]
    CB = q["pA"] * q["gB"] - q["pAB"] * q["gA"]
    C = q["pA"] * q["pB"] - q["pAB"] ** 2
    if CA > 0 and CB <= 0:
        return kappa * q["gA"] / q["pA"], 0.0
    if CA <= 0 and CB > 0:
        return 0.0, kappa * q["gB"] / q["pB"]
    if CA >= 0 and CB >= 0 and C > 0:
        return kappa * CA / C, kappa * CB / C
    return None


def scalar_kkt(q, kappa):
    """Robust scalar rule: best KKT candidate of ``q(x, y)`` over ``x, y >= 0`` (ScaLoRA Thm 3). Returns (x, y, value)."""
    pA, pB, pAB, gA, gB = q["pA"], q["pB"], q["pAB"], q["gA"], q["gB"]

    def val(x, y):
        return x * x * pA + y * y * pB + 2 * x * y * pAB - 2 * kappa * (x * gA + y * gB)

    cands = [(0.0, 0.0)]
    if pA > 0:
        cands.append((kappa * gA / pA, 0.0))
    if pB > 0:
        cands.append((0.0, kappa * gB / pB))
    C = pA * pB - pAB**2
    if C > 1e-12 * pA * pB:
        x, y = kappa * (pB * gA - pAB * gB) / C, kappa * (pA * gB - pAB * gA) / C
        if x >= 0 and y >= 0:
            cands.append((x, y))
    x, y = min(cands, key=lambda xy: val(*xy))
    return x, y, val(x, y)


def hybrid(A, B, dA, dB, kappa):
    """ScaLoRA hybrid rule (ScaLoRA's hybrid rule): column scaling iff ``v > 0``, else the scalar rule. Returns (alpha, beta, column)."""
    r = A.shape[1]
    K, lam = column_system(A, B, dA, dB)
    try:
        a, b, _, ok = column_scaling(K, lam, kappa)
    except np.linalg.LinAlgError:
        ok = False
    if ok:
        return a, b, True
    x, y, _ = scalar_kkt(scalar_quantities(A, B, dA, dB), kappa)
    return np.full(r, np.sqrt(x)), np.full(r, np.sqrt(y)), False


# --------------------------------------------------------------------------- PEFT-layout steps


def peft_reflora_grads(Ap, Bp, gAp, gBp):
    """RefLoRA preconditioning in PEFT layout (RefLoRA Sec. 3.3): ``gA <- S^{-1} gA``, ``gB <- gB S``."""
    S = geometric_mean(Ap @ Ap.T, Bp.T @ Bp)
    return np.linalg.solve(S, gAp), gBp @ S


def peft_merge(Wp, Ap, Bp, s, coeff, fan_in_fan_out=False):
    """``Wp += s Bp diag(coeff) Ap`` (ScaLoRA: scale, merge, step), transposed storage for ``fan_in_fan_out``."""
    inc = s * (Bp * coeff) @ Ap
    return Wp + (inc.T if fan_in_fan_out else inc)


def peft_scalora_scalings(Ap, Bp, gAp, gBp, s, kappa):
    """Effective factors ``A = sqrt(s) Ap^T``, ``B = sqrt(s) Bp``, ``dA = gAp^T``, ``dB = gBp``."""
    rs = np.sqrt(s)
    return hybrid(rs * Ap.T, rs * Bp, gAp.T, gBp, kappa)


def transfer(state: dict, row: np.ndarray | None = None, col: np.ndarray | None = None) -> dict:
    """Moment transfer (ScaLoRA Lemmas 3.3/3.6, chain rule): first moments times the scale, second moments times its square."""
    scale = row[:, None] if row is not None else col[None, :]
    out = dict(state)
    for k, p in (("exp_avg", 1), ("momentum_buffer", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 2)):
        if out.get(k) is not None:
            out[k] = out[k] * scale**p
    return out


def _same(x):
    return x


def adamw_step(
    p, g, st, *, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, amsgrad=False, decoupled=True, rnd=_same
):
    """One Adam step, decoupled weight decay (AdamW, Loshchilov & Hutter) or L2 (``decoupled=False``: Adam).

    ``st`` has exp_avg, exp_avg_sq, step. ``rnd`` rounds every stored intermediate to the storage dtype
    (:func:`round_to`; identity: exact float64), in the order of the textbook update: decay the weight,
    update the first and second moments, the bias-corrected denominator, the step.
    """
    b1, b2 = betas
    t = st.get("step", 0) + 1
    if weight_decay and not decoupled:
        g = rnd(g + weight_decay * p)
    m0 = st.get("exp_avg", np.zeros_like(p))
    m = rnd(m0 + (1 - b1) * (g - m0))  # b1 m + (1 - b1) g, as an interpolation
    v = rnd(rnd(b2 * st.get("exp_avg_sq", np.zeros_like(p))) + (1 - b2) * g * g)
    new = {"step": t, "exp_avg": m, "exp_avg_sq": v}
    vv = v
    if amsgrad:
        vv = np.maximum(st.get("max_exp_avg_sq", np.zeros_like(p)), v)
        new["max_exp_avg_sq"] = vv
    if weight_decay and decoupled:
        p = rnd(p * (1 - lr * weight_decay))
    denom = rnd(rnd(rnd(np.sqrt(vv)) / np.sqrt(1 - b2**t)) + eps)
    p = rnd(p - (lr / (1 - b1**t)) * m / denom)
    return p, new


def sgd_step(p, g, st, *, lr, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, rnd=_same):
    """One SGD step with (Nesterov) momentum and L2 weight decay, as Sutskever et al. and PyTorch define it.

    The first step takes the buffer ``b = g``; later ``b = mu b + (1 - dampening) g``; the step is ``p - lr b``
    (``p - lr (g + mu b)`` with Nesterov). ``rnd`` rounds every stored intermediate (see :func:`adamw_step`).
    """
    if weight_decay:
        g = rnd(g + weight_decay * p)
    new = {}
    if momentum:
        b0 = st.get("momentum_buffer")
        b = g.copy() if b0 is None else rnd(rnd(momentum * b0) + (1 - dampening) * g)
        new["momentum_buffer"] = b
        g = rnd(g + momentum * b) if nesterov else b
    return rnd(p - lr * g), new


# --------------------------------------------------------------------------- storage rounding


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to nearest (ties to even) in ``dtype`` and returned as float64: the storage model.

    ``dtype`` is ``"float64"``, ``"float32"``, ``"float16"`` or ``"bfloat16"``; bfloat16 (numpy has none)
    keeps the top 16 bits of the float32 value, rounded to nearest even (overflow gives +-inf).
    """
    x = np.asarray(x, dtype=np.float64)
    if dtype == "float64":
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        if dtype in ("float32", "float16"):
            return x.astype(dtype).astype(np.float64)
        if dtype != "bfloat16":
            raise ValueError(f"unknown storage dtype {dtype!r}")
        f = np.ascontiguousarray(x.astype(np.float32))
        bits = f.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        out = bits.astype(np.uint32).view(np.float32)
        return np.where(np.isfinite(f), out, f).astype(np.float64)


UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
LARGEST = {"float64": 1.7976931348623157e308, "float32": 3.4028234663852886e38, "float16": 65504.0}
LARGEST["bfloat16"] = 3.3895313892515355e38
#: smallest positive normal number of each dtype
SMALLEST_NORMAL = {"float64": 2.2250738585072014e-308, "float32": 2.0**-126, "float16": 2.0**-14}
SMALLEST_NORMAL["bfloat16"] = 2.0**-126


# --------------------------------------------------------------------------- decisions (when a closed form exists)


def gram_ratio(M: np.ndarray) -> float:
    """Smallest over largest eigenvalue of a PSD Gram (0 for a zero or rank-deficient one)."""
    w = np.linalg.eigvalsh(0.5 * (M + M.T))
    return float(max(w[0], 0.0) / w[-1]) if w[-1] > 0 else 0.0


def reflora_margin(AtA: np.ndarray, BtB: np.ndarray) -> float:
    """RefLoRA's Assumption 1 margin from the Grams: the smaller eigenvalue ratio of ``A^T A`` and of
    ``(A^T A)^(1/2) B^T B (A^T A)^(1/2)`` (the squared singular values of ``A B^T``, whose roots enter ``S``)."""
    Xh = spd_power(AtA, 0.5)
    return min(gram_ratio(AtA), gram_ratio(Xh @ BtB @ Xh))


def scalar_quantities_of(K: np.ndarray, lam: np.ndarray) -> dict:
    """The five numbers of the scalar theorem as block sums of the column system (ScaLoRA Thms 3, 5):
    ``g_A, g_B`` sum the two halves of ``lambda``; ``p_A, p_B, p_AB`` sum the blocks of ``K``
    (``K = (A^T A o dB^T dB, A^T dA o dB^T B; ., dA^T dA o B^T B)``, and ``dB^T B = A^T G B = A^T dA``)."""
    r = K.shape[0] // 2
    blocks = {"gA": lam[:r], "gB": lam[r:], "pA": K[:r, :r], "pB": K[r:, r:], "pAB": K[:r, r:]}
    return {k: v.sum() for k, v in blocks.items()}  # numpy scalars of K's dtype: float32 stays float32


def scalora_decision(K: np.ndarray, lam: np.ndarray, kappa: float, mode: str = "hybrid"):
    """ScaLoRA's per-layer rule (Thms 3 and 5) and when it takes no step: ``(alpha, beta, column, ok)``.

    ``K, lam``: the column system (:func:`column_system`). ``mode``: ``"hybrid"`` (column theorem where
    ``K v = lambda`` has ``v > 0``, else the scalar theorem), ``"column"`` (no step without a positive column
    solution) or ``"scalar"``. The scalar rule is :func:`scalar_kkt`; it takes no step where it gains nothing
    (value 0: a stationary point, or ``p_A = p_B = 0``). The documented decision at LoRA's init (``B = 0``, so
    ``p_B = p_AB = 0``): ``beta`` does not enter the bound, and ``B`` keeps its scale (``beta = 1``).
    """
    r = K.shape[0] // 2
    if mode != "scalar":
        try:
            a, b, _, ok = column_scaling(K, lam, kappa)
        except np.linalg.LinAlgError:
            ok = False
        if ok:
            return a, b, True, True
        if mode == "column":
            return np.ones(r), np.ones(r), False, False
    q = scalar_quantities_of(K, lam)
    x, y, val = scalar_kkt(q, kappa)
    if not (val < 0):
        return np.ones(r), np.ones(r), False, False
    if q["pB"] == 0 and q["pAB"] == 0 and y == 0:
        y = 1.0
    return np.full(r, np.sqrt(x)), np.full(r, np.sqrt(y)), False, True


def merge_growth(Ap, Bp, s: float, coeff: np.ndarray, W: np.ndarray) -> float:
    """How much ScaLoRA's merge enlarges the rounding-error bound of the layer's function (ScaLoRA Sec. 3.1):
    ``(||W|| + ||s B diag(c) A|| + ||s B diag(1 - c) A||) / (||W|| + ||s B A||)`` with ``c = 1 - alpha beta``."""
    before = np.linalg.norm(W) + np.linalg.norm(s * Bp @ Ap)
    after = np.linalg.norm(W) + np.linalg.norm(s * (Bp * coeff) @ Ap) + np.linalg.norm(s * (Bp * (1 - coeff)) @ Ap)
    return float(after / before) if before > 0 else (1.0 if after == 0 else np.inf)


# --------------------------------------------------------------------------- low-rank truncation


def best_rank_k(X: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Eckart-Young-Mirsky: the truncated SVD ``X_k`` and ``||X - X_k||_F`` (dense, numpy)."""
    U, S, Vh = np.linalg.svd(X, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k], float(np.sqrt(np.sum(S[k:] ** 2)))
