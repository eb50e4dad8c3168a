"""The sweep loop of ``optlora finetune``: claim a run, train it, write its record; several processes may share ``--out``.

Each pass reads the finished runs (with ``--resume``: every record in ``--out`` whose configuration
matches; without: the runs of this process), asks :func:`~optlora_experiments.schedule.plan` for the
runs still needed in order, and trains the first one it can claim
(:class:`~optlora_experiments.claims.Claims`). The claimant writes the record (atomically), its compact
copy (``records_dir``, :mod:`~optlora_experiments.compact`), then deletes its own Trainer checkpoint folder
``<out>/checkpoints/<run>`` and releases the claim; no process deletes another's checkpoints. Once a
method's lr selection is final it is written into every record of that method (``"selection"`` and
``config["selected_lr"]``). When every run is done, ``summary.csv``, ``aggregate.csv`` and the plots are
rewritten under the folder's lock from the records on disk. When runs remain but none can be claimed
(other processes hold them, or the runs wait on an lr selection that waits on them),
:class:`SweepPending` is raised at once: ``optlora finetune`` exits with status :data:`EXIT_PENDING`.
"""

from __future__ import annotations

import contextlib
import math
import re
import shutil
from pathlib import Path

from . import compact, results, schedule
from .aggregate import summarize
from .claims import Claims, locked

#: exit status of ``optlora finetune`` when nothing can run now but the sweep is not complete
EXIT_PENDING = 3
#: options that do not change a run's result (ignored when --resume compares configs); ``epochs`` is
#: resolved into ``steps``, which is compared
NOT_COMPARED = ("progress", "threads", "data_dir", "save_steps", "epochs")


class SweepPending(RuntimeError):
    """Nothing this process can run now; the message says what the remaining runs wait on."""


