"""The catalogue of fault cases of issue #8, by class; each case runs in milliseconds on a tiny model.

``cases()`` lists them; ``bench/fault_matrix.py`` runs all and prints the table of docs/RELIABILITY.md;
``tests/test_faults.py`` runs all and adds randomised variants (hypothesis). Classes: ``non-finite``,
``overflow/underflow`` (here), ``tied weights``, ``arguments``, ``misuse``
(:mod:`optlora.testing.fault_cases_misuse`). Each case returns an :class:`~optlora.testing.faults.Outcome`
judged by the whole-state oracle; ``corrupt`` must never occur, except where ``Outcome.known`` names a known
issue (:func:`known_failure` predicts which cases carry one).
"""

from __future__ import annotations

import math
from functools import partial

import torch

from .fault_cases_misuse import (
    _tied_llama,  # noqa: F401 - tests/test_distributed.py builds its tied model from here
    argument_cases,
    misuse_cases,
    tied_cases,
)
from .faults import METHODS, Case, Setup, run_step
from .oracle import CLASS6

__all__ = ["METHODS", "Case", "TIMINGS", "cases", "known_failure"]

# ---------------------------------------------------------------------------------------- non-finite
TIMINGS = {  # options and plain steps so that the observed step is due / warm-up / between two intervals
    "due": ({"warmup_steps": 1, "interval": 3}, 1),
    "warmup": ({"warmup_steps": 3}, 1),
    "between": ({"warmup_steps": 1, "interval": 3}, 2),
}


def _poison(where: str, value: float, layer: int = 1):
    def inject(model, method, opt):
        f = method.factors[layer]
        t = {"grad_A": f.lora_A.grad, "grad_B": f.lora_B.grad, "lora_A": f.lora_A, "lora_B": f.lora_B}[where]
        t.view(-1)[0] = value

    return inject


def nonfinite_cases() -> list[Case]:
    out = []
    for method in METHODS:
        for mode in ("raise", "skip"):
            for timing, (options, plain) in TIMINGS.items():
                for where in ("grad_A", "grad_B", "lora_A", "lora_B"):
                    for value in (math.nan, math.inf):
                        due = timing == "due"
                        allowed = ("error",) if mode == "raise" else ("skip",) if due else ("plain",)
                        setup = Setup(method, options={**options, "on_nonfinite": mode}, plain=plain)
                        name = f"{method} on_nonfinite={mode} {timing}: {where}[0] = {value}"
                        out.append(Case("non-finite", name, partial(run_step, setup, _poison(where, value), allowed)))
    return out


# ---------------------------------------------------------------------------------------- overflow / underflow
SCALES = {  # (factor on lora_A, factor on lora_B), applied before the backward
    "both x1e-20": (1e-20, 1e-20),
    "both x1e-40 (subnormal)": (1e-40, 1e-40),
    "A x1e15, B x1e-15": (1e15, 1e-15),
    "A x1e-19, B x1e19": (1e-19, 1e19),
    "A x1e30, B x1e-30": (1e30, 1e-30),
}
SAFE = ("error", "skip", "applied")


def _scale(a: float, b: float):
    def prepare(model, method):
        for f in method.factors:
            f.lora_A.mul_(a)
            f.lora_B.mul_(b)

    return prepare


def _scale_grads(k: float):
    def inject(model, method, opt):
        for f in method.factors:
            f.lora_A.grad.mul_(k)
            f.lora_B.grad.mul_(k)

    return inject


def range_cases() -> list[Case]:
    out = []
    for method in METHODS:
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for cd in (torch.float32, torch.float64):
                for label, (a, b) in SCALES.items():
                    setup = Setup(method, dtype=dtype, options={"compute_dtype": cd})
                    name = f"{method} {str(dtype)[6:]} compute {str(cd)[6:]}: factors {label}"
                    out.append(Case("overflow/underflow", name, partial(run_step, setup, None, SAFE, _scale(a, b))))
        for k in (1e30, 1e-30):
            name = f"{method} float32: gradients x{k:g}"
            out.append(Case("overflow/underflow", name, partial(run_step, Setup(method), _scale_grads(k), SAFE)))
    for method in ("scalora", "scalora_i"):
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            for kappa in (1e-12, 1e-6, 1e3, 1e6, 1e12):
                for mode in ("hybrid", "column", "scalar"):
                    setup = Setup(method, dtype=dtype, lr=0.0, options={"kappa": kappa, "mode": mode, "interval": 1})
                    name = f"{method} {str(dtype)[6:]} mode={mode}: kappa={kappa:g}"
                    out.append(Case("overflow/underflow", name, partial(run_step, setup, None, ("skip", "applied"))))
    return out


def cases() -> list[Case]:
    """Every case of every class, in a fixed order."""
    return nonfinite_cases() + range_cases() + tied_cases() + argument_cases() + misuse_cases()


def known_failure(case: Case) -> str:
    """The known issue a case must show until it is fixed (``""``: none): issue #16 class 6 for every case that
    puts NaN/Inf into a layer under ``on_nonfinite="skip"`` (the layer still moves in the optimizer's update)."""
    skip_nan = case.cls == "non-finite" and "on_nonfinite=skip" in case.name
    return CLASS6 if skip_nan or case.name.endswith("every layer skipped (not a method step)") else ""
