"""LLM-Adapters-format sets (commonsense and math) and GSM8K, as instruction -> response examples.

**LLM-Adapters format** (Hu et al., 2023, AGI-Edgerunners/LLM-Adapters; data under ODC-By 1.0):
a JSON list of ``{"instruction", "input", "output", "answer"}``. Commonsense sets answer with an
option word (``true/false``, ``solution1/2``, ``answer1..5``, ``option1/2``, ``ending1..4``),
math sets with a number, AQuA with a letter. **GSM8K** (Cobbe et al., 2021; MIT) is JSON lines
with ``question`` and ``answer``, the final number after ``#### ``.

Rows are ``{"prompt", "completion", "answer", "answer_type", "dataset"}``: the prompt is the
Alpaca/LLM-Adapters template (without the stray indentation of their source file), the
completion is ``output`` (GSM8K: the worked solution), ``answer`` the gold answer and
``answer_type`` one of ``"number"``, ``"letter"``, ``"option"``. Scoring follows LLM-Adapters'
``evaluate.py`` / ``commonsense_evaluate.py`` (see :mod:`optlora_experiments.metrics`).

Online, the sets load from the LLM-Adapters repository through
``datasets.load_dataset("json", data_files=URL)`` (:func:`hub_url`) and GSM8K from
``openai/gsm8k`` (config ``main``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .sources import DataError, open_text

LLM_ADAPTERS_RAW = "https://raw.githubusercontent.com/AGI-Edgerunners/LLM-Adapters/main/"
COMMONSENSE_SETS = (
    "boolq",
    "piqa",
    "social_i_qa",
    "hellaswag",
    "winogrande",
    "ARC-Challenge",
    "ARC-Easy",
    "openbookqa",
)
#: the commonsense sets whose train split is in ../shared/data (the 170k mix is not)
COMMONSENSE_TRAIN = ("boolq", "ARC-Easy", "ARC-Challenge", "openbookqa")
MATH_SETS = ("gsm8k", "SVAMP", "AddSub", "MultiArith", "SingleEq", "AQuA", "mawps")
MATH_TRAIN = ("gsm8k", "train_math_data")
MATH_EVAL = ("gsm8k", "SVAMP")
#: training mixes published as one file in the LLM-Adapters repository (``ft-training_set/``)
MIX_FILES = {"train_math_data": "math_data", "math_data": "math_data", "math_10k": "math_10k",
             "commonsense_170k": "commonsense_170k", "commonsense_15k": "commonsense_15k"}  # fmt: skip

_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
_TEMPLATE_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
_LETTER = re.compile(r"^[A-E]$")


def prompt(instruction: str, inp: str = "") -> str:
    """The LLM-Adapters (Alpaca) prompt; the model continues after ``### Response:``."""
    if inp:
        return _TEMPLATE_INPUT.format(instruction=instruction.strip(), input=inp.strip())
    return _TEMPLATE.format(instruction=instruction.strip())


def answer_type(answers: list[str]) -> str:
    """``"number"`` if every answer parses as a float, ``"letter"`` for A-E, else ``"option"`` (a word)."""

    def is_num(a):
        try:
            float(str(a).replace(",", ""))
            return True
        except ValueError:
            return False

    if answers and all(is_num(a) for a in answers):
        return "number"
    if answers and all(_LETTER.match(str(a).strip()) for a in answers):
        return "letter"
    return "option"


def read_adapters_json(path: str | Path, dataset: str) -> list[dict]:
    """Rows of an LLM-Adapters JSON file (``.json`` or ``.json.gz``)."""
    try:
        with open_text(path) as fh:
            data = json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON ({exc}); expected a list of instruction/output/answer records"
        ) from exc
    return from_records(data, dataset, str(path))


