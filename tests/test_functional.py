"""optlora.functional against the independent float64 reference (optlora.testing.reference).

Covers RefLoRA's geometric mean and Theorem 3, RefLoRA-S (Theorem 5), ScaLoRA's column
theorem (Thm 5 / ICML 3.7), scalar theorem (Thm 3 / ICML 3.5) and hybrid rule, with
brute-force optimality checks and degenerate inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import nnls

from optlora import functional as F
from optlora.testing import reference as ref


def rand_factors(rng, m=7, n=6, r=3, L=None):
    shape = () if L is None else (L,)
    A = rng.standard_normal(shape + (m, r))
    B = rng.standard_normal(shape + (n, r))
    return A, B


def grams(A, B):
    A, B = torch.as_tensor(A), torch.as_tensor(B)
    return A.mT @ A, B.mT @ B


def scalora_grams(A, B, dA, dB):
    SA = torch.as_tensor(np.concatenate([A, dA], -1))
    SB = torch.as_tensor(np.concatenate([dB, B], -1))
    return SA.mT @ SA, SB.mT @ SB


# --------------------------------------------------------------------------- RefLoRA


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-3)])
def test_geometric_mean_batched_matches_reference(dtype, tol):
    rng = np.random.default_rng(0)
    A, B = rand_factors(rng, L=5)
    gA, gB = grams(A, B)
    out = F.reflora_preconditioner(gA.to(dtype), gB.to(dtype))
    assert out.S.shape == (5, 3, 3) and out.ok.all()
    for i in range(5):
        S = ref.geometric_mean(A[i].T @ A[i], B[i].T @ B[i])
        np.testing.assert_allclose(out.S[i].double().numpy(), S, rtol=tol, atol=tol)
        np.testing.assert_allclose(out.S_inv[i].double().numpy(), np.linalg.inv(S), rtol=tol, atol=tol)
        assert out.nuclear_norm[i].item() == pytest.approx(ref.nuclear_norm(A[i] @ B[i].T), rel=tol)
    np.testing.assert_allclose(F.geometric_mean(gA, gB).numpy(), out.S.double().numpy(), rtol=tol, atol=tol)


def test_geometric_mean_is_riccati_solution_and_attains_two_nuclear_norm():
    rng = np.random.default_rng(1)
    for _ in range(5):
        A, B = rand_factors(rng, m=9, n=5, r=4)
        AtA, BtB = A.T @ A, B.T @ B
        S = F.geometric_mean(*grams(A, B)).numpy()
        np.testing.assert_allclose(S @ AtA @ S, BtB, rtol=1e-9, atol=1e-9)
        assert np.all(np.linalg.eigvalsh(S) > 0)
        assert ref.reflora_g(S, AtA, BtB) == pytest.approx(2 * ref.nuclear_norm(A @ B.T), rel=1e-10)


def test_geometric_mean_minimises_g_against_random_spd_probes_and_gradient_descent():
    rng = np.random.default_rng(2)
    A, B = rand_factors(rng, m=6, n=5, r=3)
    AtA, BtB = A.T @ A, B.T @ B
    S = F.geometric_mean(*grams(A, B)).numpy()
    g_star = ref.reflora_g(S, AtA, BtB)
    for _ in range(500):
        Q = rng.standard_normal((3, 3))
        probe = Q @ Q.T + 1e-3 * np.eye(3)
        assert ref.reflora_g(probe, AtA, BtB) >= g_star * (1 - 1e-12)
        # small perturbations of the optimum do no better either
        E = rng.standard_normal((3, 3)) * 1e-3
        assert ref.reflora_g(S + E @ E.T, AtA, BtB) >= g_star * (1 - 1e-12)
    # gradient descent over S = P P^T from a random start converges to S~ and never beats it
    P = torch.tensor(rng.standard_normal((3, 3)), requires_grad=True)
    tA, tB = torch.tensor(AtA), torch.tensor(BtB)
    opt = torch.optim.Adam([P], lr=0.02)
    for _ in range(1500):
        Sp = P @ P.T
        g = torch.trace(Sp @ tA) + torch.trace(torch.linalg.solve(Sp, tB))
        assert g.item() >= g_star * (1 - 1e-10)
        opt.zero_grad()
        g.backward()
        opt.step()
    assert g.item() == pytest.approx(g_star, rel=1e-4)
    np.testing.assert_allclose((P @ P.T).detach().numpy(), S, rtol=0.02, atol=0.02)


def test_theorem3_cases():
    rng = np.random.default_rng(3)
    A, B = rand_factors(rng)
    AtA, BtB = A.T @ A, B.T @ B
    N = ref.nuclear_norm(A @ B.T)
    S = ref.geometric_mean(AtA, BtB)
    # case 1: c <= 2N -> S~ twice, the unique minimiser
    Sp, Sm = F.reflora_bound_minimizers(*grams(A, B), 1.5 * N)
    np.testing.assert_allclose(Sp.numpy(), S, rtol=1e-9)
    np.testing.assert_allclose(Sm.numpy(), S, rtol=1e-9)
    # case 2: c > 2N -> kappa_+- S~ with f = 0 and kappa_+ kappa_- = 1
    c = 3.0 * N
    Sp, Sm = F.reflora_bound_minimizers(*grams(A, B), c)
    kp, km = ref.kappa_pm(N, c)
    assert kp * km == pytest.approx(1.0)
    np.testing.assert_allclose(Sp.numpy(), kp * S, rtol=1e-9)
    np.testing.assert_allclose(Sm.numpy(), km * S, rtol=1e-9)
    for M in (Sp.numpy(), Sm.numpy()):
        assert ref.reflora_f(M, AtA, BtB, c) == pytest.approx(0.0, abs=1e-12 * c * c)
    assert ref.reflora_f(S, AtA, BtB, c) > 0.1 * N * N  # S~ itself is not a zero of f in case 2


def test_reflora_s_scale_both_cases():
    rng = np.random.default_rng(4)
    A, B = rand_factors(rng, L=4)
    s, ok = F.reflora_s_scale(torch.tensor((A**2).sum((1, 2))), torch.tensor((B**2).sum((1, 2))))
    assert ok.all()
    for i in range(4):
        assert s[i].item() == pytest.approx(ref.reflora_s_scale(A[i], B[i]), rel=1e-12)
    a, b = float((A[0] ** 2).sum()), float((B[0] ** 2).sum())
    s0 = s[0].item()
    grid = np.exp(np.linspace(np.log(s0) - 4, np.log(s0) + 4, 4001))
    # case 1 (c <= 2 sqrt(ab)): s* is the global minimiser of h
    c1 = 1.2 * np.sqrt(a * b)
    assert min(ref.reflora_h(t, a, b, c1) for t in grid) >= ref.reflora_h(s0, a, b, c1) * (1 - 1e-12)
    # case 2: two zeros s_+-, and s* = sqrt(b/a) is a local maximum
    c2 = 3.0 * np.sqrt(a * b)
    sp, sm = ref.reflora_s_roots(a, b, c2)
    assert ref.reflora_h(sp, a, b, c2) == pytest.approx(0, abs=1e-9 * c2 * c2)
    assert ref.reflora_h(sm, a, b, c2) == pytest.approx(0, abs=1e-9 * c2 * c2)
    h0 = ref.reflora_h(s0, a, b, c2)
    assert h0 > ref.reflora_h(s0 * 1.01, a, b, c2) and h0 > ref.reflora_h(s0 / 1.01, a, b, c2)


# --------------------------------------------------------------------------- ScaLoRA


def scalora_instance(rng, m=6, n=5, r=2):
    A, B = rand_factors(rng, m, n, r)
    G = rng.standard_normal((m, n))
    return A, B, G, G @ B, G.T @ A


def test_column_system_matches_reference_and_phi_identity():
    rng = np.random.default_rng(5)
    A, B, G, dA, dB = scalora_instance(rng, r=3)
    K, lam = F.scalora_column_system(*scalora_grams(A, B, dA, dB))
    Kr, lr = ref.column_system(A, B, dA, dB)
    np.testing.assert_allclose(K.numpy(), Kr, rtol=1e-12)
    np.testing.assert_allclose(lam.numpy(), lr, rtol=1e-12)
    c = 0.7
    for _ in range(5):
        w = rng.random(6)
        expected = c * c * ref.fro2(G) - 2 * c * lr @ w + w @ Kr @ w
        assert ref.phi(w, G, A, B, c) == pytest.approx(expected, rel=1e-10)


def test_column_scaling_equals_exhaustive_nnls_whenever_v_positive():
    rng = np.random.default_rng(6)
    kappa, positive, negative = 0.3, 0, 0
    for _ in range(60):
        A, B, G, dA, dB = scalora_instance(rng)
        K, lam = F.scalora_column_system(*scalora_grams(A, B, dA, dB))
        alpha, beta, ok = F.scalora_column_scaling(K, lam, kappa)
        Kr, lr = ref.column_system(A, B, dA, dB)
        a_ref, b_ref, v, ok_ref = ref.column_scaling(Kr, lr, kappa)
        assert bool(ok) == ok_ref
        if not ok_ref:
            negative += 1
            assert torch.equal(alpha, torch.ones(2, dtype=alpha.dtype)) and torch.equal(beta, torch.ones_like(beta))
            continue
        positive += 1
        np.testing.assert_allclose(alpha.numpy(), a_ref, rtol=1e-8)
        np.testing.assert_allclose(beta.numpy(), b_ref, rtol=1e-8)
        w_best, _ = ref.nnls_enumerate(Kr, lr, kappa)
        w = np.concatenate([alpha.numpy(), beta.numpy()]) ** 2
        np.testing.assert_allclose(w, w_best, rtol=1e-7, atol=1e-12)
        # and against scipy's NNLS on the surrogate written with the full gradient G
        feats = [np.outer(A[:, i], G.T @ A[:, i]).ravel() for i in range(2)]
        feats += [np.outer(G @ B[:, j], B[:, j]).ravel() for j in range(2)]
        w_scipy, _ = nnls(np.stack(feats, 1), kappa * G.ravel())
        np.testing.assert_allclose(w, w_scipy, rtol=1e-6, atol=1e-10)
    assert positive >= 10 and negative >= 1, (positive, negative)


@pytest.mark.parametrize("v1,accepted", [(1e-6, True), (-1e-6, False)])
def test_column_acceptance_is_strict_positivity(v1, accepted):
    """``K v = lambda`` with a borderline entry: accepted iff every ``v_i > 0`` (ScaLoRA's hybrid rule)."""
    rng = np.random.default_rng(13)
    Q = rng.standard_normal((4, 4))
    K = Q @ Q.T + np.eye(4)
    v = np.array([1.0, v1, 2.0, 0.5])
    alpha, beta, ok = F.scalora_column_scaling(torch.tensor(K), torch.tensor(K @ v), 0.4)
    assert bool(ok) == accepted
    if accepted:
        np.testing.assert_allclose(np.concatenate([alpha.numpy(), beta.numpy()]), np.sqrt(0.4 * v), rtol=1e-6)
    else:
        assert torch.equal(alpha, torch.ones(2, dtype=torch.float64)) and torch.equal(beta, alpha)


def test_scalar_quantities_match_definitions_with_G():
    rng = np.random.default_rng(7)
    A, B, G, dA, dB = scalora_instance(rng, r=3)
    q = F.scalora_scalar_quantities(*F.scalora_column_system(*scalora_grams(A, B, dA, dB)))
    for name, val in ref.scalar_quantities_from_G(A, B, G).items():
        key = {"gA": "g_A", "gB": "g_B", "pA": "p_A", "pB": "p_B", "pAB": "p_AB"}[name]
        assert getattr(q, key).item() == pytest.approx(val, rel=1e-10)
    assert ref.scalar_quantities(A, B, dA, dB) == pytest.approx(ref.scalar_quantities_from_G(A, B, G), rel=1e-10)


def test_scalar_scaling_equals_theorem_and_exact_two_variable_optimum():
    rng = np.random.default_rng(8)
    kappa, cases = 0.5, set()
    for t in range(80):
        A, B, G, dA, dB = scalora_instance(rng, m=5, n=4, r=2)
        if t % 3 == 1:  # G mostly in the column space of A: the A-only case becomes likely
            Q, _ = np.linalg.qr(A)
            G = Q @ rng.standard_normal((2, 4)) + 0.1 * rng.standard_normal((5, 4))
        elif t % 3 == 2:  # G mostly in the row space of B^T: the B-only case becomes likely
            Q, _ = np.linalg.qr(B)
            G = rng.standard_normal((5, 2)) @ Q.T + 0.1 * rng.standard_normal((5, 4))
        dA, dB = G @ B, G.T @ A
        q = F.scalora_scalar_quantities(*F.scalora_column_system(*scalora_grams(A, B, dA, dB)))
        alpha, beta, ok = F.scalora_scalar_scaling(q, kappa)
        assert ok
        x, y = alpha.item() ** 2, beta.item() ** 2
        qr = ref.scalar_quantities(A, B, dA, dB)
        th = ref.scalar_theorem(qr, kappa)
        assert th is not None  # the three cases are exhaustive on non-degenerate inputs
        cases.add("A" if th[1] == 0 else "B" if th[0] == 0 else "both")
        assert (x, y) == pytest.approx(th, rel=1e-8, abs=1e-12)
        feats = np.stack([(A @ A.T @ G).ravel(), (G @ B @ B.T).ravel()], 1)
        w, _ = nnls(feats, kappa * G.ravel())
        assert (x, y) == pytest.approx(tuple(w), rel=1e-6, abs=1e-10)
    assert cases == {"A", "B", "both"}, cases


def test_hybrid_picks_column_iff_v_positive_and_modes():
    rng = np.random.default_rng(9)
    kappa, seen = 0.2, set()
    for _ in range(40):
        A, B, G, dA, dB = scalora_instance(rng)
        gSA, gSB = scalora_grams(A, B, dA, dB)
        sc = F.scalora_scalings(gSA, gSB, kappa, "hybrid")
        a_ref, b_ref, col_ref = ref.hybrid(A, B, dA, dB, kappa)
        seen.add(col_ref)
        assert bool(sc.column) == col_ref and bool(sc.ok)
        np.testing.assert_allclose(sc.alpha.numpy(), a_ref, rtol=1e-8)
        np.testing.assert_allclose(sc.beta.numpy(), b_ref, rtol=1e-8)
        col = F.scalora_scalings(gSA, gSB, kappa, "column")
        assert bool(col.ok) == col_ref
        if not col_ref:
            assert torch.equal(col.alpha, torch.ones_like(col.alpha))
        sca = F.scalora_scalings(gSA, gSB, kappa, "scalar")
        assert not sca.column and torch.allclose(sca.alpha, sca.alpha[0].expand(2))
    assert seen == {True, False}
    with pytest.raises(ValueError, match="mode"):
        F.scalora_scalings(gSA, gSB, kappa, "nnls")


def test_scalora_batched_and_float32():
    rng = np.random.default_rng(10)
    insts = [scalora_instance(rng) for _ in range(6)]
    gSA = torch.stack([scalora_grams(A, B, dA, dB)[0] for A, B, _, dA, dB in insts])
    gSB = torch.stack([scalora_grams(A, B, dA, dB)[1] for A, B, _, dA, dB in insts])
    sc64 = F.scalora_scalings(gSA, gSB, 0.3)
    sc32 = F.scalora_scalings(gSA.float(), gSB.float(), 0.3)
    for i, (A, B, _, dA, dB) in enumerate(insts):
        a, b, col = ref.hybrid(A, B, dA, dB, 0.3)
        assert bool(sc64.column[i]) == col
        np.testing.assert_allclose(sc64.alpha[i].numpy(), a, rtol=1e-8)
        np.testing.assert_allclose(sc64.beta[i].numpy(), b, rtol=1e-8)
        if bool(sc32.column[i]) == col:  # float32 may flip a borderline sign test; then values differ legitimately
            np.testing.assert_allclose(sc32.alpha[i].double().numpy(), a, rtol=2e-3)
            np.testing.assert_allclose(sc32.beta[i].double().numpy(), b, rtol=2e-3)


# --------------------------------------------------------------------------- degenerate inputs


def test_zero_b_lora_init():
    rng = np.random.default_rng(11)
    A = rng.standard_normal((6, 2))
    B = np.zeros((5, 2))
    G = rng.standard_normal((6, 5))
    dA, dB = G @ B, G.T @ A
    out = F.reflora_preconditioner(*grams(A, B))
    assert not out.ok and torch.equal(out.S, torch.eye(2, dtype=out.S.dtype)) and torch.equal(out.S_inv, out.S)
    gSA, gSB = scalora_grams(A, B, dA, dB)
    sc = F.scalora_scalings(gSA, gSB, 0.5)
    assert sc.ok and not sc.column  # column system singular -> scalar (one-sided) rule
    q = ref.scalar_quantities(A, B, dA, dB)
    assert sc.alpha[0].item() ** 2 == pytest.approx(0.5 * q["gA"] / q["pA"], rel=1e-10)
    assert torch.isfinite(sc.alpha).all() and torch.isfinite(sc.beta).all() and (sc.beta > 0).all()
    s, ok = F.reflora_s_scale(torch.tensor(float((A**2).sum())), torch.tensor(0.0))
    assert not ok and s.item() == 1.0


def test_rank_deficient_and_nonfinite_inputs_give_identity_and_no_nan():
    rng = np.random.default_rng(12)
    A, B = rand_factors(rng, L=4)
    A[1, :, 2] = A[1, :, 0]  # rank-deficient A
    A[2, 0, 0] = np.nan
    B[3, 1, 1] = np.inf
    out = F.reflora_preconditioner(*grams(A, B))
    assert out.ok.tolist() == [True, False, False, False]
    eye = torch.eye(3, dtype=torch.float64)
    for i in (1, 2, 3):
        assert torch.equal(out.S[i], eye) and torch.equal(out.S_inv[i], eye)
    assert torch.isfinite(out.S).all() and torch.isfinite(out.S_inv).all() and torch.isfinite(out.nuclear_norm).all()
    # ScaLoRA on the same (with NaN/Inf in gradients too)
    G = rng.standard_normal((4, 7, 6))
    dA, dB = G @ B, G.transpose(0, 2, 1) @ A
    dA[0, 0, 0] = np.nan
    gSA, gSB = scalora_grams(A, B, dA, dB)
    sc = F.scalora_scalings(gSA, gSB, 0.1)
    assert sc.ok.tolist()[0] is False and not sc.ok[2] and not sc.ok[3]
    assert torch.isfinite(sc.alpha).all() and torch.isfinite(sc.beta).all()
    for i in (0, 2, 3):
        assert torch.equal(sc.alpha[i], torch.ones(3, dtype=torch.float64))
    s, ok = F.reflora_s_scale(torch.tensor([1.0, np.nan, np.inf]), torch.tensor([2.0, 1.0, 1.0]))
    assert ok.tolist() == [True, False, False] and torch.isfinite(s).all()


# --------------------------------------------------------------------------- floating-point range (issue #8)


def _merge_norms_np(W, A, B, alpha, beta):
    """``||W||``, ``||B diag(d) A^T||`` for d = 1, 1 - alpha beta, alpha beta, from the full matrices (float64)."""
    fro = np.linalg.norm
    ab = alpha * beta
    return fro(W), fro(B @ A.T), fro((B * (1 - ab)) @ A.T), fro((B * ab) @ A.T)


@pytest.mark.parametrize("seed", range(4))
def test_merge_growth_equals_its_definition(seed):
    rng = np.random.default_rng(seed)
    A, B = rand_factors(rng, m=9, n=7, r=3)
    W = rng.standard_normal((7, 9)) * 10.0 ** rng.uniform(-3, 3)
    alpha, beta = 10.0 ** rng.uniform(-2, 3, 3), 10.0 ** rng.uniform(-2, 3, 3)
    w, one, c, ab = _merge_norms_np(W, A, B, alpha, beta)
    G = F.scalora_merge_growth(*grams(A, B), torch.tensor(alpha), torch.tensor(beta), torch.tensor(w))
    assert G.item() == pytest.approx((w + c + ab) / (w + one), rel=1e-10)
    assert G.item() >= 1.0
    unit = F.scalora_merge_growth(*grams(A, B), torch.ones(3, dtype=torch.float64), torch.ones(3), torch.tensor(w))
    assert unit.item() == pytest.approx(1.0, rel=1e-12)  # nothing merged: nothing amplified
    zero = F.scalora_merge_growth(torch.zeros(3, 3), torch.zeros(3, 3), torch.ones(3), torch.ones(3), torch.tensor(0.0))
    assert zero.item() == 1.0


@pytest.mark.parametrize("log_ab", [-2, 0, 2, 4])
def test_merge_growth_bounds_the_measured_rounding_error_of_a_merge(log_ab):
    """The claim behind ScaLoRA's merge guard: after ``W' = W + s B diag(1 - ab) A^T`` (float32) and the
    rescaled adapter, ``W' + s B~ A~^T`` differs from ``W + s B A^T`` by at most a few ``u G (||W|| + ||s B A^T||)``,
    and the error does grow with ``G`` (the bound is not vacuous)."""
    from optlora import merge

    rng = np.random.default_rng(log_ab + 10)
    errs, bounds = [], []
    for _ in range(5):
        A, B = rand_factors(rng, m=40, n=30, r=4)
        W = rng.standard_normal((30, 40))
        alpha = 10.0 ** (log_ab / 2 + rng.uniform(-0.5, 0.5, 4))
        beta = 10.0 ** (log_ab / 2 + rng.uniform(-0.5, 0.5, 4))
        Wt = torch.tensor(W, dtype=torch.float32)
        At, Bt = torch.tensor(A.T, dtype=torch.float32), torch.tensor(B, dtype=torch.float32)  # PEFT layout
        a, b = torch.tensor(alpha), torch.tensor(beta)
        merge.merge_low_rank_(Wt, Bt, At, F.scalora_merge_coefficient(a, b), 1.0, mode="nearest")
        A_new, B_new = At * a.float()[:, None], Bt * b.float()[None, :]
        after = Wt.double() + B_new.double() @ A_new.double()
        exact = torch.tensor(W + B @ A.T)
        A64, B64 = torch.tensor(A), torch.tensor(B)
        w = torch.tensor(np.linalg.norm(W))
        G = F.scalora_merge_growth(A64.mT @ A64, B64.mT @ B64, a, b, w).item()
        scale = np.linalg.norm(W) + np.linalg.norm(B @ A.T)
        errs.append(float((after - exact).norm()) / scale)
        bounds.append(torch.finfo(torch.float32).eps / 2 * G)
    assert max(e / b for e, b in zip(errs, bounds)) <= 4.0
    if log_ab >= 2:  # cancellation dominates: the measured error tracks G
        assert min(e / b for e, b in zip(errs, bounds)) >= 0.05


def test_extreme_float32_grams_never_raise_and_keep_scale_covariance():
    """Finite float32 Grams near the ends of the range: no LinAlgError, no NaN; S(aX, bY) = sqrt(b/a) S(X, Y)."""
    rng = np.random.default_rng(3)
    A, B = rand_factors(rng, r=3)
    gA, gB = grams(A, B)
    ref_S = F.reflora_preconditioner(gA, gB).S
    for a, b in [(1e-30, 1e30), (1e30, 1e-30), (1e35, 1e35), (1e-35, 1e-35), (1e37, 1.0)]:
        out = F.reflora_preconditioner((a * gA).float(), (b * gB).float(), rank_tol=1e-5)
        assert torch.isfinite(out.S).all() and torch.isfinite(out.S_inv).all()
        expect = (ref_S * np.sqrt(b / a)).float()
        if torch.isfinite(expect).all() and expect.abs().max() < 1e37 and expect.abs().max() > 1e-30:
            assert out.ok.item()
            torch.testing.assert_close(out.S, expect, rtol=2e-3, atol=0)
        else:
            assert not out.ok.item()
    huge = torch.full((2, 2), 2.5e38).fill_diagonal_(3e38)  # M + M^T overflowed inside the old eigh
    inv, ok = F.inverse_gram(huge, rank_tol=1e-5)
    assert torch.isfinite(inv).all()


def test_reflora_s_scale_never_overflows():
    sqA = torch.tensor([1e-38, 1e-45, 1.0, 1e38], dtype=torch.float32)
    sqB = torch.tensor([1e38, 1e38, 1.0, 1e-38], dtype=torch.float32)
    s, ok = F.reflora_s_scale(sqA, sqB)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert ok.tolist() == [True, False, True, True]  # 1e38 / 1e-45 is beyond float32: refused, not Inf
    assert s[0].item() == pytest.approx(1e38, rel=1e-5) and s[3].item() == pytest.approx(1e-38, rel=1e-5)


# --------------------------------------------------------------------------- low-rank truncation (residuals)
