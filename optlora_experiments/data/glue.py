"""GLUE-format task folders (``train.tsv`` / ``dev.tsv``) and the hub's ``nyu-mll/glue``.

The column layout is detected from the header, so any GLUE-style folder loads, not only the
tasks listed in :data:`GLUE_TASKS`:

* SST-2 ``sentence, label``; QNLI ``index, question, sentence, label``; RTE / WNLI
  ``index, sentence1, sentence2, label``; QQP ``id, qid1, qid2, question1, question2,
  is_duplicate``; MNLI ``..., sentence1, sentence2, ..., gold_label`` (dev file
  ``dev_matched.tsv``); MRPC ``Quality, #1 ID, #2 ID, #1 String, #2 String`` (label =
  ``Quality``); STS-B ``..., sentence1, sentence2, score`` (regression);
* CoLA has no header: ``source, label, original label, sentence``.

Rows are ``{"text": str, "text_pair": str | None, "label": int | float}``. String labels
(``entailment`` ...) are mapped to ids in the hub's order for the GLUE tasks, in sorted order
otherwise. Metrics (scikit-learn / scipy, :mod:`optlora_experiments.metrics`): CoLA Matthews
correlation, MRPC / QQP accuracy and F1, STS-B Pearson and Spearman, the rest accuracy.
"""

from __future__ import annotations

import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .sources import DataError, open_text

csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # QQP/MNLI have long fields


@dataclass(frozen=True)
class GlueSpec:
    """A GLUE task: folder name, hub config, regression or not, metrics (first = the primary one)."""

    folder: str
    hub_config: str
    regression: bool = False
    metrics: tuple[str, ...] = ("accuracy",)
    labels: tuple[str, ...] | None = None  # label names in the hub's id order (None: "0", "1", ...)
    dev_split: str = "validation"


GLUE_TASKS: dict[str, GlueSpec] = {
    "cola": GlueSpec("CoLA", "cola", metrics=("matthews", "accuracy")),
    "sst2": GlueSpec("SST-2", "sst2"),
    "mrpc": GlueSpec("MRPC", "mrpc", metrics=("accuracy", "f1")),
    "qqp": GlueSpec("QQP", "qqp", metrics=("accuracy", "f1")),
    "stsb": GlueSpec("STS-B", "stsb", regression=True, metrics=("pearson", "spearman")),
    "mnli": GlueSpec("MNLI", "mnli", labels=("entailment", "neutral", "contradiction"), dev_split="validation_matched"),
    "qnli": GlueSpec("QNLI", "qnli", labels=("entailment", "not_entailment")),
    "rte": GlueSpec("RTE", "rte", labels=("entailment", "not_entailment")),
    "wnli": GlueSpec("WNLI", "wnli"),
}
TRAIN_FILES = ("train.tsv",)
DEV_FILES = ("dev.tsv", "dev_matched.tsv", "validation.tsv", "validation_matched.tsv")

# (first text column, second text column or None), tried in order against the header
_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("#1 String", "#2 String"),
    ("premise", "hypothesis"),
    ("sentence", None),
)
_LABEL_COLUMNS = ("gold_label", "label", "Quality", "is_duplicate", "score")


def glue_name(task: str) -> str | None:
    """Canonical GLUE name for ``task`` (``"SST-2"``, ``"sst_2"``, ``"STS-B"`` -> ``"sst2"``, ``"stsb"``), or None."""
    key = task.lower().replace("-", "").replace("_", "")
    return key if key in GLUE_TASKS else None


@dataclass
class GlueTable:
    """One parsed TSV file."""

    rows: list[dict]
    columns: tuple[str, str | None, str]  # text, text_pair, label column names ("" for CoLA's positions)
    skipped: int = 0  # malformed lines (wrong number of fields), as GLUE's own processors skip them
    raw_labels: list[str] = field(default_factory=list)