def from_records(data, dataset: str, where: str) -> list[dict]:
    """Rows from LLM-Adapters records (a list of dicts, or a ``datasets.Dataset``)."""
    recs = list(data) if not isinstance(data, list) else data
    if not recs:
        raise DataError(f"{where} holds no records")
    bad = next(
        (i for i, r in enumerate(recs) if not isinstance(r, dict) or "instruction" not in r or "answer" not in r), None
    )
    if bad is not None:
        raise DataError(f"{where}: record {bad} lacks 'instruction'/'answer'; expected the LLM-Adapters JSON format")
    kind = answer_type([str(r["answer"]).strip() for r in recs])
    return [
        {
            "prompt": prompt(str(r["instruction"]), str(r.get("input") or "")),
            "completion": str(r.get("output") or r["answer"]).strip(),
            "answer": str(r["answer"]).strip(),
            "answer_type": kind,
            "dataset": dataset,
        }
        for r in recs
    ]


# ---------------------------------------------------------------------------------------- GSM8K
_ANNOTATION_FULL = re.compile(r"<<[^>]*>>")


def gsm8k_final(answer: str) -> str:
    """The number after ``#### `` in a GSM8K solution (commas and ``$`` removed)."""
    if "####" not in answer:
        raise DataError(f"GSM8K answer without '####': {answer[-80:]!r}")
    return answer.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "")


def first_step(answer: str) -> str:
    """The first line of a GSM8K solution, without its calculator annotations ``<<...>>``."""
    return _ANNOTATION_FULL.sub("", answer.strip().split("\n", 1)[0]).strip()


def match_rows(records: list[dict], seed: int = 0) -> list[dict]:
    """GSM8K as pair classification: does this first solution step belong to this problem?

    The problems are put in a ``random.Random(seed)`` order; every other one (positions 0, 2, ...)
    is paired with the first step of its own solution (label 1), the others with the first step of
    the next problem's solution in that order (label 0). Each problem appears once; the labels are
    balanced.
    """
    import random

    order = random.Random(seed).sample(range(len(records)), len(records))
    out = []
    for k, i in enumerate(order):
        own = k % 2 == 0
        j = i if own else order[(k + 1) % len(order)]
        out.append({"text": records[i]["question"], "text_pair": first_step(records[j]["answer"]), "label": int(own)})
    return out


def read_gsm8k_jsonl(path: str | Path) -> list[dict]:
    """``[{"question", "answer"}]`` from a GSM8K JSON-lines file (``.jsonl`` or ``.jsonl.gz``)."""
    out = []
    with open_text(path) as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out.append({"question": str(rec["question"]).strip(), "answer": str(rec["answer"]).strip()})
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object with 'question' and 'answer' ({exc})"
                ) from exc
    if not out:
        raise DataError(f"{path} holds no GSM8K records")
    return out


def gsm8k_rows(records: list[dict]) -> list[dict]:
    """GSM8K records as generation rows (the solution is the completion, the final number the answer)."""
    return [
        {
            "prompt": prompt(r["question"]),
            "completion": r["answer"],
            "answer": gsm8k_final(r["answer"]),
            "answer_type": "number",
            "dataset": "gsm8k",
        }
        for r in records
    ]


def gsm8k_from_hub(split: str) -> list[dict]:
    """GSM8K records (``train`` / ``test``) from ``openai/gsm8k``, config ``main``."""
    from .sources import load_hub

    ds = load_hub(f"GSM8K ({split})", "openai/gsm8k", "main", split=split)
    return [{"question": ex["question"].strip(), "answer": ex["answer"].strip()} for ex in ds]


def hub_url(dataset: str, split: str) -> str:
    """The public JSON file of an LLM-Adapters set (``dataset/<set>/<split>.json``) or training mix."""
    if dataset in MIX_FILES:
        return f"{LLM_ADAPTERS_RAW}ft-training_set/{MIX_FILES[dataset]}.json"
    return f"{LLM_ADAPTERS_RAW}dataset/{dataset}/{split}.json"


def adapters_from_hub(dataset: str, split: str) -> list[dict]:
    """An LLM-Adapters set from its public JSON via ``datasets.load_dataset("json", data_files=URL)``."""
    from .sources import load_hub

    url = hub_url(dataset, split)
    ds = load_hub(f"{dataset} ({split}) from {url}", "json", data_files=url, split="train")
    return from_records([dict(ex) for ex in ds], dataset, url)
