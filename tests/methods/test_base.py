"""The shared state machine (optlora.methods.base): warm-up, interval, state_dict, hooks, checks, dtypes."""

from __future__ import annotations

import functools
import io

import numpy as np
import pytest
import torch
from conftest import build, forward_backward, lora_params, mlp_batch, mlp_loss, np64, snapshot, tiny_mlp, train_steps
from peft import get_peft_model_state_dict, set_peft_model_state_dict

import optlora

METHODS = {
    "reflora": lambda m, **kw: optlora.RefLoRA(m, **kw),
    "reflora_s": lambda m, **kw: optlora.RefLoRA(m, scalar=True, **kw),
    "scalora": lambda m, **kw: optlora.ScaLoRA(m, kappa=0.3, **kw),
    "scalora_i": lambda m, **kw: optlora.ScaLoRA(m, kappa=0.3, interval=2, **kw),
}
MERGE_MODES = {
    f"scalora_{mode}": functools.partial(optlora.ScaLoRA, kappa=0.3, merge_precision=mode)
    for mode in ("kahan", "fp32", "nearest")
}


def params_np(model):
    return [np64(p) for p in model.parameters()]


@pytest.mark.parametrize("name", list(METHODS))
def test_warmup_steps_are_plain_lora_then_first_application(name):
    warm = 3
    model, loss_fn, batch = build("mlp")
    twin, _, _ = build("mlp")
    opt, opt_twin = torch.optim.AdamW(lora_params(model), lr=0.01), torch.optim.AdamW(lora_params(twin), lr=0.01)
    method = METHODS[name](model, warmup_steps=warm).attach(opt)
    for step in range(1, warm + 2):
        train_steps(model, opt, loss_fn, batch, 1)
        train_steps(twin, opt_twin, loss_fn, batch, 1)
        same = all(np.array_equal(a, b) for a, b in zip(params_np(model), params_np(twin)))
        assert same == (step <= warm), step
        assert method.method_steps == (step > warm)
    assert method.steps == warm + 1


@pytest.mark.parametrize("warm,interval", [(0, 1), (2, 3), (1, 4)])
def test_interval_schedule(warm, interval):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = optlora.RefLoRA(model, warmup_steps=warm, interval=interval).attach(opt)
    applied = []
    for step in range(1, 14):
        assert method.stats()["next_step_applies"] == method.is_due(step)
        before = method.method_steps
        train_steps(model, opt, loss_fn, batch, 1)
        if method.method_steps > before:
            applied.append(step)
    assert applied == [s for s in range(1, 14) if s > warm and (s - warm - 1) % interval == 0]
    assert applied[0] == warm + 1


def _save(model, opt, method):
    buf = io.BytesIO()
    adapters = {a: get_peft_model_state_dict(model, adapter_name=a) for a in model.peft_config}
    torch.save({"lora": adapters, "opt": opt.state_dict(), "method": method.state_dict()}, buf)
    buf.seek(0)
    return buf


def _load_adapters(model, adapters):
    for name, sd in adapters.items():
        set_peft_model_state_dict(model, sd, adapter_name=name)


@pytest.mark.parametrize(
    "name,dtype",
    [(n, torch.float32) for n in METHODS]
    + [("scalora", torch.bfloat16), ("scalora_i", torch.bfloat16)]
    + [(n, torch.bfloat16) for n in MERGE_MODES]
    + [("two_adapters_scalora_fp32", torch.bfloat16)],
)
def test_state_dict_round_trip_resumes_bit_exactly(name, dtype):
    kind = "mlp_two_adapters" if name.startswith("two_adapters_") else "mlp"
    name = name.removeprefix("two_adapters_")
    make = {**METHODS, **MERGE_MODES}[name]
    model, loss_fn, batch = build(kind, dtype)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = make(model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 4)
    ckpt = _save(model, opt, method)
    fresh, _, _ = build(kind, dtype)  # the pretrained base; ScaLoRA's merged weights must come from the checkpoint
    with torch.no_grad():
        for p in lora_params(fresh):  # a different adapter init: the adapter must come from the checkpoint too
            p.normal_()
    fresh_opt = torch.optim.AdamW(lora_params(fresh), lr=0.01)
    fresh_method = make(fresh, warmup_steps=1)
    state = torch.load(ckpt, weights_only=False)
    _load_adapters(fresh, state["lora"])
    fresh_opt.load_state_dict(state["opt"])
    fresh_method.load_state_dict(state["method"])
    fresh_method.attach(fresh_opt)
    assert fresh_method.steps == method.steps == 4
    for _ in range(3):
        train_steps(model, opt, loss_fn, batch, 1)
        train_steps(fresh, fresh_opt, loss_fn, batch, 1)
        for a, b in zip(params_np(model), params_np(fresh)):
            np.testing.assert_array_equal(a, b)
    assert fresh_method.method_steps == method.method_steps


