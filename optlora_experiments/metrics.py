"""Metrics: GLUE scores (scikit-learn / scipy), answer extraction for generation, paired tests.

* :func:`classification_metrics` / :func:`regression_metrics` -- GLUE's metrics: accuracy,
  binary F1, Matthews correlation (CoLA), Pearson / Spearman correlation (STS-B);
  :func:`compute_metrics_fn` wraps them for ``transformers.Trainer(compute_metrics=...)``.
* :func:`extract` / :func:`is_correct` -- LLM-Adapters' answer extraction (``evaluate.py``,
  ``commonsense_evaluate.py``): for an option word the first match of the set's options
  (``true|false``, ``solution1|solution2``, ``answer1..5``, ``ending1..4``, ``option1|option2``;
  built from the answers of the set, so any set works); for numbers the last number of the
  response (commas removed), correct within 0.001; for AQuA the first capital letter A-E. One
  addition: a response is first cut after GSM8K's ``#### <number>`` line, so text a model
  generates after its final answer is not read as the answer.
* :func:`paired_tests` -- paired t-test and Wilcoxon signed-rank test of two methods on the
  same seeds (``scipy.stats.ttest_rel`` / ``wilcoxon``).
"""

from __future__ import annotations

import math
import re

import numpy as np

NUMBER = re.compile(r"-?\d+\.?\d*")
_GSM8K_END = re.compile(r"####\s*[-$\d.,]+")
TOLERANCE = 1e-3  # LLM-Adapters' ``miss``


# ------------------------------------------------------------------------------ GLUE
def classification_metrics(logits, labels, names=("accuracy",)) -> dict[str, float]:
    """``accuracy``, ``f1`` (binary, positive class 1) and/or ``matthews`` from logits and class ids."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    pred = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels)
    out = {"accuracy": float(accuracy_score(labels, pred))}
    if "f1" in names:
        out["f1"] = float(f1_score(labels, pred, zero_division=0.0))
    if "matthews" in names:
        out["matthews"] = float(matthews_corrcoef(labels, pred))
    return out


def regression_metrics(preds, labels) -> dict[str, float]:
    """Pearson and Spearman correlation (NaN when the predictions are constant)."""
    from scipy.stats import pearsonr, spearmanr

    p, y = np.asarray(preds, dtype=np.float64).reshape(-1), np.asarray(labels, dtype=np.float64).reshape(-1)
    if np.ptp(p) == 0 or np.ptp(y) == 0:
        return {"pearson": math.nan, "spearman": math.nan}
    return {"pearson": float(pearsonr(p, y)[0]), "spearman": float(spearmanr(p, y)[0])}


def compute_metrics_fn(kind: str, names=("accuracy",)):
    """A ``compute_metrics`` callable for ``transformers.Trainer`` (``EvalPrediction`` -> dict)."""

    def compute(pred) -> dict[str, float]:
        logits = pred.predictions[0] if isinstance(pred.predictions, tuple) else pred.predictions
        if kind == "regression":
            return regression_metrics(logits, pred.label_ids)
        return classification_metrics(logits, pred.label_ids, names)

    return compute


def majority_baseline(labels) -> float:
    """Accuracy of always predicting the most frequent label."""
    labels = list(labels)
    if not labels:
        return math.nan
    return max(labels.count(v) for v in set(labels)) / len(labels)


# ------------------------------------------------------------------------------ generation
def option_pattern(answers) -> re.Pattern:
    """The regex of a commonsense set's option words (longest first, so ``answer1`` never matches ``answer10``)."""
    words = sorted({str(a).strip() for a in answers}, key=lambda w: (-len(w), w))
    return re.compile("|".join(re.escape(w) for w in words))


def _cut(response: str) -> str:
    m = _GSM8K_END.search(response)
    return response[: m.end()] if m else response


def extract(response: str, answer_type: str, options: re.Pattern | None = None) -> str | float | None:
    """The predicted answer in ``response`` (None if there is none), by LLM-Adapters' rules."""
    text = _cut(response).strip()
    if answer_type == "number":
        nums = NUMBER.findall(text.replace(",", ""))
        if not nums:
            return None
        try:
            return float(nums[-1])
        except ValueError:
            return None
    if answer_type == "letter":
        m = re.search(r"A|B|C|D|E", text)
        return m.group() if m else None
    if options is None:
        raise ValueError("option answers need the set's option pattern")
    m = options.search(text)
    return m.group() if m else None


def is_correct(pred, gold: str, answer_type: str) -> bool:
    if pred is None:
        return False
    if answer_type == "number":
        try:
            return abs(float(str(gold).replace(",", "")) - float(pred)) <= TOLERANCE
        except ValueError:
            return False
    return str(pred) == str(gold).strip()


def generation_accuracy(rows: list[dict], responses: list[str]) -> float:
    """Fraction of ``rows`` whose response contains the right answer (rows of one set: same answer type)."""
    if not rows:
        return math.nan
    kind = rows[0]["answer_type"]
    options = option_pattern(r["answer"] for r in rows) if kind == "option" else None
    hits = sum(is_correct(extract(resp, kind, options), r["answer"], kind) for r, resp in zip(rows, responses))
    return hits / len(rows)


# ------------------------------------------------------------------------------ paired tests
def paired_tests(a, b) -> dict[str, float | int | None]:
    """Compare paired samples ``a`` (a method) and ``b`` (the reference) over the same seeds.

    Returns ``pairs``, ``diff_mean`` (mean of ``a - b``), ``ttest_p`` (two-sided paired t-test) and
    ``wilcoxon_p`` (two-sided signed-rank test); p-values are None with fewer than 2 pairs or when
    every difference is zero (the tests are undefined there).
    """
    from scipy.stats import ttest_rel, wilcoxon

    pairs = [(x, y) for x, y in zip(a, b) if _finite(x) and _finite(y)]
    out: dict[str, float | int | None] = {"pairs": len(pairs), "diff_mean": None, "ttest_p": None, "wilcoxon_p": None}
    if not pairs:
        return out
    x, y = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    out["diff_mean"] = float(np.mean(x - y))
    if len(pairs) < 2 or np.all(x == y):
        return out
    out["ttest_p"] = _finite_or_none(ttest_rel(x, y).pvalue)
    out["wilcoxon_p"] = _finite_or_none(wilcoxon(x, y).pvalue)
    return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _finite_or_none(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) else None
