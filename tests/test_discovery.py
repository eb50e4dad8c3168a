"""Layer discovery and every input the methods must refuse or survive, with clear messages."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from conftest import (
    build,
    forward_backward,
    lora_params,
    mlp_batch,
    mlp_loss,
    np64,
    snapshot,
    tiny_mlp,
    tiny_mlp_two_adapters,
    train_steps,
)
from peft import LoraConfig, get_peft_model
from torch import nn

import optlora
from optlora import discovery

METHODS = {
    "reflora": lambda m, **kw: optlora.RefLoRA(m, **kw),
    "reflora_s": lambda m, **kw: optlora.RefLoRA(m, scalar=True, **kw),
    "scalora": lambda m, **kw: optlora.ScaLoRA(m, kappa=0.3, **kw),
}


def test_discovery_on_tiny_models():
    gpt2, _, _ = build("gpt2")
    fs = optlora.find_lora_factors(gpt2)
    assert len(fs) == 4 and all(f.fan_in_fan_out for f in fs)
    for f in fs:  # Conv1D stores the base weight as in x out
        assert tuple(f.base_weight.shape) == (f.lora_A.shape[1], f.lora_B.shape[0])
    llama, _, _ = build("llama")
    assert len(optlora.find_lora_factors(llama)) == 7
    rs = tiny_mlp(r=3, lora_alpha=6, use_rslora=True)
    assert all(f.scaling == pytest.approx(6 / np.sqrt(3)) for f in optlora.find_lora_factors(rs))
    two, _, _ = build("mlp_two_adapters")
    ranks = sorted((f.name, f.rank) for f in optlora.find_lora_factors(two))
    assert ranks == [
        ("base_model.model.0[default]", 2),
        ("base_model.model.0[second]", 1),
        ("base_model.model.2[default]", 3),
    ]


def test_model_without_lora():
    with pytest.raises(ValueError, match="no trainable PEFT LoRA"):
        optlora.RefLoRA(nn.Sequential(nn.Linear(3, 3)))


def _embedding_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3)).double()
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))


def _conv_model():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 2)).double()
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))


def _mha_model():
    """LoRA on ``nn.MultiheadAttention``: its factors are ``nn.Linear`` but PEFT merges them into ``in_proj_weight``."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.MultiheadAttention(4, 2), nn.Linear(4, 3)).double()
    return get_peft_model(base, LoraConfig(r=2, target_modules=["0", "1"], init_lora_weights=False))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize(
    "builder,what",
    [
        (_embedding_model, "Embedding"),
        (_conv_model, "Conv2d"),
        (_mha_model, "MultiheadAttention"),
        (lambda: tiny_mlp(use_dora=True), "DoRA"),
    ],
    ids=["embedding", "conv2d", "multihead_attention", "dora"],
)
def test_unsupported_layers_raise_naming_the_layer(builder, what, name):
    model = builder()
    with pytest.raises(ValueError, match=rf"base_model\.model\.0\[default\].*{what}"):
        METHODS[name](model)


@pytest.mark.parametrize("name", list(METHODS))
def test_skip_unsupported_warns_and_trains_the_rest(name):
    model = _embedding_model()
    with pytest.warns(UserWarning, match="Embedding"):
        method = METHODS[name](model, skip_unsupported=True, warmup_steps=0)
    assert [f.name for f in method.factors] == ["base_model.model.1[default]"]
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method.attach(opt)
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    emb_before = np64(model.base_model.model[0].lora_embedding_A["default"])
    for _ in range(2):
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
    assert method.method_steps == 2
    assert not np.array_equal(emb_before, np64(model.base_model.model[0].lora_embedding_A["default"]))


@pytest.mark.parametrize("name", list(METHODS))
def test_optimizer_missing_lora_params(name):
    model = tiny_mlp()
    layer0 = [p for n, p in model.named_parameters() if p.requires_grad and ".0." in n]
    method = METHODS[name](model)
    with pytest.raises(ValueError, match=r"base_model\.model\.2\[default\]"):
        method.attach(torch.optim.AdamW(layer0, lr=0.01))


