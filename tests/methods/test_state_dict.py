"""Method state (optlora.methods.base / scalora): transactional loading, legacy states, the RNG of a warm-up checkpoint."""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
import torch
from conftest import build, lora_params, np64, train_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import optlora
from optlora import checkpoint

KINDS = {
    "scalora": (functools.partial(optlora.ScaLoRA, kappa=0.3), torch.float32),
    "scalora_kahan_bf16": (functools.partial(optlora.ScaLoRA, kappa=0.3, merge_precision="kahan"), torch.bfloat16),
    "reflora_s": (functools.partial(optlora.RefLoRA, scalar=True), torch.float32),
}


@functools.cache
def _trained(kind: str):
    """A method after 3 steps (2 applied) and a deep copy of its state, built once per kind."""
    make, dtype = KINDS[kind]
    model, loss_fn, batch = build("mlp_two_adapters" if kind == "scalora" else "mlp", dtype)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = make(model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 3)
    return method, copy.deepcopy(method.state_dict())


def _everything(method) -> list:
    """Every tensor a load could write, the counters and the RNG states, as copies."""
    out = [p.detach().clone() for p in method.model.parameters()]
    out += [b.clone() for b in getattr(method, "buffers", {}).values()]
    out += [g.get_state() for g in getattr(method, "_generators", {}).values()]
    return [*out, method.steps, method.method_steps, dict(method.skipped)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b, strict=True)
    )


