"""Every method of the fine-tuning comparison, set up on one model: adapters, optimizer, optlora hook.

Same rank, same steps and the same AdamW / schedule for all; only the learning rate is tuned
per method. Baselines come from the ecosystem:

* ``lora`` -- PEFT LoRA (Hu et al., 2022); ``dora`` -- PEFT ``use_dora=True`` (Liu et al., 2024);
* ``loraplus`` -- ``peft.optimizers.create_loraplus_optimizer`` (``lora_B`` lr x ``loraplus_ratio``);
* ``pissa`` -- PEFT ``init_lora_weights="pissa_niter_4"`` (principal singular vectors, fast SVD);
* ``full`` -- full fine-tuning with AdamW;
* ``galore`` -- ``galore_torch.GaLoreAdamW`` on the 2-D weights of the transformer blocks
  (full fine-tuning with rank-``r`` gradient projection; optional dependency);
* ``reflora`` / ``reflora_s`` / ``scalora`` / ``scalora_i`` -- PEFT LoRA plus the optlora hook
  through the public API (``optlora.RefLoRA(model, ...)`` / ``optlora.ScaLoRA(model, ...)`` then
  ``.attach(optimizer)``); ScaLoRA-I scales every ``interval_i`` (default 10) steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

import optlora

from .models import lora_targets

METHODS = ("lora", "dora", "loraplus", "pissa", "full", "galore", "reflora", "reflora_s", "scalora", "scalora_i")
OPTLORA_METHODS = ("reflora", "reflora_s", "scalora", "scalora_i")
#: methods whose update is ``scaling * lora_B @ lora_A`` on a PEFT LoRA model (telemetry applies)
LORA_FAMILY = ("lora", "loraplus", "pissa", *OPTLORA_METHODS)


def galore_unavailable() -> str | None:
    """Why GaLore cannot run here, or None when ``galore_torch`` imports."""
    try:
        import galore_torch  # noqa: F401
    except ImportError as exc:  # galore_torch's __init__ also imports bitsandbytes
        return f"galore-torch is not usable ({exc}); pip install galore-torch bitsandbytes"
    return None


@dataclass
class Setup:
    """A model ready to train: ``optimizer.step()`` takes the method's step."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    method: optlora.LoRAMethod | None = None  # the optlora hook, if any
    info: dict = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _peft(model, task_type: str, rank: int, alpha: float, targets, init="default", dora=False):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        task_type=task_type,
        init_lora_weights=True if init == "default" else init,
        use_dora=dora,
    )
    return get_peft_model(model, cfg)


def _adamw(params, lr: float, weight_decay: float):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=lr, weight_decay=weight_decay)


def build(
    name: str,
    model: torch.nn.Module,
    *,
    task_type: str,
    lr: float,
    rank: int = 8,
    alpha: float | None = None,
    weight_decay: float = 0.0,
    warmup_steps: int = 10,
    interval_i: int = 10,
    kappa: float = 1.0,
    loraplus_ratio: float = 16.0,
    galore_gap: int = 50,
    galore_scale: float = 0.25,
    targets=None,
) -> Setup:
    """Wrap ``model`` for method ``name`` and build its optimizer.

    ``task_type`` is a PEFT task type (``"SEQ_CLS"``: the classifier head is trained in full;
    ``"CAUSAL_LM"``). ``alpha`` defaults to ``2 * rank``. ``warmup_steps`` are the plain LoRA
    steps before an optlora method starts (RefLoRA Sec. 4 / ScaLoRA Sec. 5 use 100 on long runs).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    alpha = float(2 * rank if alpha is None else alpha)
    targets = targets if targets is not None else lora_targets(model)
    info = {"rank": rank, "alpha": alpha, "lr": lr, "targets": targets}

    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Setup(name, model, _adamw(model.parameters(), lr, weight_decay), info=info)

    if name == "galore":
        reason = galore_unavailable()
        if reason:
            raise RuntimeError(reason)
        from galore_torch import GaLoreAdamW

        keys = targets if isinstance(targets, list) else None
        low, rest = [], []
        for n, p in model.named_parameters():
            p.requires_grad_(True)
            leaf = n.rsplit(".", 2)[-2] if n.count(".") >= 1 else n
            in_block = keys is None or leaf in keys
            (low if p.dim() == 2 and in_block and min(p.shape) > rank and "embed" not in n else rest).append(p)
        groups = [
            {"params": rest},
            {"params": low, "rank": rank, "update_proj_gap": galore_gap, "scale": galore_scale, "proj_type": "std"},
        ]
        info.update(galore_params=sum(p.numel() for p in low), update_proj_gap=galore_gap, scale=galore_scale)
        return Setup(name, model, GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay), info=info)

    init = "pissa_niter_4" if name == "pissa" else "default"
    peft_model = _peft(model, task_type, rank, alpha, targets, init=init, dora=name == "dora")
    if name == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio, weight_decay=weight_decay
        )
        info["loraplus_ratio"] = loraplus_ratio
        return Setup(name, peft_model, opt, info=info)

    opt = _adamw(peft_model.parameters(), lr, weight_decay)
    method = None
    if name in OPTLORA_METHODS:
        options = {"warmup_steps": warmup_steps}
        if name in ("scalora", "scalora_i"):
            options["kappa"] = kappa
        if name == "scalora_i":
            options["interval"] = interval_i
        method = optlora.make_method(name, peft_model, **options)
    if method is not None:
        method.attach(opt)
        info["optlora"] = method.config()
    return Setup(name, peft_model, opt, method=method, info=info)
