"""bitsandbytes 4-bit NF4 and 8-bit bases (PEFT's ``bnb.Linear4bit`` / ``bnb.Linear8bitLt``), loaded with
``BitsAndBytesConfig`` as QLoRA users load them; skipped where bitsandbytes cannot run.

RefLoRA's step on them must be the float64 reference step; on a 4-bit base (whose CPU forward is
``x @ dequantise(W)^T``) training must equal training the dequantised float model, and so must
ScaLoRA with a residual of sufficient rank (tests/test_quantized.py holds the bitsandbytes-free cases).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import lm_batch, lm_loss, lora_params, np64, train_steps
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from test_quantized import LR, check_one_step

import optlora
import optlora.export
from optlora import checkpoint as state_files
from optlora.testing import models

BNB = models.bnb_unavailable()
needs_bnb = pytest.mark.skipif(BNB is not None, reason=f"bitsandbytes cannot run here: {BNB}")
BITS = [4, 8]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny Llama saved once; every test loads it quantised (what QLoRA users do)."""
    return tmp_path_factory.mktemp("tiny_llama")


def quantized_peft(directory, bits, seed=0):
    """PEFT LoRA (r=2, random B so every method acts at once) on every linear of a ``bits``-bit tiny Llama.

    The LoRA factors are float64 (the base computes in float32): the method's float64 math is then
    compared with the numpy reference at float64 precision.
    """
    base = models.quantized_tiny_llama(directory, bits)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
    for p in lora_params(model):
        p.data = p.data.double()
    return model.train()


def dequantized_twin(quant, directory):
    """The same model on float32 copies of the dequantised 4-bit weights (``transformers``' ``dequantize()``),
    with the same LoRA factors."""
    twin = get_peft_model(
        models.quantized_tiny_llama(directory, 4).dequantize(), copy.deepcopy(quant.peft_config["default"])
    )
    for p in lora_params(twin):
        p.data = p.data.double()
    set_peft_model_state_dict(twin, get_peft_model_state_dict(quant))
    return twin.train()


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_peft_dispatches_to_its_bnb_layers_and_discovery_finds_them(checkpoint, bits):
    model = quantized_peft(checkpoint, bits)
    fs = optlora.find_lora_factors(model)
    assert len(fs) == 7
    assert {type(f.module).__name__ for f in fs} == {"Linear4bit" if bits == 4 else "Linear8bitLt"}
    assert {type(f.base_weight).__name__ for f in fs} == {"Params4bit" if bits == 4 else "Int8Params"}


@needs_bnb
@pytest.mark.parametrize("scalar", [False, True], ids=["reflora", "reflora_s"])
@pytest.mark.parametrize("bits", BITS)
def test_reflora_step_on_bnb_base_matches_reference(checkpoint, bits, scalar):
    model = quantized_peft(checkpoint, bits)
    packed = {f.name: f.base_weight.detach().clone() for f in optlora.find_lora_factors(model)}
    method = check_one_step(model, lm_loss, lm_batch(32), scalar)
    for f in method.factors:
        assert torch.equal(f.base_weight, packed[f.name])  # the quantised base is never touched


@needs_bnb
@pytest.mark.parametrize("scalar", [False, True], ids=["reflora", "reflora_s"])
def test_4bit_training_equals_training_the_dequantised_model(checkpoint, scalar):
    """bitsandbytes' CPU 4-bit forward is ``x @ dequantise(W)^T``: RefLoRA on the 4-bit model follows
    the same trajectory as RefLoRA on a float copy holding the dequantised weights."""
    quant = quantized_peft(checkpoint, 4)
    twin = dequantized_twin(quant, checkpoint)
    assert all(type(m).__name__ == "Linear" for m in twin.modules() if hasattr(m, "lora_A") and len(m.lora_A))
    ids = lm_batch(32)
    losses = {}
    for name, model in (("quant", quant), ("twin", twin)):
        opt = torch.optim.AdamW(lora_params(model), lr=LR)
        optlora.RefLoRA(model, scalar=scalar, warmup_steps=1).attach(opt)
        losses[name] = []
        for _ in range(4):
            opt.zero_grad()
            loss = lm_loss(model.train(), ids)
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["quant"], losses["twin"], rtol=1e-6)
    for (n, p), (n2, p2) in zip(quant.named_parameters(), twin.named_parameters()):
        if p.requires_grad:
            assert n == n2
            # float32 base kernels (bitsandbytes vs torch) round differently
            np.testing.assert_allclose(np64(p), np64(p2), rtol=1e-5, atol=1e-6, err_msg=n)


@needs_bnb
@pytest.mark.parametrize("bits", BITS)
def test_scalora_refuses_bnb_base_with_advice(checkpoint, bits):
    kind = "Params4bit, torch.uint8" if bits == 4 else "Int8Params, torch.int8"
    with pytest.raises(ValueError, match=rf"(?s)q_proj\[default\]: base layer .*{kind}.*optlora\.RefLoRA"):
        optlora.ScaLoRA(quantized_peft(checkpoint, bits))


