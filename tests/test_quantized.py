"""Quantised base layers: RefLoRA / RefLoRA-S train them; ScaLoRA refuses them or keeps a low-rank residual.

Two kinds of quantised base, both through PEFT's own LoRA layer classes:

* a weight-only int8 layer (``Int8Linear`` below, shaped like GPTQ/AWQ ``QuantLinear``s) wrapped
  by PEFT's ``GPTQLoraLinear`` via ``LoraConfig._register_custom_module``: runs everywhere;
* bitsandbytes 4-bit NF4 and 8-bit layers: tests/test_quantized_bnb.py (where bitsandbytes runs);
  saving and loading both kinds: tests/test_quantized_persist.py.

RefLoRA only reads the factors and their gradients, so on a quantised base its step must be
the float64 reference step on those gradients, and on a 4-bit base (whose CPU forward is
``x @ dequantise(W)^T``) training must equal training the dequantised float model. ScaLoRA with
``residual_rank=R`` must equal exact ScaLoRA on the dequantised model while the merged increments
fit in rank ``R``, and move the weight by exactly the norm it reports as dropped when they do not.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import lora_params, mlp_batch, mlp_loss, np64, observed_step, train_steps
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.gptq import GPTQLoraLinear
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.nn import functional as F

import optlora
import optlora.export
from optlora import residual
from optlora.testing import reference as ref

LR = 0.01


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer (per-row absmax scales), no ``.weight``: like GPTQ/AWQ ``QuantLinear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scales = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scales).to(torch.int8))
        self.register_buffer("scales", scales)
        self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.infeatures, self.outfeatures = linear.in_features, linear.out_features

    def dequantized(self) -> torch.Tensor:
        return self.qweight.to(self.scales.dtype) * self.scales

    def forward(self, x):
        return F.linear(x, self.dequantized().to(x.dtype), self.bias.to(x.dtype))


def int8_mlp(dtype=torch.float64):
    """``tiny_mlp``'s layout with both linears int8-quantised, LoRA through PEFT's ``GPTQLoraLinear``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    base[0], base[2] = Int8Linear(base[0]), Int8Linear(base[2])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    cfg._register_custom_module({Int8Linear: GPTQLoraLinear})
    model = get_peft_model(base, cfg)
    for p in lora_params(model):  # PEFT creates the factors in float32 when the base has no float weight
        p.data = p.data.to(dtype)
    return model


def reflora_reference(d, scalar):
    """(A, B) after one AdamW step of RefLoRA (Thm 3) / RefLoRA-S (Thm 5) on snapshot ``d``, in float64 numpy."""
    A, B, gA, gB, stA, stB = d["A"], d["B"], d["gA"], d["gB"], d["stA"], d["stB"]
    if scalar:
        P = np.sqrt(ref.reflora_s_scale(A.T, B))
        A, B, gA, gB = P * A, B / P, gA / P, gB * P
        stA, stB = ref.transfer(stA, col=np.full(A.shape[1], 1 / P)), ref.transfer(stB, col=np.full(B.shape[1], P))
    else:
        gA, gB = ref.peft_reflora_grads(A, B, gA, gB)
    return ref.adamw_step(A, gA, stA, lr=LR)[0], ref.adamw_step(B, gB, stB, lr=LR)[0]


def check_one_step(model, loss_fn, batch, scalar, rtol=1e-9):
    opt = torch.optim.AdamW(lora_params(model), lr=LR)
    method = optlora.RefLoRA(model, scalar=scalar, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)  # plain warm-up step: fills AdamW's moments
    before, after = observed_step(method, opt, model, loss_fn, batch)
    assert method.method_steps == 1 and method.stats()["last_skipped_layers"] == []
    for name, d in before.items():
        A1, B1 = reflora_reference(d, scalar)
        np.testing.assert_allclose(after[name]["A"], A1, rtol=rtol, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(after[name]["B"], B1, rtol=rtol, atol=1e-12, err_msg=name)
    return method


# ------------------------------------------------------------------ any quantised base PEFT wraps (no bitsandbytes)
def test_custom_quantised_layer_is_discovered_from_its_structure():
    model = int8_mlp()
    fs = optlora.find_lora_factors(model)
    assert [type(f.module) for f in fs] == [GPTQLoraLinear, GPTQLoraLinear]
    assert [(f.rank, f.scaling) for f in fs] == [(2, 2.0), (2, 2.0)]


@pytest.mark.parametrize("scalar", [False, True], ids=["reflora", "reflora_s"])
def test_reflora_on_custom_quantised_base_matches_reference(scalar):
    model = int8_mlp()
    qweights = [m.qweight.clone() for m in model.modules() if isinstance(m, Int8Linear)]
    check_one_step(model, mlp_loss, mlp_batch(), scalar)
    for before, m in zip(qweights, [m for m in model.modules() if isinstance(m, Int8Linear)]):
        assert torch.equal(m.qweight, before)  # the quantised base is never touched


def test_scalora_refuses_custom_quantised_base_with_advice():
    with pytest.raises(
        ValueError, match=r"(?s)model\.0\[default\]: base layer Int8Linear has no plain.*optlora\.RefLoRA"
    ):
        optlora.ScaLoRA(int8_mlp())


def int8_twin(quant, dtype=torch.float64):
    """``int8_mlp`` with float layers holding the dequantised weights, and the same LoRA factors."""
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).to(dtype)
    with torch.no_grad():
        for i in (0, 2):
            q = quant.get_base_model()[i].get_base_layer()
            base[i].weight.copy_(q.dequantized())
            base[i].bias.copy_(q.bias)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    twin = get_peft_model(base, cfg, autocast_adapter_dtype=False)
    set_peft_model_state_dict(twin, get_peft_model_state_dict(quant))
    return twin


