"""ScaLoRA and ScaLoRA-I on whole PEFT models against the numpy reference (ScaLoRA: scale, merge, step).

One scaling step per (model, optimizer): scale with the hybrid rule, merge
``W += s B diag(1 - alpha beta) A``, transform gradients and moments by the chain rule,
then step. Also: the merge leaves the model function unchanged, the accumulated update
exceeds rank 2r, Adam's moments equal the rescaled gradient history, and the hypothesis
properties (invariance to ``G -> rho G``, merge invariance of ``A B^T + W``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import (
    MODEL_KINDS,
    OPTIMIZERS,
    build,
    forward_backward,
    lora_params,
    make_optimizer,
    np64,
    observed_step,
    reference_optimizer_step,
    snapshot,
    tiny_mlp,
    train_steps,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import optlora
from optlora import functional as F
from optlora import merge
from optlora.testing import reference as ref

KAPPA = 0.3

# every optimizer variant on the MLPs; the transformer models with SGD and two AdamW implementations
CASES = [(k, o) for k in MODEL_KINDS for o in OPTIMIZERS if k.startswith("mlp") or o in ("sgd", "adamw", "adamw_fused")]


def scalora_reference(d, opt_name, kappa=KAPPA):
    """ScaLoRA's step (scale, merge, step) for one adapter snapshot: returns new A, B, W, states and (alpha, beta, column)."""
    A, B, gA, gB, s = d["A"], d["B"], d["gA"], d["gB"], d["s"]
    alpha, beta, column = ref.peft_scalora_scalings(A, B, gA, gB, s, kappa)
    W = ref.peft_merge(d["W"], A, B, s, 1 - alpha * beta, d["fifo"])
    A, B = alpha[:, None] * A, B * beta[None, :]
    gA, gB = beta[:, None] * gA, gB * alpha[None, :]
    stA = ref.transfer(d["stA"], row=beta) if d.get("stA") else {}
    stB = ref.transfer(d["stB"], col=alpha) if d.get("stB") else {}
    A1, stA1 = reference_optimizer_step(opt_name, A, gA, stA)
    B1, stB1 = reference_optimizer_step(opt_name, B, gB, stB)
    return A1, B1, W, stA1, stB1, (alpha, beta, column)


