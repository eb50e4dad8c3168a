"""The guarded save/load paths (optlora.persist): what users save with standard tools is right wherever it is loaded.

Every test trains a tiny Llama whose pretrained weights live in a safetensors folder (as a hub model's
do), so the original weights are read lazily from the file, as in real use.
"""

from __future__ import annotations

import copy
import io
import json
import os
import pickle
import warnings

import peft
import pytest
import torch
from eco_helpers import lora_config, tiny_llama, token_batches
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import optlora
from optlora import checkpoint, persist
from optlora.originals import HostCopyWarning, OriginalsUnavailable

SEED = 7


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama(SEED).save_pretrained(folder)
    return folder


def original(base_dir):
    return AutoModelForCausalLM.from_pretrained(base_dir)


def peft_model(base_dir, **kw):
    """PEFT model on the saved base; lora_B small and random so that every method acts from step 1."""
    model = peft.get_peft_model(original(base_dir), lora_config(**kw))
    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def train(model, method, steps, opt=None, lr=2e-2):
    opt = opt or torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    if method.optimizer is None:
        method.attach(opt)
    ids = token_batches(8, 12, seed=1)
    model.train()
    for _ in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=token_batches(4, 10, seed=9)).logits


def params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_params_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def scalora_saved(base_dir, tmp_path_factory):
    """A ScaLoRA model after 6 steps (5 merges), saved with plain ``model.save_pretrained``."""
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    train(model, method, 6)
    out = tmp_path_factory.mktemp("saved")
    model.save_pretrained(out)
    return model, method, out


# ---------------------------------------------------------------------------------------------- the artifact
def test_plain_peft_loads_the_trained_model_to_the_stated_error(base_dir, scalora_saved, tmp_path):
    model, method, out = scalora_saved
    assert persist.guard_of(model).originals.describe().startswith("8 layer(s) read from")  # lazily, from the file
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", checkpoint.STATE_FILE, "README.md"} <= files
    report = json.loads((out / "optlora_export.json").read_text())
    assert 0 < report["rel_error"] <= persist.DEFAULT_TOL
    assert "relative Frobenius error" in (out / "README.md").read_text()

    loaded = peft.PeftModel.from_pretrained(original(base_dir), out)  # plain PEFT, original base
    want = logits(model)
    err = float((logits(loaded) - want).abs().max())
    # what saving did before: PEFT's adapter of the live factors misses the merged increments
    type(model).save_pretrained(model, tmp_path / "live")
    before = float((logits(peft.PeftModel.from_pretrained(original(base_dir), tmp_path / "live")) - want).abs().max())
    assert err < 1e-2 * before, (err, before)
    # the stated error is the error of the update that PEFT loads, per layer
    trained = {f.name: f for f in optlora.export.lora_layers(model)}
    pristine = original(base_dir)
    for f in optlora.export.lora_layers(loaded):
        true = optlora.export._dense(trained[f.name], pristine.get_submodule(f.name).weight, torch.float64)
        got = f.scaling * f.lora_B.double() @ f.lora_A.double()
        stated = report["layers"][f.name]["rel_error"]
        assert float((got - true).norm() / true.norm()) == pytest.approx(stated, rel=1e-2, abs=1e-6)
        assert f.scaling == trained[f.name].scaling  # the live scale is kept: same meaning in any model


def test_the_state_holds_only_what_changed(scalora_saved, base_dir):
    model, method, out = scalora_saved
    with safe_open(out / checkpoint.STATE_FILE, "pt") as fh:
        keys = list(fh.keys())
        meta = fh.metadata()
    layers = {f.name.rsplit("[", 1)[0] for f in method.factors}
    assert {k.split("/", 1)[1] for k in keys if k.startswith("base_weights/")} == layers  # LoRA layers only
    assert {k.split("/", 1)[0] for k in keys} == {"factors", "base_weights", "rng"}
    assert json.loads(meta["state"])["steps"] == 6 and "peft_config" in meta
    state_bytes = os.path.getsize(out / checkpoint.STATE_FILE)
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    tensors = sum(nbytes(f.base_weight) + nbytes(f.lora_A) + nbytes(f.lora_B) for f in method.factors)
    tensors += sum(nbytes(g.get_state()) for g in method._generators.values())
    assert tensors < state_bytes < tensors + 16 * 1024  # the tensors above plus a JSON header; sizes of a real
    # model against its adapter and full weights: bench/checkpoint_size.py, docs/RELIABILITY.md


def test_rebuild_is_exact(scalora_saved, base_dir):
    model, _, out = scalora_saved
    rebuilt = persist.rebuild(original(base_dir), out)
    assert torch.equal(logits(rebuilt), logits(model))


