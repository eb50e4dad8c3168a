"""Trainer / TRL integration (optlora.hf): attach, clipping/accumulation/schedule, checkpoint and bit-exact resume."""

from __future__ import annotations

import pathlib
import shutil

import pytest
import torch
from eco_helpers import TokenDataset, tiny_peft, tiny_texts, tiny_tokenizer
from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

import optlora
import optlora.hf

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _args(out, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )
    base.update(kw)
    return TrainingArguments(**base)


def _snapshot(model) -> dict[str, torch.Tensor]:
    """Every LoRA factor and every base weight under a LoRA layer (ScaLoRA changes those)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_layer" in n}


def _method(kind: str, model):
    if kind == "scalora":
        return optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    return optlora.RefLoRA(model, scalar=True, warmup_steps=1)


@pytest.mark.parametrize("kind", ["scalora", "reflora_s"])
def test_trainer_with_callback_equals_manual_loop(tmp_path, kind):
    """Grad accumulation + clipping + linear LR schedule through Trainer == a hand-written loop with attach()."""
    steps, clip, lr = 4, 0.05, 1e-2
    data = TokenDataset(n=8)  # batch 4 x accumulation 2 = the whole set per optimizer step: order cannot matter
    model = tiny_peft(seed=3)
    method = _method(kind, model)
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=2, max_grad_norm=clip, learning_rate=lr)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[optlora.hf.callback(method)])
    trainer.train()
    assert method.steps == trainer.state.global_step == steps  # once per optimizer step, not per micro-batch
    assert method.method_steps == steps - 1

    ref = tiny_peft(seed=3)
    ref_method = _method(kind, ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = get_linear_schedule_with_warmup(opt, 0, steps)
    ref_method.attach(opt)
    ref.train()
    ids = data.ids
    for _ in range(steps):
        ref(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        sched.step()
        opt.zero_grad()
    got, want = _snapshot(model), _snapshot(ref)
    untouched = _snapshot(tiny_peft(seed=3))
    assert any(not torch.equal(got[k], untouched[k]) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=2e-4, atol=2e-6, msg=k)


def test_bf16_mixed_precision_trains(tmp_path):
    model = tiny_peft(seed=1)
    method = optlora.ScaLoRA(model, warmup_steps=1)
    args = _args(tmp_path, bf16=True, max_steps=3, gradient_accumulation_steps=2, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=TokenDataset(), callbacks=[optlora.hf.callback(method)])
    out = trainer.train()
    assert torch.isfinite(torch.tensor(out.training_loss))
    assert method.method_steps == 2 and method.stats()["last_skipped_layers"] == []
    assert all(torch.isfinite(p).all() for p in _snapshot(model).values())


def _run(out, *, resume=None, trainer_cls=None, steps=6, callback_kw=None):
    model = tiny_peft(seed=5)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    args = _args(out, max_steps=steps, save_strategy="steps", save_steps=3, gradient_accumulation_steps=2)
    data = TokenDataset(n=24)
    if trainer_cls is None:
        cb = optlora.hf.callback(method, **(callback_kw or {}))
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    else:
        trainer = trainer_cls(model=model, args=args, train_dataset=data, method=method)
    trainer.train(resume_from_checkpoint=resume)
    return model, method


def _assert_bit_equal(a, b):
    sa, sb = _snapshot(a), _snapshot(b)
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_is_bit_exact(tmp_path):
    full, full_method = _run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert (ckpt / optlora.hf.STATE_FILE).is_file()
    saved = optlora.hf.read_state(ckpt)
    assert saved["steps"] == 3 and saved["method_steps"] == 2

    # callback only, resume_from_checkpoint=True inside output_dir
    shutil.copytree(ckpt, tmp_path / "b" / "checkpoint-3")
    resumed, method = _run(tmp_path / "b", resume=True)
    assert method.steps == full_method.steps == 6
    _assert_bit_equal(resumed, full)

    # OptLoRATrainer: a checkpoint outside output_dir
    resumed2, _ = _run(tmp_path / "c", resume=str(ckpt), trainer_cls=optlora.hf.OptLoRATrainer)
    _assert_bit_equal(resumed2, full)

    # callback with an explicit resume_from
    resumed3, _ = _run(tmp_path / "e", resume=str(ckpt), callback_kw={"resume_from": ckpt})
    _assert_bit_equal(resumed3, full)


def test_resume_from_anywhere_needs_no_resume_from_and_a_missing_state_is_refused(tmp_path):
    full, _ = _run(tmp_path / "a")
    # outside output_dir, callback only: the Trainer's load_adapter goes through the guard, which restores exactly
    resumed, method = _run(tmp_path / "d", resume=str(tmp_path / "a" / "checkpoint-3"))
    assert method.steps == 6
    _assert_bit_equal(resumed, full)
    (tmp_path / "a" / "checkpoint-3" / optlora.hf.STATE_FILE).unlink()
    with pytest.raises(RuntimeError, match="holds no optlora_state"):
        _run(tmp_path / "e", resume=str(tmp_path / "a" / "checkpoint-3"))


def test_trainer_checkpoint_loads_in_plain_peft_to_the_stated_error(tmp_path):
    """The adapter of a Trainer checkpoint is the accumulated update: plain PEFT on the original base gets the
    trained model to the error stated beside it (per layer in test_persist), not the 'adapter without the
    merged increments' that PEFT's own save would give."""
    import json

    import peft
    from eco_helpers import tiny_llama

    model, method = _run(tmp_path, steps=3)  # checkpoint-3 is the final state
    ckpt = tmp_path / "checkpoint-3"
    stated = json.loads((ckpt / "optlora_export.json").read_text())["rel_error"]
    assert 0 < stated <= optlora.persist.DEFAULT_TOL and method.method_steps == 2
    type(model).save_pretrained(model, tmp_path / "live")  # PEFT's own save, for comparison
    ids = TokenDataset(n=4).ids
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        got = peft.PeftModel.from_pretrained(tiny_llama(seed=5), ckpt).eval()(input_ids=ids).logits
        live = peft.PeftModel.from_pretrained(tiny_llama(seed=5), tmp_path / "live").eval()(input_ids=ids).logits
    err, err_live = float((got - want).abs().max()), float((live - want).abs().max())
    assert err < 0.02 * err_live, (err, err_live)


def test_a_trainer_without_the_callback_refuses_to_train_plain_lora(tmp_path):
    model = tiny_peft(seed=5)
    optlora.ScaLoRA(model, warmup_steps=1)  # built, but nothing attaches it to the Trainer's optimizer
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=TokenDataset(n=8))
    with pytest.raises(RuntimeError, match="not attached"):
        trainer.train()


def test_load_best_model_at_end_restores_that_method_state(tmp_path):
    model = tiny_peft(seed=5)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    args = _args(
        tmp_path,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        eval_strategy="steps",
        eval_steps=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,  # the *worse* (earlier) loss wins: checkpoint-2, not the final state
    )
    data = TokenDataset(n=8)
    cb = optlora.hf.callback(method)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data, callbacks=[cb])
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    saved = optlora.hf.read_state(trainer.state.best_model_checkpoint)
    assert method.steps == 2
    for f in method.factors:
        assert torch.equal(f.base_weight, saved["base_weights"][f.name.rsplit("[", 1)[0]])
        assert torch.equal(f.lora_A, saved["factors"][f.name]["lora_A"])


def test_run_shorter_than_warmup_warns_at_start_and_end(tmp_path):
    """max_steps <= warmup_steps: the run would be plain LoRA without a word; the callback says so, twice."""
    model = tiny_peft(seed=2)
    method = optlora.RefLoRA(model, warmup_steps=5)
    trainer = Trainer(model=model, args=_args(tmp_path, max_steps=2), train_dataset=TokenDataset(n=8))
    trainer.add_callback(optlora.hf.callback(method))
    with pytest.warns(UserWarning) as record:
        trainer.train()
    messages = [str(w.message) for w in record if "RefLoRA" in str(w.message)]
    assert any("will never be applied: the run has 2 optimizer steps and warmup_steps=5" in m for m in messages)
    assert any("has not been applied in 2 optimizer steps" in m for m in messages)
    assert method.method_steps == 0


def test_callback_rejects_non_method():
    with pytest.raises(TypeError, match="optlora method"):
        optlora.hf.callback(object())


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = tiny_tokenizer()
    model = tiny_peft(seed=2)
    model.config.pad_token_id, model.config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    method = optlora.RefLoRA(model, warmup_steps=1)
    before = _snapshot(model)

    class OptLoRASFTTrainer(optlora.hf.OptLoRAMixin, trl.SFTTrainer):
        pass

    cfg = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_length=16,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        learning_rate=1e-2,
    )
    ds = datasets.Dataset.from_dict({"text": tiny_texts(16)})
    trainer = OptLoRASFTTrainer(model=model, args=cfg, train_dataset=ds, processing_class=tok, method=method)
    trainer.train()
    assert trainer.optlora_method is method
    assert method.steps == 3 and method.method_steps == 2
    assert method.stats()["last_skipped_layers"] == []
    assert any(not torch.equal(before[k], v) for k, v in _snapshot(model).items())


@pytest.mark.parametrize("script,method", [("train_trainer", "scalora"), ("train_trl", "reflora_s")])
def test_examples_run(tmp_path, monkeypatch, script, method):
    pytest.importorskip("trl")
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    main = __import__(script).main
    argv = ["--method", method, "--steps", "4", "--samples", "32", "--warmup-steps", "1", "--interval", "1"]
    assert main([*argv, "--output-dir", str(tmp_path)]) == 0
    assert (tmp_path / "checkpoint-4" / optlora.hf.STATE_FILE).is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
