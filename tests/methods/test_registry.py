"""The one ``name -> constructor`` registry (optlora.methods) and ``python -m optlora``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import tiny_mlp

import optlora
from optlora.methods import METHODS, SCALORA_I_INTERVAL


@pytest.mark.parametrize(
    "name,cls,config",
    [
        ("reflora", optlora.RefLoRA, {"scalar": False, "interval": 1}),
        ("reflora_s", optlora.RefLoRA, {"scalar": True, "interval": 1}),
        ("scalora", optlora.ScaLoRA, {"interval": 1}),
        ("scalora_i", optlora.ScaLoRA, {"interval": SCALORA_I_INTERVAL}),
        ("scaledgd", optlora.ScaledGD, {"interval": 1}),
    ],
)
def test_make_method_builds_each_paper_method(name, cls, config):
    method = optlora.make_method(name, tiny_mlp(), warmup_steps=3)
    assert type(method) is cls and method.name == name and method.warmup_steps == 3
    assert config.items() <= method.config().items()


def test_lora_is_plain_and_options_pass_through():
    assert optlora.make_method("lora", tiny_mlp(), warmup_steps=5, kappa=2.0) is None
    m = optlora.make_method("scalora_i", tiny_mlp(), interval=4, kappa=0.5)
    assert (m.interval, m.kappa, m.name) == (4, 0.5, "scalora_i")


def test_unknown_names_and_registration():
    with pytest.raises(ValueError, match="unknown method 'nope'.*reflora"):
        optlora.make_method("nope", tiny_mlp())
    with pytest.raises(ValueError, match="already registered"):
        optlora.register_method("reflora", lambda model, **kw: None)
    with pytest.raises(ValueError, match="identifier"):
        optlora.register_method("not a name", lambda model, **kw: None)
    optlora.register_method("reflora_every2", lambda model, **kw: optlora.RefLoRA(model, interval=2, **kw))
    try:
        assert "reflora_every2" in optlora.method_names()
        assert optlora.make_method("reflora_every2", tiny_mlp(), warmup_steps=0).interval == 2
    finally:
        METHODS.pop("reflora_every2")


def test_python_dash_m_optlora_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "optlora", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("optlora "), out.stderr
