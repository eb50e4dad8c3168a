"""Every optlora method, one file each, and the one ``name -> constructor`` registry.

* :mod:`.base` -- :class:`LoRAMethod`, the per-step state machine (warm-up, interval, the
  optimizer step pre-hook, checks, state, stats);
* :mod:`.layers` -- :class:`LayerGroup`, where factors, gradients, moments and base weights are
  read and written (batched over same-shape layers);
* :mod:`.reflora` -- RefLoRA and RefLoRA-S; :mod:`.scalora` -- ScaLoRA and ScaLoRA-I;
  :mod:`.scaledgd` -- the ScaledGD baseline (RefLoRA Fig. 2).

The registry serves the command line, the experiments, the benchmarks and the parity checks::

    method = optlora.make_method("scalora_i", model, warmup_steps=100)   # None for "lora"
    optlora.register_method("mine", lambda model, **kw: MyMethod(model, **kw))
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import LoRAMethod
from .reflora import RefLoRA
from .scaledgd import ScaledGD
from .scalora import ScaLoRA

__all__ = [
    "LoRAMethod",
    "METHODS",
    "RefLoRA",
    "ScaLoRA",
    "ScaledGD",
    "SCALORA_I_INTERVAL",
    "make_method",
    "method_names",
    "register_method",
]

#: ScaLoRA-I's interval when ``make_method("scalora_i", ...)`` is not given one (ScaLoRA paper, Sec. 5)
SCALORA_I_INTERVAL = 10

Factory = Callable[..., "LoRAMethod | None"]


def _scalora_i(model: torch.nn.Module, *, interval: int | None = None, **kwargs) -> ScaLoRA:
    return ScaLoRA(model, interval=SCALORA_I_INTERVAL if interval is None else interval, **kwargs)


#: name -> factory ``(model, **kwargs) -> method`` (``None``: plain LoRA, no hook)
METHODS: dict[str, Factory] = {
    "lora": lambda model, **kwargs: None,
    "reflora": lambda model, **kwargs: RefLoRA(model, **kwargs),
    "reflora_s": lambda model, **kwargs: RefLoRA(model, scalar=True, **kwargs),
    "scalora": lambda model, **kwargs: ScaLoRA(model, **kwargs),
    "scalora_i": _scalora_i,
    "scaledgd": lambda model, **kwargs: ScaledGD(model, **kwargs),
}


def method_names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(METHODS)


def register_method(name: str, factory: Factory, *, replace: bool = False) -> None:
    """Register ``factory(model, **kwargs)`` under ``name`` (for the CLI, experiments and benchmarks)."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"a method name must be an identifier, got {name!r}")
    if name in METHODS and not replace:
        raise ValueError(f"method {name!r} is already registered; pass replace=True to override it")
    METHODS[name] = factory


def make_method(name: str, model: torch.nn.Module, **kwargs) -> LoRAMethod | None:
    """Build method ``name`` on ``model`` (``None`` for ``"lora"``: plain PEFT LoRA needs no hook).

    ``kwargs`` go to the constructor (``warmup_steps``, ``interval``, ``kappa``, ...). A plain
    ``"lora"`` ignores them, so callers can pass one set of options to every method.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name](model, **kwargs)
