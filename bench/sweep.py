"""Run the sweep plan (bench/sweep_plan.toml) in the background with N workers; safe to kill and start again.

    python bench/sweep.py --plan bench/sweep_plan.toml --workers 2          # from the repository root
    python bench/sweep.py --plan bench/sweep_plan.toml --status             # what is done, per task

Each worker runs under ``nice -n 19`` with one torch thread and walks the plan's enabled tasks in order:
``optlora finetune <task options> --resume --out <out>/<task> --records-dir <records>/<task>``. Several
processes share a task's ``--out`` safely (each run is claimed; see ``optlora_experiments.runner``);
finetune exits 0 when the task is complete, 3 when every run left is held by another process or waits on
an lr selection those runs decide: the worker then moves to the next task and comes back. When no task
has anything it can run it sleeps ``poll_s`` and looks again, until every task is complete. Output goes
to ``<out>/logs/worker-<k>.log``. Killing the driver (or a worker, or the whole session) loses at most
the runs in progress since their last Trainer checkpoint (``save_steps``); starting it again resumes.
The compact run records land in ``<records>/<task>`` as runs finish.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

EXIT_PENDING = 3  # optlora_experiments.runner.EXIT_PENDING (not imported: the driver needs no torch)
SWEEP_KEYS = {"out", "records", "poll_s", "max_failures"}
TASK_KEYS = {"name", "enabled"}


class PlanError(ValueError):
    """A plan file that cannot be run."""


def load_plan(path: str | Path) -> dict:
    """Parse and check a plan: ``{"sweep": {...}, "tasks": [{"name", "options"}, ...]}`` (enabled tasks only)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PlanError(f"cannot read plan {path}: {exc}") from exc
    sweep = {"out": "runs/sweep", "records": None, "poll_s": 60, "max_failures": 3, **data.get("sweep", {})}
    unknown = set(sweep) - SWEEP_KEYS
    if unknown:
        raise PlanError(f"{path}: unknown [sweep] key(s) {sorted(unknown)}; known: {sorted(SWEEP_KEYS)}")
    defaults = data.get("defaults", {})
    tasks, names = [], set()
    for i, t in enumerate(data.get("task", [])):
        name = t.get("name")
        if not name or name in names or "/" in name:
            raise PlanError(f"{path}: task #{i + 1} needs a unique 'name' without '/', got {name!r}")
        names.add(name)
        if t.get("enabled", True):
            options = {**defaults, **{k: v for k, v in t.items() if k not in TASK_KEYS}}
            for k in ("out", "records_dir", "resume"):
                if k in options:
                    raise PlanError(f"{path}: task {name}: '{k}' is set by the driver")
            tasks.append({"name": name, "options": options})
    if not tasks:
        raise PlanError(f"{path}: no enabled [[task]]")
    return {"sweep": sweep, "tasks": tasks}


def task_argv(task: dict, sweep: dict, extra: dict | None = None) -> list[str]:
    """``optlora finetune`` arguments of one plan task (``--resume``, its ``--out`` and ``--records-dir``)."""
    opts = {**task["options"], **(extra or {})}
    argv = ["--resume", "--out", str(Path(sweep["out"]) / task["name"])]
    if sweep.get("records"):
        argv += ["--records-dir", str(Path(sweep["records"]) / task["name"])]
    for key, value in opts.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def check_options(plan: dict, extra: dict | None = None) -> None:
    """Parse every task's arguments with ``optlora finetune``'s own parser (a typo fails before anything runs)."""
    from optlora.cli import build_parser

    parser = build_parser()
    for task in plan["tasks"]:
        argv = ["finetune", *task_argv(task, plan["sweep"], extra)]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            raise PlanError(f"task {task['name']}: `optlora {' '.join(argv)}` is not valid") from exc


def _log(fh, text: str) -> None:
    fh.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")
    fh.flush()


