"""Fault injection: run one fault against a method and classify what happened (issue #8, docs/RELIABILITY.md).

A *step fault* builds a tiny PEFT model with a method and an optimizer, takes plain steps,
computes fresh gradients, injects the fault (NaN/Inf, extreme scales, ...) and calls
``optimizer.step()``. :func:`observe` snapshots every LoRA factor, gradient, base weight and
optimizer moment before the call and, through a second step pre-hook that runs after the
method's, after the method and before the optimizer's own update. :func:`classify` then names
the outcome:

* ``error``   -- a clear exception (``ValueError``/``TypeError``/``RuntimeError`` with a message, never
  a ``LinAlgError`` or ``KeyError``) and nothing modified (tensors and counters bit-identical);
* ``skip``    -- the method left the faulty layers exactly as they were and ``stats()`` names each with
  its reason (the optimizer's own step then treats them as plain LoRA);
* ``applied`` -- the method took its step on every layer and it is right: every tensor finite and each
  layer's effective weight ``W + s B A`` kept to the merge's rounding bound;
* ``plain``   -- a step on which the method is not due: it changed nothing;
* ``corrupt`` -- anything else (a NaN the method produced, a changed function, an unreported skip,
  a miscounted step, an unclear or late error). The suite asserts that it never happens.

The catalogue of cases is :mod:`optlora.testing.fault_cases`; ``bench/fault_matrix.py`` prints it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import make_method

OUTCOMES = ("error", "skip", "applied", "plain", "corrupt")
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)


@dataclass
class Outcome:
    kind: str  # one of OUTCOMES
    detail: str = ""


# ---------------------------------------------------------------------------------------- tiny setups
def tiny_model(dtype: torch.dtype = torch.float32, *, r: int = 2, seed: int = 0, dims=(6, 5, 4)):
    """``Linear -> Tanh -> Linear`` with random LoRA on both (names "0" and "2") and a fixed batch."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    d0, d1, d2 = dims
    base = nn.Sequential(nn.Linear(d0, d1), nn.Tanh(), nn.Linear(d1, d2)).to(dtype)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0", "2"], lora_dropout=0.0, init_lora_weights=False)
    model = get_peft_model(base, cfg, autocast_adapter_dtype=False)
    g = torch.Generator().manual_seed(seed + 1)
    batch = (torch.randn(8, d0, generator=g).to(dtype), torch.randn(8, d2, generator=g).to(dtype))
    return model, batch


def loss(model, batch) -> torch.Tensor:
    x, y = batch
    return (model(x) - y).float().pow(2).mean()


OPTIMIZERS = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr),
    "sgd_momentum": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, eps=1e-4),
}


@dataclass
class Setup:
    """A method on :func:`tiny_model`, ``plain`` optimizer steps taken before the observed one."""

    method: str = "scalora"
    dtype: torch.dtype = torch.float32
    optimizer: str = "adamw"
    plain: int = 1
    lr: float = 1e-2
    options: dict = field(default_factory=dict)  # warmup_steps, interval, kappa, on_nonfinite, compute_dtype, ...

    def build(self, prepare: Callable | None = None):
        """``(model, method, opt, batch)`` with fresh gradients; ``prepare(model, method)`` runs before the backward."""
        model, batch = tiny_model(self.dtype)
        opt = OPTIMIZERS[self.optimizer]([p for p in model.parameters() if p.requires_grad], self.lr)
        options = {"warmup_steps": 1, **self.options}
        method = make_method(self.method, model, **options).attach(opt)
        for _ in range(self.plain):
            opt.zero_grad()
            loss(model, batch).backward()
            opt.step()
        if prepare is not None:
            with torch.no_grad():
                prepare(model, method)
        opt.zero_grad()
        loss(model, batch).backward()
        return model, method, opt, batch


# ---------------------------------------------------------------------------------------- observing a step
def snapshot(method, opt) -> dict:
    """Clones of every factor, gradient, base weight and optimizer moment of each layer, and the counters."""
    layers = {}
    for f in method.factors:
        d = {
            "A": f.lora_A.detach().clone(),
            "B": f.lora_B.detach().clone(),
            "W": f.base_weight.detach().clone(),
            "s": f.scaling,
            "fifo": f.fan_in_fan_out,
        }
        for key, p in (("gA", f.lora_A), ("gB", f.lora_B)):
            d[key] = None if p.grad is None else p.grad.detach().clone()
        for key, p in (("mA", f.lora_A), ("mB", f.lora_B)):
            d[key] = [
                t.detach().clone() for t in opt.state.get(p, {}).values() if isinstance(t, torch.Tensor) and t.dim()
            ]
        layers[f.name] = d
    return {"layers": layers, "steps": method.steps, "method_steps": method.method_steps}


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


def _layer_same(x: dict, y: dict) -> bool:
    return all(_same(x[k], y[k]) for k in ("A", "B", "W", "gA", "gB", "mA", "mB"))


def _finite(d: dict) -> bool:
    tensors = [d["A"], d["B"], d["W"], *(t for t in (d["gA"], d["gB"]) if t is not None), *d["mA"], *d["mB"]]
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def effective_weight(d: dict) -> torch.Tensor:
    delta = d["s"] * d["B"].double() @ d["A"].double()
    return d["W"].double() + (delta.T if d["fifo"] else delta)