def _same_state(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


def _tensor_entries(state: dict, *, drop: bool = False) -> list[tuple[str, str]]:
    """``(section, name)`` of every tensor in a state (factors as ``name/lora_A``).

    A generator state may be missing (``drop``): without stochastic rounding it is unused, and with it a
    missing one (a state moved from CPU to GPU) only changes future rounding noise, with a warning.
    """
    out = []
    for section in ("base_weights", "buffers") if drop else ("base_weights", "buffers", "rng"):
        out += [(section, n) for n in state.get(section, {})]
    for name, pair in state.get("factors", {}).items():
        out += [("factors", f"{name}/{which}") for which in pair]
    return out


def _get(state, section, name):
    if section == "factors":
        n, which = name.rsplit("/", 1)
        return state["factors"][n][which]
    return state[section][name]


def _put(state, section, name, value):
    if section == "factors":
        n, which = name.rsplit("/", 1)
        state["factors"][n][which] = value
    else:
        state[section][name] = value


def corrupt(state: dict, how: str, pick: int) -> dict:
    """One kind of damage a saved state can have (wrong file, other model, other method, bit rot)."""
    s = copy.deepcopy(state)
    entries = _tensor_entries(s, drop=how == "drop_tensor")
    if how == "not_a_dict":
        return [s]  # type: ignore[return-value]
    if how == "drop_key":  # "factors" and "skipped" may be absent (states written before they were saved)
        keys = [k for k in sorted(s) if k not in ("factors", "skipped") and (k != "buffers" or s[k])]
        del s[keys[pick % len(keys)]]
    elif how == "skipped":  # the fault guards' counts: every reason, an int >= 0
        reason = sorted(s["skipped"])[pick % len(s["skipped"])]
        kind = pick % 4
        if kind == 0:
            s["skipped"][reason] = (-1, 1.5, "2", True)[(pick // 4) % 4]
        elif kind == 1:
            del s["skipped"][reason]
        elif kind == 2:
            s["skipped"]["other_reason"] = 0
        else:
            s["skipped"] = list(s["skipped"].values())
    elif how == "config":
        key = sorted(s["config"])[pick % len(s["config"])]
        value = s["config"][key]
        s["config"][key] = value + 1 if isinstance(value, (int, float)) and not isinstance(value, bool) else f"{value}x"
    elif how == "steps":
        s[("steps", "method_steps")[pick % 2]] = (-1, 2.5, "3", True, None)[pick % 5]
    elif how == "method_steps_gt_steps":
        s["method_steps"] = s["steps"] + 1
    elif how in ("broadcastable_shape", "transposed", "dtype", "drop_tensor", "extra_tensor") and entries:
        section, name = entries[pick % len(entries)]
        t = _get(s, section, name)
        if how == "broadcastable_shape" and t.dim() == 2 and t.shape[0] > 1:
            _put(s, section, name, t[:1].clone())  # a (1, n) tensor broadcasts into (k, n) if not refused
        elif how == "broadcastable_shape" and t.dim() == 2:
            _put(s, section, name, t[:, :1].clone() if t.shape[1] > 1 else t.expand(2, -1).clone())
        elif how == "broadcastable_shape":
            _put(s, section, name, t[:1].clone() if t.numel() > 1 else torch.zeros(2, dtype=t.dtype))
        elif how == "transposed" and t.dim() == 2 and t.shape[0] != t.shape[1]:
            _put(s, section, name, t.T.contiguous())
        elif how == "transposed":
            _put(s, section, name, t.reshape(-1)[:-1].clone())
        elif how == "dtype":
            _put(s, section, name, t.to(torch.float64 if t.dtype != torch.float64 else torch.float32))
        elif how == "drop_tensor" and section == "factors":
            del s["factors"][name.rsplit("/", 1)[0]][name.rsplit("/", 1)[1]]
        elif how == "drop_tensor":
            del s[section][name]
        else:
            target = s["factors"] if section == "factors" else s[section]
            target["not.a.layer[default]" if section == "factors" else "not.a.layer"] = (
                {"lora_A": t, "lora_B": t} if section == "factors" else t
            )
    else:  # a method without tensors in its state: damage the config instead
        s["config"]["method"] = "other"
    return s


HOW = [
    "not_a_dict",
    "drop_key",
    "skipped",
    "config",
    "steps",
    "method_steps_gt_steps",
    "broadcastable_shape",
    "transposed",
    "dtype",
    "drop_tensor",
    "extra_tensor",
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(sorted(KINDS)), how=st.sampled_from(HOW), pick=st.integers(0, 10_000))
def test_a_damaged_state_is_refused_before_anything_changes(kind, how, pick):
    method, state = _trained(kind)
    bad = corrupt(state, how, pick)
    assert not _same_state(bad, state), (how, pick)  # the damage is real
    before = _everything(method)
    with pytest.raises(ValueError):
        method.load_state_dict(bad)
    assert _same(before, _everything(method))


def test_a_one_row_base_weight_is_not_broadcast_into_the_layer():
    """The issue's case: a (1, n) tensor fits a (4, n) weight under copy_ broadcasting; it must be refused."""
    method, state = _trained("scalora")
    bad = copy.deepcopy(state)
    name = next(iter(bad["base_weights"]))
    bad["base_weights"][name] = bad["base_weights"][name][:1].clone()
    with pytest.raises(ValueError, match=r"base_weights.*is tensor \(1, "):
        method.load_state_dict(bad)


def test_errors_name_the_problem():
    method, state = _trained("scalora")
    with pytest.raises(ValueError, match="no \\['steps'\\]"):
        method.load_state_dict({k: v for k, v in state.items() if k != "steps"})
    with pytest.raises(ValueError, match="kappa"):
        method.load_state_dict({**state, "config": {**state["config"], "kappa": 9.0}})
    with pytest.raises(ValueError, match="scalora"):
        _trained("reflora_s")[0].load_state_dict(state)  # another method's state
    with pytest.raises(ValueError, match="missing"):
        method.load_state_dict({**state, "base_weights": {}})


def test_a_state_saved_before_factors_were_part_of_it_still_loads():
    """States of earlier versions key base weights by ``path[adapter]`` and leave the factors to the adapter."""
    method, state = _trained("scalora")
    old = {k: v for k, v in copy.deepcopy(state).items() if k not in ("factors", "base_weights", "buffers")}
    old["base_weights"] = {f.name: f.base_weight.detach().clone() for f in method.factors}
    old["buffers"] = {}
    with torch.no_grad():
        for f in method.factors:
            f.base_weight.add_(1.0)
    method.load_state_dict(old)
    for f in method.factors:
        torch.testing.assert_close(f.base_weight, old["base_weights"][f.name], rtol=0, atol=0)


def _opt_bytes(opt) -> bytes:
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_warmup_checkpoint_reloaded_into_live_objects_is_bit_exact(tmp_path, dtype):
    """A state saved before the first merge holds the RNG too: reloading it into the same live objects and
    repeating the steps gives bit-identical weights (the generator advanced during the first pass)."""
    model, loss_fn, batch = build("mlp", dtype)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=2).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)  # warm-up only: nothing merged yet
    assert method.method_steps == 0 and method.state_dict()["rng"]
    checkpoint.save_state(method, tmp_path)
    saved_opt = _opt_bytes(opt)
    train_steps(model, opt, loss_fn, batch, 4)  # merges with stochastic rounding (bf16)
    first = [np64(p) for p in model.parameters()]

    checkpoint.load_state(method, tmp_path)  # back into the same live model, optimizer and method
    opt.load_state_dict(torch.load(io.BytesIO(saved_opt), weights_only=True))
    assert (method.steps, method.method_steps) == (1, 0)
    train_steps(model, opt, loss_fn, batch, 4)
    for a, b in zip(first, (np64(p) for p in model.parameters())):
        np.testing.assert_array_equal(a, b)


def test_a_state_from_another_cpu_device_name_maps_its_generator():
    method, state = _trained("scalora_kahan_bf16")
    moved = {**copy.deepcopy(state), "rng": {"cpu:0": state["rng"]["cpu"]}}
    method.load_state_dict(moved)
    assert torch.equal(method._generators[torch.device("cpu")].get_state(), state["rng"]["cpu"])
    with pytest.raises(ValueError, match="not a generator state"):
        method.load_state_dict({**state, "rng": {"cpu": torch.zeros(3, dtype=torch.uint8)}})


def test_the_guards_skip_counts_are_part_of_the_state():
    """``skipped`` (layer-steps the fault guards left to the plain step) is saved and restored with the counters, so
    ``stats()`` after a resume equals the uninterrupted run's; a state written before the guards restarts it at 0."""
    method, state = _trained("scalora")
    assert set(state["skipped"]) == {"nonfinite", "out_of_range", "degenerate"}
    counts = {**state["skipped"], "out_of_range": 3}
    method.load_state_dict({**state, "skipped": counts})
    assert method.stats()["skipped"] == counts and method.state_dict()["skipped"] == counts
    method.load_state_dict({k: v for k, v in state.items() if k != "skipped"})
    assert set(method.skipped.values()) == {0}
    method.load_state_dict(state)
