"""Run claims: exclusive, live claims respected, stale ones (dead process, recycled pid, silent host) taken over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from optlora_experiments import claims as C


@pytest.fixture
def other_process():
    """A live process that is not this one; killed at the end."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _claim_file(claims: C.Claims, name: str, content: dict, age_s: float = 0.0):
    claims.dir.mkdir(parents=True, exist_ok=True)
    p = claims.path(name)
    p.write_text(json.dumps(content))
    t = time.time() - age_s
    os.utime(p, (t, t))
    return p


def test_a_claim_is_exclusive_and_released(tmp_path, other_process):
    c = C.Claims(tmp_path)
    assert c.try_claim("run") and c.try_claim("run")  # this process holds it: claiming again is a no-op
    content = json.loads(c.path("run").read_text())
    assert content["pid"] == os.getpid() and content["host"] == socket.gethostname() and content["run"] == "run"
    assert content["start_time"] == pytest.approx(C.process_start_time(os.getpid()))
    assert c.holder("run") is None  # ours
    c.release("run")
    assert not c.path("run").exists()
    live = {
        "host": socket.gethostname(),
        "pid": other_process.pid,
        "start_time": C.process_start_time(other_process.pid),
    }
    _claim_file(c, "run", live, age_s=10_000)  # an old heartbeat does not matter on this host: the process lives
    assert not c.try_claim("run") and c.holder("run")["pid"] == other_process.pid
    c.release("run")  # not ours: left alone
    assert c.path("run").exists()


def test_stale_claims_are_taken_over(tmp_path, other_process, capsys):
    c = C.Claims(tmp_path, stale_after=60.0, heartbeat=1.0)
    me = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    gone = int(dead.stdout)
    _claim_file(c, "a", {"host": me, "pid": gone, "start_time": 1.0})  # a killed run / closed session
    start = C.process_start_time(other_process.pid)
    _claim_file(c, "b", {"host": me, "pid": other_process.pid, "start_time": start - 100})  # pid recycled
    _claim_file(c, "c", {"host": "elsewhere", "pid": 1, "start_time": 0.0}, age_s=120)  # silent other host
    _claim_file(c, "d", {"host": "elsewhere", "pid": 1, "start_time": 0.0}, age_s=5)  # live other host
    c.path("e").write_text("{")  # half-written by a process killed while writing it
    if C.process_start_time(gone) is None:  # (the pid may have been reused at once; then it is not stale)
        assert c.try_claim("a")
    assert c.try_claim("b") and c.try_claim("c") and c.try_claim("e")
    assert not c.try_claim("d") and c.holder("d")["host"] == "elsewhere"
    assert "taking over the stale claim of b" in capsys.readouterr().out
    assert json.loads(c.path("b").read_text())["pid"] == os.getpid()


def test_hold_beats_the_heartbeat_and_releases(tmp_path):
    c = C.Claims(tmp_path, stale_after=10.0, heartbeat=0.05)
    assert c.try_claim("r")
    old = time.time() - 100
    os.utime(c.path("r"), (old, old))
    with c.hold("r"):
        time.sleep(0.3)
        assert time.time() - c.path("r").stat().st_mtime < 5
    assert not c.path("r").exists()
    with pytest.raises(ValueError, match="heartbeat"):
        C.Claims(tmp_path, stale_after=1.0, heartbeat=2.0)


def test_the_lock_excludes_another_process(tmp_path):
    code = (
        "import sys, time; from optlora_experiments.claims import locked\n"
        "print('ready', flush=True); t = time.time()\nwith locked(sys.argv[1]): print(time.time() - t)\n"
    )
    with C.locked(tmp_path):
        proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.0)
    waited = float(proc.communicate(timeout=60)[0])
    assert waited > 0.5  # it got the lock only after this process let go
