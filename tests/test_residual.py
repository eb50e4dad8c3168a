"""optlora.residual: the low-rank residual a base layer carries (forward hook), folded, saved, adopted, copied.

Float PEFT layers stand in for quantised ones here: the residual does not care what the base is.
End-to-end ScaLoRA on quantised bases is in tests/test_quantized.py.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import mlp_batch, tiny_mlp

import optlora
from optlora import residual
from optlora.testing import reference as ref


def _first(model):
    return optlora.find_lora_factors(model)[0]


def test_residual_is_added_to_the_base_layer_output_after_the_first_fold():
    model = tiny_mlp()
    f = _first(model)
    x = mlp_batch()[0]
    base = f.module.get_base_layer()
    y0 = model(x).detach()
    res = residual.attach(f, 3)
    assert residual.residuals_of(base) == {"default": res} and not res.active
    torch.testing.assert_close(model(x), y0, rtol=0, atol=0)  # inactive: zero and free
    g = torch.Generator().manual_seed(0)
    left = torch.randn(1, 5, 2, generator=g, dtype=torch.float64)
    right = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    residual.fold_([res], left, right, torch.float64)
    assert res.active and res.dropped.item() == pytest.approx(0.0, abs=1e-12)
    delta = left[0] @ right[0]
    assert res.left.dtype == torch.float64  # the factors' dtype, at least float32
    torch.testing.assert_close(res.dense(), delta)
    torch.testing.assert_close(base(x), x @ (base.weight + delta).T + base.bias)
    lora = f.scaling * x @ (f.lora_B @ f.lora_A).T
    torch.testing.assert_close(f.module(x), x @ (base.weight + delta).T + base.bias + lora)
    with model.disable_adapter():  # the residual is part of the base, like an increment merged into it
        torch.testing.assert_close(f.module(x), x @ (base.weight + delta).T + base.bias)


def test_fold_truncates_to_the_best_rank_r_and_accumulates_the_dropped_and_merged_norms():
    model = tiny_mlp()
    res = residual.attach(_first(model), 2)
    rng = np.random.default_rng(0)
    expected_dropped = expected_merged = 0.0
    for _ in range(3):
        before = res.dense().double().numpy()
        left, right = rng.standard_normal((1, 5, 2)), rng.standard_normal((1, 2, 6))
        residual.fold_([res], torch.tensor(left), torch.tensor(right), torch.float64)
        best, dropped = ref.best_rank_k(before + left[0] @ right[0], 2)
        expected_dropped += dropped
        expected_merged += np.linalg.norm(left[0] @ right[0])
        np.testing.assert_allclose(res.dense().double().numpy(), best, rtol=1e-5, atol=1e-6)
        assert res.dropped.item() == pytest.approx(expected_dropped, rel=1e-5)
        assert res.merged.item() == pytest.approx(expected_merged, rel=1e-9)
        assert res.norm.item() == pytest.approx(np.linalg.norm(best), rel=1e-5)
    assert expected_dropped > 0


def test_a_second_attach_adopts_the_residual_and_a_different_rank_is_refused():
    model = tiny_mlp()
    f = _first(model)
    res = residual.attach(f, 3)
    assert residual.attach(f, 3) is res
    assert len(f.module.get_base_layer()._forward_hooks) == 1
    with pytest.raises(ValueError, match="already carries a residual of rank 3"):
        residual.attach(f, 4)


def test_state_dict_round_trip_and_deepcopy():
    model = tiny_mlp()
    res = residual.attach(_first(model), 2)
    g = torch.Generator().manual_seed(1)
    for _ in range(2):
        residual.fold_(
            [res], torch.randn(1, 5, 2, generator=g).double(), torch.randn(1, 2, 6, generator=g).double(), torch.float64
        )
    other = residual.attach(_first(tiny_mlp()), 2)
    other.load_state_dict(res.state_dict())
    assert other.active and torch.equal(other.dense(), res.dense()) and torch.equal(other.dropped, res.dropped)
    with pytest.raises(ValueError, match="shape"):
        residual.attach(_first(tiny_mlp()), 3).load_state_dict(res.state_dict())
    x = mlp_batch()[0]
    clone = copy.deepcopy(model)  # the copy carries its own residual
    torch.testing.assert_close(clone(x), model(x))
    (copied,) = residual.residuals_of(_first(clone).module.get_base_layer()).values()
    assert copied is not res and torch.equal(copied.left, res.left)


def test_weight_norm_reads_the_weight_through_the_layer():
    """``||W||_F`` from outputs on unit vectors (chunked), for any storage; eval mode is restored."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(7, 5).double().eval()
    got = residual.weight_norm(layer, 7, "cpu", chunk=3)
    assert got.item() == pytest.approx(torch.linalg.matrix_norm(layer.weight).item(), rel=1e-12)
    assert not layer.training
