"""Fixtures of the experiment tests: a data folder in every supported format, a machine without ../shared."""

from __future__ import annotations

import pytest

from optlora_experiments.data import sources

from .datafix import make_data_root


@pytest.fixture
def data_root(tmp_path):
    return make_data_root(tmp_path / "data")


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    """A fresh clone: no ../shared/data anywhere, offline."""
    monkeypatch.setattr(sources, "shared_candidates", lambda: [tmp_path / "no-such-shared"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
