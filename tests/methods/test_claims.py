"""The global step pre-hook of optlora.methods.claims: it refuses a step without the method, and only that.

The refusal itself (forgotten ``attach``, a second optimizer, the Trainer without the callback) is tested
in test_base.py and test_hf.py; here: the wrappers it must see through (accelerate's
``AcceleratedOptimizer``), and a collected method. DDP: tests/test_distributed.py (ddp_worker.py).
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch
from conftest import build, forward_backward, lora_params, np64, train_steps

import optlora
from optlora.methods import claims


@pytest.fixture
def accelerator():
    accelerate = pytest.importorskip("accelerate")
    from accelerate.state import AcceleratorState

    yield accelerate.Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


def _params(model) -> list[np.ndarray]:
    return [np64(p) for p in model.parameters()]


@pytest.mark.parametrize("attach_to", ["wrapper", "inner"])
def test_accelerated_optimizer_steps_with_the_method(accelerator, attach_to):
    """``accelerator.prepare_optimizer`` wraps the optimizer; the method attached to either one trains."""
    model, loss_fn, batch = build("mlp")
    inner = torch.optim.AdamW(lora_params(model), lr=0.01)
    wrapped = accelerator.prepare_optimizer(inner)
    assert type(wrapped).__name__ == "AcceleratedOptimizer" and wrapped.optimizer is inner
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=1)
    method.attach(wrapped if attach_to == "wrapper" else inner)
    assert claims.hook_registered()
    train_steps(model, wrapped, loss_fn, batch, 3)
    assert (method.steps, method.method_steps) == (3, 2)


def test_accelerated_optimizer_without_the_method_is_refused(accelerator):
    model, loss_fn, batch = build("mlp")
    method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=0)
    wrapped = accelerator.prepare_optimizer(torch.optim.AdamW(lora_params(model), lr=0.01))
    forward_backward(model, loss_fn, batch)
    before = _params(model)
    with pytest.raises(RuntimeError, match="not attached"):
        wrapped.step()
    assert all(np.array_equal(a, b) for a, b in zip(before, _params(model)))
    assert method.steps == 0


def test_a_dropped_model_and_method_leave_the_table():
    """Nothing but the model keeps a method alive (the claims table holds weak references; the persist guard
    lives on the model): once both are dropped the hook looks at an empty table again."""
    import weakref

    def run() -> weakref.ref:
        model, loss_fn, batch = build("mlp")
        method = optlora.ScaLoRA(model, kappa=0.3, warmup_steps=0)
        opt = torch.optim.AdamW(lora_params(model), lr=0.01)
        train_steps(model, method.attach(opt).optimizer, loss_fn, batch, 1)
        assert len(claims._OWNERS) == owners + 1
        return weakref.ref(method)

    gc.collect()
    owners = len(claims._OWNERS)
    ref = run()
    gc.collect()
    assert ref() is None and claims.hook_registered()
    assert len(claims._OWNERS) == owners
