"""Data loaders for the fine-tuning experiments: GLUE SST-2 (TSV) and GSM8K (JSON lines).

The data are never part of the repository. By default they are looked up under
``../shared/data`` relative to the current working directory and relative to the repository
checkout that holds this package; ``data_dir`` (CLI ``--data-dir``) overrides both.

* SST-2: ``sentence<TAB>label`` with a header line (GLUE release).
* GSM8K: one JSON object per line with ``question`` and ``answer``; the final numeric answer
  follows ``#### `` at the end of ``answer`` (Cobbe et al., 2021).

For GSM8K the causal-LM loss is taken on the answer tokens only: prompt and padding positions
get label ``-100`` (ignored by ``CrossEntropyLoss``), see :func:`encode_gsm8k`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
IGNORE_INDEX = -100
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The folder that holds ``glue/`` and ``gsm8k/``.

    ``data_dir`` wins when given (it must exist); otherwise ``../shared/data`` relative to the
    current directory, then relative to the repository checkout of this package.
    """
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"data directory {p} does not exist")
        return p
    candidates = [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    raise FileNotFoundError(
        "no data directory found (looked at " + ", ".join(str(c) for c in candidates) + "); pass --data-dir"
    )


def _file(data_dir: str | Path | None, *parts: str) -> Path:
    path = resolve_data_dir(data_dir).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    return path


# ---------------------------------------------------------------------------------------- SST-2
def read_sst2(path: str | Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Sentences and 0/1 labels from a GLUE SST-2 TSV file (header ``sentence<TAB>label``)."""
    sentences, labels = [], []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["sentence", "label"]:
            raise ValueError(f"{path}: expected a header 'sentence<TAB>label', got {header!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < 2 or row[1].strip() not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {row!r}")
            sentences.append(row[0].strip())
            labels.append(int(row[1]))
            if limit is not None and len(sentences) >= limit:
                break
    return sentences, labels


def load_sst2(split: str, data_dir: str | Path | None = None, limit: int | None = None):
    """``split`` in {"train", "dev"}; returns ``(sentences, labels)``."""
    if split not in ("train", "dev"):
        raise ValueError(f"SST-2 split must be 'train' or 'dev', got {split!r}")
    return read_sst2(_file(data_dir, "glue", "SST-2", f"{split}.tsv"), limit)


def encode_sst2(tokenizer, sentences: list[str], labels: list[int], max_len: int) -> dict[str, torch.Tensor]:
    """Padded ``input_ids``/``attention_mask`` (+ ``token_type_ids``) and ``labels`` tensors."""
    enc = tokenizer(sentences, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    out = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    out["labels"] = torch.tensor(labels, dtype=torch.long)
    return out


# ---------------------------------------------------------------------------------------- GSM8K
@dataclass
class GSM8KExample:
    question: str
    answer: str  # full worked solution ending in "#### <number>"
    final: str  # the normalised final number


def normalize_number(text: str) -> str:
    """``"1,234.50"`` -> ``"1234.5"``; ``"7.0"`` -> ``"7"``; strips ``$`` and commas."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        v = float(t)
    except ValueError:
        return t
    return str(int(v)) if v == int(v) else repr(v)


def final_answer(answer: str) -> str:
    """The number after ``#### `` in a GSM8K answer (normalised)."""
    if "####" not in answer:
        raise ValueError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return normalize_number(answer.rsplit("####", 1)[1])


def extract_prediction(text: str) -> str | None:
    """The model's final number: after the first ``####`` if present, else the last number in ``text``."""
    if "####" in text:
        m = _NUMBER.search(text.split("####", 1)[1])
        if m:
            return normalize_number(m.group())
    nums = _NUMBER.findall(text)
    return normalize_number(nums[-1]) if nums else None


def read_gsm8k(path: str | Path, limit: int | None = None) -> list[GSM8KExample]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                q, a = rec["question"], rec["answer"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{path}:{lineno}: expected JSON with 'question' and 'answer' ({exc})") from exc
            out.append(GSM8KExample(q.strip(), a.strip(), final_answer(a)))
            if limit is not None and len(out) >= limit:
                break
    return out


def load_gsm8k(split: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[GSM8KExample]:
    """``split`` in {"train", "test"}."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K split must be 'train' or 'test', got {split!r}")
    return read_gsm8k(_file(data_dir, "gsm8k", f"{split}.jsonl"), limit)


def gsm8k_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def encode_gsm8k(tokenizer, examples: list[GSM8KExample], max_len: int) -> dict[str, torch.Tensor]:
    """Prompt + answer token ids, right-padded to ``max_len``; labels are ``-100`` on prompt and padding.

    The answer is `` <solution><eos>``; sequences longer than ``max_len`` are truncated on the
    right (the prompt is kept whole when it fits, so at least part of the answer is trained on).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = torch.full((len(examples), max_len), pad, dtype=torch.long)
    labels = torch.full((len(examples), max_len), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), max_len), dtype=torch.long)
    for i, ex in enumerate(examples):
        p = tokenizer(gsm8k_prompt(ex.question), add_special_tokens=True)["input_ids"]
        a = tokenizer(" " + ex.answer, add_special_tokens=False)["input_ids"] + eos
        seq = (p + a)[:max_len]
        n_prompt = min(len(p), max_len)
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
        labels[i, n_prompt : len(seq)] = ids[i, n_prompt : len(seq)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------- batching
def trim_padding(batch: dict[str, torch.Tensor], device=None) -> dict[str, torch.Tensor]:
    """Drop the right-padding columns no example of ``batch`` uses (dynamic padding), move to ``device``."""
    width = max(int(batch["attention_mask"].sum(1).max()), 1)
    return {k: (v[:, :width] if v.dim() == 2 else v).to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sst2(model, enc: dict[str, torch.Tensor], device, batch_size: int = 64) -> dict[str, float]:
    """Dev ``accuracy`` (scikit-learn) and mean cross-entropy ``eval_loss``."""
    from sklearn.metrics import accuracy_score

    was = model.training
    model.eval()
    preds, loss_sum = [], 0.0
    n = enc["labels"].shape[0]
    for i in range(0, n, batch_size):
        batch = trim_padding({k: v[i : i + batch_size] for k, v in enc.items()}, device)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()
        loss_sum += float(torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
    model.train(was)
    return {
        "accuracy": float(accuracy_score(enc["labels"].numpy(), torch.cat(preds).numpy())),
        "eval_loss": loss_sum / n,
    }


@torch.no_grad()
def answer_loss(model, enc: dict[str, torch.Tensor], device, batch_size: int = 8) -> float:
    """Mean token cross-entropy on answer tokens only (labels ``-100`` elsewhere)."""
    total, count = 0.0, 0
    for i in range(0, enc["labels"].shape[0], batch_size):
        batch = trim_padding({k: v[i : i + batch_size] for k, v in enc.items()}, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]),
                shift_labels.reshape(-1),
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
        )
        count += int((shift_labels != IGNORE_INDEX).sum())
    return total / max(count, 1)


@torch.no_grad()
def exact_match(model, tokenizer, examples: list[GSM8KExample], device, batch_size=8, max_new_tokens=160):
    """Fraction of ``examples`` whose greedy answer's final number equals the reference; also the texts."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    hits, texts = 0, []
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            enc = tokenizer([gsm8k_prompt(e.question) for e in chunk], return_tensors="pt", padding=True)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            for e, seq in zip(chunk, out[:, enc["input_ids"].shape[1] :]):
                text = tokenizer.decode(seq, skip_special_tokens=True)
                texts.append(text)
                hits += extract_prediction(text) == e.final
    finally:
        tokenizer.padding_side = side
    return hits / max(len(examples), 1), texts


def evaluate_gsm8k(model, tokenizer, enc, examples, device, batch_size=8, max_new_tokens=160) -> dict[str, float]:
    """``eval_loss`` (answer tokens of ``enc``) and greedy ``exact_match`` on ``examples``."""
    was = model.training
    model.eval()
    out = {"eval_loss": answer_loss(model, enc, device, batch_size)}
    if examples:
        out["exact_match"], _ = exact_match(model, tokenizer, examples, device, batch_size, max_new_tokens)
    model.train(was)
    return out
