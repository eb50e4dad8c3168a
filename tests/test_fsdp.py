"""FSDP2 (``fully_shard``, gloo on CPU): every method follows the single-process trajectory, ranks agree.

The processes are spawned once per world size (tests/fsdp_worker.py runs every case and scenario
in them); a file lock lets pytest-xdist workers share the run. Each test then compares one
part of what the ranks saved with a single-process run computed here.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import fsdp_worker as W  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")

TWO = [n for n in W.CASES if not n.endswith(("-r2", "-r2-gpt2"))]
TWO += ["nonfinite", "guard_reads", "resume", "export", "trainer", "persist_save"]  # persist_save: test_persist_fsdp
FOUR = ["reflora_s-r2", "scalora-r2-gpt2"]  # ranks 2, 3 hold no rows of lora_A; GPT-2 gathers lora_B


def _spawn(tmp_path_factory, world: int, names: list[str]) -> pathlib.Path:
    """Run the worker once for all xdist workers (file lock); returns its output folder."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp().parent / f"fsdp{world}"
    with FileLock(str(root) + ".lock"):
        if not (root / "done").exists() and not (root / "log").exists():  # one try: a rerun would meet its rendezvous
            root.mkdir(exist_ok=True)
            env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run(
                [sys.executable, str(HERE / "fsdp_worker.py"), str(root), str(world), ",".join(names)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
            )
            (root / "log").write_text(proc.stdout + proc.stderr)
            if proc.returncode == 0:
                (root / "done").touch()
    if not (root / "done").exists():
        pytest.fail(f"the FSDP2 worker failed:\n{(root / 'log').read_text()[-4000:]}")
    return root


@pytest.fixture(scope="session")
def two(tmp_path_factory):
    return _spawn(tmp_path_factory, 2, TWO)


@pytest.fixture(scope="session")
def four(tmp_path_factory):
    return _spawn(tmp_path_factory, 4, FOUR)


def _same_stats(sharded: dict, single: dict) -> bool:
    """Same steps, skipped layers and column fraction; the sharded run also reports its collective's size."""
    sharded = dict(sharded)
    sent = sharded.pop("exchange_bytes", 0)
    return sharded == single and (sent > 0) == bool(single)


def _update(state: dict, init: dict) -> torch.Tensor:
    return torch.cat([(state[n].double() - init[n].double()).flatten() for n in sorted(state)])


@functools.cache
def _single(name: str) -> dict:
    """The single-process run of case ``name`` (once per test process)."""
    return W.train(W.CASES[name])


def _rel_error(name: str, out: pathlib.Path) -> tuple[float, dict, dict]:
    """Relative error of the FSDP2 run's update (all LoRA factors and base weights) against one process."""
    c = W.CASES[name]
    init = {n: p.detach().clone() for n, p in W.build_model(c).named_parameters()}
    single = _single(name)
    sharded = torch.load(out / f"{name}.pt", weights_only=False)
    u_single, u_sharded = _update(single["state"], init), _update(sharded["state"], init)
    return float((u_sharded - u_single).norm() / u_single.norm()), single, sharded


@pytest.mark.parametrize("name", [n for n in W.CASES if n in TWO])
def test_two_processes_follow_the_single_process_trajectory(two, name):
    err, single, sharded = _rel_error(name, two)
    assert _same_stats(sharded["stats"], single["stats"])
    c = W.CASES[name]
    if c["dtype"] == "float32" and not c.get("mp"):
        assert err < 1e-5, err
        return
    # bfloat16 (storage, or FSDP2's mixed-precision compute against a float32 process): reductions and half batches
    # round differently from one process. The method may not add to that: compare with plain LoRA under the same
    # precision and optimizer, and with the method's effect.
    lora = "lora-mp" if c.get("mp") else f"lora-{c['opt']}-bfloat16"
    lora_err = _rel_error(lora, two)[0] if name != lora else err
    assert err < 3 * lora_err + 1e-3, (err, lora_err)
    if c["method"] != "lora" and (name.count("-") == 2 or c.get("mp")):
        plain = W.train(W.CASES[lora if not c.get("mp") else "lora-adamw-float32"])["state"]
        init = {n: p.detach().clone() for n, p in W.build_model(c).named_parameters()}
        u = _update(single["state"], init)
        effect = float((u - _update(plain, init)).norm() / u.norm())
        assert err < 0.2 * effect, (err, effect)


@pytest.mark.parametrize("name", FOUR)
def test_four_processes_with_ranks_holding_no_rows(four, name):
    err, single, sharded = _rel_error(name, four)
    assert _same_stats(sharded["stats"], single["stats"])
    assert err < 1e-5, err


def test_nonfinite_shard_is_agreed_by_every_rank(two):
    r = torch.load(two / "nonfinite.pt", weights_only=False)
    skip, refuse = r["skip"], r["raise"]
    # skip: the NaN was in the last rank's shard only, yet every rank skipped that layer and did not merge it
    assert all(row["skipped"] == [row["layer"]] and row["base_unchanged"] and row["error"] is None for row in skip)
    assert skip[0]["method_steps"] == skip[1]["method_steps"]
    # ... and the NaN the plain AdamW step then wrote into that shard is found from every rank
    assert all("non-finite values" in row["sync_error"] and row["layer"] in row["sync_error"] for row in skip)
    # raise: every rank refuses the step before anything changed
    assert all("Nothing was modified" in row["error"] and row["unchanged"] for row in refuse)


def test_plain_step_nan_in_one_shard_is_refused_by_every_rank(two):
    """Under on_nonfinite='raise' the NaN/Inf check of a step that is not due reads each rank's shards and ANDs
    the flags over the ranks: the rank without the NaN raises too (no rank steps on while another stops)."""
    rows = torch.load(two / "nonfinite.pt", weights_only=False)["raise-plain"]
    assert not rows[0]["due"]
    for row in rows:
        assert row["error"] is not None and "Nothing was modified" in row["error"] and row["layer"] in row["error"]
        assert row["unchanged"] and row["steps"] == 2  # factors, base weights, moments and the counter
    assert all(row["error"] == rows[0]["error"] for row in rows)


def test_guards_read_whole_tensor_values_on_shards(two):
    """Row maxima and moment maxima equal the whole tensors' exactly, weight norms to rounding, on every rank."""
    ranks = torch.load(two / "guard_reads.pt", weights_only=False)
    for per_layout in ranks:
        assert set(per_layout) == {"Shard(0)", "Shard(1)", "gpt2"}
        for layout, row in per_layout.items():
            assert row["layers"] > 0, layout
            assert row["rows"] == 0.0 and row["moments"] == 0.0, (layout, row)
            assert row["weight_rel"] < 1e-6, (layout, row)
    # the check can fail: a rank's own column maxima of lora_B are not the whole tensor's
    assert any(row["local_rows_differ"] for per_layout in ranks for row in per_layout.values())


@pytest.mark.parametrize("name", list(W.GUARD_CASES))
def test_range_guards_decide_on_every_rank_as_one_process(two, name):
    """A value only one rank's shard holds (a moment, a row of lora_B or of its gradient) decides a range guard:
    every rank skips exactly the layers one process skips, for the same reason, and applies the others (a
    partial skip: the tampered layer shares its shape group with another)."""
    c = W.CASES[name]
    single = _single(name)["stats"]
    layer = W.make(c, W.build_model(c)).factors[W.TAMPERED_LAYER].name
    assert single["last_skip_reasons"] == ({} if c["tamper"] == "tiny_B_rows" else {layer: "out_of_range"})
    sharded = torch.load(two / f"{name}.pt", weights_only=False)
    assert len(sharded["rank_stats"]) == 2
    for stats in sharded["rank_stats"]:
        assert _same_stats(stats, single), (stats, single)


def test_resume_from_sharded_checkpoints_is_bit_exact(two):
    r = torch.load(two / "resume.pt", weights_only=False)
    for mode in ("stochastic", "kahan"):  # the rounding generator's state and the Kahan buffers come back
        assert r[mode]["equal"] and r[mode]["steps"] == W.STEPS, (mode, r[mode])
        assert "__1_0.distcp" in r[mode]["files"]  # every rank wrote its own shards


def test_export_after_fsdp2_training(two):
    from eco_helpers import token_batches
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from optlora.testing import models

    c = W.CASES["scalora-adamw-float32"]
    single = W.build_model(c)
    single.load_state_dict(W.train(c)["state"], strict=False)
    ids = token_batches(4, 12, seed=9)
    with torch.no_grad():
        want = single(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(two / "export-merged")(input_ids=ids).logits
        adapter = PeftModel.from_pretrained(models.tiny_llama(vocab=64, seed=11), two / "export-adapter")
        got = adapter(input_ids=ids).logits
    scale = want.abs().max()
    assert (merged - want).abs().max() < 1e-4 * scale
    assert (got - want).abs().max() < 1e-4 * scale
    assert torch.load(two / "export.pt")["rel_error"] < 1e-5


def test_trainer_with_accelerate_fsdp2(two, tmp_path):
    """The Trainer's FSDP2 configuration: same result as one process, bit-exact resume, state readable whole."""
    from eco_helpers import TokenDataset, tiny_peft
    from transformers import Trainer, TrainingArguments

    import optlora
    import optlora.hf
    from optlora.export import apply_method_state

    r = torch.load(two / "trainer.pt", weights_only=False)
    straight, resumed = r["straight"], r["resumed"]
    assert straight["sharded"] and straight["stats"]["method_steps"] == 3
    assert all(torch.equal(straight["state"][n], resumed["state"][n]) for n in straight["state"])

    model = tiny_peft(seed=11)
    method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=8,  # the global batch of the two ranks
        max_steps=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        seed=0,
    )
    Trainer(
        model=model, args=args, train_dataset=TokenDataset(16, seed=4), callbacks=[optlora.hf.callback(method)]
    ).train()
    want = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n or "base_" in n}
    update = torch.cat([(straight["state"][n] - want[n]).flatten() for n in want])
    assert float(update.abs().max()) < 1e-5, float(update.abs().max())
    assert _same_stats(straight["stats"], method.stats())

    # the sharded method state of the last checkpoint, read whole in this one process (the export CLI's path)
    state = optlora.hf.read_state(two / "trainer" / "checkpoint-4")
    plain = tiny_peft(seed=11)
    assert apply_method_state(plain, state) == len(method.factors)
    for n, p in plain.named_parameters():
        if "base_layer" in n and "proj" in n and n in straight["state"]:
            assert torch.equal(p, straight["state"][n]), n


def test_fsdp2_example_runs_under_torchrun(tmp_path):
    """README's 'Scaling out' command, 2 CPU processes (torchrun --standalone picks a free local port)."""
    root = HERE.parent
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(root / "examples" / "train_fsdp2.py"), "--method", "scalora", "--steps", "4", "--samples", "16"]
    cmd += ["--warmup-steps", "1", "--output-dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(root)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "'method_steps': 3" in proc.stdout and "'last_skipped_layers': []" in proc.stdout
    assert (tmp_path / "checkpoint" / "optlora_state.dcp" / ".metadata").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
