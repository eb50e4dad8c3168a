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


# ---------------------------------------------------------------------------------------------- SVD
def test_rank_for_error_and_svd_compress():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(12, 6, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(9, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    delta = U @ torch.diag(s) @ V.T
    for tol in (0.0, 0.01, 0.05, 0.2, 0.5, 0.9):
        want = next(k for k in range(7) if (s[k:].square().sum() / s.square().sum()).sqrt() <= tol)
        assert ex.rank_for_error(s, tol) == want
        if tol == 0.0:
            continue  # the computed spectrum has round-off tails: tol=0 needs every one of them
        c = ex.svd_compress(delta, tol=tol)
        assert c.rank == max(want, 1)
        assert c.rel_error <= tol + 1e-12
        assert c.rel_error == pytest.approx(_rel(c.lora_B @ c.lora_A, delta) if c.rank else 1.0, abs=1e-12)
    c = ex.svd_compress(delta, rank=2)
    assert c.lora_A.shape == (2, 9) and c.lora_B.shape == (12, 2)
    assert c.rel_error == pytest.approx(float((s[2:].square().sum() / s.square().sum()).sqrt()), rel=1e-9)
    assert ex.svd_compress(delta, rank=2, tol=0.0).rank == 2  # rank caps tol
    assert ex.svd_compress(torch.zeros(4, 3), rank=2).rel_error == 0.0
    with pytest.raises(ValueError, match="rank"):
        ex.svd_compress(delta)
    with pytest.raises(ValueError, match="tol"):
        ex.rank_for_error(s, 1.5)


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


@pytest.mark.parametrize("shape,true_rank", [((96, 160), 12), ((160, 96), 40), ((24, 30), 6)])
def test_lowrank_compress_states_the_error_of_what_it_writes(shape, true_rank):
    g = torch.Generator().manual_seed(true_rank)
    delta = torch.randn(shape[0], true_rank, generator=g) @ torch.randn(true_rank, shape[1], generator=g)
    delta += 1e-3 * torch.randn(*shape, generator=g)  # a full-rank tail, as merged increments leave
    state = torch.random.get_rng_state()
    for kw in ({"tol": 1e-2}, {"tol": 1e-4}, {"rank": 5}, {"tol": 1e-6, "rank": 8}):
        fast, exact = ex.lowrank_compress(delta, **kw), ex.svd_compress(delta, **kw)
        true = float((delta.double() - fast.lora_B.double() @ fast.lora_A.double()).norm() / delta.double().norm())
        assert fast.rel_error == pytest.approx(true, rel=1e-3, abs=1e-7)
        if "tol" in kw and fast.rank < kw.get("rank", 10**9):
            assert fast.rel_error <= kw["tol"]
        assert exact.rank <= fast.rank <= exact.rank + 2  # near the Eckart-Young minimum
        assert fast.rank <= kw.get("rank", 10**9)
        again = ex.lowrank_compress(delta, **kw)
        assert torch.equal(again.lora_A, fast.lora_A)  # deterministic
    assert torch.equal(torch.random.get_rng_state(), state)  # saving never moves the training RNG
    assert ex.lowrank_compress(torch.zeros(40, 50), tol=0.1).rel_error == 0.0
