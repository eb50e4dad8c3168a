"""The batched fast path equals the unbatched float64 reference (numerics only, never timing).

* one due optimizer step of every method on tiny float64 models (Llama: several same-shape
  layer groups; GPT-2: ``fan_in_fan_out``) vs :mod:`optlora.testing.parity`'s per-layer reference
  written from the papers (:mod:`optlora.testing.reference`) followed by a textbook AdamW step;
* the group-wise ``foreach`` rescale equals a plain per-layer rescale (``_rescale_one_``) bit for bit;
* the in-place bfloat16 stochastic rounding used by the merge equals ``stochastic_round``;
* the cheaper finiteness checks still catch a single non-finite entry in one layer.
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import optlora  # noqa: E402
from optlora import merge  # noqa: E402
from optlora.functional import chain_rule_rescaling  # noqa: E402
from optlora.methods.layers import group_factors  # noqa: E402
from optlora.optimizer_state import moment_tensors  # noqa: E402
from optlora.testing import models, parity  # noqa: E402

TINY = models.ModelSpec("llama", hidden=48, intermediate=96, heads=4, kv_heads=2, layers=2, vocab=64)
TOL = 1e-10  # float64 end to end: the two paths differ only by round-off


def _llama(rank=4, dtype=torch.float64):
    return models.build(TINY, rank=rank, dtype=dtype, device="cpu")


def _gpt2(rank=4):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=64)
    base = GPT2LMHeadModel(cfg).double()
    lora = LoraConfig(r=rank, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return model


def _due_step_error(kind, model, batch, **method_kwargs):
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-3)
    method = optlora.make_method(kind, model, warmup_steps=1, **method_kwargs)
    if method is not None:
        method.attach(opt)
    model(**batch).loss.backward()  # plain step: Adam moments exist before the checked step
    opt.step()
    opt.zero_grad(set_to_none=True)
    return parity.check_step(kind, model, method, opt, batch)


@pytest.mark.parametrize("kind", ["lora", "reflora", "reflora_s", "scalora", "scalora_i"])
def test_llama_step_matches_reference(kind):
    model = _llama()
    batch = models.make_batch(TINY, 2, 16, "cpu")
    assert _due_step_error(kind, model, batch) < TOL


@pytest.mark.parametrize("kind", ["reflora", "reflora_s", "scalora"])
def test_fan_in_fan_out_step_matches_reference(kind):
    model = _gpt2()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(3))
    assert _due_step_error(kind, model, {"input_ids": ids, "labels": ids}) < TOL


@pytest.mark.parametrize("kappa", [0.1, 10.0])
def test_scalora_scalar_mode_step_matches_reference(kappa):
    model = _llama()
    batch = models.make_batch(TINY, 2, 16, "cpu")
    assert _due_step_error("scalora", model, batch, mode="scalar", kappa=kappa) < TOL


def _rescale_one_(method, f, alpha, beta):
    """Per-layer oracle for ``_rescale_group_``: one ``mul_`` per tensor, scales in float32 or better."""
    A, B = f.lora_A, f.lora_B
    for t, sc in ((A, alpha[:, None]), (B, beta[None, :]), (A.grad, beta[:, None]), (B.grad, alpha[None, :])):
        t.mul_(sc.to(torch.promote_types(t.dtype, torch.float32)))
    for p, sc in ((A, beta[:, None]), (B, alpha[None, :])):
        for t, power in moment_tensors(method.optimizer, method._rule, p):
            t.mul_(sc.to(torch.promote_types(t.dtype, torch.float32)) ** power)


def _with_state(model, dtype):
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-3)
    batch = models.make_batch(TINY, 2, 8, "cpu")
    model(**batch).loss.backward()
    opt.step()
    model(**batch).loss.backward()
    return opt


@pytest.mark.parametrize("full", [False, True])  # True: the CUDA layout (scales materialised to full shape)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_rescale_equals_per_layer_rescale(dtype, full):
    # PEFT keeps adapters in float32 on a bf16 model by default: cast them too, to test half-precision factors
    ref_model, fast_model = _llama(dtype=dtype).to(dtype), _llama(dtype=dtype).to(dtype)
    assert ref_model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == dtype
    ref_opt, fast_opt = _with_state(ref_model, dtype), _with_state(fast_model, dtype)
    ref_m = optlora.ScaLoRA(ref_model, warmup_steps=0).attach(ref_opt)
    fast_m = optlora.ScaLoRA(fast_model, warmup_steps=0).attach(fast_opt)
    fast_m._full_scales = full
    g = torch.Generator().manual_seed(5)
    for ref_g, fast_g in zip(group_factors(ref_m.factors), group_factors(fast_m.factors)):
        L, r = len(ref_g.factors), ref_g.factors[0].rank
        alpha = 0.5 + torch.rand(L, r, generator=g, dtype=torch.float64)
        beta = 0.5 + torch.rand(L, r, generator=g, dtype=torch.float64)
        with torch.no_grad():  # as in the optimizer pre-hook
            for i, f in enumerate(ref_g.factors):
                _rescale_one_(ref_m, f, alpha[i], beta[i])
            fast_m._rescale_group_(fast_g, chain_rule_rescaling(alpha, beta))
    for fr, ff in zip(ref_m.factors, fast_m.factors):
        for a, b in ((fr.lora_A, ff.lora_A), (fr.lora_B, ff.lora_B), (fr.lora_A.grad, ff.lora_A.grad)):
            assert torch.equal(a, b)
        assert torch.equal(fr.lora_B.grad, ff.lora_B.grad)
        for pr, pf in ((fr.lora_A, ff.lora_A), (fr.lora_B, ff.lora_B)):
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ref_opt.state[pr][key], fast_opt.state[pf][key])


def test_bf16_stochastic_rounding_in_place_equals_reference():
    x = torch.randn(64, 80, dtype=torch.float32) * torch.logspace(-3, 3, 80)
    x[0, 0], x[1, 1], x[2, 2] = float("inf"), float("-inf"), 3.0e38
    expected = merge.stochastic_round(x.clone(), torch.bfloat16, torch.Generator().manual_seed(7))
    out = torch.empty(64, 80, dtype=torch.bfloat16)
    merge._stochastic_round_bf16_into_(out, x.clone(), torch.Generator().manual_seed(7))
    assert torch.equal(out, expected)


def test_stochastic_merge_is_unbiased_and_exact_when_representable():
    w = torch.ones(64, 64, dtype=torch.bfloat16)
    B, A = torch.ones(64, 1), torch.full((1, 64), 2.0**-12)  # 1/32 of an ulp of 1.0: nearest rounding drops it
    g = torch.Generator().manual_seed(0)
    total = 0.0
    for _ in range(50):
        trial = w.clone()
        merge.merge_low_rank_(trial, B, A, torch.ones(1), 1.0, mode="stochastic", generator=g)
        total += float((trial.double() - 1.0).mean())
    assert abs(total / 50 / 2.0**-12 - 1.0) < 0.1  # 204800 Bernoulli(1/32) draws: ~1.2% std
    nearest = w.clone()
    merge.merge_low_rank_(nearest, B, A, torch.ones(1), 1.0, mode="nearest")
    assert torch.equal(nearest, w)
    exact = w.clone()
    merge.merge_low_rank_(exact, B, torch.full((1, 64), 2.0**-6), torch.ones(1), 1.0, mode="stochastic", generator=g)
    assert torch.equal(exact, torch.full((64, 64), 1.0 + 2.0**-6, dtype=torch.bfloat16))


@pytest.mark.parametrize("kind", ["reflora", "reflora_s", "scalora"])
@pytest.mark.parametrize("where", ["lora_A.grad", "lora_B"])
def test_single_nonfinite_entry_is_caught(kind, where):
    model = _llama()
    opt = torch.optim.AdamW(models.lora_parameters(model), lr=1e-3)
    method = optlora.make_method(kind, model, warmup_steps=0).attach(opt)
    model(**models.make_batch(TINY, 2, 8, "cpu")).loss.backward()
    victim = method.factors[3]
    t = victim.lora_A.grad if where == "lora_A.grad" else victim.lora_B.data
    t[1, 2] = float("nan") if where == "lora_B" else float("inf")
    with pytest.raises(
        RuntimeError, match=r"1 LoRA layer\(s\): " + victim.name.replace("[", r"\[").replace("]", r"\]")
    ):
        opt.step()


def test_pair_equals_concatenated_stacks():
    model = _llama(dtype=torch.float32)
    _with_state(model, torch.float32)
    method = optlora.ScaLoRA(model, warmup_steps=0)
    for g in group_factors(method.factors):
        XA = g.pair("A", "gA", torch.float64, dim=1)
        XB = g.pair("gB", "B", torch.float64, dim=2)
        assert torch.equal(XA, torch.cat([g.stack("A", torch.float64), g.stack("gA", torch.float64)], 1))
        assert torch.equal(XB, torch.cat([g.stack("gB", torch.float64), g.stack("B", torch.float64)], 2))
