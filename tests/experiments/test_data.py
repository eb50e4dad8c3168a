"""Loaders: GLUE header detection, LLM-Adapters / GSM8K, where data is looked up, clear errors, the hub path."""

from __future__ import annotations

import json
import sys
import types

import pytest

from optlora_experiments.data import DataError, adapters, glue, load_task, sources
from optlora_experiments.data.encode import IGNORE_INDEX, encode_causal, encode_classification
from optlora_experiments.models import tiny_tokenizer

from .datafix import write_tsv


@pytest.mark.parametrize(
    "task, kind, metrics, first",
    [
        ("sst2", "classification", ("accuracy",), ("text", None)),
        ("cola", "classification", ("matthews", "accuracy"), ("text", None)),
        ("mrpc", "classification", ("accuracy", "f1"), ("text", "text_pair")),
        ("stsb", "regression", ("pearson", "spearman"), ("text", "text_pair")),
        ("rte", "classification", ("accuracy",), ("text", "text_pair")),
    ],
)
def test_glue_formats(data_root, task, kind, metrics, first):
    d = load_task(task, data_root)
    assert (d.kind, d.metrics, list(d.evals)) == (kind, metrics, ["dev"])
    assert len(d.train) == 48 and len(d.evals["dev"]) == 16
    row = d.train[0]
    assert row["text"] and (row["text_pair"] is None) == (first[1] is None)
    if kind == "regression":
        assert d.num_labels == 1 and isinstance(row["label"], float)
    else:
        assert d.num_labels == 2 and {r["label"] for r in d.train} <= {0, 1}
    if task == "rte":  # string labels in the hub's order
        assert d.label_names == ["entailment", "not_entailment"]
    if task == "cola":  # headerless: the sentence is column 4, the label column 2
        assert all(r["text"].startswith("the cat") for r in d.train)
        assert all((r["text"] == "the cat sat") == (r["label"] == 1) for r in d.train)