def _safe(task: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", task)


def run_name(task: str, method: str, lr: float, seed: int) -> str:
    """``<task>_<method>_lr<lr>_seed<seed>``: the run's record ``<name>.json``, claim and checkpoint folder."""
    return f"{_safe(task)}_{method}_lr{lr:g}_seed{seed}"


def matches(record: dict, cfg: dict, info: dict, defaults: dict) -> bool:
    """Whether ``record`` was made with ``cfg``: a key missing from an older record counts as its default."""
    conf = record.get("config", {})
    same = all(conf.get(k, defaults.get(k)) == v for k, v in cfg.items() if k not in NOT_COMPARED)
    return same and conf.get("data") == info


def _light(record: dict, path: Path) -> dict:
    """What the loop needs of a record: its key, held-out score, divergence, selection, and where it is."""
    fin = record["final"]
    keep = {k: fin[k] for k in ("selection_score", "diverged_at_step") if k in fin}
    return {"method": record["method"], "seed": record["seed"], "lr": record["config"]["lr"], "final": keep,
            "selection": record.get("selection"), "selected_lr": record["config"].get("selected_lr"), "path": path}  # fmt: skip


def _score(record: dict):
    v = record["final"].get("selection_score")
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


class _Sweep:
    def __init__(self, prep, cfg, defaults, methods, seeds, grids, *, resume, out: Path, extend, lr_min, lr_max,
                 records_dir, train):  # fmt: skip
        self.prep, self.cfg, self.defaults = prep, cfg, defaults
        self.task = prep.task.name
        self.methods, self.seeds, self.grids = methods, list(seeds), grids
        self.resume, self.out, self.records_dir, self.train = resume, out, records_dir, train
        self.extend, self.lr_min, self.lr_max = extend, lr_min, lr_max
        self.claims = Claims(out)
        self.mine: dict[tuple, tuple[Path, dict]] = {}  # runs of this process: (record path, light view)
        self._cache: dict[Path, tuple[float, dict | None]] = {}

    # ------------------------------------------------------------------ records
    # Only a light view of each record is kept in memory (a full one holds every step: MBs as Python objects);
    # full records are read from disk when a selection is written into them and for the summaries.
    def _read(self, path: Path) -> dict | None:
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            return None
        hit = self._cache.get(path)
        if hit is None or hit[0] != mtime:
            try:
                rec = results.read_json(path)
            except (OSError, ValueError):
                rec = None
            ok = isinstance(rec, dict) and results.kind(rec) == "run" and rec.get("config", {}).get("task") == self.task
            hit = (mtime, _light(rec, path) if ok and matches(rec, self.cfg, self.prep.info, self.defaults) else None)
            self._cache[path] = hit
        return hit[1]

    def records(self) -> dict[tuple, dict]:
        """(method, lr, seed) -> light view of the usable finished record (disk with --resume, this process's runs)."""
        found = {}
        if self.resume:
            for path in sorted(self.out.glob(f"{_safe(self.task)}_*_seed*.json")):
                rec = self._read(path)
                if rec is not None and rec["method"] in self.methods:
                    found[(rec["method"], rec["lr"], rec["seed"])] = rec
        found.update({k: self._read(path) or light for k, (path, light) in self.mine.items()})
        return {k: r for k, r in found.items() if self._usable(k, r)}

    def _usable(self, key, rec) -> bool:
        method, _, seed = key
        scoring = seed == self.seeds[0] and len(set(self.grids[method])) > 1
        diverged = rec["final"].get("diverged_at_step") is not None
        return not scoring or diverged or "selection_score" in rec["final"]

    def _write(self, rec: dict) -> Path:
        name = run_name(self.task, rec["method"], rec["config"]["lr"], rec["seed"])
        path = results.write_run(self.out / f"{name}.json", rec)
        self._cache.pop(path, None)
        if self.records_dir is not None:
            compact.write(Path(self.records_dir) / f"{name}.json", rec)
        return path

    def _note_selections(self, p: schedule.Plan, recs: dict) -> None:
        for (method, lr, seed), light in recs.items():
            sel = p.selections.get(method)
            if sel is None or not sel.final or (seed != self.seeds[0] and lr != sel.selected_lr):
                continue
            info = sel.as_dict()
            if light["selection"] != info or light["selected_lr"] != sel.selected_lr:
                rec = results.read_json(light["path"])
                rec["selection"] = info
                rec["config"]["selected_lr"] = sel.selected_lr
                self._write(rec)
                light.update(selection=info, selected_lr=sel.selected_lr)

    # ------------------------------------------------------------------ the loop
    def plan(self, recs):
        done = {k: _score(r) for k, r in recs.items()}
        return schedule.plan(self.methods, self.grids, self.seeds, done, extend=self.extend, lr_min=self.lr_min,
                             lr_max=self.lr_max)  # fmt: skip

    def run(self) -> tuple[list[dict], schedule.Plan]:
        recs = self.records()
        p = self.plan(recs)
        reused = [run_name(self.task, *k) for k in recs]
        if reused:
            names = ", ".join(reused) if len(reused) <= 5 else f"{len(reused)} runs"
            print(f"already complete in {self.out}: {names}")
        while True:
            self._note_selections(p, recs)
            if p.complete:
                break
            for run in p.todo:
                name = run_name(self.task, run.method, run.lr, run.seed)
                if self.claims.try_claim(name):
                    with self.claims.hold(name):
                        self._run_claimed(run, name)
                    break
            else:
                self._pending(p, recs)
            recs = self.records()
            p = self.plan(recs)
        return [results.read_json(recs[k]["path"]) for k in self._wanted(p)], p

    def _run_claimed(self, run: schedule.Run, name: str) -> None:
        key = (run.method, run.lr, run.seed)
        if key in self.records():  # another process finished it since this one looked
            return
        ckpt = self.out / "checkpoints" / name
        if not self.resume:
            shutil.rmtree(ckpt, ignore_errors=True)
        print(f"== {self.task} {run.method} lr={run.lr:g} seed={run.seed} ({run.phase})", flush=True)
        rec = self.train(self.prep, run.method, run.lr, run.seed, self.cfg, score_holdout=run.score_holdout,
                         run_dir=ckpt)  # fmt: skip
        path = self._write(rec)  # at once: an interrupted sweep keeps its finished runs
        self.mine[key] = (path, _light(rec, path))
        shutil.rmtree(ckpt, ignore_errors=True)  # the claimant deletes its own checkpoints, after the record
        with contextlib.suppress(OSError):
            ckpt.parent.rmdir()  # only when no other run's folder is left in it

    def _wanted(self, p: schedule.Plan) -> list[tuple]:
        keys = []
        for m in self.methods:
            keys += [(m, lr, self.seeds[0]) for lr in p.selections[m].lrs()]
        for seed in self.seeds[1:]:
            keys += [(m, p.selections[m].selected_lr, seed) for m in self.methods if seed != self.seeds[0]]
        return keys

    def _pending(self, p: schedule.Plan, recs: dict):
        held = []
        for run in p.todo:
            owner = self.claims.holder(run_name(self.task, run.method, run.lr, run.seed))
            if owner is not None:
                held.append(f"{run.method} lr={run.lr:g} seed={run.seed} (pid {owner.get('pid')})")
        with locked(self.out):
            results.write_summary_csv(self.out / "summary.csv", (results.read_json(r["path"]) for r in recs.values()))
        waiting = f"; {', '.join(p.waiting_methods)} wait for their lr selection" if p.waiting_methods else ""
        raise SweepPending(
            f"nothing to run now in {self.out}: {p.done} of {p.total} runs complete; held by other processes: "
            f"{', '.join(held) or 'none'}{waiting}. Run again later with --resume."
        )


def sweep(prep, cfg, defaults, methods, seeds, grids, *, resume, out, plots=True, extend=False,
          lr_min=schedule.LR_MIN, lr_max=schedule.LR_MAX, records_dir=None, train=None) -> list[dict]:  # fmt: skip
    """Run (or join) the sweep; return its records once every run is complete, else raise :class:`SweepPending`.

    ``grids``: method -> lr grid; ``train``: the function that trains one run
    (default :func:`optlora_experiments.harness.train_one`; tests pass a fake).
    """
    if train is None:
        from .harness import train_one as train
    out = Path(out)
    s = _Sweep(prep, cfg, defaults, methods, seeds, grids, resume=resume, out=out, extend=extend, lr_min=lr_min,
               lr_max=lr_max, records_dir=records_dir, train=train)  # fmt: skip
    records, p = s.run()
    print(f"all {len(records)} runs complete")
    selected = {m: sel.selected_lr for m, sel in p.selections.items()}
    with locked(out):
        summarize(records, out, cfg["smooth_window"], plots=plots, selected=selected)
    return records
