"""optlora.merge: exact merges in float32/64, unbiased stochastic rounding, compensated sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optlora import merge
from optlora.testing import reference as ref


def _low_rank(rng, out=5, inp=4, r=2):
    return rng.standard_normal((out, r)), rng.standard_normal((r, inp)), rng.uniform(-1, 1, r)


@pytest.mark.parametrize("mode", ["auto", "nearest", "stochastic", "kahan", "fp32"])
@pytest.mark.parametrize("fifo", [False, True])
def test_full_precision_weights_merge_exactly_in_every_mode(mode, fifo):
    rng = np.random.default_rng(0)
    Bp, Ap, c = _low_rank(rng)
    Wp = rng.standard_normal((4, 5) if fifo else (5, 4))
    W = torch.tensor(Wp)
    buf = merge.new_buffer(W, mode)
    assert buf is None  # float64 never needs a buffer
    merge.merge_low_rank_(W, torch.tensor(Bp), torch.tensor(Ap), torch.tensor(c), 1.5, fan_in_fan_out=fifo, mode=mode)
    np.testing.assert_allclose(W.numpy(), ref.peft_merge(Wp, Ap, Bp, 1.5, c, fifo), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased(dtype):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(64, generator=g) * 4 - 2).float() * torch.logspace(-3, 3, 64)
    draws = torch.stack([merge.stochastic_round(x, dtype, g).float() for _ in range(4000)])
    lo, hi = draws.min(0).values, draws.max(0).values
    assert ((draws == lo) | (draws == hi)).all()  # only the two neighbours ever appear
    assert (lo <= x).all() and (hi >= x).all()
    mean, se = draws.mean(0).double(), draws.std(0).double() / np.sqrt(draws.shape[0])
    spread = (hi - lo).double()
    z = (mean - x.double()).abs() / torch.clamp(se, min=1e-30)
    assert (z[se > 0] < 5).all(), z.max()
    assert ((mean - x.double()).abs() <= 1e-6 * spread + 1e-30)[se == 0].all()
    near = x.to(dtype).float()
    assert (((mean - x.double()).abs()) < ((near - x).abs().double() + 1e-30)).float().mean() > 0.9  # beats nearest


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_merge_is_unbiased(dtype):
    """The merge path itself (not only ``stochastic_round``): the expected merged weight is exact."""
    rng = np.random.default_rng(3)
    Bp, Ap, c = _low_rank(rng, out=6, inp=5)
    W0 = torch.tensor(rng.standard_normal((6, 5))).to(dtype)
    tB, tA, tc = torch.tensor(Bp).float(), torch.tensor(Ap).float(), torch.tensor(c * 1e-3)
    exact = W0.double().numpy() + ref.peft_merge(np.zeros((6, 5)), Ap, Bp, 1.0, c * 1e-3)
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(3000):
        W = W0.clone()
        merge.merge_low_rank_(W, tB, tA, tc, 1.0, mode="stochastic", generator=gen)
        draws.append(W.double().numpy())
    draws = np.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    moved = se > 0
    assert moved.mean() > 0.5
    assert (np.abs(mean - exact)[moved] / se[moved]).max() < 5


def test_stochastic_round_special_values_and_input_check():
    x = torch.tensor([0.0, 1.0, float("inf"), float("-inf"), float("nan")])
    for dt in (torch.bfloat16, torch.float16):
        y = merge.stochastic_round(x, dt).float()
        assert y[0] == 0 and y[1] == 1 and y[2] == float("inf") and y[3] == float("-inf") and y[4].isnan()
    with pytest.raises(TypeError):
        merge.stochastic_round(x.double(), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_long_sum_of_tiny_increments(dtype):
    """1000 increments of 1e-4 on weights of 1: nearest loses them all, kahan / fp32 keep them.

    Kahan and fp32 end within half an ulp of the exact sum (the best a half-precision weight
    can hold); stochastic rounding is right on average over many weights.
    """
    n, inc, size = 1000, 1e-4, 32
    Bp = torch.ones(size, 1, dtype=dtype)
    Ap = torch.full((1, size), inc, dtype=dtype)
    exact = 1 + n * Ap.double()[0, 0].item()
    half_ulp = 0.5 * torch.finfo(dtype).eps  # spacing of the format in [1, 2)
    errors, mean_errors = {}, {}
    for mode in ("nearest", "kahan", "fp32", "stochastic"):
        W = torch.ones(size, size, dtype=dtype)
        buf = merge.new_buffer(W, mode)
        assert (buf is not None) == (mode in ("kahan", "fp32"))  # half precision: only these keep a buffer
        gen = torch.Generator().manual_seed(0)
        for _ in range(n):
            merge.merge_low_rank_(W, Bp, Ap, torch.ones(1), 1.0, mode=mode, buffer=buf, generator=gen)
        errors[mode] = (W.double() - exact).abs().max().item()
        mean_errors[mode] = abs(W.double().mean().item() - exact)
    assert errors["nearest"] > 0.9 * (exact - 1)  # the whole sum is rounded away
    assert errors["kahan"] <= half_ulp * 1.001
    assert errors["fp32"] <= half_ulp * 1.001
    assert mean_errors["stochastic"] < 0.1 * mean_errors["nearest"]


def test_kahan_and_fp32_need_their_buffers():
    W = torch.ones(2, 2, dtype=torch.bfloat16)
    args = (torch.ones(2, 1, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.bfloat16), torch.ones(1), 1.0)
    with pytest.raises(ValueError, match="kahan"):
        merge.merge_low_rank_(W, *args, mode="kahan")
    with pytest.raises(ValueError, match="fp32"):
        merge.merge_low_rank_(W, *args, mode="fp32")
    with pytest.raises(ValueError, match="merge_precision"):
        merge.resolve_mode("bf16", torch.bfloat16)
    assert merge.resolve_mode("auto", torch.bfloat16) == "stochastic"
    assert merge.resolve_mode("kahan", torch.float32) == "nearest"


def test_chunked_merge_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(1)
    Bp, Ap, c = _low_rank(rng, out=7, inp=3)
    W0 = torch.tensor(rng.standard_normal((7, 3))).to(torch.bfloat16)
    outs = []
    for chunk in (1 << 24, 3):
        monkeypatch.setattr(merge, "CHUNK_ELEMENTS", chunk)
        W = W0.clone()
        buf = merge.new_buffer(W, "kahan")
        merge.merge_low_rank_(W, torch.tensor(Bp), torch.tensor(Ap), torch.tensor(c), 0.7, mode="kahan", buffer=buf)
        outs.append((W, buf))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
