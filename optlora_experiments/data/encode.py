"""Rows -> ``datasets.Dataset`` of token ids, padded later per batch by a data collator.

* classification / regression: ``input_ids``, ``attention_mask`` (``token_type_ids``) and
  ``labels`` (int class ids, or floats for regression); pairs are truncated longest-first;
  ``DataCollatorWithPadding`` pads each batch.
* generation: prompt + completion + EOS; ``labels`` are ``-100`` on the prompt, so the loss is
  taken on the answer tokens only; ``DataCollatorForSeq2Seq`` pads ids and labels (labels with
  ``-100``). A completion is cut at ``max_len``; an example whose prompt alone fills ``max_len``
  has no answer token to learn from and is dropped (:func:`encode_causal` reports how many).
"""

from __future__ import annotations

IGNORE_INDEX = -100


def encode_classification(tokenizer, rows: list[dict], max_len: int, regression: bool = False):
    """A ``datasets.Dataset`` for a sequence-classification model."""
    import datasets

    texts = [r["text"] for r in rows]
    pairs = [r["text_pair"] for r in rows] if rows and rows[0].get("text_pair") is not None else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_len)
    cols = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
    cols["labels"] = [float(r["label"]) if regression else int(r["label"]) for r in rows]
    return datasets.Dataset.from_dict(cols)


def causal_ids(tokenizer, prompt: str, completion: str, max_len: int) -> tuple[list[int], list[int]] | None:
    """``(input_ids, labels)`` of prompt + completion + EOS with the prompt masked, or None if no answer token fits."""
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    a = tokenizer(completion, add_special_tokens=False)["input_ids"] + eos
    if len(p) >= max_len:
        return None
    ids = (p + a)[:max_len]
    return ids, [IGNORE_INDEX] * len(p) + ids[len(p) :]


def encode_causal(tokenizer, rows: list[dict], max_len: int):
    """``(dataset, dropped)``: a causal-LM ``datasets.Dataset`` with answer-only labels, and the rows dropped."""
    import datasets

    ids, labels, dropped = [], [], 0
    for r in rows:
        out = causal_ids(tokenizer, r["prompt"], r["completion"], max_len)
        if out is None:
            dropped += 1
            continue
        ids.append(out[0])
        labels.append(out[1])
    ds = datasets.Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": labels})
    return ds, dropped


def collator(tokenizer, kind: str):
    """The data collator for ``kind`` (dynamic padding to the longest sequence of the batch)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if kind == "generation":
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)
