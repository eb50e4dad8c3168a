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
    torch.optim.RMSprop: {"square_avg": 2, "grad_avg": 1},
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


def scale_param_state_(
    optimizer: torch.optim.Optimizer, rule: dict[str, int], param: torch.Tensor, scale: torch.Tensor
) -> None:
    """Multiply every moment of ``param`` by ``scale ** power`` (``scale`` broadcasts to it)."""
    state = optimizer.state.get(param)
    if not state:
        return  # no step taken yet: nothing to transfer
    for key, power in rule.items():
        t = state.get(key)
        if isinstance(t, torch.Tensor) and t.shape == param.shape:
            s = scale.to(torch.promote_types(t.dtype, torch.float32))
            t.mul_(s if power == 1 else s**power)
