"""Result files shared by every optlora experiment: one JSON per run, a CSV summary.

Every write is atomic (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written file behind.

**Per-run JSON** (``optlora finetune``; one file per method, lr and seed), written by :func:`write_run`::

    {
      "method": "reflora",                 # lora | lora_r32 | reflora | reflora_s | scalora | scalora_i | ...
      "seed": 0,
      "config": {...},                     # every option of the run, the task, lr, data sources and sizes
      "environment": {...},                # see environment()
      "steps": [                           # one dict per optimizer step
        {"step": 1, "loss": 0.69, "wall_time": 0.12,      # required: step (int), loss, wall_time (s since start)
         "lr": 1e-3, "grad_norm": 0.4,                    # optional: from the Trainer's log
         "step_ms": 35.1, "cpu_ms": 60.2,                 #   wall / process-CPU time of the step
         "rank_mean": 8.0, "column_fraction": 0.8,        #   rank of the cumulative update (every k steps),
         "skipped_fraction": 0.0},                        #   ScaLoRA's column share, share of layers skipped
      ],
      "final": {"score": 0.91, "accuracy": 0.91,          # final metrics (numbers or null): the headline score,
                "eval_loss": 0.25, "dev_accuracy": 0.91,  #   per evaluation set (<set>_<metric>), held-out
                "selection_score": 0.9,                   #   score used to pick the lr, timing, memory, ...
                "peak_memory_mb": 512.0, "ms_per_step": 35.0},
      "telemetry": {...}, "optlora_stats": {...},         # optional extras
      "sample_outputs": {...}                             # generation: the first answers per set
    }

**Matrix-factorisation JSON** (``optlora mf``), validated by :func:`validate_mf_results`::

    {"methods": {NAME: {"loss": [float per step], "norm_A": [...], ...}, ...}, "config": {...}}

Every series of one method has the same length (the number of steps); see :mod:`optlora_experiments.mf`.

Non-finite numbers (diverged runs) are written as the ``NaN`` / ``Infinity`` tokens that
Python's :mod:`json` reads back as floats.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import platform
import subprocess
import sys
import uuid
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path

RUN_KEYS = ("method", "seed", "config", "environment", "steps", "final")
STEP_KEYS = ("step", "loss", "wall_time")
OPTIONAL_STEP_KEYS = ("lr", "grad_norm", "step_ms", "cpu_ms", "rank_mean", "column_fraction", "skipped_fraction")
#: headline metrics, in the order plots show them
FINAL_KEYS = (
    "accuracy", "f1", "matthews", "pearson", "spearman", "eval_loss", "exact_match", "peak_memory_mb",
    "cpu_ms_per_step",  # CPU, not wall: wall time on a shared machine measures the other jobs too
)  # fmt: skip


# ----------------------------------------------------------------------------- environment
def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the git checkout holding ``path`` (default: this package), or None."""
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else None


def environment(device: str | None = None) -> dict:
    """Versions, platform, device and git commit, recorded with every result file."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = str(device)
    if dev.startswith("cuda") and torch.cuda.is_available():
        dev = f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "peft": _version("peft"),
        "transformers": _version("transformers"),
        "optlora": _version("optlora"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": dev,
        "git_commit": git_commit(),
        "argv": list(sys.argv),
    }


# ----------------------------------------------------------------------------- atomic writes
def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # same folder: os.replace is atomic
    try:
        with open(tmp, "x", encoding="utf-8", newline="") as fh:  # mode follows the umask
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def to_jsonable(obj):
    """Plain JSON types from tensors, numpy scalars, dtypes, paths, tuples and dataclass-like objects."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # torch / numpy tensors and scalars
        return to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        return to_jsonable(obj.item())
    return str(obj)  # torch.dtype, torch.device, enums, ...


def write_json(path: str | os.PathLike, obj) -> Path:
    """Atomically write ``obj`` as indented JSON (non-finite floats as ``NaN``/``Infinity``)."""
    return atomic_write_text(path, json.dumps(to_jsonable(obj), indent=1) + "\n")


def read_json(path: str | os.PathLike):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping], fieldnames: list[str] | None = None) -> Path:
    """Atomically write ``rows`` (dicts) as CSV; columns are ``fieldnames`` or the union of keys in order."""
    rows = [dict(r) for r in rows]
    if fieldnames is None:
        fieldnames = []
        for r in rows:
            fieldnames += [k for k in r if k not in fieldnames]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fieldnames, extrasaction="raise")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _csv_cell(v) for k, v in r.items()})
    return atomic_write_text(path, buf.getvalue())


def _csv_cell(v):
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else v


