"""Install paths (issue #19, item 2): the demo goes offline by itself and names what to install."""

from __future__ import annotations

import importlib.util

import pytest

from optlora import cli
from optlora_experiments.data import sources, tasks


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    """A machine without ../shared/data, not told it is offline, whose hub refuses connections."""
    monkeypatch.setattr(sources, "shared_candidates", lambda: [tmp_path / "no-such-shared"])
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    sources.hub_reachable.cache_clear()
    yield
    sources.hub_reachable.cache_clear()


def test_an_unreachable_hub_is_asked_once_and_the_sample_used_without_retries(unreachable_hub, monkeypatch, capsys):
    def no_download(*args, **kwargs):
        raise AssertionError("the hub was asked for data although it cannot be reached")

    monkeypatch.setattr(sources, "load_hub", no_download)
    for split in ("train", "test"):
        records, where = tasks.gsm8k_records(split, allow_sample=True)
        assert records and where.endswith(f"sample/gsm8k/{split}.jsonl.gz")
    err = capsys.readouterr().err
    assert err.count("cannot be reached") == 1 and "127.0.0.1" in err


def test_the_environment_still_decides_first(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(sources, "hub_reachable", lambda: pytest.fail("probed although HF_HUB_OFFLINE is set"))
    assert not sources.use_hub()


def test_the_demo_names_what_to_install_before_it_starts(monkeypatch, tmp_path, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 2
    out = capsys.readouterr()
    assert out.out == ""  # nothing ran
    assert out.err.strip() == "optlora demo: needs matplotlib, not installed: pip install 'optlora[experiments]'"
    assert (
        cli.main(["demo", "--quick", "--no-plots", "--skip-finetune", "--mf-steps", "2", "--out", str(tmp_path)]) == 0
    )
