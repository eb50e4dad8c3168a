"""Export (optlora.export): standard PEFT adapter after RefLoRA, merged model and SVD-compressed adapter after ScaLoRA."""

from __future__ import annotations

import peft
import pytest
import torch
from eco_helpers import VOCAB, tiny_llama, tiny_peft, token_batches
from transformers import AutoModelForCausalLM

import optlora
import optlora.export as ex
import optlora.hf

SEED = 7


def _train(method_cls, steps=6, **kw):
    model = tiny_peft(seed=SEED)
    method = method_cls(model, warmup_steps=1, **kw)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    method.attach(opt)
    ids = token_batches(8, 12, seed=1)
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model, method


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=token_batches(4, 10, seed=9)).logits


@pytest.fixture(scope="module")
def scalora_model():
    model, method = _train(optlora.ScaLoRA, kappa=0.5)
    assert method.method_steps == 5
    return model, method


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- RefLoRA
def test_reflora_leaves_a_standard_peft_adapter(tmp_path):
    model, method = _train(optlora.RefLoRA)
    assert method.method_steps == 5
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(SEED), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)
    # its update has rank r exactly: the SVD export at rank r is lossless
    report = ex.export_adapter(model, tiny_llama(SEED), tmp_path / "svd", rank=4)
    assert report.rel_error < 1e-5


# ---------------------------------------------------------------------------------------------- ScaLoRA
def test_scalora_base_drift_needs_export(scalora_model, tmp_path):
    model, _ = scalora_model
    model.save_pretrained(tmp_path)
    plain = peft.PeftModel.from_pretrained(tiny_llama(SEED), tmp_path).eval()
    assert _rel(_logits(plain), _logits(model)) > 1e-4  # the adapter alone misses the merged increments


def test_export_merged(scalora_model, tmp_path):
    model, _ = scalora_model
    before = _logits(model)
    ex.export_merged(model, tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(merged), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)  # inplace=False left the model intact
    with pytest.raises(TypeError, match="merge_and_unload"):
        ex.export_merged(tiny_llama(), tmp_path)


def test_export_adapter_full_rank_reproduces_outputs(scalora_model, tmp_path):
    model, _ = scalora_model
    report = ex.export_adapter(model, tiny_llama(SEED), tmp_path, rank=VOCAB)  # capped at min(out, in) per layer
    assert report.rel_error < 1e-5
    assert max(v["rank"] for v in report.layers.values()) > 4  # ScaLoRA's update outgrew rank r
    loaded = peft.PeftModel.from_pretrained(tiny_llama(SEED), tmp_path).eval()
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("how", [{"rank": 2}, {"tol": 0.3}, {"tol": 0.05, "rank": 3}])
def test_export_adapter_truncated_error_is_what_peft_loads(scalora_model, tmp_path, how):
    model, _ = scalora_model
    original = tiny_llama(SEED)
    report = ex.export_adapter(model, original, tmp_path, **how)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(SEED), tmp_path).eval()
    trained = {f.name: f for f in ex.lora_layers(model)}
    resid2 = total2 = 0.0
    for f in ex.lora_layers(loaded):
        info = report.layers[f.name]
        assert f.rank == info["rank"] and f.scaling == trained[f.name].scaling  # the live adapter's scale is kept
        true = ex._dense(trained[f.name], original.get_submodule(f.name).weight, torch.float64)
        got = f.scaling * f.lora_B.double() @ f.lora_A.double()
        err = float((got - true).norm() / true.norm())
        assert err == pytest.approx(info["rel_error"], rel=1e-3, abs=1e-6)
        if "tol" in how and info["rank"] < how.get("rank", 10**9):
            assert info["rel_error"] <= how["tol"] + 1e-6
        if "rank" in how:
            assert info["rank"] <= how["rank"]
        resid2 += float((got - true).norm()) ** 2
        total2 += float(true.norm()) ** 2
    assert report.rel_error == pytest.approx((resid2 / total2) ** 0.5, rel=1e-3)
    assert len(report.layers) == len(trained)
    # closer to the trained model than the original base is
    assert _rel(_logits(loaded), _logits(model)) < _rel(_logits(original), _logits(model))
    assert set(report.rank_needed(0.1)) == set(report.layers)
    assert "ranks needed" in report.summary()


def test_export_adapter_rejects_bad_input(scalora_model, tmp_path):
    model, _ = scalora_model
    with pytest.raises(ValueError, match="rank"):
        ex.export_adapter(model, tiny_llama(SEED), tmp_path)
    with pytest.raises(TypeError, match="original model"):
        ex.export_adapter(model, model, tmp_path, rank=2)