# ----------------------------------------------------------------------------- per-run records
def make_run(method: str, seed: int, config: Mapping, steps: list[Mapping], final: Mapping, env: dict | None = None):
    """A per-run record (see the module docstring), validated."""
    record = {
        "method": method,
        "seed": seed,
        "config": to_jsonable(dict(config)),
        "environment": env if env is not None else environment(),
        "steps": to_jsonable([dict(s) for s in steps]),
        "final": to_jsonable(dict(final)),
    }
    validate_run(record)
    return record


def write_run(path: str | os.PathLike, record: Mapping) -> Path:
    """Validate and atomically write one per-run record."""
    validate_run(record)
    return write_json(path, record)


def validate_run(record: Mapping) -> None:
    """Raise ``ValueError`` naming the problem if ``record`` is not a per-run record."""
    if not isinstance(record, Mapping):
        raise ValueError(f"a run record must be a dict, got {type(record).__name__}")
    missing = [k for k in RUN_KEYS if k not in record]
    if missing:
        raise ValueError(f"run record lacks key(s) {missing}; required: {list(RUN_KEYS)}")
    if not isinstance(record["method"], str) or not record["method"]:
        raise ValueError(f"run record 'method' must be a non-empty string, got {record['method']!r}")
    if not isinstance(record["seed"], int) or isinstance(record["seed"], bool):
        raise ValueError(f"run record 'seed' must be an int, got {record['seed']!r}")
    for key in ("config", "environment", "final"):
        if not isinstance(record[key], Mapping):
            raise ValueError(f"run record '{key}' must be a dict, got {type(record[key]).__name__}")
    if not isinstance(record["steps"], list):
        raise ValueError("run record 'steps' must be a list of dicts")
    for i, s in enumerate(record["steps"]):
        if not isinstance(s, Mapping) or any(k not in s for k in STEP_KEYS):
            raise ValueError(f"run record steps[{i}] must be a dict with keys {list(STEP_KEYS)}, got {s!r}")
    for k, v in record["final"].items():
        if v is not None and not isinstance(v, (int, float)):
            raise ValueError(f"run record final[{k!r}] must be a number or null, got {v!r}")


def run_summary_row(record: Mapping) -> dict:
    """One CSV row for a run: method, seed, steps, final loss, then every final metric."""
    steps = record.get("steps") or []
    row = {
        "method": record["method"],
        "seed": record["seed"],
        "steps": steps[-1]["step"] if steps else 0,
        "final_loss": steps[-1]["loss"] if steps else None,
        "wall_time_s": steps[-1]["wall_time"] if steps else None,
    }
    row.update(record.get("final", {}))
    return row


def write_summary_csv(path: str | os.PathLike, records: Iterable[Mapping]) -> Path:
    """CSV with one row per run record (see :func:`run_summary_row`)."""
    return write_csv(path, [run_summary_row(r) for r in records])


# ----------------------------------------------------------------------------- MF results
def validate_mf_results(obj: Mapping) -> None:
    """Raise ``ValueError`` unless ``obj`` is ``{"methods": {name: {series: [floats]}}, "config": {...}}``."""
    if not isinstance(obj, Mapping) or set(obj) != {"methods", "config"}:
        keys = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"MF results must have exactly the keys ['config', 'methods'], got {keys}")
    if not isinstance(obj["config"], Mapping) or not isinstance(obj["methods"], Mapping) or not obj["methods"]:
        raise ValueError("MF results: 'config' must be a dict and 'methods' a non-empty dict")
    for name, series in obj["methods"].items():
        if not isinstance(series, Mapping) or "loss" not in series:
            raise ValueError(f"MF results: method {name!r} must map series names to lists and include 'loss'")
        lengths = {k: len(v) for k, v in series.items() if isinstance(v, list)}
        if len(lengths) != len(series) or len(set(lengths.values())) != 1:
            raise ValueError(f"MF results: method {name!r} series must be lists of one common length, got {lengths}")
        for k, v in series.items():
            if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                raise ValueError(f"MF results: {name}.{k} must contain only numbers")


# ----------------------------------------------------------------------------- discovery
def find_result_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """JSON files named by ``paths``; a folder contributes every ``*.json`` below it (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.json") if q.is_file())
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such results file or folder: {p}")
    return out


def kind(obj) -> str:
    """``"mf"`` (matrix-factorisation results), ``"run"`` (per-run record) or ``"unknown"``."""
    if isinstance(obj, Mapping) and "methods" in obj and "config" in obj:
        return "mf"
    if isinstance(obj, Mapping) and "method" in obj and "steps" in obj:
        return "run"
    return "unknown"
