"""FSDP2 scenarios run inside tests/fsdp_worker.py's processes (every function runs on every rank).

Each takes ``(rank, world, out)`` and leaves what the test checks in ``out/<name>.pt`` (rank 0)
or in files the test reads (checkpoints, exported models).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

STEPS = 5


def _setup(c: dict, rank: int, world: int):
    import fsdp_worker as W
    from eco_helpers import token_batches

    model = W.shard(W.build_model(c), c)
    method = W.make(c, model)
    cls, kw = W.OPTIMIZERS[c["opt"]]
    opt = cls([p for p in model.parameters() if p.requires_grad], **kw)
    method.attach(opt)
    ids = token_batches(W.GLOBAL_BATCH, 12, seed=4)[rank::world]
    return model, method, opt, ids


def _step(model, opt, ids, poison=None) -> None:
    model(input_ids=ids, labels=ids).loss.backward()
    if poison is not None:  # NaN into this rank's shard of one gradient
        poison.to_local().view(-1)[0] = float("nan")
    opt.step()
    opt.zero_grad()


def _full(model) -> dict[str, torch.Tensor]:
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if "lora_" in n or "base_" in n}


def _gather(obj, world: int) -> list:
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _plain_step_nan(rank: int, world: int) -> dict:
    """ScaLoRA-I (interval 2) under ``on_nonfinite="raise"``: NaN in the last rank's shard on a step between two
    intervals (the warm-up takes the same path): every rank must refuse it, before anything changed."""
    import fsdp_worker as W

    c = W.case("scalora_i", on_nonfinite="raise")
    model, method, opt, ids = _setup(c, rank, world)
    for _ in range(2):  # step 1 warm-up, step 2 due
        _step(model, opt, ids)
    f = method.factors[3]
    model(input_ids=ids, labels=ids).loss.backward()
    if rank == world - 1:
        f.lora_B.grad.to_local().view(-1)[0] = float("nan")
    before = {**_full(model), **_full_moments(opt)}
    try:
        opt.step()  # step 3: not due
        error = None
    except RuntimeError as exc:
        error = str(exc)
    after = {**_full(model), **_full_moments(opt)}
    return {
        "error": error,
        "due": method.is_due(3),
        "steps": method.steps,
        "unchanged": all(torch.equal(before[n], after[n]) for n in before),
        "layer": f.name,
    }


def _full_moments(opt) -> dict[str, torch.Tensor]:
    out = {}
    for i, p in enumerate(opt.param_groups[0]["params"]):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v) and v.dim() > 0:
                out[f"moment{i}.{k}"] = v.full_tensor().detach().clone()
    return out


def nonfinite(rank: int, world: int, out: str) -> None:
    """NaN in one rank's shard of one gradient: every rank skips (or refuses) the same layer."""
    import fsdp_worker as W

    from optlora.distributed import assert_replicas_in_sync

    result = {"raise-plain": _gather(_plain_step_nan(rank, world), world)}
    for mode in ("skip", "raise"):
        c = W.case("scalora", on_nonfinite=mode)
        model, method, opt, ids = _setup(c, rank, world)
        for _ in range(2):
            _step(model, opt, ids)
        f = method.factors[3]
        model(input_ids=ids, labels=ids).loss.backward()
        if rank == world - 1:
            f.lora_B.grad.to_local().view(-1)[0] = float("nan")
        before = _full(model)
        try:
            opt.step()
            error = None
        except RuntimeError as exc:
            error = str(exc)
        after = _full(model)
        key = f.name.split("[")[0] + ".base_layer.weight"
        row = {
            "error": error,
            "skipped": method.stats().get("last_skipped_layers"),
            "method_steps": method.method_steps,
            "unchanged": all(torch.equal(before[n], after[n]) for n in before),
            "base_unchanged": torch.equal(before[key], after[key]),
            "layer": f.name,
        }
        if mode == "skip":  # the plain AdamW step wrote the NaN gradient into rank world-1's shard
            try:
                assert_replicas_in_sync(method)
                row["sync_error"] = None
            except RuntimeError as exc:
                row["sync_error"] = str(exc)
        result[mode] = _gather(row, world)
    if rank == 0:
        torch.save(result, os.path.join(out, "nonfinite.pt"))


def _save(model, opt, method, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import optlora.hf

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=os.path.join(path, "train.dcp"))
    optlora.hf.save_state(method, path)