@pytest.mark.parametrize("name", ["reflora_s", "scalora"])
@pytest.mark.parametrize("opt_cls", [torch.optim.Adadelta, torch.optim.LBFGS])
def test_moment_transfer_needs_a_known_optimizer(name, opt_cls):
    model = tiny_mlp()
    with pytest.raises(TypeError, match=opt_cls.__name__):
        METHODS[name](model).attach(opt_cls(lora_params(model)))


def test_closure_optimizers_are_refused():
    model = tiny_mlp()
    with pytest.raises(TypeError, match="LBFGS recomputes it"):
        optlora.RefLoRA(model).attach(torch.optim.LBFGS(lora_params(model)))


def test_reflora_works_with_any_optimizer():
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.Adadelta(lora_params(model))
    method = optlora.RefLoRA(model, warmup_steps=0).attach(opt)
    train_steps(model, opt, loss_fn, batch, 2)
    assert method.method_steps == 2


def test_second_attach_raises():
    model = tiny_mlp()
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.RefLoRA(model).attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        method.attach(opt)
    with pytest.raises(RuntimeError, match="already has RefLoRA attached"):
        optlora.ScaLoRA(model).attach(opt)
    method.detach()
    optlora.ScaLoRA(model).attach(opt)  # fine after detach


@pytest.mark.parametrize(
    "kwargs",
    [
        {"warmup_steps": -1},
        {"warmup_steps": 1.5},
        {"interval": 0},
        {"on_nonfinite": "ignore"},
        {"kappa": 0.0},
        {"kappa": -1.0},
        {"kappa": float("nan")},
        {"mode": "nnls"},
        {"merge_precision": "fp8"},
    ],
)
def test_bad_kwargs(kwargs):
    cls = optlora.ScaLoRA if set(kwargs) & {"kappa", "mode", "merge_precision"} else optlora.RefLoRA
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        cls(tiny_mlp(), **kwargs)


def _full_state(model, opt):
    out = [np64(p) for p in model.parameters()] + [np64(p.grad) for p in lora_params(model)]
    for st in opt.state.values():
        out += [np64(v) for v in st.values() if isinstance(v, torch.Tensor)]
    return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(METHODS))
def test_nonfinite_gradient_raises_and_modifies_nothing(name, bad):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = METHODS[name](model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    method.factors[1].lora_B.grad[0, 0] = bad
    before = _full_state(model, opt)
    with pytest.raises(RuntimeError, match=r"non-finite.*base_model\.model\.2\[default\]"):
        opt.step()
    after = _full_state(model, opt)
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert method.steps == 1 and method.method_steps == 0


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("name", list(METHODS))
def test_on_nonfinite_skip_leaves_that_layer_alone(name, bad_value):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = METHODS[name](model, warmup_steps=0, on_nonfinite="skip").attach(opt)
    seen = {}
    opt.register_step_pre_hook(lambda *_: seen.update(snapshot(method)))  # runs after the method's hook
    forward_backward(model, loss_fn, batch)
    method.factors[1].lora_A.grad[0, 0] = bad_value
    before = snapshot(method)
    opt.step()
    bad, good = method.factors[1].name, method.factors[0].name
    for key in ("A", "B", "W"):
        np.testing.assert_array_equal(seen[bad][key], before[bad][key])
    for key in ("gA", "gB"):  # bit-identical: no NaN spread from 0 * Inf
        np.testing.assert_array_equal(seen[bad][key], before[bad][key])
    assert not np.array_equal(seen[good]["gB"], before[good]["gB"])  # the finite layer was processed
    assert method.stats()["last_skipped_layers"] == [bad]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("defect", ["zero", "rank_deficient"])
def test_degenerate_factors_after_warmup_are_skipped_safely(name, defect):
    model, loss_fn, batch = build("mlp", r=3)
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = METHODS[name](model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)
    f = method.factors[0]
    with torch.no_grad():
        if defect == "zero":
            f.lora_A.zero_()
            f.lora_B.zero_()
        else:
            f.lora_A[2] = f.lora_A[0]  # rank(A) = 2 < r
            f.lora_B[:, 2] = f.lora_B[:, 1]
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    before = snapshot(method)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    for p in model.parameters():
        assert torch.isfinite(p).all()
    skipped = method.stats()["last_skipped_layers"]
    if name == "reflora" or defect == "zero":
        assert skipped == [f.name]
        np.testing.assert_array_equal(np64(f.base_weight), before[f.name]["W"])
    else:  # RefLoRA-S and ScaLoRA only need non-zero factors: a rank-deficient layer is still valid
        assert skipped == []
    assert mlp_batch()[0].shape[0] == 8
    assert mlp_loss(model, batch).isfinite()


def test_attach_through_an_optimizer_wrapper():
    """accelerate's AcceleratedOptimizer subclasses torch.optim.Optimizer and wraps the real one in .optimizer."""

    class Wrapper(torch.optim.Optimizer):
        def __init__(self, optimizer):  # no super().__init__: like accelerate, state lives on the inner one
            self.optimizer = optimizer

    model = tiny_mlp()
    inner = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model).attach(Wrapper(Wrapper(inner)))
    assert method.optimizer is inner
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        optlora.RefLoRA(tiny_mlp()).attach(object())


