"""GLUE metrics against their definitions, LLM-Adapters' answer extraction, paired tests against scipy's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from optlora_experiments import metrics as M


def test_classification_metrics_match_their_definitions():
    labels = np.array([1, 1, 0, 0, 1, 0, 1, 1])
    pred = np.array([1, 0, 0, 1, 1, 0, 1, 0])
    logits = np.stack([1 - pred, pred], 1).astype(float)
    tp, tn, fp, fn = 3, 2, 1, 2
    out = M.classification_metrics(logits, labels, ("accuracy", "f1", "matthews"))
    assert out["accuracy"] == pytest.approx((tp + tn) / 8)
    assert out["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert out["matthews"] == pytest.approx(mcc)
    assert set(M.classification_metrics(logits, labels)) == {"accuracy"}


def test_regression_metrics():
    y = np.array([0.0, 1.0, 2.0, 3.0, 5.0])
    p = np.array([0.1, 0.9, 2.5, 2.9, 4.0])
    out = M.regression_metrics(p[:, None], y)
    assert out["pearson"] == pytest.approx(np.corrcoef(p, y)[0, 1])
    assert out["spearman"] == pytest.approx(1.0)  # same order
    assert math.isnan(M.regression_metrics(np.ones(5), y)["pearson"])  # constant predictions: undefined, not an error


def test_compute_metrics_for_the_trainer():
    from transformers import EvalPrediction

    fn = M.compute_metrics_fn("classification", ("accuracy", "f1"))
    out = fn(EvalPrediction(predictions=np.array([[0.0, 1.0], [1.0, 0.0]]), label_ids=np.array([1, 1])))
    assert out == {"accuracy": 0.5, "f1": pytest.approx(2 / 3)}
    assert M.majority_baseline([1, 1, 0]) == pytest.approx(2 / 3)


@pytest.mark.parametrize(
    "response, kind, gold, correct",
    [
        ("the correct answer is true", "option", "true", True),
        ("false. It is true that ...", "option", "true", False),  # the FIRST option word counts
        ("answer1 is wrong, the answer is answer3", "option", "answer3", False),
        ("The answer is 1,250.", "number", "1250.0", True),
        ("3 + 4 = 7. The answer is 7.0005", "number", "7", True),  # within LLM-Adapters' 0.001
        ("3 + 4 = 7. The answer is 7.01", "number", "7", False),
        ("so 48+24=72\n#### 72\n\nQuestion: what is 5+5? 10", "number", "72", True),  # text after #### is not read
        ("no number here", "number", "3", False),
        ("The answer is (B).", "letter", "B", True),  # LLM-Adapters: the first capital A-E
        ("A bit of thought gives (B).", "letter", "B", False),  # ... even when it is a word
        ("Rationale ... so (D)", "letter", "D", True),
    ],
)
def test_answer_extraction(response, kind, gold, correct):
    opts = M.option_pattern(["true", "false", "answer1", "answer3"]) if kind == "option" else None
    assert M.is_correct(M.extract(response, kind, opts), gold, kind) is correct


def test_letter_rule_is_llm_adapters_first_capital():
    assert M.extract("A: the answer is C", "letter") == "A"  # their rule is naive; reproduced as is
    assert M.extract("x (E)", "letter") == "E"


def test_generation_accuracy_builds_the_option_set_from_the_answers():
    rows = [{"answer": a, "answer_type": "option"} for a in ("answer1", "answer10", "answer2")]
    assert M.generation_accuracy(rows, ["answer1", "it is answer10", "answer1"]) == pytest.approx(2 / 3)


def test_paired_tests_against_the_formulas():
    from scipy import stats

    a, b = [0.81, 0.84, 0.80, 0.86], [0.80, 0.82, 0.80, 0.83]
    out = M.paired_tests(a, b)
    d = np.array(a) - np.array(b)
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    assert out["pairs"] == 4 and out["diff_mean"] == pytest.approx(d.mean())
    assert out["ttest_p"] == pytest.approx(2 * stats.t.sf(abs(t), len(d) - 1))
    assert out["wilcoxon_p"] == pytest.approx(stats.wilcoxon(d).pvalue)
    same = M.paired_tests([0.5, 0.6], [0.5, 0.6])
    assert same["diff_mean"] == 0 and same["ttest_p"] is None and same["wilcoxon_p"] is None
    assert M.paired_tests([0.5], [float("nan")])["pairs"] == 0