def _load(model, opt, method, path: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    import optlora.hf

    msd, osd = get_state_dict(model, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=os.path.join(path, "train.dcp"))
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    optlora.hf.load_state(method, path)


def resume(rank: int, world: int, out: str) -> None:
    """Save after 3 steps (model, optimizer: DCP; method: optlora.hf.save_state), reload into fresh objects."""
    import fsdp_worker as W

    result = {}
    for merge_precision in ("stochastic", "kahan"):
        c = W.case("scalora", dtype="bfloat16", merge_precision=merge_precision)
        model, method, opt, ids = _setup(c, rank, world)
        path = os.path.join(out, f"resume-{merge_precision}")
        for step in range(STEPS):
            if step == 3:
                _save(model, opt, method, path)
            _step(model, opt, ids)
        straight = _full(model)
        model, method, opt, ids = _setup(c, rank, world)
        _step(model, opt, ids)  # moves every state away from the checkpoint before loading it
        _load(model, opt, method, path)
        for _ in range(3, STEPS):
            _step(model, opt, ids)
        resumed = _full(model)
        result[merge_precision] = {
            "equal": all(torch.equal(straight[n], resumed[n]) for n in straight),
            "steps": method.steps,
            "files": sorted(os.listdir(os.path.join(path, "optlora_state.dcp"))),
        }
    if rank == 0:
        torch.save(result, os.path.join(out, "resume.pt"))


def export(rank: int, world: int, out: str) -> None:
    """ScaLoRA under FSDP2, then the full state dict on rank 0 into a plain model and both exports."""
    import fsdp_worker as W
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    c = W.case("scalora")
    model, method, opt, ids = _setup(c, rank, world)
    for _ in range(STEPS):
        _step(model, opt, ids)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        import optlora.export
        from optlora.testing import models

        plain = W.build_model(c)
        plain.load_state_dict(full)
        optlora.export.export_merged(plain, os.path.join(out, "export-merged"))
        original = models.tiny_llama(vocab=64, seed=11)
        report = optlora.export.export_adapter(plain, original, os.path.join(out, "export-adapter"), tol=1e-6)
        torch.save({"rel_error": report.rel_error}, os.path.join(out, "export.pt"))


def _trainer(out: str, method, model, max_steps: int, resume: bool):
    """The HF Trainer with accelerate's FSDP2 plugin (``fsdp_config={"version": 2}``) on CPU.

    accelerate 1.15 turns FSDP on only for accelerator devices; on CPU it silently falls back to
    DDP. The subclass flips the prepared accelerator state to FSDP, so that accelerate's own FSDP2
    code (``fsdp2_prepare_model``, optimizer parameter switching, checkpoints) runs as on GPUs.
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from eco_helpers import TokenDataset
    from transformers import Trainer, TrainingArguments

    import optlora.hf

    rank, world = str(dist.get_rank()), str(dist.get_world_size())  # as torchrun sets them (group exists)
    os.environ.update(RANK=rank, LOCAL_RANK=rank, WORLD_SIZE=world, LOCAL_WORLD_SIZE=world, MASTER_ADDR="127.0.0.1")

    class CpuFsdp2Trainer(Trainer):
        def create_accelerator_and_postprocess(self):
            super().create_accelerator_and_postprocess()
            state = self.accelerator.state
            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            state.distributed_type = DistributedType.FSDP
            self.is_fsdp_enabled = True

    args = TrainingArguments(
        output_dir=os.path.join(out, "trainer"),
        use_cpu=True,
        fsdp=True,
        fsdp_config={
            "version": 2,
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "state_dict_type": "SHARDED_STATE_DICT",
        },
        per_device_train_batch_size=4,
        max_steps=max_steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_steps=2,
        save_strategy="steps",
        report_to=[],
        logging_steps=100,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = CpuFsdp2Trainer(
        model=model, args=args, train_dataset=TokenDataset(16, seed=4), callbacks=[optlora.hf.callback(method)]
    )
    trainer.train(resume_from_checkpoint=resume or None)
    return trainer


def trainer(rank: int, world: int, out: str) -> None:
    """ScaLoRA through the Trainer under FSDP2: 4 steps with checkpoints, then resume from step 2."""
    from eco_helpers import tiny_peft

    import optlora
    from optlora.distributed import assert_replicas_in_sync

    result = {}
    for run in ("straight", "resumed"):
        model = tiny_peft(seed=11)
        method = optlora.ScaLoRA(model, warmup_steps=1, kappa=0.5)  # built before the Trainer shards the model
        if run == "resumed":
            import shutil

            if rank == 0:
                shutil.rmtree(os.path.join(out, "trainer", "checkpoint-4"))
            dist.barrier()
        t = _trainer(out, method, model, max_steps=4, resume=run == "resumed")
        assert_replicas_in_sync(method)
        result[run] = {"state": _full(t.model), "stats": method.stats(), "sharded": method.sharded}
    if rank == 0:
        torch.save(result, os.path.join(out, "trainer.pt"))


def _whole_reads(g, i: int, opt, rule) -> tuple[dict, torch.Tensor, dict]:
    """Row maxima, ``||W||_F`` and moment maxima of layer ``i`` of group ``g`` from its gathered (full) tensors."""
    from optlora.optimizer_state import moment_tensors

    f = g.factors[i]
    rows = {
        "lora_A": f.lora_A.full_tensor().double().abs().amax(1),
        "grad_A": f.lora_A.grad.full_tensor().double().abs().amax(1),
        "lora_B": f.lora_B.full_tensor().double().abs().amax(0),
        "grad_B": f.lora_B.grad.full_tensor().double().abs().amax(0),
    }
    moments: dict = {}
    for p, which in ((f.lora_A, "grad_A"), (f.lora_B, "grad_B")):
        for t, power in moment_tensors(opt, rule, p):
            key = (which, power, t.dtype)
            moments[key] = max(moments.get(key, 0.0), float(t.full_tensor().double().abs().max()))
    return rows, f.base_weight.full_tensor().double().norm(), moments


def guard_reads(rank: int, world: int, out: str) -> None:
    """What the range guards read on shards, from the step's one exchange, equals the whole tensors' values.

    Row maxima of ``lora_A``/``lora_B`` and their gradients (``PairGrams.amax_SA/amax_SB`` and
    ``row_amax``), ``weight_norms()`` and ``moment_amax()`` of every layer, for ``Shard(0)``, ``Shard(1)`` and
    GPT-2 (``fan_in_fan_out``), compared with the same quantities of the gathered (full) tensors.
    """
    import fsdp_worker as W

    from optlora.distributed import local
    from optlora.methods import sharded

    result = {}
    for layout, c in (
        ("Shard(0)", W.case("scalora")),
        ("Shard(1)", W.case("scalora", placement=1)),
        ("gpt2", W.case("scalora", model="gpt2")),
    ):
        model, method, opt, ids = _setup(c, rank, world)
        _step(model, opt, ids)  # the warm-up step: AdamW's moments exist
        model(input_ids=ids, labels=ids).loss.backward()
        groups, moments = method._active_groups(), method._moment_rule_of_step()
        row = {"rows": 0.0, "moments": 0.0, "weight_rel": 0.0, "local_rows_differ": False, "layers": 0}
        for reads in ("pair", "sqnorms"):
            with torch.no_grad():  # as in the pre-hook
                sharded.exchange_(groups, torch.float64, reads, True, moments)
                for g in groups:
                    r, got = g.rank, [g.row_amax(g.factors_and_grads(torch.float64))]
                    if reads == "pair":
                        pg = g.pair_grams(torch.float64)
                        got.append({"lora_A": pg.amax_SA[:, :r], "grad_A": pg.amax_SA[:, r:]})
                        got[-1].update(grad_B=pg.amax_SB[:, :r], lora_B=pg.amax_SB[:, r:])
                    norms, maxima = g.weight_norms(), g.moment_amax(*moments)
                    for i, f in enumerate(g.factors):
                        rows, norm, want = _whole_reads(g, i, opt, method._rule)
                        for k, v in rows.items():
                            row["rows"] = max([row["rows"]] + [float((d[k][i] - v).abs().max()) for d in got])
                        mine = local(f.lora_B.detach()).double().abs()  # what this rank alone would read
                        if mine.shape[0] and mine.shape[1] == r and not torch.equal(mine.amax(0), rows["lora_B"]):
                            row["local_rows_differ"] = True
                        row["weight_rel"] = max(row["weight_rel"], float((norms[i].double() - norm).abs() / norm))
                        assert set(want) == set(maxima), (set(want), set(maxima))
                        for key, v in want.items():
                            row["moments"] = max(row["moments"], abs(float(maxima[key][i]) - v))
                        row["layers"] += 1
                sharded.release_(groups)
        opt.zero_grad()
        result[layout] = row
    result = _gather(result, world)
    if rank == 0:
        torch.save(result, os.path.join(out, "guard_reads.pt"))
