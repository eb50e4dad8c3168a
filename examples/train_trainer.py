"""Fine-tune a causal LM with ``transformers.Trainer`` + an optlora method (offline CPU demo in about a minute).

    python examples/train_trainer.py --method scalora                       # tiny config model, synthetic data
    python examples/train_trainer.py --method scalora --resume              # continue from the last checkpoint
    python examples/train_trainer.py --model smollm2 --jsonl optlora_experiments/sample/gsm8k/train.jsonl.gz

The tiny model is saved to ``--output-dir``/base first and loaded from there, so ``optlora export``
finds its base. Checkpoints and the final ``model.save_pretrained`` hold a standard PEFT adapter (for ScaLoRA: the
accumulated update for the original base, by truncated SVD, its error stated beside it) *and*
``optlora_state.safetensors`` (the exact state to resume from); see ``optlora.persist``.
"""

from __future__ import annotations

import os

import torch
from example_utils import add_lora, already_complete, common_args, load_model, make_method, texts
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import optlora.hf


def main(argv=None) -> int:
    p = common_args(__doc__.split("\n\n")[0], method="scalora", output_dir="runs/example_trainer")
    p.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    p.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    adapter = os.path.join(args.output_dir, "adapter")
    last = get_last_checkpoint(args.output_dir) if args.resume and os.path.isdir(args.output_dir) else None
    if already_complete(last, args.steps) and os.path.isdir(adapter):
        print(f"the trained adapter is in {adapter}")
        return 0
    torch.manual_seed(0)
    base, tok = load_model(args.model, base_dir=os.path.join(args.output_dir, "base"))
    model = add_lora(base, args.rank)
    method = make_method(args.method, model, args.warmup_steps, args.interval)
    enc = tok(texts(args.samples, args.jsonl), truncation=True, max_length=64)
    data = [{"input_ids": ids} for ids in enc["input_ids"]]
    targs = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=2,
        learning_rate=args.lr,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        bf16=args.bf16,
        logging_steps=10,
        save_steps=max(1, args.steps // 2),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tok, mlm=False),
        callbacks=[optlora.hf.callback(method)] if method is not None else [],
    )
    trainer.train(resume_from_checkpoint=args.resume or None)
    if method is not None:
        print("optlora:", method.stats())
    # a standard PEFT adapter for the original base (ScaLoRA: its accumulated update, optlora_export.json says
    # how exactly), loadable with PeftModel.from_pretrained(base, "adapter"), plus the exact state to resume
    model.save_pretrained(adapter)
    print(f"wrote the adapter to {adapter}; the whole model: optlora export --checkpoint {adapter} --out merged")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
