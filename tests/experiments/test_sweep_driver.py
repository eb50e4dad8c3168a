"""bench/sweep.py: the plan, the worker loop (pending -> next task, failures), two workers end to end (tiny model)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sweep_driver", ROOT / "bench" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_the_repository_plan_is_valid_and_in_priority_order():
    plan = sweep.load_plan(ROOT / "bench" / "sweep_plan.toml")
    assert [t["name"] for t in plan["tasks"]] == ["cola", "mrpc", "stsb", "sst2"]  # commonsense: not enabled
    sweep.check_options(plan)  # every task parses with optlora finetune's own parser
    cola = sweep.task_argv(plan["tasks"][0], plan["sweep"])
    assert cola[:5] == ["--resume", "--out", "runs/sweep/cola", "--records-dir", "docs/results/records/cola"]
    text = " ".join(cola)
    assert "--epochs 5" in text and "--lr-extend" in text and "--lrs 0.0001 0.0002 0.0005 0.001 0.002" in text
    assert "--methods lora lora_r32 dora pissa loraplus riemannian balora reflora reflora_s scalora scalora_i" in text
    assert "--save-steps 300" in text and "--batch-size 32" in text and "--alpha 16" in text


def test_bad_plans_are_refused(tmp_path):
    p = tmp_path / "p.toml"
    p.write_text('[sweep]\noutt = "x"\n[[task]]\nname = "a"\ntask = "sst2"\n')
    with pytest.raises(sweep.PlanError, match="unknown \\[sweep\\] key"):
        sweep.load_plan(p)
    p.write_text('[[task]]\nname = "a"\ntask = "sst2"\nlearning_rate = 1\n')
    with pytest.raises(sweep.PlanError, match="task a"):
        sweep.check_options(sweep.load_plan(p))
    p.write_text('[[task]]\nname = "a"\nenabled = false\n')
    with pytest.raises(sweep.PlanError, match="no enabled"):
        sweep.load_plan(p)


FAKE = textwrap.dedent(
    """
    import sys, pathlib
    out = pathlib.Path(sys.argv[sys.argv.index("--out") + 1])
    calls = pathlib.Path(sys.argv[1])
    with open(calls, "a") as fh:
        fh.write(out.name + "\\n")
    n = calls.read_text().split().count(out.name)
    codes = {"a": [3, 0], "b": [0], "c": [1, 1, 1, 1]}[out.name]
    sys.exit(codes[min(n, len(codes)) - 1])
    """
)


def test_a_worker_moves_on_when_a_task_is_pending_and_gives_up_on_failures(tmp_path):
    (tmp_path / "fake.py").write_text(FAKE)
    plan = {
        "sweep": {"out": str(tmp_path / "out"), "records": None, "poll_s": 0, "max_failures": 2},
        "tasks": [{"name": n, "options": {}} for n in ("a", "b", "c")],
    }
    calls = tmp_path / "calls"
    code = sweep.worker(plan, 0, [sys.executable, str(tmp_path / "fake.py"), str(calls)])
    # a pending -> b complete -> c fails; back to a (complete), c fails again -> left for a person
    assert calls.read_text().split() == ["a", "b", "c", "a", "c"] and code == 1
    log = (tmp_path / "out" / "logs" / "worker-0.log").read_text()
    assert "a: nothing this worker can run now" in log and "c: left for a person after 2 failures" in log


@pytest.mark.slow
def test_two_workers_finish_a_two_task_plan_and_train_each_run_once(data_root, tmp_path):
    plan = tmp_path / "plan.toml"
    plan.write_text(
        textwrap.dedent(
            """
            [sweep]
            out = "runs"
            records = "records"
            poll_s = 1
            [defaults]
            methods = ["lora", "balora"]
            model = "tiny"
            lrs = [1e-3, 1e-2]
            seeds = [0, 1]
            steps = 2
            batch_size = 4
            holdout_frac = 0.25
            eval_batch_size = 8
            telemetry_every = 0
            [[task]]
            name = "sst2"
            task = "sst2"
            [[task]]
            name = "mrpc"
            task = "mrpc"
            """
        )
    )
    cmd = [sys.executable, str(ROOT / "bench" / "sweep.py"), "--plan", str(plan), "--workers", "2",
           "--data-dir", str(data_root)]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    logs = "".join(p.read_text() for p in sorted((tmp_path / "runs" / "logs").glob("worker-*.log")))
    assert len(list((tmp_path / "runs" / "logs").glob("worker-*.log"))) == 2
    for task in ("sst2", "mrpc"):
        trained = [line for line in logs.splitlines() if line.startswith(f"== {task} ")]
        assert len(trained) == len(set(trained)) == 6, trained  # 2 methods x (2 grid lrs + seed 1), once each
        assert len(list((tmp_path / "records" / task).glob("*.json"))) == 6
        with open(tmp_path / "runs" / task / "aggregate.csv") as fh:
            assert {r["method"] for r in csv.DictReader(fh)} == {"lora", "balora"}
    assert "every task complete" in logs and "sst2: 6 of 6 runs finished (records/sst2), 0 running now, complete" in (
        done.stdout
    )


def test_status_counts_this_sweeps_records_against_the_runs_needed(tmp_path):
    plan = sweep.load_plan(ROOT / "bench" / "sweep_plan.toml")
    plan["sweep"].update(out=str(tmp_path / "runs"), records=str(tmp_path / "records"))
    (tmp_path / "records" / "cola").mkdir(parents=True)
    for name in ("cola_lora_lr0.0001_seed0", "cola_dora_lr0.0001_seed0"):
        (tmp_path / "records" / "cola" / f"{name}.json").write_text("{}")
    (tmp_path / "runs" / "cola" / "claims").mkdir(parents=True)
    (tmp_path / "runs" / "cola" / "claims" / "cola_pissa_lr0.0001_seed0.claim").write_text("{}")
    (tmp_path / "runs" / "cola" / "cola_lora_lr0.0001_seed0.json").write_text("{}")  # e.g. another configuration
    lines = sweep.status(plan).splitlines()
    # 11 methods x (5 grid lrs + seeds 1 and 2), more if a grid is extended
    assert lines[0] == (f"cola: 2 of >= 77 runs finished ({tmp_path / 'records' / 'cola'}), 1 running now "
                        "(cola_pissa_lr0.0001_seed0), not complete")  # fmt: skip
    assert lines[1].startswith("mrpc: 0 of >= 77 runs finished") and len(lines) == 4
    assert sweep.runs_needed({"methods": ["a", "b"], "lrs": [1e-3], "seeds": [0, 1, 2]}) == (6, False)
    assert sweep.runs_needed({}) is None