# --------------------------------------------------------------------------- shared (tied) base weights
def _tied_lm_head(targets=("q_proj", "lm_head")):
    from optlora.testing import models

    base = models.tiny_llama(hidden=16, intermediate=24, layers=1, vocab=32, tie_embeddings=True)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns about the tied layer itself
        return get_peft_model(base, cfg)


def test_lora_on_a_tied_lm_head_is_refused_for_merging_methods_only():
    model = _tied_lm_head()
    shared = discovery.shared_base_weights(model, discovery.find_lora_factors(model))
    assert list(shared) == ["base_model.model.lm_head[default]"]
    assert shared["base_model.model.lm_head[default]"] == ["base_model.model.model.embed_tokens.weight"]
    with pytest.raises(ValueError, match=r"lm_head\[default\]: its base weight is shared with .*embed_tokens"):
        optlora.ScaLoRA(model)
    assert len(optlora.RefLoRA(model).factors) == 2  # RefLoRA never writes a base weight
    with pytest.warns(UserWarning, match="tied weights"):
        method = optlora.ScaLoRA(model, skip_unsupported=True)
    assert [f.name for f in method.factors] == ["base_model.model.model.layers.0.self_attn.q_proj[default]"]


def test_untied_lm_head_and_two_adapters_on_one_layer_are_not_shared():
    from optlora.testing import models

    base = models.tiny_llama(hidden=16, intermediate=24, layers=1, vocab=32, tie_embeddings=False)
    model = get_peft_model(base, LoraConfig(r=2, target_modules=["lm_head"], init_lora_weights=False))
    assert discovery.shared_base_weights(model, discovery.find_lora_factors(model)) == {}
    two = tiny_mlp_two_adapters()
    assert discovery.shared_base_weights(two, discovery.find_lora_factors(two)) == {}


def test_non_overlapping_views_of_one_storage_are_not_shared():
    """Two Linear layers whose weights are disjoint slices of one buffer (fused storage) do not interact."""
    torch.manual_seed(0)
    fused = torch.randn(8, 4)
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    first.weight, second.weight = nn.Parameter(fused[:4]), nn.Parameter(fused[4:])
    model = get_peft_model(nn.Sequential(first, second), LoraConfig(r=2, target_modules=["0", "1"]))
    assert discovery.shared_base_weights(model, discovery.find_lora_factors(model)) == {}
    second.weight = nn.Parameter(fused[2:6])  # now overlapping
    model = get_peft_model(nn.Sequential(first, second), LoraConfig(r=2, target_modules=["0", "1"]))
    assert set(discovery.shared_base_weights(model, discovery.find_lora_factors(model))) == {
        "base_model.model.0[default]",
        "base_model.model.1[default]",
    }
