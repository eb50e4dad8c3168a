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
    p.add_argument(
        "--base",
        default=None,
        help="original pretrained model: local path, hub id, or minilm / smollm2 / tiny as in `optlora finetune` "
        "(default: the base_model_name_or_path the adapter records)",
    )
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


def recorded(checkpoint: str, key: str) -> str | None:
    """``key`` (``task_type``, ``base_model_name_or_path``) of the checkpoint's PEFT configuration, if recorded."""
    if os.path.isfile(os.path.join(checkpoint, "adapter_config.json")):
        with open(os.path.join(checkpoint, "adapter_config.json")) as fh:
            value = json.load(fh).get(key)
    else:  # e.g. an FSDP2 Trainer checkpoint: the live PEFT configuration is in the optlora state
        configs = rebuild.peft_configs(checkpoint_io.find_state(checkpoint))
        value = next((c.get(key) for c in configs.values() if c.get(key)), None)
    return str(getattr(value, "value", value)) if value else None


def load_base(name: str, auto, checkpoint: str, dtype: torch.dtype | None = None):
    """The pretrained model ``name``: a path or hub id, or an alias of ``optlora finetune`` (``minilm``, ``smollm2``,
    ``tiny``: the tiny random model of that seed-0 config, whose classifier size is read from the checkpoint)."""
    if name in ("minilm", "smollm2", "tiny"):  # the experiments' model names (a lazy import: an optional extra)
        from .cli import experiments_module

        models = experiments_module("models")

        if name == "tiny":
            tok = models.tiny_tokenizer()
            if auto.__name__ == "AutoModelForCausalLM":
                return models.tiny_causal_lm(tok)
            return models.tiny_classifier(tok, _head_size(checkpoint))
        name = models.resolve_model(name)
    return auto.from_pretrained(name, **_dtype_kw(dtype))


def _head_size(checkpoint: str) -> int:
    from safetensors import safe_open

    path = os.path.join(checkpoint, "adapter_model.safetensors")
    with safe_open(path, "pt") as fh:
        heads = [fh.get_slice(k).get_shape()[0] for k in fh.keys() if "classifier" in k and k.endswith("weight")]
    if not heads:
        raise ValueError(f"{path} holds no classifier head: pass --task or the real --base")
    return heads[-1]


def load_trained(checkpoint: str, base: str, *, task: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild a trained model exactly: ``base`` (:func:`load_base`) + the checkpoint's optlora state and adapter.

    Returns ``(peft_model, auto_class)`` (:func:`optlora.persist.rebuild`).
    """
    import transformers

    task = task or recorded(checkpoint, "task_type") or "FEATURE_EXTRACTION"
    auto = getattr(transformers, _TASK_TO_AUTO.get(str(task).upper(), "AutoModel"))
    return persist.rebuild(load_base(base, auto, checkpoint, dtype), checkpoint), auto


def run(args) -> int:
    missing = [o for o in ("checkpoint", "out") if getattr(args, o, None) is None]
    if missing:
        print("optlora export: missing " + ", ".join(f"--{m}" for m in missing), file=sys.stderr)
        return 2
    if not os.path.isdir(args.checkpoint):
        print(f"optlora export: no checkpoint folder {args.checkpoint}", file=sys.stderr)
        return 2
    if args.base is None:
        args.base = recorded(args.checkpoint, "base_model_name_or_path")
        if args.base is None:
            print(
                f"optlora export: {args.checkpoint} records no base model (it was built from a config): pass --base",
                file=sys.stderr,
            )
            return 2
        print(f"base model: {args.base} (recorded in the checkpoint)")
    if args.format == "adapter" and args.rank is None and args.tol is None:
        print("optlora export: --format adapter needs --rank and/or --tol", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    try:
        model, auto = load_trained(args.checkpoint, args.base, task=args.task, dtype=dtype)
    except OSError as exc:  # a missing folder, an unknown or unreachable hub id
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"optlora export: cannot load the base model {args.base!r} ({first}); pass --base", file=sys.stderr)
        return 2
    tokenizer = None
    if os.path.isfile(os.path.join(args.checkpoint, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    if args.format == "merged":
        path = export_merged(model, args.out, tokenizer=tokenizer, inplace=True)
        print(f"wrote the merged model to {path}")
        return 0
    base = load_base(args.base, auto, args.checkpoint, dtype)
    report = export_adapter(model, base, args.out, rank=args.rank, tol=args.tol)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    print(report.summary())
    if args.report_json:
        with open(args.report_json, "w") as fh:
            json.dump(report.to_json(), fh, indent=1)
    return 0