def worker(plan: dict, wid: int, command: list[str], extra: dict | None = None) -> int:
    """Walk the plan's tasks until all are complete (see the module docstring); returns 0, or 1 if some failed."""
    sweep = plan["sweep"]
    logs = Path(sweep["out"]) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    left = [t["name"] for t in plan["tasks"]]
    failures = dict.fromkeys(left, 0)
    child = None

    def stop(signum, frame):
        if child is not None and child.poll() is None:
            child.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with open(logs / f"worker-{wid}.log", "a", encoding="utf-8") as fh:
        _log(fh, f"worker {wid} (pid {os.getpid()}) starts: tasks {', '.join(left)}")
        while left:
            progressed = False
            for task in [t for t in plan["tasks"] if t["name"] in left]:
                argv = [*command, *task_argv(task, sweep, extra), "--threads", "1", "--no-progress"]
                _log(fh, "$ " + " ".join(argv))
                child = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env)
                rc = child.wait()
                child = None
                if rc == 0:
                    _log(fh, f"{task['name']}: complete")
                    left.remove(task["name"])
                    progressed = True
                elif rc == EXIT_PENDING:
                    _log(fh, f"{task['name']}: nothing this worker can run now; next task")
                else:
                    failures[task["name"]] += 1
                    _log(fh, f"{task['name']}: failed with status {rc} ({failures[task['name']]} time(s))")
                    if failures[task["name"]] >= sweep["max_failures"]:
                        _log(fh, f"{task['name']}: left for a person after {sweep['max_failures']} failures")
                        left.remove(task["name"])
            if left and not progressed:
                time.sleep(sweep["poll_s"])
        bad = [n for n, k in failures.items() if k >= sweep["max_failures"]]
        _log(fh, f"worker {wid} done" + (f"; failed: {', '.join(bad)}" if bad else ": every task complete"))
    return 1 if bad else 0


def runs_needed(options: dict) -> tuple[int, bool] | None:
    """``(runs, more possible)`` a task needs: per method its lr grid on the first seed plus one run per other
    seed; ``more possible`` with ``lr_extend`` (an edge best adds grid points). None when the plan does not list
    the methods (finetune's default, all of them, is not known here without importing it)."""
    methods = options.get("methods")
    if not methods:
        return None
    lrs, seeds = set(options.get("lrs") or [None]), options.get("seeds") or [0]
    return len(methods) * (len(lrs) + len(seeds) - 1), bool(options.get("lr_extend")) and len(lrs) > 1


def status(plan: dict) -> str:
    """One line per task: runs finished (of those needed), runs in progress (claimed), complete or not.

    Finished runs are counted in the task's records folder when the plan has one (only this sweep's runs land
    there), else in its ``--out``.
    """
    lines = []
    for task in plan["tasks"]:
        out = Path(plan["sweep"]["out"]) / task["name"]
        rec = Path(plan["sweep"]["records"]) / task["name"] if plan["sweep"].get("records") else out
        runs = len(list(rec.glob("*_seed*.json"))) if rec.is_dir() else 0
        need = runs_needed(task["options"])
        of = "" if need is None else f" of {'>= ' if need[1] else ''}{need[0]}"
        held = sorted(c.stem for c in (out / "claims").glob("*.claim")) if (out / "claims").is_dir() else []
        now = f"{len(held)} running now" + (f" ({', '.join(held)})" if held else "")
        done = "complete" if (out / "aggregate.csv").is_file() else "not complete"
        lines.append(f"{task['name']}: {runs}{of} runs finished ({rec}), {now}, {done}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plan", required=True, help="plan file (TOML), e.g. bench/sweep_plan.toml")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--data-dir", default=None, help="passed to every task (default: finetune's own search)")
    p.add_argument("--status", action="store_true", help="print what each task has done, run nothing")
    p.add_argument("--worker-id", type=int, default=None, help=argparse.SUPPRESS)  # a worker process
    args = p.parse_args(argv)
    try:
        plan = load_plan(args.plan)
    except PlanError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    extra = {"data_dir": args.data_dir} if args.data_dir else None
    if args.status:
        print(status(plan))
        return 0
    command = [sys.executable, "-m", "optlora", "finetune"]
    if args.worker_id is not None:
        return worker(plan, args.worker_id, command, extra)
    if args.workers < 1:
        print("sweep: error: --workers must be >= 1", file=sys.stderr)
        return 2
    try:
        check_options(plan, extra)
    except PlanError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    me = [sys.executable, str(Path(__file__).resolve()), "--plan", args.plan]
    me += ["--data-dir", args.data_dir] if args.data_dir else []
    procs = [subprocess.Popen(["nice", "-n", "19", *me, "--worker-id", str(k)]) for k in range(args.workers)]
    print(f"sweep: {args.workers} worker(s) (pids {', '.join(str(q.pid) for q in procs)}); logs in "
          f"{Path(plan['sweep']['out']) / 'logs'}", flush=True)  # fmt: skip

    def stop(signum, frame):
        for q in procs:
            if q.poll() is None:
                q.terminate()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    codes = [q.wait() for q in procs]
    print(status(plan))
    return max(codes)


if __name__ == "__main__":
    raise SystemExit(main())
