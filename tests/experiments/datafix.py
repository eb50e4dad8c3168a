"""Small data folders in the real formats (GLUE TSV, LLM-Adapters JSON, GSM8K JSONL) for the experiment tests."""

from __future__ import annotations

import gzip
import json
import random


def write_tsv(path, header, rows, bom=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, r)) for r in rows]
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


def write_json(path, records, gz=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")


def adapters_record(instruction, answer, output=None):
    return {
        "instruction": instruction,
        "input": "",
        "output": output or f"the correct answer is {answer}",
        "answer": answer,
    }


def gsm8k_record(a, b, op="+"):
    value = a + b if op == "+" else a // b
    return {"question": f"What is {a}{op}{b}?", "answer": f"{a}{op}{b}=<<{a}{op}{b}={value}>>{value}\n#### {value}"}


def make_data_root(root, seed=0):
    """Every format under ``root`` (laid out like ../shared/data); small and learnable."""
    rng = random.Random(seed)
    glue = root / "glue"
    for split, n in (("train", 48), ("dev", 16)):
        ys = [rng.randint(0, 1) for _ in range(n)]
        write_tsv(
            glue / "SST-2" / f"{split}.tsv",
            ["sentence", "label"],
            [(f"a {'good' if y else 'bad'} film", y) for y in ys],
        )
        write_tsv(
            glue / "CoLA" / f"{split}.tsv", None, [("gj04", y, "", f"the cat {'sat' if y else 'sat sat'}") for y in ys]
        )
        write_tsv(glue / "MRPC" / f"{split}.tsv", ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"],
                  [(y, i, i + 1, "a b c", "a b c" if y else "x y z") for i, y in enumerate(ys)], bom=split == "dev")  # fmt: skip
        write_tsv(glue / "STS-B" / f"{split}.tsv", ["index", "genre", "sentence1", "sentence2", "score"],
                  [(i, "g", "a b", "a b" if y else "c d", f"{4.0 * y + rng.random():.3f}") for i, y in enumerate(ys)])  # fmt: skip
        write_tsv(glue / "RTE" / f"{split}.tsv", ["index", "sentence1", "sentence2", "label"],
                  [(i, "p", "h", "entailment" if y else "not_entailment") for i, y in enumerate(ys)])  # fmt: skip
    cs = root / "commonsense"
    for split, n in (("train", 24), ("test", 6)):
        ys = [rng.choice(["true", "false"]) for _ in range(n)]
        write_json(
            cs / "boolq" / f"{split}.json",
            [adapters_record(f"question {i}? Answer format: true/false", y) for i, y in enumerate(ys)],
        )
    write_json(
        cs / "piqa" / "test.json",
        [adapters_record("goal? Solution1: a Solution2: b", f"solution{1 + i % 2}") for i in range(4)],
    )
    math_ = root / "math"
    write_json(
        math_ / "SVAMP" / "test.json",
        [adapters_record(f"{i} plus 1?", f"{i + 1}.0", output=f"The answer is {i + 1}.") for i in range(4)],
    )
    write_json(
        math_ / "AQuA" / "test.json",
        [adapters_record("Pick. Answer Choices: (A) 1 (B) 2", "AB"[i % 2]) for i in range(4)],
    )
    write_json(
        math_ / "train_math_data.json",
        [adapters_record(f"{i} plus 2?", f"{i + 2}.0", output=f"The answer is {i + 2}.") for i in range(8)],
    )
    g = root / "gsm8k"
    g.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 24), ("test", 6)):
        recs = [gsm8k_record(rng.randint(1, 9), rng.randint(1, 3), rng.choice("+/")) for _ in range(n)]
        (g / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return root