def test_state_dict_refuses_other_config():
    model, _, _ = build("mlp")
    sd = optlora.ScaLoRA(model, kappa=0.3).state_dict()
    with pytest.raises(ValueError, match="config"):
        optlora.ScaLoRA(model, kappa=0.5).load_state_dict(sd)


def test_stochastic_rounding_rng_is_part_of_the_state():
    """A bf16 resume without the saved generator state diverges: the round trip above is not vacuous."""
    model, loss_fn, batch = build("mlp", torch.bfloat16)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=0).attach(opt)
    train_steps(model, opt, loss_fn, batch, 2)
    ckpt = _save(model, opt, method).getvalue()
    train_steps(model, opt, loss_fn, batch, 2)
    finals = []
    for keep_rng in (True, False):
        fresh, _, _ = build("mlp", torch.bfloat16)
        fresh_opt = torch.optim.AdamW(lora_params(fresh), lr=0.01)
        fresh_method = optlora.ScaLoRA(fresh, kappa=0.3, warmup_steps=0)
        state = torch.load(io.BytesIO(ckpt), weights_only=False)
        assert state["method"]["rng"]
        if not keep_rng:
            state["method"]["rng"] = {}
        _load_adapters(fresh, state["lora"])
        fresh_opt.load_state_dict(state["opt"])
        fresh_method.load_state_dict(state["method"])
        fresh_method.attach(fresh_opt)
        train_steps(fresh, fresh_opt, loss_fn, batch, 2)
        finals.append([np64(f.base_weight) for f in fresh_method.factors])
    original = [np64(f.base_weight) for f in method.factors]
    assert all(np.array_equal(a, b) for a, b in zip(original, finals[0]))
    assert not all(np.array_equal(a, b) for a, b in zip(original, finals[1]))


@pytest.mark.parametrize("name", list(METHODS))
def test_gradient_accumulation_fires_once_per_step(name):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = METHODS[name](model, warmup_steps=0).attach(opt)
    x, y = batch
    for _ in range(3):
        opt.zero_grad()
        for i in range(4):  # four micro-batches, one optimizer step
            (mlp_loss(model, (x[2 * i : 2 * i + 2], y[2 * i : 2 * i + 2])) / 4).backward()
        opt.step()
    assert method.steps == 3
    assert method.method_steps == (2 if name == "scalora_i" else 3)