def test_push_to_hub_uploads_the_guarded_artifact(scalora_saved, monkeypatch):
    import transformers.utils.hub as hub

    model, _, _ = scalora_saved
    uploaded = {}

    class Api:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": repo_id})()

    def upload(folder, repo_id, **kw):
        uploaded.update({name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)})

    monkeypatch.setattr(hub, "hf_api", lambda: Api())
    monkeypatch.setattr(hub, "create_and_tag_model_card", lambda *a, **k: hub.ModelCard("---\n---\n"))
    monkeypatch.setattr(model, "_upload_modified_files", upload, raising=False)
    model.push_to_hub("me/adapter")
    assert {"optlora_export.json", checkpoint.STATE_FILE, "adapter_model.safetensors"} <= set(uploaded)


# ---------------------------------------------------------------------------------------------- resume
def test_resume_without_a_trainer_or_callback_is_bit_exact(base_dir, tmp_path):
    """Save with save_pretrained + optimizer state; a fresh process restores with load_adapter and continues."""
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    opt = train(model, method, 3)
    model.save_pretrained(tmp_path)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    train(model, method, 3, opt)

    fresh = peft_model(base_dir, init_lora_weights=False)  # another adapter init: it must come from the state
    fresh_method = optlora.ScaLoRA(fresh, warmup_steps=1, kappa=0.5)
    fresh.load_adapter(tmp_path, "default", is_trainable=True)
    assert (fresh_method.steps, fresh_method.method_steps) == (3, 2)
    fresh_opt = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=2e-2)
    fresh_opt.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    train(fresh, fresh_method, 3, fresh_opt)
    assert_params_equal(params(fresh), params(model))


def test_a_checkpoint_without_its_state_is_refused(scalora_saved, base_dir, tmp_path):
    _, _, out = scalora_saved
    for name in os.listdir(out):
        if name != checkpoint.STATE_FILE:
            (tmp_path / name).write_bytes((out / name).read_bytes())
    fresh = peft_model(base_dir)
    optlora.ScaLoRA(fresh, warmup_steps=1, kappa=0.5)
    before = params(fresh)
    with pytest.raises(RuntimeError, match="holds no optlora_state.safetensors"):
        fresh.load_adapter(tmp_path, "default", is_trainable=True)
    assert_params_equal(before, params(fresh))


def test_a_plain_adapter_loads_only_on_an_untouched_base(base_dir, tmp_path):
    donor = peft_model(base_dir)
    type(donor).save_pretrained(donor, tmp_path)  # a standard PEFT adapter, not written by optlora
    model = peft_model(base_dir, init_lora_weights=False)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    model.load_adapter(tmp_path, "default", is_trainable=True)  # nothing merged yet: a warm start, fine
    assert torch.equal(logits(model), logits(donor))
    train(model, method, 3)
    before = params(model)
    with pytest.raises(RuntimeError, match="already merged"):
        model.load_adapter(tmp_path, "default", is_trainable=True)
    assert_params_equal(before, params(model))


def test_a_mismatched_state_is_refused_before_anything_changes(scalora_saved, base_dir):
    _, _, out = scalora_saved
    other = peft_model(base_dir)
    optlora.ScaLoRA(other, warmup_steps=1, kappa=0.25)  # another kappa
    before = params(other)
    with pytest.raises(ValueError, match="kappa"):
        other.load_adapter(out, "default", is_trainable=True)
    assert_params_equal(before, params(other))
    wider = peft_model(base_dir, r=6)  # another rank
    optlora.ScaLoRA(wider, warmup_steps=1, kappa=0.5)
    before = params(wider)
    with pytest.raises(ValueError, match="factors.lora_A"):
        wider.load_adapter(out, "default", is_trainable=True)
    assert_params_equal(before, params(wider))


# ---------------------------------------------------------------------------------------------- RefLoRA
def test_reflora_saves_peft_s_own_adapter_and_its_counters(base_dir, tmp_path):
    model = peft_model(base_dir)
    method = optlora.RefLoRA(model, warmup_steps=1)
    train(model, method, 3)
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "optlora_export.json").exists()
    assert torch.equal(logits(peft.PeftModel.from_pretrained(original(base_dir), tmp_path)), logits(model))
    fresh = peft_model(base_dir)
    fresh_method = optlora.RefLoRA(fresh, warmup_steps=1)
    fresh.load_adapter(tmp_path, "default", is_trainable=True)
    assert (fresh_method.steps, fresh_method.method_steps) == (3, 2)
    assert torch.equal(logits(fresh), logits(model))


# ---------------------------------------------------------------------------------------------- refusals
def test_copies_of_a_base_modifying_model_refuse_to_save(scalora_saved, tmp_path):
    model, _, _ = scalora_saved
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert torch.equal(logits(twin), logits(model))
        with pytest.raises(RuntimeError, match="copy of a model"):
            twin.save_pretrained(tmp_path / "copy")
        assert not (tmp_path / "copy").exists()


def test_uninstall_gives_back_peft_s_methods(base_dir):
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1)
    assert "save_pretrained" in model.__dict__ and persist.guard_of(model).method is method
    persist.uninstall(model)
    assert "save_pretrained" not in model.__dict__ and persist.guard_of(model) is None
    assert model.save_pretrained.__func__ is type(model).save_pretrained


