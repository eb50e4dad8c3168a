"""Where the pretrained weights come from (optlora.originals): lazy file reads, verification, host copies."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from eco_helpers import tiny_llama
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from optlora.originals import HostCopyWarning, OriginalsUnavailable, OriginalWeights, resolve_folder, weight_files

LAYERS = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "lm_head"]


def _live(model) -> dict[str, torch.Tensor]:
    return {p: model.get_submodule(p).weight for p in LAYERS}


@pytest.mark.parametrize("shards", [None, "20KB"])
def test_weights_are_read_from_the_files_they_were_loaded_from(tmp_path, shards):
    tiny_llama(3).save_pretrained(tmp_path, **({"max_shard_size": shards} if shards else {}))
    if shards:
        assert os.path.isfile(tmp_path / "model.safetensors.index.json")
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    live = _live(model)
    originals = OriginalWeights.resolve(live, folder=model.config._name_or_path, prefix=model.base_model_prefix)
    assert not originals.problems and all(not isinstance(s, torch.Tensor) for s in originals.sources.values())
    with torch.no_grad():
        live["lm_head"].add_(1.0)  # the model changes (as ScaLoRA's merges do); the original stays readable
    for p in LAYERS:
        assert torch.equal(originals.get(p), tiny_llama(3).get_submodule(p).weight)
    assert originals.describe() == f"3 layer(s) read from {tmp_path}"


def test_a_file_saved_without_the_model_prefix_is_matched(tmp_path):
    full = tiny_llama(4)
    full.model.save_pretrained(tmp_path)  # a LlamaModel checkpoint: keys without "model."
    assert "layers.0.self_attn.q_proj.weight" in weight_files(str(tmp_path))
    live = {p: full.get_submodule(p).weight for p in LAYERS[:2]}
    originals = OriginalWeights.resolve(live, folder=tmp_path, prefix=full.base_model_prefix)
    assert not originals.problems and torch.equal(originals.get(LAYERS[0]), live[LAYERS[0]])


def test_a_wrong_file_is_caught_and_never_replaced_by_a_copy(tmp_path):
    tiny_llama(5).save_pretrained(tmp_path)
    other = tiny_llama(6)  # same architecture, other weights: the wrong file for this model
    with warnings.catch_warnings():  # "extra.layer", which no file holds, is copied: the folder cannot help
        warnings.simplefilter("error", HostCopyWarning)
        originals = OriginalWeights.resolve({**_live(other), "extra.layer": torch.zeros(2, 2)}, folder=tmp_path)
    assert set(originals.problems) == set(LAYERS) and "differs from the live weight" in originals.problems[LAYERS[0]]
    assert isinstance(originals.sources["extra.layer"], torch.Tensor)
    with pytest.raises(OriginalsUnavailable, match="differs from the live weight"):
        originals.get(LAYERS[0])
    with pytest.raises(OriginalsUnavailable, match="3 LoRA layer"):
        originals.require(LAYERS)


def test_without_files_a_host_copy_is_taken_and_said_only_where_a_folder_would_help(tmp_path):
    model = tiny_llama(7)
    live = _live(model)
    nbytes = sum(w.numel() * w.element_size() for w in live.values())
    with pytest.warns(HostCopyWarning, match=f"{nbytes / 2**20:.1f} MiB.*original="):  # a name, but no files here
        OriginalWeights.resolve(live, folder=str(tmp_path / "moved"))
    (tmp_path / "other").mkdir()  # a folder with none of these layers (another model's files)
    save_file({"unrelated.weight": torch.zeros(2)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.warns(HostCopyWarning, match="holds none of them"):
        OriginalWeights.resolve(live, folder=tmp_path / "other")
    with warnings.catch_warnings():  # built from a config: the weights exist nowhere else, nothing to advise
        warnings.simplefilter("error", HostCopyWarning)
        originals = OriginalWeights.resolve(live, folder=None)
    with torch.no_grad():
        live[LAYERS[0]].add_(1.0)
    assert torch.equal(originals.get(LAYERS[0]), tiny_llama(7).get_submodule(LAYERS[0]).weight)
    refused = OriginalWeights.resolve(live, folder=None, host_copy=False)
    with pytest.raises(OriginalsUnavailable, match="no file holds it"):
        refused.require(LAYERS)


def test_an_unknown_hub_id_resolves_to_no_folder():
    assert resolve_folder("nobody/not-a-model-optlora-test") is None
    assert resolve_folder(None) is None
