"""Quantised bases x saving (optlora.persist): what ``save_pretrained`` writes is right when loaded with plain PEFT.

ScaLoRA(residual_rank=R) never writes a quantised weight ``W_q``: its merges live in the low-rank
residual ``U V`` beside it, so the trained layer is ``W_q + U V + s B A`` and its accumulated update
(relative to ``W_q``) is ``U V + s B A``, of rank ``<= R + r``. The guarded ``save_pretrained`` must
write that update as a standard PEFT adapter at the stated error, for the same quantised base, and the
exact state (residual factors included) must come back through the transactional ``load_adapter`` /
``load_state_dict``. (RefLoRA leaves PEFT's own adapter: tests/test_quantized_bnb.py.) The int8 tests run everywhere; the bitsandbytes
ones where bitsandbytes' CPU kernels run.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import lm_batch, lm_loss, lora_params, mlp_batch, mlp_loss, train_steps
from peft import LoraConfig, PeftModel
from peft.tuners.lora.gptq import GPTQLoraLinear
from test_quantized import (
    LR,
    Int8Linear,
    effective_weights,
    int8_mlp,
    int8_twin,
    run,
    tiny_mlp_with_one_int8_layer,
)
from test_quantized_bnb import needs_bnb, quantized_peft
from transformers import AutoModelForCausalLM

import optlora
import optlora.export
from optlora import checkpoint, persist, residual
from optlora.discovery import lora_layers, quantized_base
from optlora.testing import models

BUILDERS = {"int8": int8_mlp, "int8_and_float": tiny_mlp_with_one_int8_layer}


def plain_peft(builder, folder):
    """The saved adapter loaded with plain PEFT on a freshly built base (PEFT's GPTQ LoRA layer for ``Int8Linear``)."""
    base = builder().unload()  # the same base as the trained model's, without LoRA layers
    cfg = LoraConfig.from_pretrained(folder)
    cfg._register_custom_module({Int8Linear: GPTQLoraLinear})
    return PeftModel.from_pretrained(base, folder, config=cfg)


def updates(model) -> dict[str, torch.Tensor]:
    """``W_now - W_start`` per LoRA layer (float64, out x in): merged drift (float base) or residual, plus ``s B A``."""
    out = {}
    for f in lora_layers(model):  # named by path inside the base model, as PEFT's adapter files are
        lora = f.scaling * f.lora_B.detach().double() @ f.lora_A.detach().double()
        res = residual.residuals_of(f.module.get_base_layer()).get(f.adapter)
        out[f.name] = lora + (0 if res is None else res.dense().double())
    return out


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_residual_run_saves_its_whole_update_as_a_plain_peft_adapter_at_the_stated_error(kind, tmp_path):
    builder = BUILDERS[kind]
    model = builder()
    start = {n: p.detach().clone() for n, p in model.get_base_model().named_parameters() if not p.requires_grad}
    method, _ = run(model, {"residual_rank": 1}, steps=4)  # rank 1 < the merged increments' rank: truncation cuts
    assert method.stats()["residual_dropped"] > 0
    # tol 1e-6 (default 1e-3) so that outputs compare tightly; rank cap 5 = full rank of these 5 x 6 layers (the
    # default cap, as many numbers as the dense layer, is 30/11 here): a quantised layer's update has rank <= R + r = 3
    persist.install(method, max_rank=5, tol=1e-6)
    model.save_pretrained(tmp_path)
    assert (tmp_path / checkpoint.STATE_FILE).exists()
    report = json.loads((tmp_path / "optlora_export.json").read_text())
    assert {n: v["quantized_base"] for n, v in report["layers"].items()} == {
        f.name: quantized_base(f) for f in lora_layers(model)
    }
    card = (tmp_path / "README.md").read_text()
    assert "same quantisation" in card and "rank-1 residuals" in card

    loaded = plain_peft(builder, tmp_path)
    trained = updates(model)
    for f in lora_layers(loaded):
        name = f.name
        got = f.scaling * f.lora_B.detach().double() @ f.lora_A.detach().double()
        want = trained[name]
        if not quantized_base(f):  # a float layer: ScaLoRA merged part of its update into the weight
            w = model.get_base_model().get_submodule(name).get_base_layer().weight.detach().double()
            want = want + w - start[f"{name}.base_layer.weight"].double()
        stated = report["layers"][name]["rel_error"]
        assert stated <= 1e-6 and (report["layers"][name]["rank"] <= 3 or not quantized_base(f))
        # PEFT builds float32 factors on a base without a float weight: the float64 ones saved are rounded once
        assert float((got - want).norm() / want.norm()) <= stated + 1e-6, name
    x = mlp_batch()[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x).to(loaded(x).dtype), rtol=1e-5, atol=1e-6)
        for r in method.residuals.values():  # the check is not vacuous: without its residuals the model differs
            r.active = False
        assert not torch.allclose(model(x).to(loaded(x).dtype), loaded(x), rtol=1e-5, atol=1e-6)
        for r in method.residuals.values():
            r.active = True
    with pytest.raises(RuntimeError, match="disable_adapter"):
        with model.disable_adapter():
            pass


