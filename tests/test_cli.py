"""The command line's own behaviour: only messages its user can act on (issue #19, item 3)."""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import warnings

import pytest

from optlora import cli
from optlora.originals import HostCopyWarning


def test_help_prints_nothing_but_the_help():
    """bitsandbytes (imported by PEFT) logs that its optional hub kernel is missing: not on our --help."""
    done = subprocess.run([sys.executable, "-m", "optlora", "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage: optlora")
    assert done.stderr == ""


def test_quiet_drops_what_the_user_cannot_act_on_and_restores_everything(caplog):
    logger = logging.getLogger(cli._DROPPED_LOGS[0][0])
    message = cli._DROPPED_LOGS[0][1] + " from kernels-community: ..."
    text = f"host copy {id(object())}"  # "once" remembers a text for the whole process
    with cli.quiet_third_party(), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # inside: the context's filters come first
        logger.warning(message)
        logging.getLogger("bitsandbytes.other").warning("kept: another message")
        with cli.quiet_third_party():
            warnings.warn(
                "`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning, stacklevel=1
            )
            for _ in range(3):
                warnings.warn(text, HostCopyWarning, stacklevel=1)
    assert [r.getMessage() for r in caplog.records] == ["kept: another message"]
    assert [str(w.message) for w in seen] == [text]  # once, and the FutureWarning dropped
    assert not logger.filters
    caplog.clear()
    logger.warning(message)  # outside the context: untouched
    assert len(caplog.records) == 1


def test_bars_off_is_undone():
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled()
    with cli.quiet_third_party(bars=False):
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()


@pytest.mark.parametrize(
    ("module", "install"),
    [("matplotlib", "pip install 'optlora[experiments]'"), ("galore_torch", "pip install galore-torch bitsandbytes")],
)
def test_a_missing_optional_package_is_one_sentence(module, install, monkeypatch, capsys):
    def run(args):
        raise ModuleNotFoundError(f"No module named '{module}'", name=module)

    monkeypatch.setattr(cli, "parse_args", lambda argv: argparse.Namespace(func=run, command="demo"))
    assert cli.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"optlora demo: needs the optional package `{module}`, which is not installed: {install}"


def test_a_missing_optlora_module_is_a_bug_not_an_extra(monkeypatch):
    def run(args):
        raise ModuleNotFoundError("No module named 'optlora.nothing'", name="optlora.nothing")

    monkeypatch.setattr(cli, "parse_args", lambda argv: argparse.Namespace(func=run, command="demo"))
    with pytest.raises(ModuleNotFoundError):
        cli.main([])