def test_glue_header_detection_mnli_qqp_and_malformed_rows(tmp_path):
    write_tsv(tmp_path / "MNLI" / "train.tsv", ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"],
              [(0, "g", "a", "b", "neutral", "neutral"), (1, "g", "c", "d", "x", "contradiction")])  # fmt: skip
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", ["index", "genre", "sentence1", "sentence2", "label1", "gold_label"],
              [(0, "g", "a", "b", "e", "entailment")])  # fmt: skip
    d = load_task("mnli", tmp_path)
    assert d.label_names == ["entailment", "neutral", "contradiction"]
    assert [r["label"] for r in d.train] == [1, 2] and d.evals["dev"][0]["label"] == 0
    path = tmp_path / "QQP" / "train.tsv"
    write_tsv(path, ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"], [(0, 1, 2, "q a", "q b", 1)])
    with open(path, "a") as fh:
        fh.write("1\t3\tbroken line\n")
    table = glue.read_tsv(path)
    assert table.skipped == 1 and table.rows == [{"text": "q a", "text_pair": "q b"}]
    write_tsv(tmp_path / "bad.tsv", ["what", "ever"], [("x", "y")])
    with pytest.raises(DataError, match="unrecognised GLUE header"):
        glue.read_tsv(tmp_path / "bad.tsv")


def test_any_glue_folder_by_path_and_by_name(data_root, tmp_path):
    mine = tmp_path / "MyTask"
    write_tsv(mine / "train.tsv", ["sentence1", "sentence2", "label"], [("a", "b", "yes"), ("c", "d", "no")] * 3)
    write_tsv(mine / "dev.tsv", ["sentence1", "sentence2", "label"], [("a", "b", "no")])
    d = load_task(str(mine))
    assert (d.name, d.kind, d.label_names, d.metrics) == ("MyTask", "classification", ["no", "yes"], ("accuracy",))
    assert load_task("mytask", tmp_path).name == "MyTask"  # a folder of that name under --data-dir
    write_tsv(mine / "dev.tsv", ["sentence1", "sentence2", "label"], [("a", "b", "maybe")])
    with pytest.raises(DataError, match="not one of the training labels"):
        load_task(str(mine))


def test_data_dir_may_be_the_task_folder_or_any_parent(data_root):
    for where in (data_root, data_root / "glue", data_root / "glue" / "SST-2"):
        d = load_task("sst2", where)
        assert d.sources["train"] == str(data_root / "glue" / "SST-2" / "train.tsv")
    # another task's folder is never read as this task
    with pytest.raises(DataError, match="no GLUE-format data for 'sst2'"):
        load_task("sst2", data_root / "glue" / "MRPC")


def test_wrong_data_dir_is_one_clear_sentence(data_root, tmp_path):
    with pytest.raises(DataError) as exc:
        load_task("sst2", tmp_path / "nope")
    msg = str(exc.value)
    assert "does not exist" in msg and "\n" not in msg
    with pytest.raises(DataError) as exc:
        load_task("sst2", tmp_path)  # exists, but holds no SST-2: where we looked and what to do
    msg = str(exc.value)
    assert "pass --data-dir" in msg and "glue/SST-2" in msg and "glue/glue" not in msg


def test_commonsense_math_and_gsm8k(data_root):
    cs = load_task("commonsense", data_root, train_sets=["boolq"], eval_sets=["boolq", "piqa"])
    assert cs.kind == "generation" and list(cs.evals) == ["boolq", "piqa"] and len(cs.train) == 24
    row = cs.train[0]
    assert row["prompt"].endswith("### Response:\n") and "Answer format: true/false" in row["prompt"]
    assert row["completion"].startswith("the correct answer is") and row["answer_type"] == "option"
    m = load_task("math", data_root, eval_sets=["gsm8k", "SVAMP", "AQuA"])
    assert len(m.train) == 24 + 8 and {r["dataset"] for r in m.train} == {"gsm8k", "train_math_data"}
    assert [m.evals[s][0]["answer_type"] for s in ("gsm8k", "SVAMP", "AQuA")] == ["number", "number", "letter"]
    g = load_task("gsm8k", data_root)
    assert g.evals["gsm8k"][0]["completion"].endswith(f"#### {g.evals['gsm8k'][0]['answer']}")
    match = load_task("gsm8k_match", data_root)
    assert match.kind == "classification" and match.label_names == ["other", "own"] and len(match.train) == 24
    own = {r["question"]: adapters.first_step(r["answer"]) for r in load_task_records(data_root)}
    assert all((own[r["text"]] == r["text_pair"]) == bool(r["label"]) for r in match.train)
    assert sum(r["label"] for r in match.train) == 12 and len({r["text"] for r in match.train}) == len(own)
    assert load_task("boolq", data_root / "commonsense" / "boolq").name == "boolq"
    with pytest.raises(DataError, match="no SVAMP train data"):
        load_task("SVAMP", data_root)  # no train split offline: a clear message


def load_task_records(root):
    from optlora_experiments.data import gsm8k_records

    return gsm8k_records("train", root)[0]


def test_gsm8k_answers_and_first_steps():
    assert adapters.gsm8k_final("so 3+4=7\n#### 1,250") == "1250"
    assert (
        adapters.first_step("Half is 10/2=<<10/2=5>>5 apples.\nSo 5+1=<<5+1=6>>6\n#### 6") == "Half is 10/2=5 apples."
    )
    with pytest.raises(DataError, match="####"):
        adapters.gsm8k_final("no marker")


def test_llm_adapters_format_errors(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("[{'bad': json}]")
    with pytest.raises(DataError, match="not valid JSON"):
        adapters.read_adapters_json(p, "x")
    p.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(DataError, match="lacks 'instruction'"):
        adapters.read_adapters_json(p, "x")


def test_sample_only_when_allowed_and_gz_files(no_shared):
    with pytest.raises(DataError, match="unset HF_HUB_OFFLINE"):
        load_task("gsm8k_match")
    d = load_task("gsm8k_match", allow_sample=True)
    assert d.sources["train"].endswith("sample/gsm8k/train.jsonl.gz") and len(d.train) == 1000
    assert len(d.evals["test"]) == 500 and sum(r["label"] for r in d.train) == 500


def test_hub_loading_uses_the_documented_ids(no_shared, monkeypatch):
    calls = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        if args[0] == "nyu-mll/glue":
            feats = types.SimpleNamespace(names=["unacceptable", "acceptable"])
            return _FakeDataset([{"sentence": "s", "label": 1, "idx": 0}] * 3, {"label": feats})
        if args[0] == "openai/gsm8k":
            return _FakeDataset([{"question": "q", "answer": "a <<6/3=2>>2\n#### 2"}] * 2)
        if args[0] == "json":
            return _FakeDataset([{"instruction": "i", "input": "", "output": "o", "answer": "true"}] * 2)
        raise AssertionError(args)

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(sources, "hub_reachable", lambda: True)  # the fake datasets below stand for the hub
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    d = load_task("cola")
    assert d.sources["train"] == "hub: nyu-mll/glue cola" and d.label_names == ["0", "1"] and d.train[0]["label"] == 1
    assert calls[0] == (("nyu-mll/glue", "cola"), {"split": "train"}) and calls[1][1] == {"split": "validation"}
    assert load_task("gsm8k_match").train[0]["text_pair"] == "a 2"  # the first step, annotation removed
    assert calls[-1] == (("openai/gsm8k", "main"), {"split": "test"})
    load_task("boolq")
    assert calls[-1][1]["data_files"] == adapters.LLM_ADAPTERS_RAW + "dataset/boolq/test.json"
    load_task("math", train_sets=["train_math_data"], eval_sets=["SVAMP"])
    assert calls[-2][1]["data_files"].endswith("ft-training_set/math_data.json")

    def broken(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=broken))
    with pytest.raises(DataError, match="could not load GLUE sst2 .* from the hub .*ConnectionError"):
        load_task("sst2")
    # online without a network: the demo still falls back to the embedded sample
    assert load_task("gsm8k_match", allow_sample=True).sources["test"].endswith("sample/gsm8k/test.jsonl.gz")


class _FakeDataset(list):
    def __init__(self, rows, features=None):
        super().__init__(rows)
        self.column_names = list(rows[0])
        self.features = features or {}


def test_unknown_task_and_bad_combinations(data_root):
    with pytest.raises(DataError, match="unknown task 'nosuch'"):
        load_task("nosuch", data_root)
    with pytest.raises(DataError, match="apply to generation tasks"):
        load_task("sst2", data_root, eval_sets=["boolq"])
    with pytest.raises(DataError, match="does not exist"):
        sources.candidate_roots("/no/such/dir")


def test_encode_classification_and_answer_only_labels(data_root):
    tok = tiny_tokenizer()
    d = load_task("mrpc", data_root)
    ds = encode_classification(tok, d.train[:4], max_len=16)
    assert set(ds.column_names) >= {"input_ids", "attention_mask", "labels"} and len(ds) == 4
    assert max(len(x) for x in ds["input_ids"]) <= 16
    g = load_task("gsm8k", data_root)
    rows = g.train[:3]
    enc, dropped = encode_causal(tok, rows, max_len=512)
    assert dropped == 0
    for r, ids, labels in zip(rows, enc["input_ids"], enc["labels"]):
        n_prompt = len(tok(r["prompt"])["input_ids"])
        assert all(x == IGNORE_INDEX for x in labels[:n_prompt])  # the prompt is not trained on
        assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tok.eos_token_id  # the answer and EOS are
    _, dropped = encode_causal(tok, rows, max_len=20)  # prompts longer than max_len: nothing to learn
    assert dropped == 3


def test_real_shared_data_if_present():
    try:
        d = load_task("mrpc")
    except DataError as exc:
        pytest.skip(f"no ../shared/data: {exc}")
    assert len(d.train) == 3668 and len(d.evals["dev"]) == 408 and d.num_labels == 2
    s = load_task("stsb")
    assert len(s.evals["dev"]) == 1500 and s.kind == "regression"
    assert len(load_task("cola").train) == 8551
