"""Compact run records for the repository: every table and figure can be rebuilt from them alone.

A full run record (:mod:`optlora_experiments.results`) keeps a dict per optimizer step (~400 KB for
1,200 steps). :func:`compact_record` keeps the configuration, environment, final metrics, lr selection,
ScaLoRA/optlora statistics, sample outputs and the telemetry summary (:func:`telemetry_summary`) whole,
and the per-step series as rounded arrays::

    {"format": "optlora-compact-run/1", "method": ..., "seed": ..., "config": {...}, "environment": {...},
     "final": {...}, "selection": {...}, "telemetry_summary": {"update_rank": 9.2, "column_fraction": 0.6, ...},
     "series": {"first_step": 1, "loss": [0.6931, ...],          # 4 significant digits
                "cpu_ms": [61.2, ...],                             # 3 significant digits
                "telemetry": [[50, 8.1, 0.75], ...]}}              # [step, update rank, column fraction]

:func:`expand_record` turns it back into a run record that :mod:`~optlora_experiments.aggregate`, the plots
and ``bench/glue_report.py`` read (``wall_time`` is not kept: it is None in the expanded steps; CPU time
compares methods on a shared machine). :func:`load_run` reads either form.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from . import results

FORMAT = "optlora-compact-run/1"
_KEEP = ("method", "seed", "config", "environment", "final", "selection", "sample_outputs")


def _sig(v, digits: int):
    """``v`` rounded to ``digits`` significant digits (an int when whole); None and non-finite values kept."""
    if v is None or not math.isfinite(v):
        return v
    r = float(f"{v:.{digits}g}")
    return int(r) if r.is_integer() and abs(r) < 2**53 else r


def telemetry_summary(record: dict) -> dict:
    """Update rank (final, mean over layers), and the mean column-branch / skipped fractions over steps.

    ``update_rank``: numerical rank of ``W_now - W_initial`` at the end, averaged over the LoRA layers
    (ScaLoRA Sec. 3: above r once the scaling merges); ``column_fraction``: share of layers on ScaLoRA's
    column branch (Theorem 5), averaged over the steps the method acted on; ``skipped_fraction``: share of
    layers the method skipped. None where the run has no such data (other methods, telemetry off).
    """
    if "telemetry_summary" in record:  # an expanded compact record keeps the full record's summary
        return dict(record["telemetry_summary"])
    final = (record.get("telemetry") or {}).get("final_ranks")
    vals = list(final.values()) if isinstance(final, dict) else list(final or [])
    cols = [s["column_fraction"] for s in record["steps"] if s.get("column_fraction") is not None]
    skips = [s["skipped_fraction"] for s in record["steps"] if s.get("skipped_fraction") is not None]
    mean = lambda v: statistics.mean(v) if v else None  # noqa: E731
    return {"update_rank": mean(vals), "column_fraction": mean(cols), "skipped_fraction": mean(skips)}


def compact_record(record: dict) -> dict:
    """The compact copy of a full run record (see the module docstring)."""
    steps = record["steps"]
    first = steps[0]["step"] if steps else 1
    if [s["step"] for s in steps] != list(range(first, first + len(steps))):
        raise ValueError(f"{record['method']}: the steps of a run record must be consecutive to be compacted")
    out = {"format": FORMAT, **{k: record[k] for k in _KEEP if k in record}}
    stats = record.get("optlora_stats")
    if isinstance(stats, dict):  # counters and fractions; per-layer lists are left out
        out["optlora_stats"] = {k: v for k, v in stats.items() if not isinstance(v, list)}
    tel = [
        [s["step"], _sig(s.get("rank_mean"), 4), _sig(s.get("column_fraction"), 3)] for s in steps if "rank_mean" in s
    ]
    out["telemetry_summary"] = telemetry_summary(record)
    if "telemetry" in record:
        out["telemetry_summary"]["rank_rtol"] = record["telemetry"].get("rank_rtol")
    out["series"] = {
        "first_step": first,
        "loss": [_sig(s.get("loss"), 4) for s in steps],
        "cpu_ms": [_sig(s.get("cpu_ms"), 3) for s in steps],
        "telemetry": tel,
    }
    return results.to_jsonable(out)


def dumps(obj: dict) -> str:
    """JSON text of a compact record: indented, with the per-step arrays of ``series`` on single lines."""
    marker = "__optlora_series__"
    head = json.dumps({**obj, "series": marker}, indent=1)
    return head.replace(json.dumps(marker), json.dumps(obj["series"], separators=(",", ":"))) + "\n"


def write(path: str | Path, record: dict) -> Path:
    """Atomically write the compact copy of the full run ``record`` to ``path``."""
    return results.atomic_write_text(path, dumps(compact_record(record)))


def is_compact(obj) -> bool:
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def expand_record(obj: dict) -> dict:
    """A run record (``steps`` as dicts, ``wall_time`` None) from a compact one."""
    if not is_compact(obj):
        raise ValueError(f"not a compact run record (format {obj.get('format') if isinstance(obj, dict) else None!r})")
    ser = obj["series"]
    steps = [
        {"step": ser["first_step"] + i, "loss": loss, "cpu_ms": cpu, "wall_time": None}
        for i, (loss, cpu) in enumerate(zip(ser["loss"], ser["cpu_ms"]))
    ]
    at = {s["step"]: s for s in steps}
    for step, rank, col in ser.get("telemetry", []):
        if step in at:
            at[step].update({"rank_mean": rank} | ({"column_fraction": col} if col is not None else {}))
    rec = {k: obj[k] for k in (*_KEEP, "optlora_stats", "telemetry_summary") if k in obj}
    rec["steps"] = steps
    results.validate_run(rec)
    return rec


def load_run(path: str | Path) -> dict | None:
    """The run record in ``path`` (full or compact, expanded), or None if the file holds something else."""
    obj = results.read_json(path)
    if is_compact(obj):
        return expand_record(obj)
    return obj if results.kind(obj) == "run" else None