def test_a_changed_base_file_is_caught_when_the_method_is_built(base_dir, tmp_path):
    model = peft_model(base_dir)
    with torch.no_grad():
        model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight[0, 2] += 1.0  # a checked row
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    assert (
        "differs from the live weight" in persist.guard_of(model).originals.problems["model.layers.0.self_attn.q_proj"]
    )
    train(model, method, 3)
    with pytest.raises(OriginalsUnavailable, match="q_proj"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="before training"):
        persist.install(method, original=base_dir)


def test_without_files_a_host_copy_is_kept(tmp_path):
    from eco_helpers import tiny_peft

    model = tiny_peft(seed=SEED)  # built from a config: no file holds its weights, nothing to advise
    with warnings.catch_warnings():
        warnings.simplefilter("error", HostCopyWarning)
        method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    train(model, method, 4)
    model.save_pretrained(tmp_path)
    loaded = peft.PeftModel.from_pretrained(tiny_llama(SEED), tmp_path)
    assert float((logits(loaded) - logits(model)).abs().max()) < 1e-3


def test_no_host_copy_means_saving_fails_with_what_to_do(tmp_path):
    from eco_helpers import tiny_peft

    model = tiny_peft(seed=SEED)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    persist.uninstall(model)
    persist.install(method, host_copy=False)
    train(model, method, 3)
    with pytest.raises(OriginalsUnavailable, match="original="):
        model.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


def test_two_trained_adapters_merging_into_one_weight_refuse_to_save(tmp_path):
    from eco_helpers import tiny_peft

    model = tiny_peft(seed=SEED)
    model.add_adapter("second", lora_config())
    model.base_model.set_adapter(["default", "second"])
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    method = optlora.ScaLoRA(model, warmup_steps=1)
    assert {f.adapter for f in method.factors} == {"default", "second"}
    with pytest.raises(ValueError, match="2 adapters"):
        model.save_pretrained(tmp_path)


def test_save_options_are_validated(base_dir):
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1)
    with pytest.raises(ValueError, match="tol"):
        persist.install(method, tol=1.5)
    with pytest.raises(ValueError, match="max_rank"):
        persist.install(method, max_rank=0)
    guard = persist.install(method, tol=0.05, max_rank=3)
    assert (guard.tol, guard.max_rank) == (0.05, 3) and guard.originals is not None


def test_adapter_only_saving_for_shipping(base_dir, tmp_path):
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    train(model, method, 3)
    persist.install(method, exact_state=False)  # e.g. before push_to_hub of the final model
    model.save_pretrained(tmp_path)
    assert not (tmp_path / checkpoint.STATE_FILE).exists() and (tmp_path / "optlora_export.json").exists()
    assert checkpoint.STATE_FILE not in (tmp_path / "README.md").read_text()
    assert optlora.card.STATE_FILE == checkpoint.STATE_FILE  # the card names the file without importing checkpoint
    fresh = peft_model(base_dir)
    optlora.ScaLoRA(fresh, warmup_steps=1, kappa=0.5)
    with pytest.raises(RuntimeError, match="holds no"):
        fresh.load_adapter(tmp_path, "default", is_trainable=True)


def test_bfloat16_updates_are_compressed_down_to_the_dtype_floor_not_into_its_noise(tmp_path):
    """Stochastic rounding leaves dense noise of about one bf16 ulp in W_now - W_pretrained; no low rank holds
    it and no bf16 copy of the model is more exact: the adapter keeps the update above that noise, and plain
    PEFT then gets the trained model about as exactly as the trained model stored in bf16."""
    base = tmp_path / "base"
    tiny_llama(SEED, dtype=torch.bfloat16).save_pretrained(base)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), lora_config(), autocast_adapter_dtype=False
    )
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)  # merge_precision "auto": stochastic in bf16
    train(model, method, 6)
    model.save_pretrained(tmp_path / "out")
    report = json.loads((tmp_path / "out" / "optlora_export.json").read_text())
    assert report["rounding_floor"] > 0
    for name, layer in report["layers"].items():
        m, n = model.get_base_model().get_submodule(name).base_layer.weight.shape
        at_cap = layer["rank"] >= m * n // (m + n)
        assert layer["above_noise"] or layer["rounding_floor"] <= persist.DEFAULT_TOL, name
        assert at_cap or layer["above_noise"] or layer["rel_error"] <= max(persist.DEFAULT_TOL, layer["rounding_floor"])
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16), tmp_path / "out"
    )
    merged = optlora.export.export_merged(model, tmp_path / "merged")  # the trained model stored in bf16
    floor = float(
        (logits(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.bfloat16)) - logits(model)).abs().max()
    )
    assert float((logits(loaded) - logits(model)).abs().max()) <= 4 * floor + 1e-2
