"""The whole-state oracle can fail (issue #16, class 7): each test breaks one part of the state that the old
oracle did not look at, inside or after ``optimizer.step()``, and checks that the verdict names it.

The deliberate breakages of the library itself (moment transfer, chain rule, RefLoRA's preconditioning,
skip counters, the merge) are in tests/test_oracle_mutations.py.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from optlora.testing import faults
from optlora.testing.faults import Setup
from optlora.testing.judge import COMPUTE_RANGE
from optlora.testing.oracle import CLASS6


def _verdict(method, opt, **hooks):
    """Classify one ``opt.step()`` with ``pre`` (after the method's hook) and ``post`` (after the update) hooks."""
    handles = []

    def hook(name):
        def run(*_):
            hooks[name]()  # and return None: a pre-hook's return value would replace the step's arguments

        return run

    if "pre" in hooks:
        handles.append(opt.register_step_pre_hook(hook("pre")))
    if "post" in hooks:
        handles.append(opt.register_step_post_hook(hook("post")))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return faults.classify(method, *faults.observe(method, opt, opt.step))
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("method", ["reflora", "reflora_s", "scalora", "scaledgd"])
def test_an_unbroken_due_step_passes_with_room(method):
    model, m, opt, _ = Setup(method, options={"interval": 1}).build()
    outcome = _verdict(m, opt)
    assert outcome.kind == "applied", outcome.detail
    assert 0 < outcome.ratio < 1  # the largest error / tolerance: compared, and within


def test_an_optimizer_moment_nudged_after_the_update_is_caught():
    model, m, opt, _ = Setup("scalora", options={"interval": 1}).build()
    moment = opt.state[m.factors[0].lora_B]["exp_avg_sq"]
    outcome = _verdict(m, opt, post=lambda: moment.mul_(1 + 1e-4))
    assert outcome.kind == "corrupt" and "exp_avg_sq" in outcome.detail and "after the step" in outcome.detail


def test_a_step_counter_of_the_optimizer_is_checked():
    model, m, opt, _ = Setup("reflora", options={"interval": 1}).build()
    step = opt.state[m.factors[1].lora_A]["step"]
    outcome = _verdict(m, opt, post=lambda: step.add_(1))
    assert outcome.kind == "corrupt" and "[step]" in outcome.detail


def test_torchs_global_rng_must_not_be_drawn():
    model, m, opt, _ = Setup("reflora").build()
    outcome = _verdict(m, opt, pre=lambda: torch.rand(1))
    assert outcome.kind == "corrupt" and "global RNG" in outcome.detail


def test_a_tensor_outside_the_method_layers_must_not_change():
    model, m, opt, _ = Setup("scalora").build()
    bias = model.base_model.model[0].base_layer.bias
    outcome = _verdict(m, opt, post=lambda: bias.data.add_(1e-6))
    assert outcome.kind == "corrupt" and "bias" in outcome.detail


def test_a_refusal_must_leave_every_moment_bit_identical():
    """The old oracle compared moments of the layers only; an error must leave the whole state as it was."""
    model, m, opt, _ = Setup("scalora", options={"interval": 1}).build()
    m.factors[0].lora_A.grad.view(-1)[0] = math.nan
    moment = opt.state[m.factors[1].lora_B]["exp_avg"]

    def nudge():
        moment.view(-1)[0] = torch.nextafter(moment.view(-1)[0], torch.tensor(math.inf))

    m.detach()  # the method raises, so the nudge must come first: a hook registered ahead of the method's
    opt.register_step_pre_hook(lambda *_: nudge())
    m.attach(opt)
    outcome = _verdict(m, opt)
    assert outcome.kind == "corrupt" and "changed opt_state[base_model.model.2.lora_B" in outcome.detail


def test_a_merge_buffer_of_a_layer_that_did_not_merge_must_not_change():
    model, m, opt, _ = Setup(
        "scalora", dtype=torch.bfloat16, options={"merge_precision": "kahan", "warmup_steps": 5}
    ).build()
    buffer = m.buffers[m.factors[0].name]
    outcome = _verdict(m, opt, post=lambda: buffer.add_(1.0))
    assert outcome.kind == "corrupt" and "buffer" in outcome.detail


def test_method_steps_counted_on_a_plain_step_is_caught():
    model, m, opt, _ = Setup("reflora", options={"warmup_steps": 5}).build()

    def count():
        m.method_steps += 1

    outcome = _verdict(m, opt, post=count)
    assert outcome.kind == "corrupt" and "method_steps" in outcome.detail


def test_a_decline_the_reference_does_not_confirm_is_reported():
    """A layer the method skips as out of range while the reference's step is far from every limit."""
    model, m, opt, _ = Setup("scalora", options={"interval": 1}).build()
    plan_all = m._plan_all

    def decline_first_layer(groups):
        plans = plan_all(groups)
        for key in ("ok", "in_range"):
            plans[0][key] = plans[0][key].clone()
            plans[0][key][0] = False
        return plans

    m._plan_all = decline_first_layer
    outcome = _verdict(m, opt)
    assert outcome.kind == "corrupt" and "declined (out_of_range) a step the reference takes" in outcome.detail


def test_a_skipped_layer_that_moves_is_issue_16_class_6():
    """Under on_nonfinite="skip" a NaN layer still takes the optimizer's update today: reported, and tagged."""
    model, m, opt, _ = Setup("reflora", options={"on_nonfinite": "skip", "warmup_steps": 5}).build()
    m.factors[1].lora_B.grad.view(-1)[0] = math.nan
    outcome = _verdict(m, opt)
    assert outcome.kind == "corrupt" and outcome.known == CLASS6
    assert "moved in the step" in outcome.detail and "skipped['nonfinite'] grew by 0, expected 1" in outcome.detail


def test_an_untagged_problem_next_to_class_6_is_not_known():
    model, m, opt, _ = Setup("reflora", options={"on_nonfinite": "skip", "warmup_steps": 5}).build()
    m.factors[1].lora_B.grad.view(-1)[0] = math.nan
    bias = model.base_model.model[2].base_layer.bias
    outcome = _verdict(m, opt, post=lambda: bias.data.add_(1.0))
    assert outcome.kind == "corrupt" and outcome.known == ""


# ---------------------------------------------------------------------------------------- findings of this oracle
class KnownFinding(AssertionError):
    """The oracle reported exactly the finding the test documents."""


def _finding(outcome) -> None:
    if outcome.kind == "corrupt" and outcome.known == COMPUTE_RANGE:
        raise KnownFinding(outcome.detail)
    assert outcome.kind != "corrupt", outcome.detail


def _big_lora_B(model, m):
    for f in m.factors:
        f.lora_B.mul_(1e5)


def _tiny_gradients(model, m, opt):
    for f in m.factors:
        f.lora_A.grad.mul_(1e-34)
        f.lora_B.grad.mul_(1e-34)


def _small_factors(model, m):
    for f in m.factors:
        f.lora_A.mul_(1e-13)
        f.lora_B.mul_(1e-6)


@pytest.mark.xfail(
    strict=True, raises=KnownFinding, reason="finding: float32 compute overflows in ScaLoRA's scalar rule"
)
def test_finding_scalora_float32_compute_overflows_in_the_scalar_rule():
    """lora_B ~1e4: p_A p_B overflows float32 inside the scalar theorem, the interior optimum is lost and the one-sided
    alpha = 0 (lora_A zeroed) is taken instead, reported as a normal step (float64 compute takes the interior one)."""
    setup = Setup("scalora", options={"compute_dtype": torch.float32})
    _finding(faults.run_step(setup, None, prepare=_big_lora_B))


@pytest.mark.parametrize("method", ["reflora", "scaledgd"])
@pytest.mark.xfail(strict=True, raises=KnownFinding, reason="finding: float32 compute flushes float64 gradients")
def test_finding_float32_compute_flushes_the_gradients_of_a_float64_model(method):
    """compute_dtype=float32 on float64 parameters: the preconditioned gradients are formed in float32, where
    gradients below its range (~1e-45) become 0 (or lose digits as subnormals): the step is lost, unreported."""
    setup = Setup(method, dtype=torch.float64, optimizer="sgd", options={"compute_dtype": torch.float32})
    _finding(faults.run_step(setup, _tiny_gradients, prepare=_small_factors))


def test_the_same_setups_pass_with_float64_compute():
    for method, inject, prepare in (("scalora", None, _big_lora_B), ("reflora", _tiny_gradients, _small_factors)):
        setup = Setup(method, dtype=torch.float64 if inject else torch.float32, optimizer="sgd" if inject else "adamw")
        outcome = faults.run_step(setup, inject, prepare=prepare)
        assert outcome.kind in ("applied", "skip"), outcome.detail
