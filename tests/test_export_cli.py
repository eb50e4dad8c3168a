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

    assert _cli(["--checkpoint", str(ckpt), "--out", str(out)]) == 2  # missing --base
    assert _cli([*argv]) == 2  # adapter without --rank/--tol