def effective_weights(method) -> dict[str, torch.Tensor]:
    """``W + U V + s B A`` per adapter, out x in (``W`` dequantised, ``U V`` the residual if any)."""
    out = {}
    for f in method.factors:
        base = f.module.get_base_layer()
        W = base.dequantized() if isinstance(base, Int8Linear) else base.weight
        res = residual.residuals_of(base).get(f.adapter)
        out[f.name] = (W + (0 if res is None else res.dense()) + f.scaling * f.lora_B @ f.lora_A).detach().clone()
    return out


def run(model, method_kw, steps=4, opt_cls=torch.optim.AdamW, lr=LR):
    opt = opt_cls(lora_params(model), lr=lr)
    method = optlora.ScaLoRA(model, warmup_steps=1, **method_kw).attach(opt)
    train_steps(model, opt, mlp_loss, mlp_batch(), steps)
    return method, opt


def test_scalora_residual_on_quantised_base_is_exact_scalora_on_the_dequantised_model():
    quant = int8_mlp()
    twin = int8_twin(quant)
    mq, _ = run(quant, {"residual_rank": 5})  # 5 >= min(out, in) of both layers: every sum of increments fits
    mt, _ = run(twin, {})
    assert mq.method_steps == 3 and set(mq.residuals) == {f.name for f in mq.factors}
    weights_q, weights_t = effective_weights(mq), effective_weights(mt)
    for fq, ft in zip(mq.factors, mt.factors):
        np.testing.assert_allclose(np64(fq.lora_A), np64(ft.lora_A), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np64(fq.lora_B), np64(ft.lora_B), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(np64(weights_q[fq.name]), np64(weights_t[ft.name]), rtol=1e-9, atol=1e-12)
        # the residual holds exactly what exact ScaLoRA merged into the float weight
        drift = ft.base_weight - fq.module.get_base_layer().dequantized()
        np.testing.assert_allclose(np64(mq.residuals[fq.name].dense()), np64(drift), rtol=1e-9, atol=1e-12)
    assert mq.stats()["residual_dropped"] < 1e-12
    for f, r in mq.residuals.items():  # the merge guard weighs merges against the dequantised weight's norm
        w = dict(quant.named_modules())[f.split("[")[0]].get_base_layer().dequantized()
        assert r.base_norm.item() == pytest.approx(torch.linalg.matrix_norm(w).item(), rel=1e-6)  # float32 probe
    assert all(
        torch.equal(m.qweight, q.qweight)
        for m, q in zip(quant.modules(), int8_mlp().modules())
        if isinstance(m, Int8Linear)
    )


def test_truncation_moves_the_weight_by_exactly_the_reported_dropped_norm():
    """With the learning rate at 0 a ScaLoRA step must not change the weight (Sec. 3.1) -- except for
    what truncating the residual to rank R cuts off, which is what ``dropped`` adds up."""
    model = int8_mlp()
    method, opt = run(model, {"residual_rank": 1}, steps=3, opt_cls=torch.optim.SGD, lr=0.05)
    opt.param_groups[0]["lr"] = 0.0
    before, dropped = effective_weights(method), {n: r["dropped"] for n, r in method.residual_report().items()}
    train_steps(model, opt, mlp_loss, mlp_batch(), 1)
    after, report = effective_weights(method), method.residual_report()
    moved = []
    for name in before:
        step_drop = report[name]["dropped"] - dropped[name]
        moved.append(step_drop)
        assert float((after[name] - before[name]).norm()) == pytest.approx(step_drop, rel=1e-8, abs=1e-14)
    assert max(moved) > 1e-6  # the check is not vacuous: rank 1 < the increments' rank
    assert method.stats()["residual_dropped"] == max(r["dropped"] / r["merged"] for r in report.values())


def test_scalora_residual_state_resumes_bit_for_bit():
    model = int8_mlp()
    method, opt = run(model, {"residual_rank": 1}, steps=3)
    state = method.state_dict()
    assert state["base_weights"] == {} and set(state["residuals"]) == {f.name for f in method.factors}
    fresh = int8_mlp()
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    opt2 = torch.optim.AdamW(lora_params(fresh), lr=LR)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # (load_state_dict would share the moment tensors)
    method2 = optlora.ScaLoRA(fresh, warmup_steps=1, residual_rank=1).attach(opt2)
    method2.load_state_dict(copy.deepcopy(state))
    train_steps(model, opt, mlp_loss, mlp_batch(), 2)
    train_steps(fresh, opt2, mlp_loss, mlp_batch(), 2)
    for name, w in effective_weights(method).items():
        assert torch.equal(w, effective_weights(method2)[name])
    with pytest.raises(ValueError, match=r"state_dict\['residuals'\] does not match.*missing"):
        optlora.ScaLoRA(int8_mlp(), warmup_steps=1, residual_rank=1).load_state_dict({**state, "residuals": {}})
    with pytest.raises(ValueError, match="already carries a residual of rank 1"):
        optlora.ScaLoRA(model, residual_rank=2)  # the model's residual holds merged increments: same rank only


def test_saved_residuals_reload_into_a_fresh_model_and_merged_export_refuses_them(tmp_path):
    model = int8_mlp()
    method, _ = run(model, {"residual_rank": 1}, steps=3)
    fresh = int8_mlp()
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(model))
    x = mlp_batch()[0]
    assert not torch.allclose(fresh(x), model(x))
    assert optlora.export.apply_method_state(fresh, method.state_dict()) == 2
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="carry ScaLoRA's low-rank residual.*export_adapter"):
        optlora.export.export_merged(model, tmp_path / "merged")


