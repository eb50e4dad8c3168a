"""Claims and a lock that let several ``optlora finetune --resume`` processes share one ``--out``.

* A run is **claimed** by creating ``<out>/claims/<run>.claim`` with ``O_CREAT | O_EXCL``; the file
  holds the claimant's host, pid and process start time (psutil), and the claimant touches it every
  ``heartbeat`` seconds while it holds it (a daemon thread of :meth:`Claims.hold`, stopped on release).
* A claim is **stale** -- its process is gone -- when it was made on this host and no process with that
  pid and that start time runs any more (a killed run, a closed session; a recycled pid has another start
  time), or, for a claim made on another host (whose processes cannot be looked at), when its heartbeat
  is older than ``stale_after`` seconds. A stale claim is taken over.
* Every check-and-create runs under :func:`locked` (an exclusive ``fcntl.flock`` on ``<out>/.lock``,
  released by the kernel when its process dies), so two processes never take over the same stale claim.
  The same lock serialises the rewriting of ``summary.csv`` / ``aggregate.csv`` / plots.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
from pathlib import Path

import psutil

LOCK_FILE = ".lock"
CLAIMS_DIR = "claims"


@contextlib.contextmanager
def locked(folder: str | os.PathLike):
    """Hold the exclusive lock of ``folder`` (``folder/.lock``, created if missing) for the ``with`` block."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(folder) / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def process_start_time(pid: int) -> float | None:
    """Start time (seconds since the epoch) of process ``pid``, or None if there is no such process."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def this_process() -> dict:
    """``{"host", "pid", "start_time"}`` of the calling process, as written into its claims."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": process_start_time(os.getpid())}


def is_stale(claim: dict, age_s: float, stale_after: float) -> bool:
    """Whether ``claim`` (a claim file's content, its heartbeat ``age_s`` seconds old) belongs to no live process."""
    pid, start = claim.get("pid"), claim.get("start_time")
    if not isinstance(pid, int):
        return True  # unreadable: claims are written under the lock, so its writer died while writing it
    if claim.get("host") != socket.gethostname():
        return age_s > stale_after
    now = process_start_time(pid)
    return now is None or start is None or abs(now - start) > 1.0


class Claims:
    """The claims of one output folder (see the module docstring).

    Args:
        folder: the sweep's ``--out``.
        stale_after: seconds without a heartbeat after which another host's claim is stale.
        heartbeat: seconds between the touches of a held claim.
    """

    def __init__(self, folder: str | os.PathLike, stale_after: float = 900.0, heartbeat: float = 60.0):
        if not 0 < heartbeat < stale_after:
            raise ValueError(f"need 0 < heartbeat < stale_after, got {heartbeat} and {stale_after}")
        self.folder = Path(folder)
        self.dir = self.folder / CLAIMS_DIR
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self.me = this_process()

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.claim"

    def read(self, name: str) -> tuple[dict, float] | None:
        """``(content, heartbeat age in s)`` of the claim of run ``name``, or None if it is not claimed."""
        p = self.path(name)
        try:
            age = time.time() - p.stat().st_mtime
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            content = json.loads(text)
        except json.JSONDecodeError:
            content = {}
        return (content if isinstance(content, dict) else {}), age

    def holder(self, name: str) -> dict | None:
        """The live claim of run ``name`` held by another process, or None (unclaimed, stale or ours)."""
        got = self.read(name)
        if got is None or self._mine(got[0]) or is_stale(got[0], got[1], self.stale_after):
            return None
        return got[0]

    def _mine(self, claim: dict) -> bool:
        return all(claim.get(k) == self.me[k] for k in ("host", "pid", "start_time"))

    def try_claim(self, name: str) -> bool:
        """Claim run ``name``; False if another live process holds it. A stale claim is taken over (printed)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with locked(self.folder):
            got = self.read(name)
            if got is not None:
                if self._mine(got[0]):
                    return True
                if not is_stale(got[0], got[1], self.stale_after):
                    return False
                print(f"taking over the stale claim of {name} (pid {got[0].get('pid')} on {got[0].get('host')})")
                self.path(name).unlink(missing_ok=True)
            content = json.dumps({**self.me, "run": name, "claimed_at": time.time()})
            fd = os.open(self.path(name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(content)
        return True

    def release(self, name: str) -> None:
        """Delete the claim of run ``name`` if this process holds it."""
        with locked(self.folder):
            got = self.read(name)
            if got is not None and self._mine(got[0]):
                self.path(name).unlink(missing_ok=True)

    @contextlib.contextmanager
    def hold(self, name: str):
        """Keep the (already claimed) run ``name``'s heartbeat going for the block, then release the claim."""
        stop = threading.Event()

        def beat():
            while not stop.wait(self.heartbeat):
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path(name))

        thread = threading.Thread(target=beat, name=f"claim-heartbeat-{name}", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release(name)
