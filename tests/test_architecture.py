"""The house rules, checked on the source: layers import downwards only, no import cycles.

Floors, bottom to top:

1. ``functional`` and ``compress`` (pure math: torch only), ``cliutil`` (argparse only);
2. the core: ``merge``, ``optimizer_state``, ``discovery``, ``distributed``, ``residual``, ``methods.*``;
3. integrations: ``hf``, ``export``, ``export_cli``, ``cli``, ``experiments.*``, ``testing.*``, ``persist``,
   ``persist_fsdp``, ``persist_load``, ``originals``, ``checkpoint``, ``sharded_checkpoint``, ``rebuild``, ``card``.

The core never imports an integration; ``testing.reference`` never imports optlora (it is the
independent oracle); nothing outside ``cli`` imports ``cli``; and the module graph has no cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "optlora"
CORE = ("merge", "optimizer_state", "discovery", "distributed", "residual", "methods")
INTEGRATIONS = (
    "hf",
    "export",
    "export_cli",
    "cli",
    "cliutil",
    "experiments",
    "testing",
    "persist",
    "persist_fsdp",
    "persist_load",
    "originals",
    "checkpoint",
    "sharded_checkpoint",
    "rebuild",
    "card",
)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


_ALL = {_module_name(p) for p in PKG.rglob("*.py")}


def _imports(path: pathlib.Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # ``from . import merge`` imports the module optlora.merge, ``from .x import f`` the module .x
            subs = {f"{mod}.{a.name}" for a in node.names} & set(_ALL)
            out.update(subs or {mod})
    return out


MODULES = {_module_name(p): p for p in PKG.rglob("*.py")}
GRAPH = {m: {i for i in _imports(p) if i in MODULES and i != m} for m, p in MODULES.items()}


def _floor(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else ""
    if top in ("functional", "compress", "cliutil"):
        return "base"
    if top in CORE:
        return "core"
    if top in INTEGRATIONS:
        return "integration"
    return "package"  # optlora/__init__, __main__


def test_every_module_has_a_floor():
    """A new module must be placed in a floor above (else the rules below would not look at it)."""
    unplaced = sorted(m for m in MODULES if _floor(m) == "package" and m not in ("optlora", "optlora.__main__"))
    assert not unplaced, unplaced


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _floor(m) in ("base", "core")))
def test_core_never_imports_an_integration(module):
    up = sorted(i for i in GRAPH[module] if _floor(i) == "integration")
    assert not up, f"{module} imports {up}"


def test_functional_and_reference_are_pure():
    assert not GRAPH["optlora.functional"], GRAPH["optlora.functional"]
    assert not GRAPH["optlora.compress"], GRAPH["optlora.compress"]
    assert not GRAPH["optlora.cliutil"]
    reference = _imports(MODULES["optlora.testing.reference"])
    assert not any(i.split(".")[0] == "optlora" for i in reference), reference


def test_only_the_command_line_imports_cli_and_hf_never_imports_trl():
    # export_cli is the `optlora export` command itself; it reaches the experiments' model aliases through cli
    users = sorted(
        m for m, deps in GRAPH.items() if "optlora.cli" in deps and m not in ("optlora.__main__", "optlora.export_cli")
    )
    assert not users, users
    assert not any(i.split(".")[0] == "trl" for i in _imports(MODULES["optlora.hf"]))


def test_no_import_cycles():
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in GRAPH[m]:
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, d]))
            if d not in state:
                visit(d, [*path, m])
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [])


def test_tests_and_benchmarks_do_not_reach_into_each_other():
    for folder, other in (("tests", "bench"), ("bench", "tests")):
        for path in (ROOT / folder).rglob("*.py"):
            for line in path.read_text().splitlines():
                if "sys.path" in line or "syspath_prepend" in line:
                    assert other not in line, f"{path} puts {other}/ on the import path: {line.strip()}"
