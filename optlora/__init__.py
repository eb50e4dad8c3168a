"""optlora: optimal steps for LoRA fine-tuning (RefLoRA, RefLoRA-S, ScaLoRA, ScaLoRA-I).

Three lines on a PEFT model::

    optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-4)
    method = optlora.RefLoRA(model, warmup_steps=100)     # or optlora.ScaLoRA(model, ...)
    method.attach(optimizer)
"""

from . import functional
from .discovery import LoRAFactors, find_lora_factors
from .method import LoRAMethod
from .optimizer_state import register_moment_rule
from .reflora import RefLoRA
from .scalora import ScaLoRA

__version__ = "0.1.0"

__all__ = ["LoRAFactors", "LoRAMethod", "RefLoRA", "ScaLoRA", "find_lora_factors", "functional", "register_moment_rule"]
