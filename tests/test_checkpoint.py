"""The method state on disk (optlora.checkpoint): safetensors + JSON, round trips, legacy .pt, unreadable files."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import build, lora_params, train_steps
from hypothesis import given, settings
from hypothesis import strategies as st

import optlora
from optlora import checkpoint

names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)
scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False) | names
tensors = st.builds(
    lambda shape, dtype, seed: (torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed)) * 3).to(dtype),
    st.lists(st.integers(0, 3), max_size=3),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    st.integers(0, 99),
) | st.builds(lambda n: torch.arange(n, dtype=torch.uint8), st.integers(0, 8))
states = st.recursive(scalars | tensors, lambda inner: st.dictionaries(names, inner, max_size=4), max_leaves=12)


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return a == b and type(a) is type(b)


@settings(max_examples=60, deadline=None)
@given(state=st.dictionaries(names, states, max_size=5))
def test_any_nested_state_round_trips_bit_exactly(state):
    tensors_, metadata = checkpoint.flatten(state)
    assert all(isinstance(v, str) for v in metadata.values())
    assert _equal(checkpoint.unflatten(tensors_, metadata), state)


def test_method_state_round_trips_through_the_file(tmp_path):
    model, loss_fn, batch = build("mlp", torch.bfloat16)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=1, merge_precision="kahan").attach(opt)
    train_steps(model, opt, loss_fn, batch, 3)
    path = checkpoint.save_state(method, tmp_path)
    assert path.endswith(checkpoint.STATE_FILE) and not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    assert checkpoint.state_steps(tmp_path) == 3
    assert _equal(checkpoint.read_state(tmp_path), method.state_dict())
    with open(path, "rb") as fh:
        assert b"pickle" not in fh.read(4096)


def test_a_legacy_pt_state_is_read_without_pickle_code(tmp_path):
    torch.save({"config": {"method": "lora"}, "steps": 2, "method_steps": 1}, tmp_path / checkpoint.LEGACY_STATE_FILE)
    assert checkpoint.read_state(tmp_path)["steps"] == 2

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / checkpoint.LEGACY_STATE_FILE)
    with pytest.raises(Exception, match="[Ww]eights only"):
        checkpoint.read_state(tmp_path)


def test_unreadable_or_foreign_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no optlora method state"):
        checkpoint.read_state(tmp_path)
    (tmp_path / checkpoint.STATE_FILE).write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        checkpoint.read_state(tmp_path)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / checkpoint.STATE_FILE)  # a safetensors file, not ours
    with pytest.raises(ValueError, match="not an optlora state"):
        checkpoint.read_state(tmp_path)
    with pytest.raises(TypeError, match="cannot store"):
        checkpoint.flatten({"x": object()})