def function_error(before: dict, after: dict) -> float:
    """``||W_eff(after) - W_eff(before)||_F / (||W|| + ||s B A||)`` in float64."""
    scale = before["W"].double().norm() + (before["s"] * before["B"].double() @ before["A"].double()).norm()
    diff = (effective_weight(after) - effective_weight(before)).norm()
    return float(diff / scale) if scale > 0 else float(diff)


def tolerance(method, d: dict) -> float:
    """The rounding bound a method's step must keep ``W + s B A`` to (merge growth bound for ScaLoRA)."""
    u_w, u_f = torch.finfo(d["W"].dtype).eps / 2, torch.finfo(d["A"].dtype).eps / 2
    growth = method.max_merge_growth(d["W"].dtype) if hasattr(method, "max_merge_growth") else 1.0
    return 4 * growth * u_w + 16 * u_f  # stochastic rounding errs by up to one ulp (2u), both factors rescaled


def observe(method, opt, call: Callable[[], object]) -> tuple[dict, dict | None, dict, BaseException | None]:
    """``(before, mid, after, exception)`` around ``call``; ``mid`` is taken after the method, before the update."""
    before = snapshot(method, opt)
    seen: dict = {}

    def after_method(*_) -> None:  # registered after the method's hook: runs between it and the update
        seen.setdefault("mid", snapshot(method, opt))

    handle = opt.register_step_pre_hook(after_method)
    exc = None
    try:
        call()
    except Exception as e:  # noqa: BLE001 - classified below
        exc = e
    finally:
        handle.remove()
    return before, seen.get("mid"), snapshot(method, opt), exc


def clear_error(exc: BaseException) -> bool:
    linalg = getattr(torch._C, "_LinAlgError", ())
    return isinstance(exc, CLEAR_ERRORS) and not isinstance(exc, linalg) and len(str(exc)) >= 30


def classify(method, before: dict, mid: dict | None, after: dict, exc: BaseException | None) -> Outcome:
    """The outcome of one observed ``optimizer.step()`` (see the module docstring)."""
    if exc is not None:
        unchanged = all(_layer_same(before["layers"][n], after["layers"][n]) for n in before["layers"])
        counters = (before["steps"], before["method_steps"]) == (after["steps"], after["method_steps"])
        if clear_error(exc) and unchanged and counters:
            return Outcome("error", f"{type(exc).__name__}: {str(exc)[:120]}")
        return Outcome(
            "corrupt", f"{type(exc).__name__} (clear={clear_error(exc)}, unchanged={unchanged and counters})"
        )
    if mid is None:
        return Outcome("corrupt", "optimizer.step() returned without running its pre-hooks")
    if after["steps"] != before["steps"] + 1:
        return Outcome("corrupt", f"steps went from {before['steps']} to {after['steps']}")
    due = method.is_due(before["steps"] + 1)
    if not due or not any(before["layers"][n]["gA"] is not None for n in before["layers"]):
        if all(_layer_same(before["layers"][n], mid["layers"][n]) for n in before["layers"]):
            return Outcome("plain")
        return Outcome("corrupt", "the method changed a layer on a step where it is not due")
    stats = method.stats()
    reasons = stats.get("last_skip_reasons", dict.fromkeys(stats.get("last_skipped_layers", []), "reported"))
    skipped, problems = [], []
    for name, b in before["layers"].items():
        m = mid["layers"][name]
        if name in reasons:
            skipped.append(name)
            if not _layer_same(b, m):
                problems.append(f"{name} reported skipped ({reasons[name]}) but modified")
        elif not _finite(m):
            problems.append(f"{name}: the method produced NaN/Inf")
        elif function_error(b, m) > tolerance(method, b):
            problems.append(f"{name}: function changed by {function_error(b, m):.2e} > {tolerance(method, b):.2e}")
    applied = len(skipped) < len(before["layers"])
    if after["method_steps"] != before["method_steps"] + int(applied):
        problems.append(f"method_steps {before['method_steps']} -> {after['method_steps']}, applied={applied}")
    if problems:
        return Outcome("corrupt", "; ".join(problems))
    if skipped:
        return Outcome("skip", ", ".join(f"{n}: {reasons[n]}" for n in skipped))
    return Outcome("applied")


def expected(outcome: Outcome, allowed: tuple[str, ...]) -> Outcome:
    """``outcome``, or ``corrupt`` if it is not one the fault must end in (e.g. a NaN under "raise" must be an error)."""
    if outcome.kind in allowed:
        return outcome
    return Outcome("corrupt", f"expected {'/'.join(allowed)}, got {outcome.kind}: {outcome.detail}")


def run_step(
    setup: Setup,
    inject: Callable | None = None,
    allowed: tuple[str, ...] = OUTCOMES[:-1],
    prepare: Callable | None = None,
) -> Outcome:
    """Build ``setup`` (``prepare`` before its last backward), inject the fault after it, observe and classify one step."""
    model, method, opt, _ = setup.build(prepare)
    if inject is not None:
        with torch.no_grad():
            inject(model, method, opt)
    return expected(classify(method, *observe(method, opt, opt.step)), allowed)


def expect_error(build: Callable[[], object]) -> Outcome:
    """A fault refused at construction or attach: ``build()`` must raise a clear error."""
    try:
        build()
    except Exception as e:  # noqa: BLE001
        return (
            Outcome("error", f"{type(e).__name__}: {str(e)[:120]}") if clear_error(e) else Outcome("corrupt", repr(e))
        )
    return Outcome("corrupt", "accepted without an error")
