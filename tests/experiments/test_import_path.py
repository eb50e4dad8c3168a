"""The experiments are off the library's import path: a top-level package that only the CLI imports, lazily."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
LIBRARY = ROOT / "optlora"
PACKAGE = "optlora_experiments"


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=300)


def test_import_optlora_never_imports_the_experiments(tmp_path):
    code = (
        "import sys, optlora, optlora.hf, optlora.cli, optlora.export\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] == {PACKAGE!r} or m.startswith('optlora.experiments'))\n"
        "print(bad)\n"
    )
    done = _run(code, tmp_path)  # outside the checkout: what an installed optlora does
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_the_library_names_the_experiments_only_in_the_cli_subcommand_table():
    assert not (LIBRARY / "experiments").exists()
    for path in sorted(LIBRARY.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == PACKAGE for a in node.names), path
            elif isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != PACKAGE, path
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGE):
                assert path.name == "cli.py", f"{path}: {node.value}"  # the one lazy import place
    from optlora import cli

    names = {m: n for m, n in cli.SUBCOMMANDS if m.startswith(PACKAGE + ".")}
    assert sorted(names.values()) == ["demo", "finetune", "mf", "plot"]


def test_the_subcommands_load_through_the_cli_and_python_m_optlora_works():
    from optlora import cli

    parser = cli.build_parser()
    choices = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("mf", "finetune", "plot", "demo"):
        assert "unavailable" not in (choices[name].description or ""), name
    done = subprocess.run([sys.executable, "-m", "optlora", "finetune", "--help"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert done.returncode == 0 and "--records-dir" in done.stdout, done.stderr  # what the sweep driver calls


def test_the_distribution_ships_both_packages_and_the_sample():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = meta["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {"optlora", "optlora.*", PACKAGE, f"{PACKAGE}.*"} <= set(include)
    data = meta["tool"]["setuptools"]["package-data"][PACKAGE]
    assert all(list((ROOT / PACKAGE).glob(pattern)) for pattern in data)  # each pattern matches a shipped file
    extra = meta["project"]["optional-dependencies"]["experiments"]
    assert "matplotlib" in extra and not any(d.startswith("matplotlib") for d in meta["project"]["dependencies"])
