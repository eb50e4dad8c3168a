"""Which method trains which model, and the refusal of an optimizer that trains it without the method.

A method *claims* its model when it is built (:class:`ClaimsOnBuild`) and again when it is
attached: it becomes :func:`owner_of` the model, and the hooks registered with :func:`on_claim`
run (:mod:`optlora.persist` installs its save/load guard there). From the first claim on, one
global optimizer step pre-hook (``torch.optim.optimizer.register_optimizer_step_pre_hook``)
refuses a ``step()`` that would update a claimed model's LoRA parameters while its method is
not attached to that optimizer: a forgotten ``attach`` or Trainer callback would otherwise train
plain LoRA without a word. The hook is registered lazily, at the first claim (importing optlora
registers nothing); once registered it stays (removing a global hook from inside a step would
mutate the hooks torch is iterating), and with no claiming method alive it only looks at an empty
table. It recognises the attached optimizer through wrappers on either side (accelerate's ``AcceleratedOptimizer`` and others that keep the optimizer
they wrap in ``.optimizer`` or ``.optim``). Its cost per step is measured in docs/PERFORMANCE.md
(``bench/claim_hook.py``).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

#: model -> weak reference to the method that trains it (the last one built or attached on it)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: called with a method each time it claims its model (built, or attached after another method claimed it)
_CLAIM_HOOKS: list[Callable] = []
#: the global step pre-hook's handle while one is registered
_HOOK: list = []
#: attributes under which optimizer wrappers keep the optimizer they wrap
_INNER = ("optimizer", "optim")


@dataclass
class _Claim:
    """What the hook knows of one method: its attachment and the ids of its LoRA parameters."""

    # weak references to the optimizer passed to attach and every optimizer it wraps (incl. the attached one):
    # an optimizer holds the method through its step pre-hook, so a strong one would keep both alive forever
    chain: tuple = ()
    released: bool = False  # detach() was called: training without the method is intended
    first: int = 0  # id of the first lora_A when ``ids`` was read (fully_shard replaces the parameters)
    ids: set = field(default_factory=set)


_CLAIMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # method -> _Claim


def on_claim(hook: Callable) -> None:
    """Register ``hook(method)``, run whenever a method claims its model (integrations install guards here)."""
    if hook not in _CLAIM_HOOKS:
        _CLAIM_HOOKS.append(hook)


def owner_of(model: torch.nn.Module):
    """The method that currently trains ``model`` (the last one built or attached on it), if any."""
    ref = _OWNERS.get(model)
    return None if ref is None else ref()


def claim(method) -> None:
    """Make ``method`` the owner of ``method.model`` and run the claim hooks (once per change of owner)."""
    if owner_of(method.model) is method:
        return
    _OWNERS[method.model] = weakref.ref(method)
    if not _HOOK:
        _HOOK.append(register_optimizer_step_pre_hook(_refuse_unattached_step))
    for hook in _CLAIM_HOOKS:
        hook(method)


def attached(method, optimizer) -> None:
    """``method`` was attached to ``optimizer`` (as passed, possibly a wrapper): it claims its model."""
    info = _CLAIMS.setdefault(method, _Claim())
    info.chain = tuple(weakref.ref(o) for o in (*wrapped_chain(optimizer), *wrapped_chain(method.optimizer)))
    info.released = False
    claim(method)


def detached(method) -> None:
    """``method.detach()``: its optimizer may now train the model as plain LoRA."""
    info = _CLAIMS.setdefault(method, _Claim())
    info.chain, info.released = (), True


def holds(method, optimizer) -> bool:
    """Whether ``optimizer`` steps any of ``method``'s LoRA parameters as they are now (ids read again when the
    first parameter was replaced, e.g. by ``fully_shard``)."""
    info = _CLAIMS.setdefault(method, _Claim())
    first = id(method.factors[0].lora_A) if method.factors else 0
    if info.first != first:
        info.first, info.ids = first, {id(p) for f in method.factors for p in (f.lora_A, f.lora_B)}
    return any(id(p) in info.ids for g in optimizer.param_groups for p in g["params"])


def hook_registered() -> bool:
    """Whether the global step pre-hook is registered (from the first claim on)."""
    return bool(_HOOK)


def wrapped_chain(optimizer) -> list:
    """``optimizer`` and every optimizer it wraps (``.optimizer`` / ``.optim``, innermost last)."""
    out, seen = [], set()
    while optimizer is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        out.append(optimizer)
        optimizer = next((getattr(optimizer, a) for a in _INNER if getattr(optimizer, a, None) is not None), None)
    return out


def _updates_nothing(optimizer) -> bool:
    """Every parameter group has learning rate 0: the step changes no parameter.

    ``torch.distributed.checkpoint.state_dict`` takes such a step on zero gradients to create the optimizer
    state of an optimizer that has none (FSDP2 checkpoints; the Trainer loads them before its callbacks
    attach the method): refusing it would be a false alarm.
    """
    for group in optimizer.param_groups:
        lr = group.get("lr", 1.0)
        if not (lr == 0 if not isinstance(lr, torch.Tensor) else bool(lr.detach().cpu() == 0)):
            return False
    return True


def _refuse_unattached_step(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: a claimed model's LoRA parameters stepped without its method attached."""
    for ref in list(_OWNERS.values()):
        method = ref()
        if method is None or method.optimizer is optimizer:
            continue
        info = _CLAIMS.get(method) or _Claim()
        if info.released or any(o is a() for o in wrapped_chain(optimizer) for a in info.chain):
            continue  # detached on purpose, or a wrapper of the attached optimizer, or one it wraps
        if holds(method, optimizer) and not _updates_nothing(optimizer):
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() updates the LoRA parameters that {type(method).__name__} was "
                f"built for, but the method is not attached to this optimizer, so it would train plain LoRA. Call "
                "method.attach(optimizer) (with a Trainer: callbacks=[optlora.hf.callback(method)]), or "
                "method.detach() to train without it. Nothing was updated."
            )


class ClaimsOnBuild(type):
    """Metaclass: claims the model once an instance is fully built (after every subclass ``__init__``)."""

    def __call__(cls, *args, **kwargs):
        method = super().__call__(*args, **kwargs)
        claim(method)
        return method
