"""The GLUE tables and figures of docs/RESULTS.md, from the run records of ``optlora finetune``; partial sweeps too.

    python bench/glue_report.py --plan bench/sweep_plan.toml --img docs/img --md docs/results/glue.md
    python bench/glue_report.py docs/results/records/cola runs/glue/mrpc --img docs/img

Per task folder (``<task>_<method>_lr<lr>_seed<k>.json``: the full records ``optlora finetune --out`` writes, or
the compact copies of ``--records-dir`` kept in the repository, ``docs/results/records/<task>``), the markdown of
:func:`optlora_experiments.report.task_markdown`: the lr grid of every method (held-out score, dev score, final
training loss, diverged runs), the lr-sensitivity figure, the table at each method's lr (seeds, paired tests
against LoRA, steps and process-CPU seconds to LoRA's final smoothed loss, telemetry) and the training figures.
With ``--plan`` the tasks, their record folders and the methods / seeds / lrs the sweep wants come from the
sweep plan (``bench/sweep.py``), so runs not done yet are listed as missing. Every number is read from the
records; nothing is typed in. Methods are compared by CPU time: on a shared machine wall time measures the
other jobs too.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from optlora_experiments.compact import load_run
from optlora_experiments.report import Expected, task_markdown


def read_records(folder: Path) -> list[dict]:
    """Finished run records (full or compact) in ``folder``; other JSON files are skipped."""
    return [r for r in (load_run(f) for f in sorted(Path(folder).glob("*_seed*.json"))) if r and "final" in r]


def report(folder: Path, img: Path | None, smooth: float, expected: Expected | None = None,
           link_base: Path | None = None, name: str | None = None) -> str:  # fmt: skip
    """The markdown of one task folder (also printed); a folder without records says so."""
    records = read_records(folder) if Path(folder).is_dir() else []
    if records:
        text = task_markdown(records, expected or Expected(), img, link_base, smooth)
    else:
        text = f"### {name or Path(folder).name}\n\nNo finished runs yet in {folder}.\n"
    print(text)
    return text


def _load_sweep_module():
    spec = importlib.util.spec_from_file_location("sweep_driver", Path(__file__).with_name("sweep.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def plan_tasks(plan_path: Path) -> list[tuple[str, Path, Expected]]:
    """``(name, records folder, Expected)`` of every enabled task of a sweep plan."""
    sweep = _load_sweep_module()
    plan = sweep.load_plan(plan_path)
    records = plan["sweep"].get("records") or plan["sweep"]["out"]
    out = []
    for task in plan["tasks"]:
        o = task["options"]
        exp = Expected(tuple(o.get("methods") or ()), tuple(o.get("seeds") or ()), tuple(o.get("lrs") or ()))
        out.append((task["name"], Path(records) / task["name"], exp))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="*", type=Path, help="run-record folders, one per task")
    p.add_argument("--plan", type=Path, default=None, help="a sweep plan: its tasks' record folders and expected runs")
    p.add_argument("--img", type=Path, default=None, help="write the figures to IMG/glue_<task>/")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown here (figure links relative to it)")
    p.add_argument("--smooth", type=float, default=0.95, help="EMA factor of the training-loss curves (default 0.95)")
    args = p.parse_args(argv)
    if not args.folders and args.plan is None:
        p.error("give record folders or --plan")
    tasks = [(f.name, f, Expected()) for f in args.folders]
    if args.plan is not None:
        try:
            tasks += plan_tasks(args.plan)
        except ValueError as exc:  # the driver's PlanError
            print(f"glue_report: error: {exc}", file=sys.stderr)
            return 2
    link_base = args.md.parent if args.md is not None else None
    parts = [report(folder, args.img, args.smooth, exp, link_base, name) for name, folder, exp in tasks]
    if args.md is not None:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text("\n".join(parts), encoding="utf-8")
        print(f"markdown: {args.md}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
