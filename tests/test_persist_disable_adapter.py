"""The guarded ``model.disable_adapter()`` (optlora.persist): the pretrained model, or a clear error.

PEFT's model without adapters is the pretrained model only while the base weights are the pretrained
ones. ScaLoRA merges its increments into them (ScaLoRA Sec. 3.1), so after its first merge the context
would silently give "trained model minus the live adapter" to a reference model (TRL's DPO/KTO/GRPO
without ``ref_model`` call ``use_adapter(model, None)``, i.e. ``with model.disable_adapter(): model(**batch)``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from eco_helpers import token_batches
from test_persist import base_dir, logits, original, params, peft_model, train  # noqa: F401 - base_dir: fixture

import optlora
from optlora import persist


def batch() -> dict:
    return {"input_ids": token_batches(4, 10, seed=9)}


def test_before_the_first_merge_and_under_reflora_it_gives_the_pretrained_model(base_dir):  # noqa: F811
    pretrained = logits(original(base_dir))
    for name, steps in (("scalora", 1), ("reflora", 3)):  # ScaLoRA: the warm-up step only, nothing merged yet
        model = peft_model(base_dir)
        method = optlora.make_method(name, model, warmup_steps=1)
        train(model, method, steps)
        assert method.method_steps == steps - 1
        trained = logits(model)
        assert not torch.allclose(trained, pretrained)  # the adapter changes the outputs: the check can fail
        with model.disable_adapter():  # PEFT's context manager, as TRL uses it
            with torch.no_grad():
                assert torch.equal(model(**batch()).logits, pretrained), name
        assert torch.equal(logits(model), trained), name  # the adapter is back on leaving the context


def test_after_a_merge_it_raises_with_guidance_and_changes_nothing(base_dir):  # noqa: F811
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    train(model, method, 2)
    assert method.method_steps == 1
    before, trained = params(model), logits(model)
    with pytest.raises(RuntimeError, match="ScaLoRA has merged its updates") as err:
        with model.disable_adapter():
            model(**batch())
    assert "ref_model" in str(err.value) and "RefLoRA" in str(err.value)  # what to do instead
    assert all(torch.equal(before[n], p) for n, p in params(model).items())
    assert torch.equal(logits(model), trained)  # the adapter is still enabled


def test_trl_reference_context_raises_after_a_merge(base_dir):  # noqa: F811
    """TRL's own reference-model context (``trl.trainer.utils.use_adapter(model, None)``)."""
    use_adapter = pytest.importorskip("trl.trainer.utils").use_adapter
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    opt = train(model, method, 1)  # warm-up: the reference is still the pretrained model
    with use_adapter(model, None), torch.no_grad():
        assert torch.equal(model(**batch()).logits, logits(original(base_dir)))
    train(model, method, 1, opt)
    with pytest.raises(RuntimeError, match="would not give the pretrained model"):
        with use_adapter(model, None):
            model(**batch())


def test_copies_rebuilt_and_resumed_models_of_a_merged_run_raise(base_dir, tmp_path):  # noqa: F811
    model = peft_model(base_dir)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    train(model, method, 2)
    model.save_pretrained(tmp_path)
    resumed = peft_model(base_dir)
    optlora.ScaLoRA(resumed, warmup_steps=1, kappa=0.5)
    resumed.load_adapter(tmp_path, "default", is_trainable=True)  # merged base weights restored from the state
    for twin in (copy.deepcopy(model), persist.rebuild(original(base_dir), tmp_path), resumed):
        with pytest.raises(RuntimeError, match="would not give the pretrained model"):
            twin.disable_adapter()
    fresh = peft_model(base_dir)  # a copy of a model nothing was merged into keeps PEFT's behaviour
    optlora.ScaLoRA(fresh, warmup_steps=1, kappa=0.5)
    with copy.deepcopy(fresh).disable_adapter():
        pass
