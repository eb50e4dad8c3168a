"""Fine-tune with FSDP2 (``fully_shard``) + an optlora method: a plain loop, one process per device.

    torchrun --standalone --nproc_per_node 2 examples/train_fsdp2.py --method scalora            # CPU: gloo
    torchrun --standalone --nproc_per_node 2 examples/train_fsdp2.py --method scalora --resume   # continue
    torchrun --nproc_per_node 8 examples/train_fsdp2.py --model meta-llama/Llama-3.1-8B --bf16 --jsonl data.jsonl

Every rank holds a shard of each parameter, gradient and optimizer moment; the method runs inside
``optimizer.step()`` with one small collective per step. Checkpoints are sharded
(``torch.distributed.checkpoint``: model and optimizer in ``train.dcp``, the method in
``optlora_state.dcp``); at the end rank 0 gathers the full model and, for ScaLoRA, exports the
update as a standard LoRA adapter for the original base (``optlora.export``).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from example_utils import add_lora, common_args, load_model, make_method, texts
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import optlora.export
import optlora.hf
from optlora.distributed import assert_replicas_in_sync


def shard(model, bf16: bool):
    """FSDP2: every decoder block, then the root (so that every LoRA parameter is sharded)."""
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = {"mp_policy": mp} if mp is not None else {}
    for block in model.get_base_model().model.layers:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


def main(argv=None) -> int:
    p = common_args(__doc__.split("\n\n")[0], method="scalora", output_dir="runs/example_fsdp2")
    p.add_argument("--resume", action="store_true", help="resume from --output-dir/checkpoint")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute (FSDP2 MixedPrecisionPolicy)")
    p.add_argument("--batch", type=int, default=4, help="sequences per rank and step")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial model on every rank
    base, tok = load_model(args.model)
    model = shard(add_lora(base, args.rank).to(device), args.bf16)
    method = make_method(args.method, model, args.warmup_steps, args.interval)  # after sharding (or before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    if method is not None:
        method.attach(opt)

    ckpt = os.path.join(args.output_dir, "checkpoint")
    start = 0
    if args.resume:
        msd, osd = get_state_dict(model, opt)
        state = {"model": msd, "optim": osd, "step": 0}
        dcp.load(state, checkpoint_id=os.path.join(ckpt, "train.dcp"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if method is not None:
            optlora.hf.load_state(method, ckpt)  # ScaLoRA's merged base weights, buffers, rounding state
        start = int(state["step"])

    enc = tok(texts(args.samples, args.jsonl), truncation=True, max_length=64, padding="max_length")
    ids = torch.tensor(enc["input_ids"])[rank::world]  # this rank's share of the data
    mask = torch.tensor(enc["attention_mask"])[rank::world]
    for step in range(start, args.steps):
        rows = torch.arange(step * args.batch, (step + 1) * args.batch) % len(ids)
        batch_ids, batch_mask = ids[rows].to(device), mask[rows].to(device)
        labels = batch_ids.masked_fill(batch_mask == 0, -100)
        loss = model(input_ids=batch_ids, attention_mask=batch_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if rank == 0 and (step + 1) % 10 == 0:
            print(f"step {step + 1}: loss {loss.item():.4f}", flush=True)

    if method is not None:
        assert_replicas_in_sync(method)  # every shard finite, every rank took the same decisions
        if rank == 0:
            print(method.stats(), flush=True)
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd, "step": args.steps}, checkpoint_id=os.path.join(ckpt, "train.dcp"))
    if method is not None:
        optlora.hf.save_state(method, ckpt)  # every rank writes its shards

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:  # an unsharded copy for the exports
        torch.manual_seed(0)
        plain = add_lora(load_model(args.model)[0], args.rank)
        plain.load_state_dict(full)
        if args.method.startswith("scalora"):  # the update has outgrown rank r: SVD export for the original base
            report = optlora.export.export_adapter(
                plain, load_model(args.model)[0], os.path.join(args.output_dir, "adapter"), tol=0.01
            )
            print(report.summary(), flush=True)
        else:
            plain.save_pretrained(os.path.join(args.output_dir, "adapter"))
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
