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

Subclasses implement ``_plan`` and ``_apply`` only.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from .discovery import LoRAFactors, find_lora_factors, unwrap_optimizer
from .distributed import check_not_sharded
from .optimizer_state import require_moment_rule

_ATTACHED = "_optlora_method"
_GET = {
    "A": lambda f: f.lora_A,
    "B": lambda f: f.lora_B,
    "gA": lambda f: f.lora_A.grad,
    "gB": lambda f: f.lora_B.grad,
}


class LayerGroup:
    """Same-shape, same-dtype, same-device adapters, processed as one batch."""

    def __init__(self, factors: list[LoRAFactors]):
        self.factors = factors

    def stack(self, what: str, dtype: torch.dtype) -> torch.Tensor:
        """``what`` in {"A", "B", "gA", "gB"}: stacked (L, ...) copy in ``dtype``."""
        return torch.stack([_GET[what](f).detach() for f in self.factors]).to(dtype)

    def pair(self, first: str, second: str, dtype: torch.dtype, dim: int) -> torch.Tensor:
        """``[first_l, second_l]`` concatenated along ``dim`` (1: rows, 2: columns) for every layer ``l``.

        (L, 2a, b) or (L, a, 2b) in ``dtype``, built with one stack and one converting copy
        (instead of two stacks, two conversions and a ``cat``).
        """
        L = len(self.factors)
        X = torch.stack(
            [_GET[first](f).detach() for f in self.factors] + [_GET[second](f).detach() for f in self.factors]
        )
        X = X.view(2, L, *X.shape[1:])
        a, b = X.shape[2:]
        if dim == 1:
            return torch.empty(L, 2, a, b, dtype=dtype, device=X.device).copy_(X.transpose(0, 1)).view(L, 2 * a, b)
        return torch.empty(L, a, 2, b, dtype=dtype, device=X.device).copy_(X.permute(1, 2, 0, 3)).view(L, a, 2 * b)

    def scalings(self, dtype: torch.dtype) -> torch.Tensor:
        """PEFT scales as an (L,) tensor; cached (no host-to-device copy per step) until a scale changes."""
        key = (dtype, tuple(f.scaling for f in self.factors))
        if getattr(self, "_scalings_key", None) != key:
            self._scalings = torch.tensor(key[1], dtype=dtype, device=self.factors[0].lora_A.device)
            self._scalings_key = key
        return self._scalings


def group_factors(factors: list[LoRAFactors]) -> list[LayerGroup]:
    groups: dict[tuple, list[LoRAFactors]] = defaultdict(list)
    for f in factors:
        key = (f.lora_A.device, f.lora_A.dtype, f.lora_B.dtype, tuple(f.lora_A.shape), tuple(f.lora_B.shape))
        groups[key].append(f)
    return [LayerGroup(v) for v in groups.values()]


class LoRAMethod:
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
        return self

    def detach(self) -> None:
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
        self.steps += 1
        if not self.is_due(self.steps):
            return
        groups = self._active_groups()
        if not groups:
            return
        with torch.no_grad():
            plans = self._plan_all(groups)
            if self.on_nonfinite == "raise" and not bool(torch.cat([p["finite"] for p in plans]).all()):  # one sync
                bad = [f.name for g, p in zip(groups, plans) for f, o in zip(g.factors, p["finite"].tolist()) if not o]
                if bad:
                    self.steps -= 1
                    raise RuntimeError(
                        f"{type(self).__name__}: non-finite gradient or factor in {len(bad)} LoRA layer(s): "
                        + ", ".join(bad[:5])
                        + ". Nothing was modified. Use a GradScaler/clipping, lower the learning rate, or pass "
                        "on_nonfinite='skip' to leave such layers to the plain optimizer step."
                    )
            for g, p in zip(groups, plans):
                self._apply(g, p)
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

    @staticmethod
    def _finite(*stacked: torch.Tensor) -> torch.Tensor:
        """Per-layer finiteness of stacked (L, ...) tensors.

        One float64 sum per tensor instead of an elementwise ``isfinite`` (five kernels): a sum
        is NaN/Inf iff an element is, as float64 sums of float32/bfloat16 values cannot overflow.
        """
        sums = torch.stack([t.flatten(1).sum(1, dtype=torch.float64) for t in stacked])
        return torch.isfinite(sums).all(0)

    # ------------------------------------------------------------------ shared rescale
    def _rescale_group_(self, group: LayerGroup, alpha: torch.Tensor, beta: torch.Tensor) -> None:
        """``A~ = A diag(alpha)``, ``B~ = B diag(beta)`` for a whole group at the same full weight (PEFT layout).

        ``alpha``, ``beta`` are (L, r). ``lora_A`` rows scale by ``alpha`` and its gradient/moments by
        ``beta``; ``lora_B`` columns scale by ``beta`` and its gradient/moments by ``alpha`` (chain rule;
        second moments by the square). Scales stay in float32 or better, so half-precision storage is
        rounded once. One ``torch._foreach_mul_`` covers every factor, gradient and moment of the group;
        on CUDA the scales are materialised to full shape so that the multi-tensor fast path applies
        (for float32 tensors; half-precision ones take foreach's per-tensor path).
        """
        cast: dict[tuple, torch.Tensor] = {}
        first = group.factors[0]
        full = self._full_scales if self._full_scales is not None else first.lora_A.device.type == "cuda"
        shape_A, shape_B = (len(group.factors), *first.lora_A.shape), (len(group.factors), *first.lora_B.shape)

        def scale(which: str, dtype: torch.dtype, row: bool, power: int = 1) -> torch.Tensor:
            key = (which, dtype, row, power)
            if key not in cast:
                t = (alpha if which == "alpha" else beta).to(torch.promote_types(dtype, torch.float32))
                t = t if power == 1 else t**power
                t = t[:, :, None] if row else t[:, None, :]
                cast[key] = t.expand(shape_A if row else shape_B).contiguous() if full else t
            return cast[key]

        rule = self._rule if self.optimizer is not None else None
        tensors, scales = [], []
        for i, f in enumerate(group.factors):
            A, B = f.lora_A, f.lora_B
            # lora_A rows by alpha (grad/moments by beta); lora_B columns by beta (grad/moments by alpha)
            for t, which, row in (
                (A, "alpha", True),
                (B, "beta", False),
                (A.grad, "beta", True),
                (B.grad, "alpha", False),
            ):
                tensors.append(t)
                scales.append(scale(which, t.dtype, row)[i])
            if rule is None:
                continue
            for p, which, row in ((A, "beta", True), (B, "alpha", False)):
                state = self.optimizer.state.get(p)
                if not state:
                    continue  # no step taken yet: nothing to transfer
                for key, power in rule.items():
                    t = state.get(key)
                    if isinstance(t, torch.Tensor) and t.shape == p.shape and power != 0:
                        tensors.append(t)
                        scales.append(scale(which, t.dtype, row, power)[i])
        torch._foreach_mul_(tensors, scales)

    # ------------------------------------------------------------------ state
    def config(self) -> dict:
        return {"method": self.name, "warmup_steps": self.warmup_steps, "interval": self.interval}

    def state_dict(self) -> dict:
        """Counters and configuration (subclasses add what they own). Tensors are not copied."""
        return {"config": self.config(), "steps": self.steps, "method_steps": self.method_steps}

    def load_state_dict(self, state: dict) -> None:
        if state.get("config") != self.config():
            raise ValueError(f"state_dict was saved with config {state.get('config')}, this method has {self.config()}")
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
