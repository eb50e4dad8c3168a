"""The sweep loop with fake quick runs: claims respected, prompt 'pending', parallel processes, selections recorded."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from optlora_experiments import claims, compact, results, runner

CFG = {"steps": 2, "rank": 8, "smooth_window": None}
INFO = {"train_examples": 10}


def fake_train(log, peak=5e-4, sleep=0.0):
    """A run that takes ``sleep`` s, logs its name, and scores -|log(lr / peak)| on the held-out part."""

    def train(prep, method, lr, seed, cfg, *, score_holdout, run_dir):
        with open(log, "a") as fh:
            fh.write(f"{method} {lr:g} {seed} {os.getpid()}\n")
        time.sleep(sleep)
        final = {"score": 0.5 + 0.01 * seed, "diverged_at_step": None, "cpu_ms_per_step": 1.0}
        if score_holdout:
            final["selection_score"] = -abs(math.log(lr / peak))
        steps = [{"step": k, "loss": 1.0 / k, "wall_time": 0.1 * k, "cpu_ms": 1.0} for k in (1, 2)]
        conf = {**cfg, "task": "t", "lr": lr, "data": prep.info, "primary_metric": "accuracy"}
        return results.make_run(method, seed, conf, steps, final, env={})

    return train


def sweep(out, train, methods=("lora", "reflora"), grid=(2e-4, 1e-3), seeds=(0, 1), **kw):
    prep = SimpleNamespace(task=SimpleNamespace(name="t"), info=INFO)
    grids = {m: list(grid) for m in methods}
    return runner.sweep(prep, CFG, CFG, list(methods), seeds, grids, out=out, train=train, plots=False,
                        **{"resume": True, **kw})  # fmt: skip


def _log(path):
    return [line.split()[:3] for line in open(path)] if os.path.exists(path) else []


@pytest.fixture
def other_process():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_runs_held_elsewhere_make_the_sweep_return_pending_then_resume(tmp_path, other_process, capsys):
    out, log = tmp_path / "out", tmp_path / "log"
    held = runner.run_name("t", "lora", 2e-4, 0)
    c = claims.Claims(out)
    c.dir.mkdir(parents=True)
    start = claims.process_start_time(other_process.pid)
    c.path(held).write_text(json.dumps({"host": socket.gethostname(), "pid": other_process.pid, "start_time": start}))
    with pytest.raises(runner.SweepPending) as info:
        sweep(out, fake_train(log))
    msg = str(info.value)
    assert f"lora lr=0.0002 seed=0 (pid {other_process.pid})" in msg and "lora wait for their lr selection" in msg
    assert "4 of 6 runs complete" in msg
    # everything it could run, in order: the grid by lr then method, then reflora's seed 1; lora waits
    assert _log(log) == [
        ["reflora", "0.0002", "0"],
        ["lora", "0.001", "0"],
        ["reflora", "0.001", "0"],
        ["reflora", "0.001", "1"],
    ]  # fmt: skip  (1e-3 is nearer the peak 5e-4)
    assert (out / "summary.csv").is_file() and not (out / "aggregate.csv").exists()
    other_process.kill()
    other_process.wait()  # the holder dies: its claim is stale
    capsys.readouterr()
    recs = sweep(out, fake_train(log))
    assert _log(log)[4:] == [["lora", "0.0002", "0"], ["lora", "0.001", "1"]]
    text = capsys.readouterr().out
    assert "already complete in" in text and "taking over the stale claim" in text and "all 6 runs complete" in text
    assert len(recs) == 6 and (out / "aggregate.csv").is_file() and not list(c.dir.iterdir())
    capsys.readouterr()
    sweep(out, fake_train(log))  # nothing left: nothing trained, said so
    assert len(_log(log)) == 6 and "all 6 runs complete" in capsys.readouterr().out


def _worker(out, log):
    train = fake_train(log, peak=1e-4, sleep=0.2)
    for _ in range(200):
        try:
            sweep(out, train, grid=(2e-4, 5e-4, 1e-3), seeds=(0, 1, 2), extend=True)
            return
        except runner.SweepPending:
            time.sleep(0.05)
    raise RuntimeError("the sweep never completed")


def test_two_processes_share_one_out_and_train_every_run_once(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_worker, args=(out, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = [line.split() for line in open(log)]
    runs = [tuple(x[:3]) for x in lines]
    assert len(runs) == len(set(runs)), "a run was trained twice"
    assert len({x[3] for x in lines}) == 2  # both processes trained
    # grid 2e-4..1e-3 with the best (1e-4) below it: extended to 1e-4 and 5e-5, then seeds 1 and 2 at 1e-4
    for m in ("lora", "reflora"):
        assert {r[1] for r in runs if r[0] == m and r[2] == "0"} == {"5e-05", "0.0001", "0.0002", "0.0005", "0.001"}
        assert {(r[1], r[2]) for r in runs if r[0] == m and r[2] != "0"} == {("0.0001", "1"), ("0.0001", "2")}
    rec = results.read_json(out / "t_lora_lr0.001_seed0.json")
    assert rec["selection"]["selected_lr"] == 1e-4 == rec["config"]["selected_lr"]
    assert rec["selection"]["extended"] == [1e-4, 5e-5] and "interior" in rec["selection"]["reason"]
    assert not (out / "checkpoints").exists() and not list((out / "claims").iterdir())


def test_without_resume_old_records_are_retrained_and_compact_copies_follow(tmp_path):
    out, log, rdir = tmp_path / "out", tmp_path / "log", tmp_path / "records"
    sweep(out, fake_train(log), methods=("lora",), resume=False, records_dir=rdir)
    sweep(out, fake_train(log), methods=("lora",), resume=False, records_dir=rdir)
    assert len(_log(log)) == 6  # 2 grid + 1 seed, twice
    small = results.read_json(rdir / "t_lora_lr0.001_seed0.json")
    assert compact.is_compact(small) and small["selection"]["selected_lr"] == 1e-3
    assert small["selection"] == results.read_json(out / "t_lora_lr0.001_seed0.json")["selection"]
