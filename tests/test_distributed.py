"""Distributed: DDP replicas agree and equal one process on the global batch; FSDP/DTensor is refused clearly."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from ddp_worker import train
from eco_helpers import tiny_peft

import optlora
from optlora.distributed import ADVICE, assert_replicas_in_sync, check_not_sharded, sharding_problem

HERE = pathlib.Path(__file__).resolve().parent

needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


@needs_dist
def test_ddp_two_processes_match_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "ddp_worker.py"), str(tmp_path), "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for kind in ("scalora", "reflora_s"):
        single = train(kind)  # one process, the whole global batch
        untouched = {n: p for n, p in tiny_peft(seed=11).named_parameters() if n in single}
        assert any(not torch.equal(single[n], untouched[n]) for n in single)
        assert r0[kind].keys() == single.keys()
        for name in single:
            assert torch.equal(r0[kind][name], r1[kind][name]), f"{kind}: ranks differ at {name}"
            torch.testing.assert_close(r0[kind][name], single[name], rtol=1e-4, atol=1e-6, msg=f"{kind} {name}")


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group (file rendezvous: no port), destroyed afterwards."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@needs_dist
def test_fsdp1_use_orig_params_is_refused(process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = tiny_peft()
    early = optlora.ScaLoRA(model, warmup_steps=0)  # built before wrapping: refused at attach
    with pytest.warns(UserWarning):  # FSDP: world size 1 switches to NO_SHARD
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
    with pytest.raises(RuntimeError, match="FSDP1") as err:
        optlora.RefLoRA(wrapped)
    assert "DDP" in str(err.value) and "accelerate launch" in str(err.value)
    with pytest.raises(RuntimeError, match="FSDP1"):
        optlora.ScaLoRA(model)  # the inner PEFT model: its parameters are flattened views
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad])
    with pytest.raises(RuntimeError, match="sharded parameters"):
        early.attach(opt)


@needs_dist
def test_fsdp2_fully_shard_is_refused(process_group):
    from torch.distributed.fsdp import fully_shard

    model = tiny_peft()
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    assert "FSDP2" in sharding_problem(model)
    with pytest.raises(RuntimeError, match="FSDP2"):
        optlora.RefLoRA(model, scalar=True)
    with pytest.raises(RuntimeError, match="DTensor"):
        check_not_sharded(None, torch.optim.SGD(model.parameters(), lr=0.1))


def test_plain_and_ddp_models_are_accepted():
    model = tiny_peft()
    assert sharding_problem(model) is None
    method = optlora.RefLoRA(model)
    method.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert_replicas_in_sync(method)  # no process group: a no-op
    assert "DDP" in ADVICE


@needs_dist
def test_assert_replicas_in_sync_single_rank(process_group):
    method = optlora.ScaLoRA(tiny_peft())
    assert_replicas_in_sync(method)  # one rank always agrees with itself
