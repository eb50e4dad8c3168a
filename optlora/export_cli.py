"""``optlora export``: a trained checkpoint as the full merged model or a compressed PEFT LoRA adapter.

The command line of :mod:`optlora.export` (which holds the library code).
"""

from __future__ import annotations

import json
import os
import sys

import torch

from . import checkpoint as checkpoint_io
from . import persist, rebuild
from .export import _TASK_TO_AUTO, _dtype_kw, export_adapter, export_merged

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="export a trained checkpoint: full merged model or a compressed PEFT LoRA adapter",
        description="Export a trained checkpoint: the full merged model, or its update as a small standard PEFT LoRA adapter. Rebuilds the trained model exactly from the optlora_state.safetensors of a checkpoint (or its PEFT adapter when there is none).",
    )
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (PEFT adapter [+ optlora_state.safetensors])")
    p.add_argument("--base", default=None, help="original pretrained model: hub id or local path")
    p.add_argument("--out", default=None, help="output folder")
    p.add_argument(
        "--format",
        choices=("merged", "adapter"),
        default="merged",
        help="merged: full model (safetensors); adapter: W_now - W_pretrained as a LoRA adapter by truncated SVD",
    )
    p.add_argument("--rank", type=int, default=None, help="adapter rank (with --tol: the per-layer cap)")
    p.add_argument("--tol", type=float, default=None, help="per-layer relative Frobenius error target (adapter)")
    p.add_argument("--task", default=None, help="PEFT task type (CAUSAL_LM, SEQ_CLS, ...); default from the adapter")
    p.add_argument("--dtype", choices=tuple(_DTYPES), default="auto", help="dtype to load the base model in")
    p.add_argument("--report-json", default=None, help="also write the adapter export report to this JSON file")
    p.set_defaults(func=run)


def load_trained(checkpoint: str, base: str, *, task: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild a trained model exactly: ``base`` (hub id or path) + the checkpoint's optlora state and adapter.

    Returns ``(peft_model, auto_class)`` (:func:`optlora.persist.rebuild`).
    """
    import peft
    import transformers

    if task is None and os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        cfg = peft.PeftConfig.from_pretrained(checkpoint)
        task = cfg.task_type.value if hasattr(cfg.task_type, "value") else cfg.task_type
    elif task is None:  # e.g. an FSDP2 Trainer checkpoint: the live PEFT configuration is in the optlora state
        configs = rebuild.peft_configs(checkpoint_io.find_state(checkpoint))
        task = next((c.get("task_type") for c in configs.values() if c.get("task_type")), None)
    task = task or "FEATURE_EXTRACTION"
    auto = getattr(transformers, _TASK_TO_AUTO.get(str(task).upper(), "AutoModel"))
    return persist.rebuild(auto.from_pretrained(base, **_dtype_kw(dtype)), checkpoint), auto


def run(args) -> int:
    missing = [o for o in ("checkpoint", "base", "out") if getattr(args, o, None) is None]
    if missing:
        print("optlora export: missing " + ", ".join(f"--{m}" for m in missing), file=sys.stderr)
        return 2
    if args.format == "adapter" and args.rank is None and args.tol is None:
        print("optlora export: --format adapter needs --rank and/or --tol", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    model, auto = load_trained(args.checkpoint, args.base, task=args.task, dtype=dtype)
    tokenizer = None
    if os.path.isfile(os.path.join(args.checkpoint, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.format == "merged":
        path = export_merged(model, args.out, tokenizer=tokenizer, inplace=True)
        print(f"wrote the merged model to {path}")
        return 0
    base = auto.from_pretrained(args.base, **_dtype_kw(dtype))
    report = export_adapter(model, base, args.out, rank=args.rank, tol=args.tol)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(report.summary())
    if args.report_json:
        with open(args.report_json, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
    return 0
