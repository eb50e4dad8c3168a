"""The per-step state machine shared by every optlora method.

A method is attached to an optimizer as a *step pre-hook*: it runs after ``backward``,
gradient clipping and AMP unscaling, and before ``optimizer.step()``. A step that
``GradScaler`` skips for inf/NaN never reaches the hook and does not count. On a step
that is due (after ``warmup_steps`` plain LoRA steps, then every ``interval`` steps) the
hook runs three phases:

1. *plan*: compute every layer's closed form from its factors and gradients, batched
   over layers of the same shape (no parameter is touched yet), with per-layer masks: inputs
   finite, result within floating-point range (and, for ScaLoRA, a merge that keeps the
   function to rounding), closed form defined;
2. *check*: one device sync brings the masks to the host. A NaN/Inf gradient or factor raises
   naming the layers (default) or skips them (``on_nonfinite="skip"``); out-of-range and
   degenerate layers are skipped. Skipped layers are left exactly as they are, to the plain step;
3. *apply*: precondition gradients (RefLoRA) or rescale factors, gradients and
   optimizer moments (RefLoRA-S, ScaLoRA), merging into the base weight (ScaLoRA), on the
   layers that passed. ``method_steps`` counts the step only if at least one layer did.

On every other step (warm-up, between intervals) the hook still checks, under
``on_nonfinite="raise"``, that no LoRA gradient or factor is NaN/Inf (one fused reduction and
one sync), and on every step it refuses adapters merged by PEFT's ``merge_adapter()`` and
evaluates a ``step(closure)`` closure first (:mod:`optlora.methods.guards`).

Subclasses implement ``_plan`` (or ``_plan_all``) and ``_apply`` only; every read and write of a
parameter goes through :class:`optlora.methods.layers.LayerGroup`. Under FSDP2 the groups are
:class:`optlora.methods.sharded.ShardedLayerGroup`: before *plan*, one ``all_gather`` per due step
brings every rank the same Grams, norms, row and moment maxima, non-finite flags and ``lora_A`` rows
(:func:`optlora.methods.sharded.exchange_`), so every closed form and guard sees the single-process
inputs; before the one host sync, one all-reduce ANDs the per-layer flags over the ranks, so every rank
skips, raises and applies the same layers. The plain-step NaN/Inf check reads each rank's shards and
ANDs its flags the same way.

A method *claims* its model when it is built and when it is attached (:mod:`optlora.methods.claims`):
an optimizer that steps the model's LoRA parameters without the method attached then raises instead
of silently training plain LoRA, and :mod:`optlora.persist` installs its save/load guard.
``load_state_dict`` is transactional (:mod:`optlora.methods.state`): names, shapes, dtypes, method,
config, counters and skip counts of the whole state are checked (under FSDP2 on every rank, and the
ranks agree) before anything is written.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from functools import partial

import torch

from ..discovery import find_lora_factors
from ..distributed import check_sharding, is_dtensor
from ..optimizer_state import moment_tensors, require_moment_rule, unwrap_optimizer
from . import claims, guards
from .claims import on_claim, owner_of
from .layers import LayerGroup
from .sharded import ShardedLayerGroup, and_over_ranks, exchange_, group_layers, release_
from .state import agree_over_ranks, check_counters, check_tensors

__all__ = ["LoRAMethod", "check_tensors", "on_claim", "owner_of"]

_ATTACHED = "_optlora_method"


class LoRAMethod(metaclass=claims.ClaimsOnBuild):
    """Base class: warm-up, interval, attach/detach, checks, state_dict and stats."""

    name = "lora"
    #: the method rescales factors and must transfer optimizer moments
    transfers_moments = False
    #: the method merges into base weights (needs mergeable layers)
    merges = False
    #: a merging method accepts quantised bases (it keeps their merges elsewhere: ScaLoRA's ``residual_rank``)
    _quantized_ok = False
    #: materialise per-layer scales to full shape in ``_rescale_group_`` (None: on CUDA only)
    _full_scales: bool | None = None
    #: what ``_plan`` reads per layer (``optlora.methods.sharded.READS``): sizes the FSDP2 exchange
    reads = "grams"

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
        warmup_steps = guards.check_int("warmup_steps", warmup_steps, 0)
        interval = guards.check_int("interval", interval, 1)
        if on_nonfinite not in ("raise", "skip"):
            raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
        if compute_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"compute_dtype must be torch.float32 or torch.float64, got {compute_dtype}")
        if not isinstance(skip_unsupported, bool):
            raise ValueError(f"skip_unsupported must be True or False, got {skip_unsupported!r}")
        self.model = model
        self.warmup_steps = warmup_steps
        self.interval = interval
        self.on_nonfinite = on_nonfinite
        self.compute_dtype = compute_dtype
        check_sharding(model)  # FSDP1 / ZeRO-3 / HSDP: refuse with advice (optlora.distributed)
        self.factors = find_lora_factors(
            model, mergeable=self.merges, skip_unsupported=skip_unsupported, quantized_ok=self._quantized_ok
        )
        self._groups = group_layers(self.factors)
        self.optimizer: torch.optim.Optimizer | None = None
        self._rule: dict[str, int] | None = None
        self._handle = None
        self.steps = 0  # optimizer steps seen
        self.method_steps = 0  # steps on which the method was applied to at least one layer
        self._last: dict[str, torch.Tensor] = {}  # device tensors from the last due step
        self._last_names: list[str] = []  # the layers those tensors describe
        self._last_skipped: dict[str, str] = {}  # name -> reason, last due step
        self.skipped = dict.fromkeys(guards.REASONS, 0)  # layer-steps skipped so far, by reason
        self._warned_range = False
        self._exchange_bytes = 0  # FSDP2: bytes this rank sent in the last step's collective

    @property
    def sharded(self) -> bool:
        """Whether the model's LoRA parameters are FSDP2 shards (DTensors) now."""
        return any(is_dtensor(f.lora_A) for f in self.factors)

    # ------------------------------------------------------------------ wiring
    def attach(self, optimizer) -> LoRAMethod:
        """Apply the method at every ``optimizer.step()`` from now on; returns ``self``."""
        if self._handle is not None:
            raise RuntimeError(f"{type(self).__name__} is already attached to an optimizer; call detach() first")
        opt = unwrap_optimizer(optimizer)
        check_sharding(self.model, opt)  # the model may have been wrapped (FSDP) after construction
        self._groups = group_layers(self.factors)  # ... e.g. sharded by fully_shard (FSDP2): DTensor groups
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
        claims.attached(self, optimizer)  # and claims the model
        return self

    def detach(self) -> None:
        """Stop applying the method; the optimizer may then train the model as plain LoRA."""
        claims.detached(self)
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
    def _pre_step(self, optimizer, args, kwargs):
        step = self.steps + 1
        replaced = guards.evaluate_closure(args, kwargs)  # step(closure): the gradient must exist first
        guards.refuse_merged_adapters(self.factors)
        groups = self._active_groups() if self.is_due(step) else []
        if not groups:
            if self.on_nonfinite == "raise":  # warm-up and between intervals too: one fused reduction, one sync
                sharded = [g for g in self._current_groups(every=False) if isinstance(g, ShardedLayerGroup)]
                # FSDP2: every rank reads its shards; the per-layer flags are ANDed over the ranks before the sync
                bad = guards.nonfinite_layers(
                    self.factors, agree=partial(and_over_ranks, groups=sharded) if sharded else None
                )
                if bad:
                    raise guards.nonfinite_error(type(self).__name__, bad)
            self.steps = step
            return replaced
        with torch.no_grad():
            # everything that can refuse the step runs before the first parameter is touched
            self._check_moments(groups)
            # FSDP2: one all_gather brings every rank the same Grams, norms, row maxima, moment maxima and flags
            # of all sharded layers (optlora.methods.sharded.exchange_; bytes this rank sent); plain groups: nothing
            self._exchange_bytes = exchange_(
                groups, self.compute_dtype, self.reads, self.merges, self._moment_rule_of_step()
            )
            try:
                plans = self._plan_all(groups)
                flags = self._host_flags(groups, plans)  # the one sync: (finite, ok, in_range) per layer
                names = [f.name for g in groups for f in g.factors]
                if self.on_nonfinite == "raise" and not all(finite for finite, _, _ in flags):
                    raise guards.nonfinite_error(type(self).__name__, [n for n, fl in zip(names, flags) if not fl[0]])
                start = 0
                for g, p in zip(groups, plans):
                    keep = [ok for _, ok, _ in flags[start : start + len(g)]]
                    start += len(g)
                    if all(keep):
                        self._apply(g, p)
                    elif any(keep):
                        self._apply(*_restrict(g, p, keep))
            finally:
                release_(groups)
        self.steps = step
        self._record(plans, names, flags)
        return replaced

    def _host_flags(
        self, groups: list[LayerGroup], plans: list[dict[str, torch.Tensor]]
    ) -> list[tuple[bool, bool, bool]]:
        """Per layer ``(finite, ok, in_range)`` on the host, with one device sync for all groups.

        Under FSDP2 the flags are first ANDed over the ranks (one all-reduce MIN of this small tensor,
        :func:`optlora.methods.sharded.and_over_ranks`) and written back into the plans, so every rank skips and
        applies the same layers even where a guard reads this rank's rows of a planned tensor
        (RefLoRA's preconditioned ``lora_B.grad``).
        """
        cols = []
        for p in plans:
            in_range = p.get("in_range", torch.ones_like(p["ok"]))
            cols.append(torch.stack([p["finite"], p["ok"] & p["finite"] & in_range, in_range], 1))
        table = and_over_ranks(torch.cat(cols), groups)
        if any(isinstance(g, ShardedLayerGroup) for g in groups):
            for p, part in zip(plans, table.split([len(g) for g in groups])):
                p["finite"], p["ok"], p["in_range"] = part.unbind(1)
                if "column" in p:
                    p["column"] = p["column"] & p["ok"]
        return [tuple(row) for row in table.tolist()]

    def _record(self, plans, names: list[str], flags: list[tuple[bool, bool, bool]]) -> None:
        """Stats of a due step: skipped layers with their reason, counts; ``method_steps`` if any layer applied."""
        self._last = {k: torch.cat([p[k] for p in plans]) for k in plans[0] if k in ("finite", "ok", "column")}
        self._last_names = names
        self._last_skipped = {}
        for name, (finite, ok, in_range) in zip(names, flags):
            if not ok:
                reason = guards.NONFINITE if not finite else guards.OUT_OF_RANGE if not in_range else guards.DEGENERATE
                self._last_skipped[name] = reason
                self.skipped[reason] += 1
        if len(self._last_skipped) < len(names):
            self.method_steps += 1
        out = [n for n, r in self._last_skipped.items() if r == guards.OUT_OF_RANGE]
        if out and not self._warned_range:
            self._warned_range = True
            warnings.warn(
                f"{type(self).__name__} skipped {len(out)} LoRA layer(s) whose step would leave the floating-point "
                f"range or, for ScaLoRA, lose the model's function to rounding at the merge ({', '.join(out[:3])}); "
                "they take the plain step. stats()['skipped'] counts them. " + self._range_advice(),
                RuntimeWarning,
                stacklevel=4,
            )

    def _range_advice(self) -> str:
        return "Check the scale of the factors (compute_dtype=torch.float64 has the widest range)."

    def _current_groups(self, every: bool = True) -> list[LayerGroup]:
        """All layer groups, rebuilt if the model was sharded by ``fully_shard`` (or unsharded) since they were built.

        ``every=False`` (plain steps, where a parameter lookup per adapter is a visible cost) looks at the
        first adapter only; due steps look at every adapter, and regrouping refuses a partly sharded model.
        """
        sharded = self.sharded if every else bool(self.factors) and is_dtensor(self.factors[0].lora_A)
        if sharded != any(isinstance(g, ShardedLayerGroup) for g in self._groups):
            self._groups = group_layers(self.factors)
        return self._groups

    def _active_groups(self) -> list[LayerGroup]:
        """Groups restricted to adapters that received a gradient this step."""
        out = []
        for g in self._current_groups():
            live = [f for f in g.factors if f.lora_A.grad is not None and f.lora_B.grad is not None]
            if len(live) == len(g.factors):
                out.append(g)
            elif live:
                out.append(g.subset(live))
        return out

    def _moment_rule_of_step(self) -> tuple[torch.optim.Optimizer, dict[str, int]] | None:
        """The optimizer and moment rule whose moments a rescaling multiplies (range guards read them), if any."""
        return (self.optimizer, self._rule) if self.optimizer is not None and self._rule is not None else None

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

    def _rescaling_in_range(
        self, group: LayerGroup, alpha: torch.Tensor, beta: torch.Tensor, rows: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Per layer: the chain-rule rescaling keeps every tensor it multiplies finite, and factor rows normal
        (:func:`optlora.methods.guards.rescaling_in_range`, with the moments of the attached optimizer)."""
        return guards.rescaling_in_range(group, alpha, beta, rows, self._moment_rule_of_step())

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
        """Configuration, step counters and the guards' skip counts (subclasses add what they own).

        Tensors are not copied. What only describes the last due step (``stats()['last_*']``) and the
        once-per-process range warning are not part of the state.
        """
        return {
            "config": self.config(),
            "steps": self.steps,
            "method_steps": self.method_steps,
            "skipped": dict(self.skipped),
        }

    def check_state_dict(self, state: Mapping) -> None:
        """Raise ``ValueError`` unless ``state`` fits this method and model; writes nothing.

        Subclasses extend it with their tensors; :meth:`load_state_dict` runs it on every rank (FSDP2).
        """
        check_counters(state, self.config())

    def load_state_dict(self, state: Mapping) -> None:
        """Restore a :meth:`state_dict`; everything is checked (:meth:`check_state_dict`) before anything is written.

        FSDP2: call it on every rank (the ranks agree on the check: one rank's refusal is everyone's).
        """
        mesh = self.factors[0].lora_A.device_mesh if self.factors and self.sharded else None
        agree_over_ranks(lambda: self.check_state_dict(state), mesh)
        self._write_state(state)

    def _write_state(self, state: Mapping) -> None:
        """Write a checked state (subclasses write their tensors first, then call this)."""
        self.steps = int(state["steps"])
        self.method_steps = int(state["method_steps"])
        self.skipped = {r: int(state.get("skipped", {}).get(r, 0)) for r in guards.REASONS}

    def stats(self) -> dict:
        """What happened so far.

        ``method_steps``: steps on which at least one layer took the method's step;
        ``last_skipped_layers`` / ``last_skip_reasons``: the layers of the last due step left to the
        plain step and why (``"nonfinite"``, ``"out_of_range"``, ``"degenerate"``); ``skipped``: layer-steps
        skipped so far, by reason; ``note``: present when the method has not been applied yet.
        """
        out = {
            "method": self.name,
            "layers": len(self.factors),
            "steps": self.steps,
            "method_steps": self.method_steps,
            "next_step_applies": self.is_due(self.steps + 1),
            "skipped": dict(self.skipped),
        }
        if self._last_names:
            out["last_layers"] = len(self._last_names)
            out["last_skipped_layers"] = list(self._last_skipped)
            out["last_skip_reasons"] = dict(self._last_skipped)
        note = self.never_applied_note()
        if note:
            out["note"] = note
        if self._exchange_bytes:
            out["exchange_bytes"] = self._exchange_bytes
        return out

    def never_applied_note(self, planned_steps: int | None = None) -> str | None:
        """A sentence if the method was never applied in ``self.steps`` steps (or cannot be in ``planned_steps``)."""
        return guards.never_applied_note(self, planned_steps)

    def __repr__(self) -> str:
        cfg = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({len(self.factors)} LoRA layers, {cfg})"


def _restrict(group: LayerGroup, plan: dict[str, torch.Tensor], keep: list[bool]) -> tuple[LayerGroup, dict]:
    """The layers of ``group`` with ``keep`` True, as a group of the same kind (FSDP2: with the step's exchanged
    tensors of those layers), and the same rows of ``plan``."""
    idx = [i for i, k in enumerate(keep) if k]
    index = torch.tensor(idx, device=next(iter(plan.values())).device)
    return group.restrict(idx), {k: v.index_select(0, index) for k, v in plan.items()}