@needs_bnb
def test_adapter_trained_on_4bit_base_reloads_with_peft(checkpoint, tmp_path):
    """RefLoRA leaves a standard PEFT adapter: ``save_pretrained`` / ``PeftModel.from_pretrained`` on the 4-bit base."""
    from peft import PeftModel

    model = quantized_peft(checkpoint, 4)
    opt = torch.optim.AdamW(lora_params(model), lr=LR)
    optlora.RefLoRA(model, warmup_steps=1).attach(opt)
    ids = lm_batch(32)
    train_steps(model, opt, lm_loss, ids, 3)
    model.save_pretrained(tmp_path / "adapter")  # guarded (optlora.persist): PEFT's own adapter + the counters
    assert (tmp_path / "adapter" / state_files.STATE_FILE).exists()
    assert not (tmp_path / "adapter" / "optlora_export.json").exists()  # not a compressed update: the adapter itself
    reloaded = PeftModel.from_pretrained(models.quantized_tiny_llama(checkpoint, 4), tmp_path / "adapter")
    with torch.no_grad():
        ours = model.train()(input_ids=ids).logits
        theirs = reloaded.train()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


@needs_bnb
def test_scalora_residual_on_4bit_equals_exact_scalora_on_the_dequantised_model(checkpoint):
    quant = quantized_peft(checkpoint, 4)
    twin = dequantized_twin(quant, checkpoint)
    ids = lm_batch(32)
    methods = {}
    for name, model, kw in (("quant", quant, {"residual_rank": 8}), ("twin", twin, {})):
        opt = torch.optim.AdamW(lora_params(model), lr=LR)
        methods[name] = optlora.ScaLoRA(model, warmup_steps=1, **kw).attach(opt)
        train_steps(model, opt, lm_loss, ids, 4)  # 3 merges of rank 2 <= 8: nothing is dropped
    from peft.utils.integrations import dequantize_module_weight

    for fq, ft in zip(methods["quant"].factors, methods["twin"].factors):
        w4 = dequantize_module_weight(fq.module.get_base_layer()).double()
        drift = ft.base_weight.double() - w4
        res = methods["quant"].residuals[fq.name].dense().double()
        assert float((res - drift).norm() / drift.norm()) < 1e-5, fq.name  # float32 storage and kernels
        np.testing.assert_allclose(np64(fq.lora_A), np64(ft.lora_A), rtol=1e-5, atol=1e-6)
        base_norm = methods["quant"].residuals[fq.name].base_norm.item()
        assert base_norm == pytest.approx(float(w4.norm()), rel=1e-6)  # ||W_q|| read through the 4-bit layer
    assert methods["quant"].stats()["residual_dropped"] < 1e-6


@needs_bnb
def test_adapter_exported_from_a_4bit_scalora_run_reloads_exactly_with_peft(checkpoint, tmp_path):
    """The residual plus the adapter (rank <= R + r) is written as one standard PEFT adapter for the 4-bit base."""
    model = quantized_peft(checkpoint, 4)
    opt = torch.optim.AdamW(lora_params(model), lr=LR)
    optlora.ScaLoRA(model, warmup_steps=1, residual_rank=3).attach(opt)
    ids = lm_batch(32)
    train_steps(model, opt, lm_loss, ids, 4)
    report = optlora.export.export_adapter(model, models.quantized_tiny_llama(checkpoint, 4), tmp_path, rank=5)
    assert report.rel_error < 1e-6 and max(v["rank"] for v in report.layers.values()) == 5
    reloaded = PeftModel.from_pretrained(models.quantized_tiny_llama(checkpoint, 4), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded.train()(input_ids=ids).logits, model.train()(input_ids=ids).logits, rtol=1e-5, atol=1e-5
        )


@needs_bnb
def test_scalora_residual_trains_an_8bit_base(checkpoint):
    """8-bit (LLM.int8) quantises activations too, so there is no float twin to match; the mode must run and stay finite."""
    model = quantized_peft(checkpoint, 8)
    packed = {f.name: f.base_weight.detach().clone() for f in optlora.find_lora_factors(model)}
    opt = torch.optim.AdamW(lora_params(model), lr=LR)
    method = optlora.ScaLoRA(model, warmup_steps=1, residual_rank=4).attach(opt)
    train_steps(model, opt, lm_loss, lm_batch(32), 3)
    assert method.method_steps == 2 and all(r.active for r in method.residuals.values())
    assert all(torch.isfinite(r.dense()).all() for r in method.residuals.values())
    assert all(torch.equal(f.base_weight, packed[f.name]) for f in method.factors)  # the int8 weights are untouched