def read_tsv(path: str | Path) -> GlueTable:
    """Parse a GLUE TSV file; labels stay strings (see :func:`finalize_labels`)."""
    with open_text(path) as fh:
        lines = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    lines = [r for r in lines if r and any(c.strip() for c in r)]
    if not lines:
        raise DataError(f"{path} is empty; a GLUE-format file needs a header row (or CoLA's 4 columns) and data")
    header = [h.strip() for h in lines[0]]
    text_cols = next(((a, b) for a, b in _TEXT_COLUMNS if a in header and (b is None or b in header)), None)
    label_col = next((c for c in _LABEL_COLUMNS if c in header), None)
    if text_cols is not None and label_col is not None:
        ia, ib, il = (
            header.index(text_cols[0]),
            header.index(text_cols[1]) if text_cols[1] else None,
            header.index(label_col),
        )
        body, columns = lines[1:], (text_cols[0], text_cols[1], label_col)
    elif len(header) >= 4 and header[1].strip() in ("0", "1"):  # CoLA: source, label, original label, sentence
        ia, ib, il, body, columns = 3, None, 1, lines, ("sentence (column 4)", None, "label (column 2)")
    else:
        raise DataError(
            f"{path}: unrecognised GLUE header {header[:6]!r}; expected text columns such as sentence / "
            "sentence1+sentence2 / question1+question2 and a label column (label, gold_label, Quality, score), "
            "or CoLA's headerless 4 columns"
        )
    need = max(i for i in (ia, ib, il) if i is not None)
    rows, raw, skipped = [], [], 0
    for r in body:
        if len(r) <= need or not r[il].strip():
            skipped += 1
            continue
        raw.append(r[il].strip())
        rows.append({"text": r[ia].strip(), "text_pair": r[ib].strip() if ib is not None else None})
    if not rows:
        raise DataError(f"{path} has a header but no usable rows")
    return GlueTable(rows, columns, skipped, raw)


def label_names(task: str | None, train_labels: list[str], regression: bool) -> list[str] | None:
    """Class names in id order (None for regression)."""
    if regression:
        return None
    spec = GLUE_TASKS.get(task or "")
    if spec is not None and spec.labels is not None:
        return list(spec.labels)
    uniq = sorted(set(train_labels))
    if all(u.lstrip("-").isdigit() for u in uniq):
        return [str(i) for i in sorted(int(u) for u in uniq)]
    return uniq


def finalize_labels(table: GlueTable, names: list[str] | None, path) -> list[dict]:
    """Attach numeric labels: floats for regression (``names is None``), class ids otherwise."""
    out = []
    for row, raw in zip(table.rows, table.raw_labels):
        if names is None:
            try:
                value: float | int = float(raw)
            except ValueError as exc:
                raise DataError(f"{path}: regression label {raw!r} is not a number") from exc
        else:
            key = str(int(raw)) if raw.lstrip("-").isdigit() else raw
            if key not in names:
                raise DataError(f"{path}: label {raw!r} is not one of the training labels {names}")
            value = names.index(key)
        out.append({**row, "label": value})
    return out


def is_regression(task: str | None, table: GlueTable) -> bool:
    if task in GLUE_TASKS:
        return GLUE_TASKS[task].regression
    if table.columns[2] == "score":
        return True
    return False


def from_hub(task: str, split: str) -> tuple[list[dict], list[str] | None]:
    """``nyu-mll/glue`` rows for a GLUE task and split (``"train"`` or ``"dev"``), with label names."""
    from .sources import load_hub

    spec = GLUE_TASKS[task]
    hub_split = "train" if split == "train" else spec.dev_split
    ds = load_hub(f"GLUE {task} ({hub_split})", "nyu-mll/glue", spec.hub_config, split=hub_split)
    cols = ds.column_names
    a, b = next(((x, y) for x, y in _TEXT_COLUMNS if x in cols and (y is None or y in cols)), (None, None))
    if a is None:
        raise DataError(f"nyu-mll/glue {spec.hub_config} has unexpected columns {cols}; pass --data-dir instead")
    names = None if spec.regression else list(spec.labels or ds.features["label"].names)
    if not spec.regression and spec.labels is None:
        names = [str(i) for i in range(len(names))]
    rows = [
        {
            "text": ex[a],
            "text_pair": ex[b] if b else None,
            "label": float(ex["label"]) if spec.regression else int(ex["label"]),
        }
        for ex in ds
    ]
    return rows, names