@pytest.mark.parametrize("on_nonfinite", ["raise", "skip"])
def test_nonfinite_gradient_leaves_the_residual_untouched(on_nonfinite):
    model = int8_mlp()
    method, opt = run(model, {"residual_rank": 1, "on_nonfinite": on_nonfinite}, steps=3)
    bad = method.factors[1]
    before = {n: (r.left.clone(), r.right.clone(), r.dropped.clone()) for n, r in method.residuals.items()}
    opt.zero_grad()
    mlp_loss(model, mlp_batch()).backward()
    bad.lora_A.grad[0, 0] = float("nan")
    if on_nonfinite == "raise":
        with pytest.raises(RuntimeError, match=r"non-finite.*model\.2\[default\]"):
            opt.step()
    else:
        opt.step()
        assert method.stats()["last_skipped_layers"] == [bad.name]
    for name, (left, right, dropped) in before.items():
        r = method.residuals[name]
        same = torch.equal(r.left, left) and torch.equal(r.right, right) and torch.equal(r.dropped, dropped)
        assert same == (on_nonfinite == "raise" or name == bad.name), name  # skip: the finite layer still merges


def test_residuals_under_fsdp2_are_refused_before_anything_is_touched(monkeypatch):
    """Residuals are whole tensors beside whole base layers; FSDP2-sharded factors are refused (at construction,
    attach, or the next due step when the model was sharded after attach), with RefLoRA named as the alternative."""
    with monkeypatch.context() as patch:
        patch.setattr(optlora.ScaLoRA, "sharded", property(lambda self: True))
        fresh = int8_mlp()
        with pytest.raises(RuntimeError, match=r"FSDP2.*optlora\.RefLoRA"):
            optlora.ScaLoRA(fresh, residual_rank=2)
        assert not any(residual.residuals_of(m) for m in fresh.modules())  # no hook was left on the model
    model = int8_mlp()
    method, opt = run(model, {"residual_rank": 2}, steps=2)
    monkeypatch.setattr(optlora.ScaLoRA, "sharded", property(lambda self: True))
    opt.zero_grad()
    mlp_loss(model, mlp_batch()).backward()
    before = [r.dense().clone() for r in method.residuals.values()]
    with pytest.raises(RuntimeError, match="FSDP2.*optlora.RefLoRA"):
        method._plan_all(method._active_groups())
    assert all(torch.equal(b, r.dense()) for b, r in zip(before, method.residuals.values()))
    method.detach()
    with pytest.raises(RuntimeError, match="FSDP2"):
        method.attach(opt)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "4"])
def test_bad_residual_rank(bad):
    with pytest.raises(ValueError, match="residual_rank"):
        optlora.ScaLoRA(int8_mlp(), residual_rank=bad)


def test_residual_rank_leaves_float_layers_to_the_exact_merge():
    model = tiny_mlp_with_one_int8_layer()
    method = optlora.ScaLoRA(model, residual_rank=2)
    assert list(method.residuals) == ["base_model.model.2[default]"]
    assert list(method.state_dict()["base_weights"]) == ["base_model.model.0"]  # keyed by layer path


def tiny_mlp_with_one_int8_layer():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    base[2] = Int8Linear(base[2])
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    cfg._register_custom_module({Int8Linear: GPTQLoraLinear})
    model = get_peft_model(base, cfg)
    for p in lora_params(model):
        p.data = p.data.double()
    return model
