"""The guarded ``save_pretrained`` under FSDP2 (optlora.persist_fsdp), 2 gloo processes.

tests/fsdp_persist.py trains ScaLoRA and RefLoRA on a sharded tiny Llama in the processes that
tests/test_fsdp.py spawns once (with timeouts), and saves in the two supported ways and the refused one;
here, in one process, plain PEFT loads what was written on the pretrained base.
"""

from __future__ import annotations

import json

import pytest
import torch
from eco_helpers import token_batches
from fsdp_persist import EVAL_IDS, STEPS
from peft import PeftModel
from test_fsdp import two  # noqa: F401 - the session fixture that runs the 2-process worker
from transformers import AutoModelForCausalLM

from optlora import checkpoint, persist
from optlora.export import REPORT_FILE, lora_layers
from optlora.persist_fsdp import NO_STATE_NOTE

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")

WAYS = ("every", "whole")  # every rank with is_main_process; the main rank alone with a whole state_dict


@pytest.fixture(scope="module")
def saved(two):  # noqa: F811
    return torch.load(two / "persist_save.pt", weights_only=False)


def pretrained(two):  # noqa: F811
    return AutoModelForCausalLM.from_pretrained(two / "persist-base")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=token_batches(*EVAL_IDS)).logits


def _with_live_factors(two, trained: dict):  # noqa: F811
    """The pretrained base with the trained live LoRA factors: what saving PEFT's adapter alone would give."""
    model = PeftModel.from_pretrained(pretrained(two), two / "persist-reflora-whole")  # any adapter of this config
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in trained.items():
            if "lora_" in n:
                params[n].copy_(v)
    return model


@pytest.mark.parametrize("way", WAYS)
def test_scalora_adapter_loads_in_plain_peft_to_the_stated_error(two, saved, way):  # noqa: F811
    r = saved["scalora"]
    assert r["steps"] == (STEPS, STEPS - 1) and not r["stats"]["last_skipped_layers"]
    folder = two / f"persist-scalora-{way}"
    report = json.loads((folder / REPORT_FILE).read_text())
    loaded = PeftModel.from_pretrained(pretrained(two), folder)  # plain PEFT, one process, the pretrained base
    # the stated error is the error of the update PEFT loads, per layer: W_now + s B A - W_pretrained
    original = pretrained(two)
    trained, stated = r["trained"], []
    for f in lora_layers(loaded):
        key = f"base_model.model.{f.name}"
        w0 = original.get_submodule(f.name).weight.double()
        live_b, live_a = trained[f"{key}.lora_B.default.weight"], trained[f"{key}.lora_A.default.weight"]
        true = trained[f"{key}.base_layer.weight"].double() - w0 + f.scaling * live_b.double() @ live_a.double()
        got = f.scaling * f.lora_B.detach().double() @ f.lora_A.detach().double()
        err = float((got - true).norm() / true.norm())
        stated.append(report["layers"][f.name]["rel_error"])
        assert err == pytest.approx(stated[-1], rel=1e-2, abs=1e-6), f.name
        assert stated[-1] <= persist.DEFAULT_TOL
    assert len(stated) == 8
    # the logits: the update's effect on them is reproduced to about the stated relative error
    want, got = r["logits"], logits(loaded)
    effect = float((want - logits(original)).abs().max())
    err = float((got - want).abs().max())
    assert err <= 2 * max(stated) * effect + 1e-5, (err, max(stated), effect)  # measured: 0.3x
    live_only = float((logits(_with_live_factors(two, trained)) - want).abs().max())
    assert err < 1e-2 * live_only, (err, live_only)  # what PEFT's own save of the live factors would give


def test_both_ways_write_the_same_adapter(two):  # noqa: F811
    every, whole = (json.loads((two / f"persist-scalora-{w}" / REPORT_FILE).read_text()) for w in WAYS)
    assert every["layers"].keys() == whole["layers"].keys()
    for name, layer in every["layers"].items():
        assert layer["rank"] == whole["layers"][name]["rank"], name
        assert layer["rel_error"] == pytest.approx(whole["layers"][name]["rel_error"], rel=1e-6, abs=1e-9), name


@pytest.mark.parametrize("way", WAYS)
def test_reflora_adapter_is_the_trained_model(two, saved, way):  # noqa: F811
    r = saved["reflora"]
    assert r["steps"] == (STEPS, STEPS - 1)
    folder = two / f"persist-reflora-{way}"
    assert not (folder / REPORT_FILE).exists()  # PEFT's own adapter: exact
    want = r["logits"]
    got = logits(PeftModel.from_pretrained(pretrained(two), folder))
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())  # two processes' rounding only
    assert float((want - logits(pretrained(two))).abs().max()) > 1e-3  # trained: the check can fail


@pytest.mark.parametrize("name", ["scalora", "reflora"])
def test_every_rank_saving_writes_the_exact_state(two, saved, name):  # noqa: F811
    """``optlora_state.dcp`` (every rank's shards): a fresh sharded model resumes exactly from it via
    ``load_adapter`` (and refuses it, transactionally, for another configuration), and ``persist.rebuild``
    gives the trained model in one process."""
    r = saved[name]
    folder = two / f"persist-{name}-every"
    assert (folder / checkpoint.SHARDED_STATE / ".metadata").is_file()
    assert r["resumed"] == {"error": None, "equal": True, "steps": (STEPS, STEPS - 1)}
    # a state of another configuration: every rank refuses it, with the same error, before anything changes
    assert [row["unchanged"] for row in r["mismatch"]] == [True, True]
    assert "'interval': (1, 2)" in r["mismatch"][0]["error"], r["mismatch"]
    assert r["mismatch"][0]["error"] == r["mismatch"][1]["error"]
    rebuilt = dict(persist.rebuild(pretrained(two), folder).named_parameters())
    for n, v in r["trained"].items():
        assert torch.equal(rebuilt[n].detach(), v), n
    if name == "scalora":
        assert checkpoint.SHARDED_STATE in (folder / "README.md").read_text()


def test_the_main_rank_alone_writes_no_state_and_says_so(two):  # noqa: F811
    folder = two / "persist-scalora-whole"
    assert checkpoint.find_state(folder) is None
    assert NO_STATE_NOTE.split(":")[0] in (folder / "README.md").read_text()


@pytest.mark.parametrize("name", ["scalora", "reflora"])
def test_the_main_rank_alone_without_a_state_dict_is_refused(saved, name):
    r = saved[name]
    assert r["refused"] is not None and not r["refused_wrote"]
    for guidance in ("is_main_process=(rank == 0)", "state_dict=full", "Nothing was written"):
        assert guidance in r["refused"], guidance
