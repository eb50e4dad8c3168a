"""optlora: optimal steps for LoRA fine-tuning (RefLoRA, RefLoRA-S, ScaLoRA, ScaLoRA-I).

Three lines on a PEFT model::

    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-4)
    method = optlora.RefLoRA(model, warmup_steps=100)     # or optlora.ScaLoRA(model, ...)
    method.attach(optimizer)

Layout: :mod:`optlora.functional` (every closed form, pure), :mod:`optlora.methods` (the state
machine and one file per method, plus the registry), :mod:`optlora.merge` and
:mod:`optlora.optimizer_state` (in-place updates), :mod:`optlora.discovery` (PEFT), and the
integrations on top: :mod:`optlora.hf`, :mod:`optlora.export`, :mod:`optlora.distributed`, the CLI.

Importing optlora installs :mod:`optlora.persist`: every method built on a ``PeftModel`` guards that
model's ``save_pretrained`` / ``load_adapter``, so the usual saving and resuming paths stay right.
"""

from . import functional, persist
from .discovery import LoRAFactors, find_lora_factors
from .methods import LoRAMethod, RefLoRA, ScaledGD, ScaLoRA, make_method, method_names, register_method
from .optimizer_state import register_moment_rule

__version__ = "0.1.0"

__all__ = [
    "LoRAFactors",
    "LoRAMethod",
    "RefLoRA",
    "ScaLoRA",
    "ScaledGD",
    "find_lora_factors",
    "functional",
    "make_method",
    "method_names",
    "persist",
    "register_method",
    "register_moment_rule",
]
