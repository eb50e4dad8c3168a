"""Records of the running sweep (written by 007de9f, before the experiments moved) stay readable and reusable.

The fixture is a compact record the sweep wrote from ``bench/sweep_plan.toml`` (CoLA, 5 epochs) at commit
007de9f, copied unchanged. ``--resume`` compares a record's config with the one the current code builds from
the same plan (:func:`optlora_experiments.runner.matches`): if a default or an option's meaning changed, the
sweep would silently train its runs again; the report must read it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from optlora import cli
from optlora_experiments import compact, finetune, runner
from optlora_experiments.report import task_markdown

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "sweep_007de9f"


def _plan_task(name: str):
    spec = importlib.util.spec_from_file_location("sweep_driver", ROOT / "bench" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    plan = sweep.load_plan(ROOT / "bench" / "sweep_plan.toml")
    task = next(t for t in plan["tasks"] if t["name"] == name)
    # what a worker runs: the task's options, then --threads 1 --no-progress, plus the driver's --data-dir
    argv = ["finetune", *sweep.task_argv(task, plan["sweep"], {"data_dir": "/data"}), "--threads", "1", "--no-progress"]
    return cli.parse_args(argv)


def _records():
    return [compact.load_run(p) for p in sorted(FIXTURES.glob("*.json"))]


def test_the_fixture_comes_from_the_running_sweep_at_007de9f():
    recs = _records()
    assert recs and all(r["environment"]["git_commit"].startswith("007de9f") for r in recs)
    assert all(compact.is_compact(compact.results.read_json(p)) for p in FIXTURES.glob("*.json"))


def test_the_current_code_reuses_the_sweeps_records_with_resume():
    task, methods, opts = finetune.options(_plan_task("cola"))
    for rec in _records():
        conf = rec["config"]
        cfg, defaults = finetune.run_config(conf["kind"], task, opts)
        cfg["steps"] = finetune.epochs_to_steps(cfg["epochs"], conf["data"]["train_examples"], cfg["batch_size"],
                                                cfg["grad_accum"])  # fmt: skip
        assert rec["method"] in methods and cfg["steps"] == conf["steps"]
        assert runner.matches(rec, cfg, conf["data"], defaults), {
            k: (conf.get(k, defaults.get(k)), v)
            for k, v in cfg.items()
            if k not in runner.NOT_COMPARED and conf.get(k, defaults.get(k)) != v
        }
        # the comparison can fail: a changed default (or option) would make the sweep train the run again
        changed = {**defaults, "kappa": defaults["kappa"] * 2}
        assert not runner.matches({**rec, "config": {k: v for k, v in conf.items() if k != "kappa"}}, cfg,
                                  conf["data"], changed)  # fmt: skip


def test_the_report_reads_the_sweeps_records():
    text = task_markdown(_records())
    assert text.startswith("### cola (") and "matthews" in text and "**Partial sweep**" not in text
