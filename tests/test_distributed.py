"""Distributed: DDP replicas agree and equal one process; FSDP2 on one rank equals the plain path; FSDP1 and
unsupported DTensor layouts are refused clearly; assert_replicas_in_sync finds NaN. (Multi-rank FSDP2: test_fsdp.)"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
from ddp_worker import train
from eco_helpers import tiny_peft

import optlora
from optlora.distributed import ADVICE, assert_replicas_in_sync, check_sharding, sharding_problem

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
    for r in (r0, r1):  # the unattached-step hook: silent while the method is attached (below), and a step
        u = r.pop("unattached")  # without it is refused on every rank, nothing changed
        assert "not attached" in u["error"] and u["unchanged"], u
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
    assert "fully_shard" in str(err.value) and "DDP" in str(err.value)  # points to FSDP2 (and DDP)
    with pytest.raises(RuntimeError, match="FSDP1"):
        optlora.ScaLoRA(model)  # the inner PEFT model: its parameters are flattened views
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad])
    with pytest.raises(RuntimeError, match="sharded parameters"):
        early.attach(opt)


def _fully_shard(model, layers=None):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers[:layers]:
        fully_shard(layer)
    if layers is None:
        fully_shard(model)
    return model


@needs_dist
@pytest.mark.parametrize("name", ["reflora", "reflora_s", "scalora", "scaledgd", "scalora_kahan_bf16"])
def test_fsdp2_one_process_equals_plain(process_group, name):
    """The sharded code path (one collective, shard-local writes) on a 1-rank mesh equals the plain path."""
    from eco_helpers import token_batches

    ids = token_batches(4, 12, seed=4)
    kahan = name == "scalora_kahan_bf16"  # built before sharding: its Kahan buffers are sharded at attach
    out = []
    for shard in (False, True):
        model = tiny_peft(seed=3).to(torch.bfloat16 if kahan else torch.float32)
        if kahan:
            method = optlora.ScaLoRA(model, warmup_steps=1, merge_precision="kahan")
        if shard:
            _fully_shard(model)
        if not kahan:
            method = optlora.make_method(name, model, warmup_steps=1)  # built after sharding
        assert method.sharded == shard
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        method.attach(opt)
        for _ in range(3):
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        assert method.method_steps == 2
        if kahan:
            assert len(method.buffers) == len(method.factors)
            assert all(type(b).__name__ == ("DTensor" if shard else "Tensor") for b in method.buffers.values())
        out.append({n: (p.full_tensor() if shard else p).detach() for n, p in model.named_parameters()})
    for n in out[0]:
        torch.testing.assert_close(out[1][n], out[0][n], rtol=1e-6, atol=1e-7, msg=n)


@needs_dist
def test_fsdp2_tied_base_weight_is_refused(process_group):
    """A tied lm_head stays one DTensor under fully_shard: merging methods refuse it as without sharding (the
    check compares FSDP2 parameters by identity: a rank's local shard may be empty, ranks must agree)."""
    from torch.distributed.fsdp import fully_shard

    from optlora.testing.fault_cases import _tied_llama

    model = _tied_llama(["q_proj", "lm_head"])
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    with pytest.raises(ValueError, match="lm_head.*shared with.*embed_tokens"):
        optlora.ScaLoRA(model)
    method = optlora.ScaLoRA(model, skip_unsupported=True)
    assert method.sharded and [f.name.split(".")[-1] for f in method.factors] == ["q_proj[default]"]


@needs_dist
def test_fsdp2_layouts_optlora_cannot_use_are_refused(process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    partly = _fully_shard(tiny_peft(), layers=1)  # the second block and the root left unsharded
    with pytest.raises(RuntimeError, match="fully_shard to the root"):
        optlora.RefLoRA(partly)
    model = tiny_peft()
    lora = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"]
    mesh = init_device_mesh("cpu", (1,))
    lora.weight = torch.nn.Parameter(distribute_tensor(lora.weight.detach(), mesh, [Replicate()]))
    assert "Replicate" in sharding_problem(model)
    with pytest.raises(RuntimeError, match="Replicate"):
        optlora.ScaLoRA(model)
    with pytest.raises(RuntimeError, match="Replicate"):
        check_sharding(None, torch.optim.SGD(model.parameters(), lr=0.1))


def test_plain_and_ddp_models_are_accepted():
    model = tiny_peft()
    assert sharding_problem(model) is None
    method = optlora.RefLoRA(model)
    method.attach(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    assert_replicas_in_sync(method)  # no process group: only finiteness is checked
    assert "DDP" in ADVICE and "fully_shard" in ADVICE


@needs_dist
def test_assert_replicas_in_sync_single_rank(process_group):
    method = optlora.ScaLoRA(tiny_peft())
    assert_replicas_in_sync(method)  # one rank always agrees with itself


@needs_dist
@pytest.mark.parametrize("where", ["lora_A", "base"])
def test_assert_replicas_in_sync_detects_nan(process_group, where):
    method = optlora.ScaLoRA(tiny_peft())
    f = method.factors[2]
    with torch.no_grad():
        (f.lora_A if where == "lora_A" else f.base_weight).view(-1)[3] = float("nan")
    with pytest.raises(RuntimeError, match=f"non-finite values in {re.escape(f.name)}.{where}"):
        assert_replicas_in_sync(method)
