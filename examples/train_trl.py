"""Supervised fine-tuning with TRL's ``SFTTrainer`` + an optlora method (offline CPU demo in about a minute).

    python examples/train_trl.py --method reflora                      # tiny config model, synthetic data
    python examples/train_trl.py --model smollm2 --jsonl optlora_experiments/sample/gsm8k/train.jsonl.gz --method scalora_i

``optlora.hf.OptLoRAMixin`` adds the ``method=`` argument to any Trainer subclass (here TRL's) and
restores the method state from whatever checkpoint ``train(resume_from_checkpoint=...)`` is given.
"""

from __future__ import annotations

import os

import torch
from example_utils import add_lora, already_complete, common_args, load_model, make_method, texts
from transformers.trainer_utils import get_last_checkpoint

import optlora.export
import optlora.hf


def main(argv=None) -> int:
    try:
        import datasets
        import trl
    except ImportError as exc:
        raise SystemExit(f"this example needs TRL: pip install 'optlora[hf]' ({exc})") from exc

    p = common_args(__doc__.split("\n\n")[0], method="reflora", output_dir="runs/example_trl")
    p.add_argument("--resume", default=None, help="checkpoint folder to resume from (or 'last')")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    class OptLoRASFTTrainer(optlora.hf.OptLoRAMixin, trl.SFTTrainer):
        """TRL's SFTTrainer with an optlora method."""

    out = os.path.join(args.output_dir, "adapter")
    last = get_last_checkpoint(args.output_dir) if args.resume == "last" and os.path.isdir(args.output_dir) else None
    if already_complete(last or args.resume, args.steps) and os.path.isdir(out):
        print(f"the trained adapter is in {out}")
        return 0
    torch.manual_seed(0)
    base_dir = os.path.join(args.output_dir, "base")
    base, tok = load_model(args.model, base_dir=base_dir)
    model = add_lora(base, args.rank)
    method = make_method(args.method, model, args.warmup_steps, args.interval)
    cfg = trl.SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=2,
        learning_rate=args.lr,
        max_length=64,
        logging_steps=10,
        save_steps=max(1, args.steps // 2),
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
    )
    ds = datasets.Dataset.from_dict({"text": texts(args.samples, args.jsonl)})
    kwargs = dict(model=model, args=cfg, train_dataset=ds, processing_class=tok)
    trainer = OptLoRASFTTrainer(**kwargs, method=method) if method else trl.SFTTrainer(**kwargs)
    trainer.train(resume_from_checkpoint=True if args.resume == "last" else args.resume)
    if method is not None:
        print("optlora:", method.stats())
    if method is not None and method.merges and method.method_steps:  # ScaLoRA merged into the base: SVD export
        original, _ = load_model(args.model, base_dir=base_dir)
        print(optlora.export.export_adapter(model, original, out, tol=0.05).summary())
    else:
        model.save_pretrained(out)  # LoRA, RefLoRA, or ScaLoRA before its first scaling: a standard PEFT adapter
        print(f"wrote the PEFT adapter to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