@pytest.mark.parametrize("name", list(METHODS))
def test_accumulated_micro_batches_take_the_step_of_one_batch_up_to_rounding(name):
    """4 micro-batches of 2 (losses / 4) and 1 batch of 8 give the same gradient up to float rounding, so the
    same method step: in float64 the weights agree to ~1e-13 after 5 steps (bench/clip_accum.py
    measures how much float32 rounding the closed forms amplify on MiniLM)."""
    finals = []
    for micro in (1, 4):
        model, loss_fn, (x, y) = build("mlp")
        opt = torch.optim.AdamW(lora_params(model), lr=0.01)
        method = METHODS[name](model, warmup_steps=1).attach(opt)
        for _ in range(5):
            opt.zero_grad()
            for i in range(micro):
                part = slice(i * 8 // micro, (i + 1) * 8 // micro)
                (mlp_loss(model, (x[part], y[part])) / micro).backward()
            opt.step()
        assert method.method_steps == (2 if name == "scalora_i" else 4)
        finals.append(params_np(model))
    for a, b in zip(*finals):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_clipping_before_step_is_seen_by_reflora():
    from optlora.testing import reference as ref

    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.1)
    method = optlora.RefLoRA(model, warmup_steps=0).attach(opt)
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    norm = torch.nn.utils.clip_grad_norm_(lora_params(model), max_norm=1e-3)
    assert norm > 1e-3  # clipping is active
    before = snapshot(method)
    opt.step()
    for name, d in before.items():
        gA, _ = ref.peft_reflora_grads(d["A"], d["B"], d["gA"], d["gB"])
        np.testing.assert_allclose(np64(next(f for f in method.factors if f.name == name).lora_A), d["A"] - 0.1 * gA)


def test_scalora_scalings_ignore_clipping_scale():
    results = []
    for clip in (None, 1e-4):
        model, loss_fn, batch = build("mlp")
        opt = torch.optim.SGD(lora_params(model), lr=0.0)
        method = optlora.ScaLoRA(model, warmup_steps=0, kappa=0.3).attach(opt)
        opt.zero_grad()
        forward_backward(model, loss_fn, batch)
        if clip:
            torch.nn.utils.clip_grad_norm_(lora_params(model), max_norm=clip)
        opt.step()
        results.append([np64(f.lora_A) for f in method.factors])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-8)


def test_gradscaler_skipped_steps_do_not_count():
    model, loss_fn, batch = build("mlp", torch.float32)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, warmup_steps=0, kappa=0.3).attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(4):
        opt.zero_grad()
        scaler.scale(loss_fn(model, batch)).backward()
        if step == 1:  # an overflow: GradScaler skips optimizer.step(), so the pre-hook never runs
            method.factors[0].lora_A.grad[0, 0] = float("inf")
        W = [f.base_weight.clone() for f in method.factors]
        scaler.step(opt)
        scaler.update()
        if step == 1:
            assert all(torch.equal(w, f.base_weight) for w, f in zip(W, method.factors))
    assert method.steps == 3 and method.method_steps == 3


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_every_dtype_runs_without_nan(name, dtype):
    model, loss_fn, batch = build("mlp", dtype)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01, eps=1e-4)
    method = METHODS[name](model, warmup_steps=1).attach(opt)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert method.method_steps >= 3 and np.isfinite(losses).all()
    for p in model.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
    assert method.stats()["last_skipped_layers"] == []


@pytest.mark.parametrize("name", list(METHODS) + list(MERGE_MODES))
def test_peft_default_float32_adapters_on_bfloat16_base(name):
    from conftest import tiny_mlp

    model = tiny_mlp(torch.bfloat16, autocast_adapter_dtype=True)  # PEFT's default upcast of the adapters
    assert {p.dtype for p in lora_params(model)} == {torch.float32}
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = {**METHODS, **MERGE_MODES}[name](model, warmup_steps=1).attach(opt)
    batch = mlp_batch(torch.bfloat16)
    train_steps(model, opt, mlp_loss, batch, 5)
    assert method.method_steps >= 2 and mlp_loss(model, batch).isfinite()
    for f in method.factors:
        assert f.base_weight.dtype == torch.bfloat16 and torch.isfinite(f.base_weight).all()
        assert f.lora_A.dtype == torch.float32 and torch.isfinite(f.lora_A).all()


def test_compute_dtype_float32_matches_float64():
    out = []
    for cd in (torch.float64, torch.float32):
        model, loss_fn, batch = build("mlp", torch.float32)
        opt = torch.optim.SGD(lora_params(model), lr=0.05)
        optlora.RefLoRA(model, warmup_steps=0, compute_dtype=cd).attach(opt)
        train_steps(model, opt, loss_fn, batch, 2)
        out.append(params_np(model))
    for a, b in zip(*out):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="compute_dtype"):
        optlora.RefLoRA(tiny_mlp(), compute_dtype=torch.bfloat16)