def test_residual_state_round_trips_through_the_transactional_load(tmp_path):
    model = int8_mlp()
    method, opt = run(model, {"residual_rank": 1}, steps=4)
    model.save_pretrained(tmp_path)

    fresh = int8_mlp()
    opt2 = torch.optim.AdamW(lora_params(fresh), lr=LR)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    method2 = optlora.ScaLoRA(fresh, warmup_steps=1, residual_rank=1).attach(opt2)
    saved = checkpoint.read_state(tmp_path / checkpoint.STATE_FILE)
    bad = copy.deepcopy(saved)
    name = next(iter(bad["residuals"]))
    bad["residuals"][name]["left"] = bad["residuals"][name]["left"][:, :0]  # a rank-0 residual: refused
    before = effective_weights(method2)
    with pytest.raises(ValueError, match=r"residuals\.left.*nothing was loaded"):
        method2.load_state_dict(bad)
    assert all(torch.equal(w, before[n]) for n, w in effective_weights(method2).items())
    assert method2.steps == 0 and not any(r.active for r in method2.residuals.values())

    fresh.load_adapter(tmp_path, "default", is_trainable=True)  # the guard restores the exact state
    assert method2.steps == method.steps
    for n, w in effective_weights(method).items():
        assert torch.equal(w, effective_weights(method2)[n]), n
    train_steps(model, opt, mlp_loss, mlp_batch(), 2)
    train_steps(fresh, opt2, mlp_loss, mlp_batch(), 2)
    for n, w in effective_weights(method).items():
        assert torch.equal(w, effective_weights(method2)[n]), n


# ------------------------------------------------------------------ bitsandbytes 4-bit
@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny_llama_4bit")


def logits(model, ids):
    with torch.no_grad():  # train mode: bitsandbytes repacks 4-bit weights on eval-mode CPU calls (docs/QUANTIZED.md)
        return model.train()(input_ids=ids).logits


@needs_bnb
def test_scalora_residual_on_4bit_saves_a_plain_peft_adapter_and_rebuilds_exactly(qdir, tmp_path):
    model = quantized_peft(qdir, 4)
    opt = torch.optim.AdamW(lora_params(model), lr=LR)
    method = optlora.ScaLoRA(model, warmup_steps=1, residual_rank=3).attach(opt)
    ids = lm_batch(32)
    train_steps(model, opt, lm_loss, ids, 4)
    assert all(r.active for r in method.residuals.values())
    model.save_pretrained(tmp_path)
    report = json.loads((tmp_path / "optlora_export.json").read_text())
    assert all(v["quantized_base"] for v in report["layers"].values()) and report["rel_error"] <= 1e-3
    ours = logits(model, ids)
    plain = PeftModel.from_pretrained(models.quantized_tiny_llama(qdir, 4), tmp_path)
    torch.testing.assert_close(logits(plain, ids), ours, rtol=1e-4, atol=1e-4)
    rebuilt = persist.rebuild(models.quantized_tiny_llama(qdir, 4), tmp_path)  # factors + residuals of the state
    torch.testing.assert_close(logits(rebuilt, ids), ours, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match="export_merged"):
        rebuilt.save_pretrained(tmp_path / "again")  # no method, no originals: refuses, writes nothing
    with pytest.raises(ValueError, match="not quantised.*same quantization_config"):
        persist.rebuild(AutoModelForCausalLM.from_pretrained(qdir), tmp_path)  # the float base: not the trained model


def test_residuals_are_never_applied_beside_a_float_base():
    model = int8_mlp()
    method, _ = run(model, {"residual_rank": 1}, steps=3)
    twin = int8_twin(model)
    before = {n: p.detach().clone() for n, p in twin.named_parameters()}
    with pytest.raises(ValueError, match="not quantised"):
        optlora.export.apply_method_state(twin, method.state_dict())
    assert all(torch.equal(p, before[n]) for n, p in twin.named_parameters())
    assert not any(residual.residuals_of(m) for m in twin.modules())
