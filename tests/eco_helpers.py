"""Shared helpers of the ecosystem tests (test_hf, test_export, test_distributed): tiny offline models and data."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from optlora.testing import models  # noqa: E402

# 2 shared cores: intra-op threads oversubscribe and make tiny models ~100x slower.
torch.set_num_threads(1)

VOCAB = 64


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A 2-layer Llama built from a config (no download), deterministic given ``seed``."""
    return models.tiny_llama(vocab=VOCAB, seed=seed, dtype=dtype)


def lora_config(r: int = 4, **kw) -> peft.LoraConfig:
    kw.setdefault("target_modules", ["q_proj", "v_proj", "up_proj", "down_proj"])
    return peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, task_type="CAUSAL_LM", **kw)


def tiny_peft(seed: int = 0, r: int = 4, init_b: bool = True, **kw):
    """PEFT-wrapped tiny Llama; ``init_b`` gives lora_B small random values (so methods act from step 1)."""
    model = peft.get_peft_model(tiny_llama(seed), lora_config(r, **kw))
    if init_b:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def token_batches(n: int, seq: int = 12, seed: int = 0) -> torch.Tensor:
    """``n`` rows of random token ids (a learnable pattern: each row is a repeated short motif)."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, VOCAB, (n, 3), generator=g)
    return motif.repeat(1, seq // 3 + 1)[:, :seq]


class TokenDataset(torch.utils.data.Dataset):
    """Causal-LM examples (input_ids, labels) for ``Trainer``."""

    def __init__(self, n: int = 16, seq: int = 12, seed: int = 0):
        self.ids = token_batches(n, seq, seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i].clone()}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``w0 .. w59`` plus specials (ids < VOCAB), built offline."""
    return models.word_tokenizer(VOCAB - 4)


def tiny_texts(n: int = 16, seed: int = 0) -> list[str]:
    return [" ".join(f"w{int(t) % (VOCAB - 4)}" for t in row) for row in token_batches(n, 9, seed)]