def test_mlp_batch_helper_is_deterministic():
    a, b = mlp_batch(), mlp_batch()
    assert torch.equal(a[0], b[0])


def test_reflora_without_warmup_from_peft_init_skips_then_applies():
    """PEFT's lora_B = 0 makes S~ = 0 (RefLoRA Sec. 3, Assumption 1): step 1 must fall back to plain LoRA, step 2 refactors."""
    model = tiny_mlp(random_b=False)
    opt = torch.optim.SGD(lora_params(model), lr=0.1)
    method = optlora.RefLoRA(model, warmup_steps=0).attach(opt)
    batch = mlp_batch()
    train_steps(model, opt, mlp_loss, batch, 1)
    names = [f.name for f in method.factors]
    assert method.stats()["last_skipped_layers"] == names
    assert all(f.lora_B.abs().sum() > 0 for f in method.factors)  # the plain step left the init
    assert method.method_steps == 0  # a step on which every layer was skipped is not a method step
    train_steps(model, opt, mlp_loss, batch, 1)
    assert method.stats()["last_skipped_layers"] == [] and method.method_steps == 1


def test_optimizer_state_without_an_exact_rule_is_refused_before_anything_changes():
    """An Adam subclass keeping its moments under its own keys inherits Adam's rule: refused, nothing modified."""

    class OwnKeys(torch.optim.Adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for q in group["params"]:
                    st = self.state[q]
                    st["m"] = st.get("m", torch.zeros_like(q)) + q.grad
                    q.data.add_(st["m"], alpha=-1e-3)

    model, loss_fn, batch = build("mlp")
    opt = OwnKeys(lora_params(model))
    method = optlora.ScaLoRA(model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)  # warm-up: plain step, state "m" appears
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    before = snapshot(method)
    with pytest.raises(TypeError, match="'m' is not covered"):
        opt.step()
    after = snapshot(method)
    for name in before:
        for key in ("A", "B", "W", "gA", "gB"):
            np.testing.assert_array_equal(before[name][key], after[name][key])
    assert (method.steps, method.method_steps) == (1, 0)


# ---------------------------------------------------------------------------------------------- not attached
@pytest.mark.parametrize("name", list(METHODS))
def test_training_without_attaching_the_method_raises_before_any_update(name):
    """Forgetting attach() (or the Trainer callback) would train plain LoRA without a word."""
    model, loss_fn, batch = build("mlp")
    method = METHODS[name](model, warmup_steps=0)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    before = params_np(model)
    with pytest.raises(RuntimeError, match="not attached"):
        opt.step()
    assert all(np.array_equal(a, b) for a, b in zip(before, params_np(model)))
    assert method.steps == 0
    method.detach()  # explicit: train without the method from here on
    opt.step()
    assert not all(np.array_equal(a, b) for a, b in zip(before, params_np(model)))


def test_only_optimizers_of_the_methods_parameters_are_refused():
    model, loss_fn, batch = build("mlp")
    other, _, _ = build("mlp", seed=1)
    method = optlora.ScaLoRA(model, warmup_steps=0)
    attached = torch.optim.SGD(lora_params(model), lr=0.01)
    method.attach(attached)
    unrelated = torch.optim.SGD(lora_params(other), lr=0.01)  # another model: not this method's business
    forward_backward(other, loss_fn, batch)
    unrelated.step()
    second = torch.optim.SGD(lora_params(model)[:1], lr=0.01)  # a second optimizer over the same LoRA parameters
    forward_backward(model, loss_fn, batch)
    with pytest.raises(RuntimeError, match="not attached"):
        second.step()
    attached.step()
    assert method.steps == 1


def test_the_last_method_built_on_a_model_is_the_one_checked():
    model, loss_fn, batch = build("mlp")
    optlora.RefLoRA(model, warmup_steps=0)  # superseded below
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=0)
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method.attach(opt)
    train_steps(model, opt, loss_fn, batch, 2)
    assert method.method_steps == 2