@pytest.mark.parametrize("interval", [1, 3], ids=["scalora", "scalora_i"])
@pytest.mark.parametrize("kind,opt_name", CASES)
def test_one_step_matches_reference(kind, opt_name, interval):
    model, loss_fn, batch = build(kind)
    opt = make_optimizer(opt_name, model)
    method = optlora.ScaLoRA(model, warmup_steps=1, interval=interval, kappa=KAPPA).attach(opt)
    assert method.name == ("scalora" if interval == 1 else "scalora_i")
    train_steps(model, opt, loss_fn, batch, 1)
    before, after = observed_step(method, opt, model, loss_fn, batch)
    assert method.method_steps == 1
    merged = {}  # several adapters of one layer all merge into its base weight
    for name, d in before.items():
        layer = name.split("[")[0]
        W1 = scalora_reference(d, opt_name)[2]
        merged[layer] = merged.get(layer, d["W"]) + (W1 - d["W"])
    for name, d in before.items():
        A1, B1, _, stA, stB, _ = scalora_reference(d, opt_name)
        W1 = merged[name.split("[")[0]]
        np.testing.assert_allclose(after[name]["W"], W1, rtol=1e-10, atol=1e-13, err_msg=name)
        np.testing.assert_allclose(after[name]["A"], A1, rtol=1e-8, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(after[name]["B"], B1, rtol=1e-8, atol=1e-12, err_msg=name)
        for side, expected in (("stA", stA), ("stB", stB)):  # every moment the optimizer keeps
            for key, val in expected.items():
                if isinstance(val, np.ndarray):
                    np.testing.assert_allclose(after[name][side][key], val, rtol=1e-8, atol=1e-15, err_msg=key)
    if interval == 3:  # ScaLoRA-I: the next step is plain LoRA, no merge
        before, after = observed_step(method, opt, model, loss_fn, batch)
        assert method.method_steps == 1
        for name, d in before.items():
            np.testing.assert_array_equal(after[name]["W"], d["W"])


@pytest.mark.parametrize("kind", ["mlp", "gpt2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_merge_leaves_model_function_unchanged(kind, dtype):
    model, loss_fn, batch = build(kind, dtype)
    inputs = batch[0] if kind == "mlp" else batch

    def forward(m, x):
        with torch.no_grad():
            return (m(x) if kind == "mlp" else m(input_ids=x).logits).double()

    # bf16 yardstick: how far the bf16 forward itself is from the same weights evaluated in float64
    rounding = (
        (forward(model, inputs) - forward(copy.deepcopy(model).double(), inputs.double() if kind == "mlp" else inputs))
        .abs()
        .max()
    )
    opt = torch.optim.SGD(lora_params(model), lr=0.0)  # the step itself changes nothing
    method = optlora.ScaLoRA(model, warmup_steps=0, kappa=KAPPA).attach(opt)
    out0 = forward(model, inputs)
    W0 = [np64(f.base_weight) for f in method.factors]
    train_steps(model, opt, loss_fn, batch, 1)
    assert method.method_steps == 1
    assert any(not np.array_equal(w, np64(f.base_weight)) for w, f in zip(W0, method.factors)), "nothing was merged"
    out1 = forward(model, inputs)
    if dtype == torch.float64:
        torch.testing.assert_close(out1, out0, rtol=1e-10, atol=1e-12)
    else:  # bf16: the rounding of the merged weights and rescaled factors, of the order of bf16's own error
        assert 0 < rounding < 0.1 * out0.abs().max()
        assert (out1 - out0).abs().max() <= 8 * rounding


def _effective_update_rank(method, W0_eff):
    f = method.factors[0]
    W = np64(f.base_weight) + f.scaling * np64(f.lora_B) @ np64(f.lora_A)
    sv = np.linalg.svd(W - W0_eff, compute_uv=False)
    return int((sv > 1e-8 * sv[0]).sum())


@pytest.mark.parametrize("method_name", ["scalora", "lora"])
def test_accumulated_update_rank_exceeds_2r_on_full_rank_target(method_name):
    torch.manual_seed(0)
    d, r = 8, 1
    net = nn.Sequential(nn.Linear(d, d, bias=False)).double()
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(net, LoraConfig(r=r, lora_alpha=2, target_modules=["0"], init_lora_weights=False))
    target = torch.randn(d, d, dtype=torch.float64) * 2  # full-rank target map
    x = torch.randn(64, d, dtype=torch.float64)
    opt = torch.optim.AdamW(lora_params(model), lr=0.05, weight_decay=0.0)
    f = optlora.find_lora_factors(model)[0]
    W0_eff = np64(f.base_weight) + f.scaling * np64(f.lora_B) @ np64(f.lora_A)
    if method_name == "scalora":
        method = optlora.ScaLoRA(model, warmup_steps=0, kappa=0.5).attach(opt)
    else:
        method = optlora.RefLoRA(model, warmup_steps=10**6).attach(opt)  # never due: plain LoRA
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = (model(x) - x @ target.T).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    rank = _effective_update_rank(method, W0_eff)
    if method_name == "scalora":
        assert rank > 2 * r, rank
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
    else:
        assert rank <= 2 * r  # plain LoRA's update telescopes to a rank <= 2r difference


def test_adam_moments_equal_rescaled_gradient_history():
    model, loss_fn, batch = build("mlp")
    betas = (0.9, 0.999)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01, betas=betas, weight_decay=0.0)
    method = optlora.ScaLoRA(model, warmup_steps=3, kappa=KAPPA).attach(opt)
    hist = {f.name: ([], []) for f in method.factors}
    m = {f.name: [0.0, 0.0] for f in method.factors}  # EMA of raw gradients of A
    v = {f.name: [0.0, 0.0] for f in method.factors}
    for step in range(1, 6):
        opt.zero_grad()
        forward_backward(model, loss_fn, batch)
        snap = snapshot(method)
        for name, d in snap.items():
            if step > 3:  # the method rescales: the whole history is re-expressed (ScaLoRA Lemmas 3.3/3.6, chain rule)
                alpha, beta, _ = ref.peft_scalora_scalings(d["A"], d["B"], d["gA"], d["gB"], d["s"], KAPPA)
                m[name] = [m[name][0] * beta[:, None], m[name][1] * alpha[None, :]]
                v[name] = [v[name][0] * beta[:, None] ** 2, v[name][1] * alpha[None, :] ** 2]
                gA, gB = d["gA"] * beta[:, None], d["gB"] * alpha[None, :]
            else:
                gA, gB = d["gA"], d["gB"]
            m[name] = [betas[0] * m[name][0] + (1 - betas[0]) * gA, betas[0] * m[name][1] + (1 - betas[0]) * gB]
            v[name] = [betas[1] * v[name][0] + (1 - betas[1]) * gA**2, betas[1] * v[name][1] + (1 - betas[1]) * gB**2]
            hist[name][0].append(gA)
        opt.step()
        after = snapshot(method, opt)
        for name in hist:
            np.testing.assert_allclose(after[name]["stA"]["exp_avg"], m[name][0], rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(after[name]["stB"]["exp_avg"], m[name][1], rtol=1e-9, atol=1e-15)
            np.testing.assert_allclose(after[name]["stA"]["exp_avg_sq"], v[name][0], rtol=1e-9, atol=1e-18)
            np.testing.assert_allclose(after[name]["stB"]["exp_avg_sq"], v[name][1], rtol=1e-9, atol=1e-18)
    assert method.method_steps == 2


def test_lora_init_b_zero_is_handled_by_the_scalar_rule():
    model = tiny_mlp(random_b=False)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, warmup_steps=0, kappa=KAPPA).attach(opt)
    from conftest import mlp_batch, mlp_loss

    train_steps(model, opt, mlp_loss, mlp_batch(), 3)
    assert method.method_steps == 3
    for f in method.factors:
        assert torch.isfinite(f.lora_A).all() and torch.isfinite(f.lora_B).all() and f.lora_B.abs().sum() > 0


# --------------------------------------------------------------------------- hypothesis properties


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rho=st.floats(1e-3, 1e3), mode=st.sampled_from(["hybrid", "column", "scalar"]))
def test_scalings_invariant_to_gradient_scale(seed, rho, mode):
    rng = np.random.default_rng(seed)
    A, B, G = rng.standard_normal((6, 2)), rng.standard_normal((5, 2)), rng.standard_normal((6, 5))

    def scal(Gm):
        SA = torch.tensor(np.concatenate([A, Gm @ B], 1))
        SB = torch.tensor(np.concatenate([Gm.T @ A, B], 1))
        return F.scalora_scalings(SA.T @ SA, SB.T @ SB, KAPPA, mode)

    s1, s2 = scal(G), scal(rho * G)
    assert bool(s1.column) == bool(s2.column) and bool(s1.ok) == bool(s2.ok)
    torch.testing.assert_close(s2.alpha, s1.alpha, rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(s2.beta, s1.beta, rtol=1e-7, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    fifo=st.booleans(),
    dims=st.tuples(st.integers(2, 7), st.integers(2, 7), st.integers(1, 3)),
)
def test_scaled_merge_keeps_the_effective_weight(seed, fifo, dims):
    out, inp, r = dims
    rng = np.random.default_rng(seed)
    Ap, Bp = rng.standard_normal((r, inp)), rng.standard_normal((out, r))
    Wp = rng.standard_normal((inp, out) if fifo else (out, inp))
    alpha, beta, s = rng.uniform(0.1, 3, r), rng.uniform(0.1, 3, r), float(rng.uniform(0.5, 4))
    W = torch.tensor(Wp)
    merge.merge_low_rank_(W, torch.tensor(Bp), torch.tensor(Ap), torch.tensor(1 - alpha * beta), s, fan_in_fan_out=fifo)
    np.testing.assert_allclose(W.numpy(), ref.peft_merge(Wp, Ap, Bp, s, 1 - alpha * beta, fifo), rtol=1e-12, atol=1e-12)

    def eff(Wm, A_, B_):
        return (Wm.T if fifo else Wm) + s * B_ @ A_

    np.testing.assert_allclose(
        eff(W.numpy(), alpha[:, None] * Ap, Bp * beta[None, :]), eff(Wp, Ap, Bp), rtol=1e-10, atol=1e-10
    )


@pytest.mark.parametrize("mode", ["auto", "nearest", "kahan", "fp32"])
def test_two_adapters_on_one_layer_merge_into_the_same_weight(mode):
    """Both adapters of layer "0" merge into one base weight; no merge may overwrite the other's."""
    model, loss_fn, batch = build("mlp_two_adapters", torch.bfloat16)
    x = batch[0]
    with torch.no_grad():
        rounding = (model(x).double() - copy.deepcopy(model).double()(x.double())).abs().max()
        out0 = model(x).double()
    opt = torch.optim.SGD(lora_params(model), lr=0.0)
    method = optlora.ScaLoRA(model, warmup_steps=0, kappa=KAPPA, merge_precision=mode).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)
    assert method.method_steps == 1 and method.stats()["last_skipped_layers"] == []
    with torch.no_grad():
        out1 = model(x).double()
    assert (out1 - out0).abs().max() <= 8 * rounding
