"""Fault injection: run one fault against a method and classify what happened (issues #8, #16; docs/RELIABILITY.md).

A *step fault* builds a tiny PEFT model with a method and an optimizer, takes plain steps,
computes fresh gradients, injects the fault (NaN/Inf, extreme scales, ...) and calls
``optimizer.step()``. :func:`observe` snapshots the whole state (:func:`optlora.testing.oracle.capture`:
model tensors, gradients, optimizer state, the method's counters, buffers and generators, torch's RNG)
before the call, between the method's pre-hook and the optimizer's update (a second pre-hook registered
after the method's), and after the call returns. :func:`classify` hands the three to the whole-state oracle
(:func:`optlora.testing.judge.judge`) and names the outcome:

* ``error``   -- a clear exception (``ValueError``/``TypeError``/``RuntimeError`` with a message, never
  a ``LinAlgError`` or ``KeyError``) and the whole state bit-identical;
* ``skip``    -- a due step on which the method left some layers to the plain step (or, for NaN/Inf, untouched),
  each reported and counted, and everything else as the reference says;
* ``applied`` -- a due step on which every layer took the method's step, and the whole state after the step
  equals the float64 reference to measured rounding;
* ``plain``   -- a step on which the method is not due: the optimizer's update alone;
* ``corrupt`` -- anything else. ``Outcome.known`` names the issue when every problem is a known one (issue #16
  class 6: a layer skipped for NaN/Inf still moves in the optimizer's update).

The catalogue of cases is :mod:`optlora.testing.fault_cases`; ``bench/fault_matrix.py`` prints it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import make_method
from .judge import judge
from .oracle import Snapshot, capture

OUTCOMES = ("error", "skip", "applied", "plain", "corrupt")
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)


METHODS = ("reflora", "reflora_s", "scalora", "scalora_i", "scaledgd")


@dataclass
class Outcome:
    kind: str  # one of OUTCOMES
    detail: str = ""
    known: str = ""  # "corrupt" only: the known issue every problem belongs to (oracle.CLASS6), if all do
    ratio: float = 0.0  # the largest error / tolerance of a tensor the oracle compared (below 1 when it passed)
    fingerprint: str = ""  # "before:after" whole-state hashes of the observed step (:func:`fingerprint`), if any


@dataclass
class Case:
    """One catalogued fault (:mod:`optlora.testing.fault_cases`): its class, a name, and how to run it."""

    cls: str
    name: str
    run: Callable[[], Outcome]


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
def observe(
    method, opt, call: Callable[[], object], model=None
) -> tuple[Snapshot, Snapshot | None, Snapshot, BaseException | None]:
    """``(before, mid, after, exception)`` around ``call``; ``mid`` is taken after the method, before the update."""
    before = capture(method, opt, model)
    seen: dict = {}

    def after_method(*_) -> None:  # registered after the method's hook: runs between it and the update
        seen.setdefault("mid", capture(method, opt, model))

    handle = opt.register_step_pre_hook(after_method)
    exc = None
    try:
        call()
    except Exception as e:  # noqa: BLE001 - classified below
        exc = e
    finally:
        handle.remove()
    return before, seen.get("mid"), capture(method, opt, model), exc


def clear_error(exc: BaseException) -> bool:
    linalg = getattr(torch._C, "_LinAlgError", ())
    return isinstance(exc, CLEAR_ERRORS) and not isinstance(exc, linalg) and len(str(exc)) >= 30


def classify(method, before: Snapshot, mid: Snapshot | None, after: Snapshot, exc: BaseException | None) -> Outcome:
    """The outcome of one observed ``optimizer.step()`` (see the module docstring)."""
    opt = method.optimizer
    verdict = judge(method, opt, before, mid, after, exc, exc is not None and clear_error(exc))
    mark = f"{fingerprint(before)}:{fingerprint(after)}"
    if verdict.kind != "corrupt":
        detail = f"{type(exc).__name__}: {str(exc)[:120]}" if exc is not None else _skips(method, verdict.kind)
        return Outcome(verdict.kind, detail, ratio=verdict.ratio, fingerprint=mark)
    tags = {tag for _, tag in verdict.problems}
    return Outcome(
        "corrupt",
        "; ".join(text for text, _ in verdict.problems),
        known=",".join(sorted(tags)) if "" not in tags else "",
        ratio=verdict.ratio,
        fingerprint=mark,
    )


def fingerprint(snap: Snapshot) -> str:
    """A hash of a whole-state snapshot (tensors, gradients, optimizer state, the method's state): two runs of a
    case end in the same state iff their fingerprints are equal (the mutation check compares them)."""
    digest = hashlib.sha256()

    def feed(x) -> None:
        if isinstance(x, dict):
            for k in sorted(x, key=str):
                digest.update(str(k).encode())
                feed(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                feed(v)
        elif isinstance(x, torch.Tensor):
            digest.update(
                str(x.dtype).encode() + x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
            )
        else:
            digest.update(repr(x).encode())

    feed([snap.tensors, snap.grads, snap.opt_state, snap.method])
    return digest.hexdigest()[:16]


def _skips(method, kind: str) -> str:
    if kind != "skip":
        return ""
    return ", ".join(f"{n}: {r}" for n, r in method.stats().get("last_skip_reasons", {}).items())


def expected(outcome: Outcome, allowed: tuple[str, ...]) -> Outcome:
    """``outcome``, or ``corrupt`` if it is not one the fault must end in (e.g. a NaN under "raise" must be an error)."""
    if outcome.kind in allowed or outcome.kind == "corrupt":
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
