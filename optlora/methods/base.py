"""The per-step state machine shared by every optlora method.

A method is attached to an optimizer as a *step pre-hook*: it runs after ``backward``,
gradient clipping and AMP unscaling, and before ``optimizer.step()``. A step that
``GradScaler`` skips for inf/NaN never reaches the hook and does not count. On a step
that is due (after ``warmup_steps`` plain LoRA steps, then every ``interval`` steps) the
hook runs three phases:

1. *plan*: compute every layer's closed form from its factors and gradients, batched
   over layers of the same shape (no parameter is touched yet);
2. *check*: if any layer's gradient is NaN/Inf, raise naming the layers (default), or
   leave those layers to the plain step (``on_nonfinite="skip"``);
3. *apply*: precondition gradients (RefLoRA) or rescale factors, gradients and
   optimizer moments (RefLoRA-S, ScaLoRA), merging into the base weight (ScaLoRA).

Subclasses implement ``_plan`` (or ``_plan_all``) and ``_apply`` only; every read and write of a
parameter goes through :class:`optlora.methods.layers.LayerGroup`.

A method *claims* its model when it is built (and again when it is attached): from then on,
an optimizer that steps the model's LoRA parameters without the method attached raises
instead of silently training plain LoRA, and the hooks registered with
:func:`on_claim` run (:mod:`optlora.persist` installs its save/load guard there).
``load_state_dict`` is transactional: it checks names, shapes, dtypes, method and config of
the whole state before it writes anything.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ..discovery import find_lora_factors
from ..distributed import check_not_sharded
from ..optimizer_state import moment_tensors, require_moment_rule, unwrap_optimizer
from .layers import LayerGroup, group_factors

_ATTACHED = "_optlora_method"

#: model -> weak reference to the method that trains it (the last one built or attached on it)
_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: called with a method each time it claims its model (built, or attached after another method claimed it)
_CLAIM_HOOKS: list[Callable[[LoRAMethod], None]] = []


def on_claim(hook: Callable[[LoRAMethod], None]) -> None:
    """Register ``hook(method)``, run whenever a method claims its model (integrations install guards here)."""
    if hook not in _CLAIM_HOOKS:
        _CLAIM_HOOKS.append(hook)


def owner_of(model: torch.nn.Module) -> LoRAMethod | None:
    """The method that currently trains ``model`` (the last one built or attached on it), if any."""
    ref = _OWNERS.get(model)
    return None if ref is None else ref()


def _refuse_unattached_step(optimizer, args, kwargs) -> None:
    """Global optimizer step pre-hook: a model's LoRA parameters stepped without its method attached.

    Forgetting ``attach`` (or the Trainer callback) would otherwise train plain LoRA without a word.
    """
    for ref in list(_OWNERS.values()):
        method = ref()
        if method is None or method.optimizer is optimizer or method._released:
            continue
        if method._holds(optimizer):
            raise RuntimeError(
                f"{type(optimizer).__name__}.step() updates the LoRA parameters that {type(method).__name__} was "
                f"built for, but the method is not attached to this optimizer, so it would train plain LoRA. Call "
                "method.attach(optimizer) (with a Trainer: callbacks=[optlora.hf.callback(method)]), or "
                "method.detach() to train without it. Nothing was updated."
            )


register_optimizer_step_pre_hook(_refuse_unattached_step)


class _ClaimsOnBuild(type):
    """Claims the model once an instance is fully built (after every subclass ``__init__``)."""

    def __call__(cls, *args, **kwargs):
        method = super().__call__(*args, **kwargs)
        method._claim()
        return method


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def check_tensors(what: str, saved, live: Mapping[str, torch.Tensor]) -> None:
    """Refuse a saved ``{name: tensor}`` that does not match ``live`` exactly (names, shapes, dtypes).

    A shape is never broadcast (a (1, n) tensor does not fit a (4, n) weight) and a dtype never cast.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"state_dict[{what!r}] must be a mapping of name -> tensor, got {type(saved).__name__}")
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise ValueError(
            f"state_dict[{what!r}] does not match this model's LoRA layers: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "")
            + ". Was it saved from a model with the same LoRA configuration?"
        )
    for name, want in live.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            raise ValueError(
                f"state_dict[{what!r}][{name!r}] is {_describe(got)}, this model has {_describe(want)}: "
                "nothing was loaded"
            )


