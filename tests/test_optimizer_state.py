"""Moment transfer rules (optlora.optimizer_state): rescaling the state equals re-running the history.

A rescaling ``A~ = A diag(alpha)`` at the same weight multiplies every later gradient of the
factor column-wise by a constant (ScaLoRA Lemmas 3.3/3.6). A correct rule makes the optimizer state look
as if the whole gradient history had been produced in the new coordinates.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from optlora import register_moment_rule
from optlora.optimizer_state import moment_rule, moment_tensors, require_moment_rule


def scale_param_state_(opt, rule, p, scale):
    """Multiply the moments of ``p`` by ``scale ** power`` through :func:`moment_tensors` (what a rescale does)."""
    for t, power in moment_tensors(opt, rule, p):
        t.mul_(scale.to(t.dtype) ** power)


CASES = {
    "adam": (torch.optim.Adam, {"lr": 0.01}),
    "adam_amsgrad": (torch.optim.Adam, {"lr": 0.01, "amsgrad": True}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.0}),
    "adamw_fused": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.0, "fused": True}),
    "nadam": (torch.optim.NAdam, {"lr": 0.01}),
    "radam": (torch.optim.RAdam, {"lr": 0.01}),
    "adamax": (torch.optim.Adamax, {"lr": 0.01, "eps": 1e-30}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.01, "momentum": 0.9}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.9, "eps": 1e-30}),
    "adagrad": (torch.optim.Adagrad, {"lr": 0.01}),
}


def _run(cls, kw, grads):
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))
    opt = cls([p], **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return opt, p


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("axis", ["row", "col"])
def test_rule_equals_rescaled_gradient_history(case, axis):
    cls, kw = CASES[case]
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(4)]
    scale = torch.rand(3 if axis == "row" else 4, generator=g, dtype=torch.float64) * 3 + 0.2
    scale = scale[:, None] if axis == "row" else scale[None, :]
    rule = require_moment_rule(cls([torch.nn.Parameter(torch.zeros(1))], **kw), "test")
    opt, p = _run(cls, kw, grads)
    scale_param_state_(opt, rule, p, scale)
    opt_ref, p_ref = _run(cls, kw, [gi * scale for gi in grads])
    compared = 0
    for key, ref_val in opt_ref.state[p_ref].items():
        if isinstance(ref_val, torch.Tensor) and ref_val.shape == p.shape:
            torch.testing.assert_close(opt.state[p][key], ref_val, rtol=1e-10, atol=1e-14, msg=f"{case}: {key}")
            compared += 1
    assert compared >= 1


def test_empty_state_is_left_alone():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p])
    scale_param_state_(opt, moment_rule(opt), p, torch.full((2, 1), 2.0))
    assert not opt.state.get(p)


def test_unknown_optimizers_raise_and_registration_and_subclasses_work():
    p = torch.nn.Parameter(torch.zeros(2))
    for cls in (torch.optim.Adadelta, torch.optim.LBFGS):
        with pytest.raises(TypeError, match=f"{cls.__name__}.*register_moment_rule"):
            require_moment_rule(cls([p]), "ScaLoRA")

    class MyAdamW(torch.optim.AdamW):
        pass

    assert moment_rule(MyAdamW([p])) == moment_rule(torch.optim.AdamW([p]))

    class Sign(torch.optim.SGD):
        pass

    register_moment_rule(Sign, {"momentum_buffer": 1, "extra": 2})
    try:
        assert require_moment_rule(Sign([p], lr=0.1), "ScaLoRA") == {"momentum_buffer": 1, "extra": 2}
    finally:
        from optlora.optimizer_state import MOMENT_RULES

        MOMENT_RULES.pop(Sign)


def test_scalar_moments_are_not_touched():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.NAdam([p])
    p.grad = torch.ones(2, 2)
    opt.step()
    step, mu = opt.state[p]["step"].clone(), opt.state[p]["mu_product"].clone()
    scale_param_state_(opt, moment_rule(opt), p, torch.full((2, 1), 3.0))
    assert torch.equal(opt.state[p]["step"], step) and torch.equal(opt.state[p]["mu_product"], mu)
    np.testing.assert_allclose(opt.state[p]["exp_avg"].numpy(), 3 * 0.1 * np.ones((2, 2)), rtol=1e-6)


def test_factored_quantised_or_uncovered_state_is_refused_not_skipped():
    p = torch.nn.Parameter(torch.zeros(3, 4))
    p.grad = torch.ones(3, 4)

    class OwnKeys(torch.optim.Adam):  # an Adam subclass that keeps its moments under other names
        def step(self, closure=None):
            for group in self.param_groups:
                for q in group["params"]:
                    st = self.state[q]
                    st["m"] = st.get("m", torch.zeros_like(q)) + q.grad
            return None

    opt = OwnKeys([p])
    opt.step()
    with pytest.raises(TypeError, match="'m' is not covered"):
        moment_tensors(opt, require_moment_rule(opt, "ScaLoRA"), p)

    factored = torch.optim.Adafactor([p])
    factored.step()
    rule = {k: 2 for k, v in factored.state[p].items() if isinstance(v, torch.Tensor) and v.dim() > 0}
    assert rule, "Adafactor keeps factored second moments"
    with pytest.raises(TypeError, match="factored state"):
        moment_tensors(factored, rule, p)

    quantised = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    quantised.step()
    quantised.state[p]["momentum_buffer"] = torch.zeros(3, 4, dtype=torch.uint8)
    with pytest.raises(TypeError, match="quantised state"):
        moment_tensors(quantised, {"momentum_buffer": 1}, p)
