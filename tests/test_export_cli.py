"""``optlora export`` (optlora.export_cli): a Trainer-style checkpoint exported from the command line."""

from __future__ import annotations

import argparse
import json

import peft
import pytest
import torch
from eco_helpers import tiny_llama
from test_export import SEED, _logits, _train
from transformers import AutoModelForCausalLM

import optlora.hf
from optlora import export_cli


@pytest.fixture(scope="module")
def scalora_model():
    model, method = _train(optlora.ScaLoRA, kappa=0.5)
    assert method.method_steps == 5
    return model, method


def _cli(argv) -> int:
    parser = argparse.ArgumentParser()
    export_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", *argv])
    return args.func(args)


def test_cli_export_from_checkpoint(scalora_model, tmp_path):
    model, method = scalora_model
    base_dir, ckpt = tmp_path / "base", tmp_path / "ckpt"
    tiny_llama(SEED).save_pretrained(base_dir)
    model.save_pretrained(ckpt)
    optlora.hf.save_state(method, ckpt)
    want = _logits(model)

    assert _cli(["--checkpoint", str(ckpt), "--base", str(base_dir), "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(merged), want, rtol=1e-5, atol=1e-5)

    out, rep = tmp_path / "a", tmp_path / "r.json"
    argv = ["--checkpoint", str(ckpt), "--base", str(base_dir), "--out", str(out), "--format", "adapter"]
    assert _cli([*argv, "--tol", "0.0001", "--report-json", str(rep)]) == 0
    assert json.loads(rep.read_text())["rel_error"] <= 1e-4
    loaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), out).eval()
    torch.testing.assert_close(_logits(loaded), want, rtol=1e-3, atol=1e-3)

    assert _cli(["--checkpoint", str(ckpt), "--out", str(out)]) == 2  # built from a config: no base recorded
    assert _cli([*argv]) == 2  # adapter without --rank/--tol


def test_the_recorded_base_is_the_default(scalora_model, tmp_path, capsys):
    model, method = scalora_model
    base_dir, ckpt = tmp_path / "base", tmp_path / "ckpt"
    tiny_llama(SEED).save_pretrained(base_dir)
    model.save_pretrained(ckpt)
    config = json.loads((ckpt / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base_dir)  # what a model loaded from base_dir records
    (ckpt / "adapter_config.json").write_text(json.dumps(config))
    assert _cli(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m")]) == 0
    assert f"base model: {base_dir} (recorded in the checkpoint)" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(_logits(merged), _logits(model), rtol=1e-5, atol=1e-5)
    assert _cli(["--checkpoint", str(ckpt), "--out", str(tmp_path / "m2"), "--base", str(tmp_path / "nowhere")]) == 2
    assert "cannot load the base model" in capsys.readouterr().err


def test_the_tiny_alias_of_finetune_works_in_export(tmp_path):
    from optlora_experiments.models import tiny_causal_lm, tiny_tokenizer

    tok = tiny_tokenizer()
    model = peft.get_peft_model(
        tiny_causal_lm(tok), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    )
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    method.attach(opt)
    ids = torch.randint(0, len(tok), (4, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    model.save_pretrained(tmp_path / "ckpt")
    assert _cli(["--checkpoint", str(tmp_path / "ckpt"), "--base", "tiny", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