class LoRAMethod(metaclass=_ClaimsOnBuild):
    """Base class: warm-up, interval, attach/detach, checks, state_dict and stats."""

    name = "lora"
    #: the method rescales factors and must transfer optimizer moments
    transfers_moments = False
    #: the method merges into base weights (needs mergeable layers)
    merges = False
    #: materialise per-layer scales to full shape in ``_rescale_group_`` (None: on CUDA only)
    _full_scales: bool | None = None

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        warmup_steps: int = 100,
        interval: int = 1,
        on_nonfinite: str = "raise",
        skip_unsupported: bool = False,
        compute_dtype: torch.dtype = torch.float64,
    ):
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
        if not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an int >= 1, got {interval!r}")
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        self.model = model
        self.warmup_steps = warmup_steps
        self.interval = interval
        self.on_nonfinite = on_nonfinite
        self.compute_dtype = compute_dtype
        check_not_sharded(model)  # FSDP / ZeRO-3: refuse with advice (optlora.distributed)
        self.factors = find_lora_factors(model, mergeable=self.merges, skip_unsupported=skip_unsupported)
        self._groups = group_factors(self.factors)
        self.optimizer: torch.optim.Optimizer | None = None
        self._rule: dict[str, int] | None = None
        self._handle = None
        self.steps = 0  # optimizer steps seen
        self.method_steps = 0  # steps on which the method was applied
        self._last: dict[str, torch.Tensor] = {}  # device tensors from the last applied step
        self._last_names: list[str] = []  # the layers those tensors describe
        self._released = False  # detach() was called: training without the method is intended
        self._param_ids = {id(p) for f in self.factors for p in (f.lora_A, f.lora_B)}

    def _claim(self) -> None:
        """Become the method that trains ``self.model`` (built, or attached after another method)."""
        if owner_of(self.model) is self:
            return
        _OWNERS[self.model] = weakref.ref(self)
        for hook in _CLAIM_HOOKS:
            hook(self)

    def _holds(self, optimizer) -> bool:
        """Whether ``optimizer`` steps any of this method's LoRA parameters."""
        return any(id(p) in self._param_ids for g in optimizer.param_groups for p in g["params"])

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer) -> LoRAMethod:
        """Apply the method at every ``optimizer.step()`` from now on; returns ``self``."""
        if self._handle is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to an optimizer; call detach() first")
        opt = unwrap_optimizer(optimizer)
        check_not_sharded(self.model, opt)  # the model may have been wrapped (FSDP) after construction
        other = getattr(opt, _ATTACHED, None)
        if other is not None and other is not self:
            raise RuntimeError(f"this optimizer already has {type(other).__name__} attached; detach it first")
        held = {id(p) for group in opt.param_groups for p in group["params"]}
        missing = [f.name for f in self.factors if id(f.lora_A) not in held or id(f.lora_B) not in held]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ValueError(
                f"the optimizer does not hold the LoRA parameters of {shown}; build it from model.parameters()"
            )
        if self.transfers_moments:
            self._rule = require_moment_rule(opt, type(self).__name__)
        self._check_optimizer(opt)
        self.optimizer = opt
        self._handle = opt.register_step_pre_hook(self._pre_step)
        setattr(opt, _ATTACHED, self)
        self._released = False
        self._claim()
        return self

    def detach(self) -> None:
        """Stop applying the method; the optimizer may then train the model as plain LoRA."""
        self._released = True
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            if getattr(self.optimizer, _ATTACHED, None) is self:
                delattr(self.optimizer, _ATTACHED)
            self.optimizer = None

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse optimizers whose step re-evaluates the gradient through a closure (LBFGS):
        the pre-hook would transform gradients that the closure then recomputes."""
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                f"{type(self).__name__} transforms the gradient before the step; LBFGS recomputes it inside "
                "step(closure), so the method cannot apply. Use SGD, Adam or AdamW."
            )

    def is_due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) applies the method (RefLoRA code semantics)."""
        return step > self.warmup_steps and (step - self.warmup_steps - 1) % self.interval == 0

    # ------------------------------------------------------------------ the step
    def _pre_step(self, optimizer, args, kwargs) -> None:
        step = self.steps + 1
        groups = self._active_groups() if self.is_due(step) else []
        if not groups:
            self.steps = step
            return
        with torch.no_grad():
            # everything that can refuse the step runs before the first parameter is touched
            self._check_moments(groups)
            plans = self._plan_all(groups)
            if self.on_nonfinite == "raise" and not bool(torch.cat([p["finite"] for p in plans]).all()):  # one sync
                bad = [f.name for g, p in zip(groups, plans) for f, o in zip(g.factors, p["finite"].tolist()) if not o]
                raise RuntimeError(
                    f"{type(self).__name__}: non-finite gradient or factor in {len(bad)} LoRA layer(s): "
                    + ", ".join(bad[:5])
                    + ". Nothing was modified. Use a GradScaler/clipping, lower the learning rate, or pass "
                    "on_nonfinite='skip' to leave such layers to the plain optimizer step."
                )
            for g, p in zip(groups, plans):
                self._apply(g, p)
        self.steps = step
        self.method_steps += 1
        self._last = {k: torch.cat([p[k] for p in plans]) for k in plans[0] if k in ("finite", "ok", "column")}
        self._last_names = [f.name for g in groups for f in g.factors]

    def _active_groups(self) -> list[LayerGroup]:
        """Groups restricted to adapters that received a gradient this step."""
        out = []
        for g in self._groups:
            live = [f for f in g.factors if f.lora_A.grad is not None and f.lora_B.grad is not None]
            if len(live) == len(g.factors):
                out.append(g)
            elif live:
                out.append(LayerGroup(live))
        return out

    def _plan(self, group: LayerGroup) -> dict[str, torch.Tensor]:
        """Closed forms for one group; must return at least bool masks ``finite`` and ``ok``."""
        raise NotImplementedError

    def _plan_all(self, groups: list[LayerGroup]) -> list[dict[str, torch.Tensor]]:
        """Plans of all groups; override to batch work across groups (e.g. the r x r math)."""
        return [self._plan(g) for g in groups]

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ shared rescale
    def _rescale_group_(self, group: LayerGroup, rescaling) -> None:
        """Apply a chain-rule rescaling to ``group``'s factors, gradients and (attached) optimizer moments."""
        full = self._full_scales if self._full_scales is not None else group.factors[0].lora_A.device.type == "cuda"
        rule = self._rule if self.optimizer is not None else None
        group.rescale_(rescaling, self.optimizer, rule, full_scales=full)

    def _check_moments(self, groups: list[LayerGroup]) -> None:
        """Refuse optimizer state a rescaling cannot transfer exactly, before anything is modified."""
        if not self.transfers_moments or self.optimizer is None or self._rule is None:
            return
        for g in groups:
            for f in g.factors:
                moment_tensors(self.optimizer, self._rule, f.lora_A)
                moment_tensors(self.optimizer, self._rule, f.lora_B)

    # ------------------------------------------------------------------ state
    def config(self) -> dict:
        return {"method": self.name, "warmup_steps": self.warmup_steps, "interval": self.interval}

    def state_dict(self) -> dict:
        """Counters and configuration (subclasses add what they own). Tensors are not copied."""
        return {"config": self.config(), "steps": self.steps, "method_steps": self.method_steps}

    def check_state_dict(self, state: Mapping) -> None:
        """Raise ``ValueError`` unless ``state`` fits this method and model; writes nothing."""
        if not isinstance(state, Mapping):
            raise ValueError(f"a method state_dict is a mapping, got {type(state).__name__}")
        missing = [k for k in ("config", "steps", "method_steps") if k not in state]
        if missing:
            raise ValueError(f"state_dict has no {missing}: not an optlora method state (keys: {sorted(state)[:8]})")
        saved, mine = state["config"], self.config()
        if saved != mine:
            diff = (
                {k: (saved.get(k), mine.get(k)) for k in set(saved) | set(mine) if saved.get(k) != mine.get(k)}
                if isinstance(saved, Mapping)
                else saved
            )
            raise ValueError(
                f"state_dict was saved by another method or configuration (saved, this method): {diff}; "
                f"this method is {mine}"
            )
        steps, method_steps = state["steps"], state["method_steps"]
        for key, value in (("steps", steps), ("method_steps", method_steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
        if method_steps > steps:
            raise ValueError(f"state_dict has method_steps={method_steps} > steps={steps}: corrupted")

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`; everything is checked (:meth:`check_state_dict`) before anything is written."""
        self.check_state_dict(state)
        self._write_state(state)

    def _write_state(self, state: Mapping) -> None:
        """Write a checked state (subclasses write their tensors first, then call this)."""
        self.steps = int(state["steps"])
        self.method_steps = int(state["method_steps"])

    def stats(self) -> dict:
        """What happened so far; reading it synchronises with the device."""
        out = {
            "method": self.name,
            "layers": len(self.factors),
            "steps": self.steps,
            "method_steps": self.method_steps,
            "next_step_applies": self.is_due(self.steps + 1),
        }
        if self._last:
            ok = self._last["ok"] & self._last["finite"]
            out["last_layers"] = int(ok.numel())
            out["last_skipped_layers"] = [n for n, o in zip(self._last_names, ok.tolist()) if not o]
        return out

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({len(self.factors)} LoRA layers, {cfg})"
