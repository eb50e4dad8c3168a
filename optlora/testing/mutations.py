"""Deliberate breakages of the library, applied at runtime, that the whole-state oracle must flag (issue #16, class 7).

Each :class:`Mutation` patches one internal entry point of optlora for the duration of a ``with`` block
(:func:`applied`), without editing a file, and names a representative subset of fault-matrix setups in which
the patched code runs and changes the outcome. ``tests/test_oracle_mutations.py`` asserts that the oracle
reports every mutation in every setup of its subset (as a problem that is not a known issue) and that the
unbroken library passes the same setups; ``bench/fault_matrix.py --mutations`` runs the whole catalogue
under each mutation and counts the cases that flag it (docs/RELIABILITY.md).

The internal entry points patched here (the only names of optlora's internals this module uses; the core's
module paths may move, then only these imports change):

* ``LayerGroup.rescale_`` and ``LayerGroup._rescale_operands`` -- the chain-rule rescaling of factors,
  gradients and optimizer moments (RefLoRA-S, ScaLoRA);
* ``reflora.reflora_precondition`` -- RefLoRA's preconditioned gradients, as the method module calls it;
* ``LoRAMethod._record`` -- the statistics of a due step (skip counts);
* ``merge.merge_low_rank_`` -- ScaLoRA's merge into the base weight.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import merge as _merge
from ..methods import reflora as _reflora
from ..methods.base import LoRAMethod as _LoRAMethod
from ..methods.layers import LayerGroup as _LayerGroup
from .faults import Outcome, Setup, run_step

# ---------------------------------------------------------------------------------------- the breakages


def _no_moment_transfer(original):
    def rescale_(self, rescaling, optimizer=None, rule=None, **kwargs):
        return original(self, rescaling, None, None, **kwargs)

    return rescale_


def _second_moments_first_power(original):
    def rescale_(self, rescaling, optimizer=None, rule=None, **kwargs):
        rule = None if rule is None else {key: min(power, 1) for key, power in rule.items()}
        return original(self, rescaling, optimizer, rule, **kwargs)

    return rescale_


def _no_gradient_chain_rule(original):
    def operands(self, *args, **kwargs):
        tensors, scales, sides = original(self, *args, **kwargs)
        grads = {id(p.grad) for f in self.factors for p in (f.lora_A, f.lora_B)}
        keep = [i for i, t in enumerate(tensors) if id(t) not in grads]
        return [tensors[i] for i in keep], [scales[i] for i in keep], [sides[i] for i in keep]

    return operands


def _scaled_preconditioning(factor: float):
    def wrap(original):
        def precondition(grad_A, grad_B, S, S_inv, ok):
            new_A, new_B = original(grad_A, grad_B, S, S_inv, ok)
            return new_A * factor, new_B * factor

        return precondition

    return wrap


def _no_preconditioning(original):
    def precondition(grad_A, grad_B, S, S_inv, ok):
        return grad_A.clone(), grad_B.clone()

    return precondition


def _frozen_skip_counts(original):
    def record(self, *args, **kwargs):
        frozen = dict(self.skipped)
        original(self, *args, **kwargs)
        self.skipped = frozen

    return record


def _merge_times(factor: float):
    def wrap(original):
        def merge_low_rank_(weight, lora_B, lora_A, coeff, *args, **kwargs):
            return original(weight, lora_B, lora_A, coeff * factor, *args, **kwargs)

        return merge_low_rank_

    return wrap


# ---------------------------------------------------------------------------------------- the catalogue
def _nan_in_layer_1(model, method, opt):
    method.factors[1].lora_A.grad.view(-1)[0] = float("nan")


def _tiny_factors(model, method):
    for f in method.factors:
        f.lora_A.mul_(1e-20)
        f.lora_B.mul_(1e-20)


def _rank_deficient(model, method):
    for f in method.factors:
        f.lora_A[1] = f.lora_A[0]


@dataclass
class Mutation:
    name: str
    owner: object  # the module or class whose attribute is patched
    attribute: str
    wrap: Callable  # original -> replacement
    setups: list[tuple[str, Setup, Callable | None, Callable | None]] = field(default_factory=list)
    # (label, setup, inject after the backward, prepare before it): where the patched code runs and matters


def _due(method: str, **kw) -> Setup:
    return Setup(method, options={"interval": 1, **kw.pop("options", {})}, **kw)


RESCALING = [
    ("ScaLoRA float32 AdamW", _due("scalora"), None, None),
    ("ScaLoRA-I bfloat16 AdamW", _due("scalora_i", dtype=torch.bfloat16), None, None),
    ("ScaLoRA float64 SGD momentum", _due("scalora", dtype=torch.float64, optimizer="sgd_momentum"), None, None),
    ("RefLoRA-S float32 AdamW", _due("reflora_s"), None, None),
    (
        "RefLoRA-S float64 AdamW, compute float32",
        _due("reflora_s", dtype=torch.float64, options={"compute_dtype": torch.float32}),
        None,
        None,
    ),
]
SECOND_MOMENTS = [s for s in RESCALING if "momentum" not in s[0]]  # SGD's momentum has no second moment
PRECONDITIONING = [
    ("RefLoRA float32 AdamW", _due("reflora"), None, None),
    ("RefLoRA bfloat16 AdamW", _due("reflora", dtype=torch.bfloat16), None, None),
    ("RefLoRA float64 SGD", _due("reflora", dtype=torch.float64, optimizer="sgd"), None, None),
    (
        "RefLoRA float32 SGD momentum, compute float32",
        _due("reflora", optimizer="sgd_momentum", options={"compute_dtype": torch.float32}),
        None,
        None,
    ),
]
SKIPS = [
    (
        "ScaLoRA, NaN in one layer, on_nonfinite='skip'",
        _due("scalora", options={"on_nonfinite": "skip"}),
        _nan_in_layer_1,
        None,
    ),
    (
        "RefLoRA, NaN in one layer, on_nonfinite='skip'",
        _due("reflora", options={"on_nonfinite": "skip"}),
        _nan_in_layer_1,
        None,
    ),
    ("ScaLoRA float32, factors x1e-20 (out of range)", _due("scalora"), None, _tiny_factors),
    ("RefLoRA, a rank-deficient lora_A (degenerate)", _due("reflora"), None, _rank_deficient),
]
MERGES = [
    ("ScaLoRA float32 AdamW", _due("scalora"), None, None),
    ("ScaLoRA float64 SGD", _due("scalora", dtype=torch.float64, optimizer="sgd"), None, None),
    (
        "ScaLoRA-I float32 kappa=10 mode=scalar",
        _due("scalora_i", options={"kappa": 10.0, "mode": "scalar"}),
        None,
        None,
    ),
]

MUTATIONS = [
    Mutation("moment transfer switched off", _LayerGroup, "rescale_", _no_moment_transfer, RESCALING),
    Mutation(
        "second moments scaled by the first power", _LayerGroup, "rescale_", _second_moments_first_power, SECOND_MOMENTS
    ),
    Mutation("gradient chain rule dropped", _LayerGroup, "_rescale_operands", _no_gradient_chain_rule, RESCALING),
    Mutation(
        "RefLoRA's preconditioned gradient x7",
        _reflora,
        "reflora_precondition",
        _scaled_preconditioning(7.0),
        PRECONDITIONING,
    ),
    Mutation(
        "RefLoRA's preconditioned gradient dropped",
        _reflora,
        "reflora_precondition",
        _no_preconditioning,
        PRECONDITIONING,
    ),
    Mutation("skip counters frozen", _LoRAMethod, "_record", _frozen_skip_counts, SKIPS),
    Mutation("merge of 1.05x the increment", _merge, "merge_low_rank_", _merge_times(1.05), MERGES),
]


@contextlib.contextmanager
def applied(mutation: Mutation) -> Iterator[None]:
    """Patch ``mutation`` into the library for the ``with`` block, and restore the original afterwards."""
    original = getattr(mutation.owner, mutation.attribute)
    setattr(mutation.owner, mutation.attribute, mutation.wrap(original))
    try:
        yield
    finally:
        setattr(mutation.owner, mutation.attribute, original)


def run_setup(entry: tuple) -> Outcome:
    """One ``(label, setup, inject, prepare)`` of a mutation's subset, judged by the whole-state oracle."""
    _, setup, inject, prepare = entry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return run_step(setup, inject, prepare=prepare)


def flagged(outcome: Outcome) -> bool:
    """The oracle reported a problem that is not a known issue."""
    return outcome.kind == "corrupt" and not outcome.known
