"""How an optimizer's per-parameter state follows a rescaling of the gradient.

RefLoRA-S and ScaLoRA rescale LoRA factors between steps. At the same full weight the
chain rule then rescales each gradient column-wise (ScaLoRA, ICML Lemmas 3.3/3.6;
RefLoRA Sec. 3.3): ``grad(lora_A) <- diag(beta) grad(lora_A)``,
``grad(lora_B) <- grad(lora_B) diag(alpha)``. A state that is linear in past gradients
(Adam's first moment, SGD momentum) is rescaled by the same factor; one that is
quadratic (Adam's second moment) by its square. Because the factor is diagonal this
re-expresses the whole gradient history exactly: no optimizer reset is needed.

``MOMENT_RULES`` maps optimizer classes to ``{state key: power}``. Register your own with
:func:`register_moment_rule`.
"""

from __future__ import annotations

import torch

MOMENT_RULES: dict[type, dict[str, int]] = {
    torch.optim.Adam: {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.AdamW: {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2},
    torch.optim.NAdam: {"exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.RAdam: {"exp_avg": 1, "exp_avg_sq": 2},
    torch.optim.Adamax: {"exp_avg": 1, "exp_inf": 1},
    torch.optim.SGD: {"momentum_buffer": 1},
    # RMSprop's momentum_buffer accumulates g / sqrt(square_avg): scale-free (power 0), so it is left as is
    torch.optim.RMSprop: {"square_avg": 2, "grad_avg": 1, "momentum_buffer": 0},
    torch.optim.Adagrad: {"sum": 2},
}


def register_moment_rule(optimizer_cls: type, rule: dict[str, int]) -> None:
    """Declare how ``optimizer_cls``'s state tensors scale with the gradient (power per key)."""
    MOMENT_RULES[optimizer_cls] = dict(rule)


def moment_rule(optimizer: torch.optim.Optimizer) -> dict[str, int] | None:
    for cls in type(optimizer).__mro__:
        if cls in MOMENT_RULES:
            return MOMENT_RULES[cls]
    return None


def require_moment_rule(optimizer: torch.optim.Optimizer, method: str) -> dict[str, int]:
    rule = moment_rule(optimizer)
    if rule is None:
        names = ", ".join(sorted(c.__name__ for c in MOMENT_RULES))
        raise TypeError(
            f"{method} rescales the LoRA factors and must transfer the optimizer's moments, but it does not know "
            f"how {type(optimizer).__name__}'s state scales. Supported: {names}. "
            "Use optlora.register_moment_rule(YourOptimizer, {'state_key': power}) if its state is a "
            "per-element average of gradients (power 1) or of squared gradients (power 2)."
        )
    return rule


def moment_tensors(
    optimizer: torch.optim.Optimizer, rule: dict[str, int], param: torch.Tensor
) -> list[tuple[torch.Tensor, int]]:
    """The state tensors of ``param`` that a rescaling must multiply, each with its power.

    Refuses, instead of silently skipping, state that cannot be rescaled exactly: a per-element
    tensor the rule does not name (e.g. an ``Adam`` subclass keeping moments under its own keys),
    a named state whose shape differs from the parameter's (factored state, e.g. Adafactor) or
    that is not floating point (quantised state, e.g. 8-bit Adam).

    Raises:
        TypeError: naming the optimizer, the state key and what to do.
    """
    state = optimizer.state.get(param)
    if not state:
        return []  # no step taken yet: nothing to transfer
    out = []
    for key, t in state.items():
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            continue  # step counters and scalars
        power = rule.get(key)
        problem = None
        if power is None:
            problem = "is not covered by its moment rule"
        elif t.shape != param.shape:
            problem = f"has shape {tuple(t.shape)}, not the parameter's {tuple(param.shape)} (factored state?)"
        elif not t.is_floating_point():
            problem = f"is stored as {t.dtype} (quantised state?)"
        if problem is not None:
            raise TypeError(
                f"{type(optimizer).__name__}'s per-parameter state {key!r} {problem}: optlora cannot rescale it "
                "exactly when it rescales the LoRA factors. Register the right rule with "
                "optlora.register_moment_rule(YourOptimizer, {key: power, ...}) (power 1: average of gradients, "
                "2: of squared gradients, 0: scale-free), or use torch.optim.AdamW."
            )
        if power != 0:
            out.append((t, power))
    return out


def unwrap_optimizer(optimizer):
    """The innermost ``torch.optim.Optimizer`` inside wrappers such as accelerate's ``AcceleratedOptimizer``.

    Such wrappers may themselves subclass ``torch.optim.Optimizer`` (accelerate's does) while the
    hooks, state and parameter groups that matter live on the wrapped ``.optimizer``.
    """
    seen = set()
    while getattr(optimizer, "optimizer", None) is not None and id(optimizer) not in seen:
        seen.add(id(optimizer))
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer
