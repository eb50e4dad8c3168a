"""Data loaders (SST-2 TSV, GSM8K JSONL) on small fixtures, and answer-only loss masking."""

from __future__ import annotations

import json

import pytest
import torch

from optlora.experiments import data as D
from optlora.experiments.models import tiny_causal_lm, tiny_tokenizer


def write_sst2(path, rows, header="sentence\tlabel"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header] + [f"{s}\t{y}" for s, y in rows]) + "\n", encoding="utf-8")


def write_gsm8k(path, pairs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs), encoding="utf-8")


def test_read_sst2_and_limit(tmp_path):
    rows = [("a fine film , really", 1), ('dull "quoted" mess', 0), ("ok", 1)]
    write_sst2(tmp_path / "glue" / "SST-2" / "train.tsv", rows)
    s, y = D.load_sst2("train", tmp_path)
    assert s == [r[0] for r in rows] and y == [1, 0, 1]
    s2, y2 = D.load_sst2("train", tmp_path, limit=2)
    assert (s2, y2) == (s[:2], y[:2])


@pytest.mark.parametrize(
    "header, rows, match",
    [("text\tlabel", [("x", 1)], "header"), ("sentence\tlabel", [("x", 2)], "0\\|1"), ("sentence\tlabel", [], None)],
)
def test_read_sst2_bad_input(tmp_path, header, rows, match):
    path = tmp_path / "d.tsv"
    write_sst2(path, rows, header)
    if match is None:
        assert D.read_sst2(path) == ([], [])
    else:
        with pytest.raises(ValueError, match=match):
            D.read_sst2(path)


def test_data_dir_resolution(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.resolve_data_dir(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="dev.tsv"):
        D.load_sst2("dev", tmp_path)
    with pytest.raises(ValueError, match="split"):
        D.load_sst2("test", tmp_path)
    assert D.resolve_data_dir(tmp_path) == tmp_path


def test_gsm8k_final_numbers(tmp_path):
    write_gsm8k(
        tmp_path / "gsm8k" / "test.jsonl",
        [("How many?", "2 + 3 = 5\n#### 5"), ("Cost?", "It is $1,250.\n#### 1,250"), ("Neg?", "#### -3")],
    )
    ex = D.load_gsm8k("test", tmp_path)
    assert [e.final for e in ex] == ["5", "1250", "-3"]
    assert ex[0].question == "How many?" and ex[0].answer.endswith("#### 5")
    assert D.extract_prediction("so 7 + 3 = 10\n#### 10 apples") == "10"
    assert D.extract_prediction("The answer is 1,250.00 dollars.") == "1250"
    assert D.extract_prediction("no number") is None
    with pytest.raises(ValueError, match="####"):
        D.final_answer("no marker 4")


def test_gsm8k_bad_json(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"question": "q"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="x.jsonl:1"):
        D.read_gsm8k(p)


def test_answer_only_masking():
    tok = tiny_tokenizer()
    ex = [D.GSM8KExample("What is 2+2?", "2+2=4\n#### 4", "4"), D.GSM8KExample("Q?", "1\n#### 1", "1")]
    enc = D.encode_gsm8k(tok, ex, max_len=64)
    for i, e in enumerate(ex):
        prompt = tok(D.gsm8k_prompt(e.question))["input_ids"]
        answer = tok(" " + e.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        n = len(prompt) + len(answer)
        assert enc["input_ids"][i, :n].tolist() == prompt + answer
        assert (enc["labels"][i, : len(prompt)] == D.IGNORE_INDEX).all()  # prompt masked
        assert enc["labels"][i, len(prompt) : n].tolist() == answer  # answer kept
        assert (enc["labels"][i, n:] == D.IGNORE_INDEX).all() and (enc["attention_mask"][i, n:] == 0).all()
    # truncation keeps the prompt and only the answer tokens that fit
    short = D.encode_gsm8k(tok, ex[:1], max_len=len(tok(D.gsm8k_prompt(ex[0].question))["input_ids"]) + 3)
    assert int((short["labels"] != D.IGNORE_INDEX).sum()) == 3


def test_answer_loss_matches_hf_and_ignores_prompt():
    tok = tiny_tokenizer()
    model = tiny_causal_lm(tok).eval()
    ex = [D.GSM8KExample("What is 2+2?", "2+2=4\n#### 4", "4"), D.GSM8KExample("Q?", "1\n#### 1", "1")]
    enc = D.encode_gsm8k(tok, ex, max_len=48)
    with torch.no_grad():
        hf = float(model(**enc).loss)  # transformers' shifted, -100-ignoring mean
        full = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, D.IGNORE_INDEX)
        all_tokens = float(model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=full).loss)
    ours = D.answer_loss(model, enc, "cpu", batch_size=8)
    assert ours == pytest.approx(hf, rel=1e-5)
    assert ours != pytest.approx(all_tokens, rel=1e-4)  # the prompt really is excluded


def test_real_sst2_dev_if_present():
    try:
        s, y = D.load_sst2("dev")
    except FileNotFoundError as exc:
        pytest.skip(f"real SST-2 data not available: {exc}")
    assert len(s) == 872 and set(y) == {0, 1}
