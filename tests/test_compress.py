"""Low-rank compression (optlora.compress): exact and randomized truncated SVD, the dtype's rounding floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optlora import compress as ex
from optlora.testing import reference as ref


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_rank_for_error_and_svd_compress():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    delta = U @ torch.diag(s) @ V.T
    for tol in (0.0, 0.01, 0.05, 0.2, 0.5, 0.9):
        want = next(k for k in range(7) if (s[k:].square().sum() / s.square().sum()).sqrt() <= tol)
        assert ex.rank_for_error(s, tol) == want
        if tol == 0.0:
            continue  # the computed spectrum has round-off tails: tol=0 needs every one of them
        c = ex.svd_compress(delta, tol=tol)
        assert c.rank == max(want, 1)
        assert c.rel_error <= tol + 1e-12
        assert c.rel_error == pytest.approx(_rel(c.lora_B @ c.lora_A, delta) if c.rank else 1.0, abs=1e-12)
    c = ex.svd_compress(delta, rank=2)
    assert c.lora_A.shape == (2, 9) and c.lora_B.shape == (12, 2)
    assert c.rel_error == pytest.approx(float((s[2:].square().sum() / s.square().sum()).sqrt()), rel=1e-9)
    assert ex.svd_compress(delta, rank=2, tol=0.0).rank == 2  # rank caps tol
    assert ex.svd_compress(torch.zeros(4, 3), rank=2).rel_error == 0.0
    with pytest.raises(ValueError, match="rank"):
        ex.svd_compress(delta)
    with pytest.raises(ValueError, match="tol"):
        ex.rank_for_error(s, 1.5)


@pytest.mark.parametrize("shape,true_rank", [((96, 160), 12), ((160, 96), 40), ((24, 30), 6)])
def test_lowrank_compress_states_the_error_of_what_it_writes(shape, true_rank):
    g = torch.Generator().manual_seed(true_rank)
    delta = torch.randn(shape[0], true_rank, generator=g) @ torch.randn(true_rank, shape[1], generator=g)
    delta += 1e-3 * torch.randn(*shape, generator=g)  # a full-rank tail, as merged increments leave
    state = torch.random.get_rng_state()
    for kw in ({"tol": 1e-2}, {"tol": 1e-4}, {"rank": 5}, {"tol": 1e-6, "rank": 8}):
        fast, exact = ex.lowrank_compress(delta, **kw), ex.svd_compress(delta, **kw)
        true = float((delta.double() - fast.lora_B.double() @ fast.lora_A.double()).norm() / delta.double().norm())
        assert fast.rel_error == pytest.approx(true, rel=1e-3, abs=1e-7)
        if "tol" in kw and fast.rank < kw.get("rank", 10**9):
            assert fast.rel_error <= kw["tol"]
        assert exact.rank <= fast.rank <= exact.rank + 2  # near the Eckart-Young minimum
        assert fast.rank <= kw.get("rank", 10**9)
        again = ex.lowrank_compress(delta, **kw)
        assert torch.equal(again.lora_A, fast.lora_A)  # deterministic
    assert torch.equal(torch.random.get_rng_state(), state)  # saving never moves the training RNG
    assert ex.lowrank_compress(torch.zeros(40, 50), tol=0.1).rel_error == 0.0


@pytest.mark.parametrize("dtype,bits", [(torch.bfloat16, 8), (torch.float16, 11), (torch.float32, 24)])
def test_rounding_floor_is_the_error_of_storing_in_the_dtype(dtype, bits):
    g = torch.Generator().manual_seed(bits)
    exact = torch.randn(200, 300, generator=g, dtype=torch.float64) * 0.05
    stored = exact.to(dtype)
    # round-to-nearest error is uniform within one ulp: RMS ulp / sqrt(12), which the floor predicts
    measured = float((stored.double() - exact).norm())
    assert ex.rounding_floor(stored) == pytest.approx(measured, rel=0.05)
    assert ex.rounding_floor(torch.zeros(3, 3, dtype=dtype)) == 0.0


@pytest.mark.parametrize("shape,k", [((300, 200), 5), ((150, 400), 12)])
def test_noise_rank_finds_the_components_above_iid_noise(shape, k):
    g = torch.Generator().manual_seed(k)
    m, n = shape
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    noise = 0.01 * torch.randn(m, n, generator=g)  # spectral norm about 0.01 (sqrt m + sqrt n) ~ 0.3
    signal = U @ torch.diag(torch.linspace(1.0, 3.0, k)) @ V.T  # every component well above it
    assert ex.noise_rank(signal + noise) == k
    assert ex.noise_rank(noise) <= 2
    assert ex.noise_rank(torch.zeros(m, n)) == 1


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    m=st.integers(1, 9),
    n=st.integers(1, 9),
    p=st.integers(1, 8),
    k=st.integers(1, 8),
)
def test_truncate_low_rank_is_the_truncated_svd(seed, m, n, p, k):
    """Eckart-Young from the factors: the same matrix and dropped norm as numpy's SVD of the dense product."""
    rng = np.random.default_rng(seed)
    left, right = rng.standard_normal((3, m, p)), rng.standard_normal((3, p, n))
    out = ex.truncate_low_rank(torch.tensor(left), torch.tensor(right), k)
    assert out.left.shape == (3, m, k) and out.right.shape == (3, k, n)
    for i in range(3):
        X = left[i] @ right[i]
        Xk, dropped = ref.best_rank_k(X, k)
        scale = max(1.0, np.abs(X).max())
        np.testing.assert_allclose((out.left[i] @ out.right[i]).numpy(), Xk, atol=1e-9 * scale)
        assert np.sqrt(out.dropped_sq[i].item()) == pytest.approx(dropped, abs=1e-7 * scale)
        assert out.kept_sq[i].item() + out.dropped_sq[i].item() == pytest.approx(float(np.sum(X * X)), rel=1e-9)
        if min(m, n, p) <= k:  # rank(X) <= k: nothing is dropped
            np.testing.assert_allclose((out.left[i] @ out.right[i]).numpy(), X, atol=1e-9 * scale)


def test_truncate_low_rank_zero_matrix_and_bad_rank():
    out = ex.truncate_low_rank(torch.zeros(4, 3), torch.zeros(3, 5), 2)
    assert torch.equal(out.left, torch.zeros(4, 2)) and torch.equal(out.right, torch.zeros(2, 5))
    assert out.dropped_sq.item() == 0.0 and out.kept_sq.item() == 0.0
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ex.truncate_low_rank(torch.zeros(4, 3), torch.zeros(3, 5), 0)
