"""Every method of the fine-tuning comparison, set up on one model: adapters, optimizer, optlora method.

Same model, rank, data order, AdamW, schedule and clipping for all; only the learning rate is
tuned per method. :func:`build` returns a :class:`Setup` that ``transformers.Trainer`` runs
(:mod:`optlora_experiments.harness`): the Trainer builds AdamW and the schedule, except where a
method needs its own optimizer. Baselines come from the ecosystem:

* ``lora`` -- PEFT LoRA (Hu et al., 2022); ``lora_r32`` -- the same at rank 32 (the ScaLoRA paper's
  upper bound; alpha scaled with the rank, so ``alpha / r`` is unchanged); ``dora`` -- PEFT
  ``use_dora=True`` (Liu et al., 2024); ``pissa`` -- PEFT ``init_lora_weights="pissa_niter_4"``;
* ``loraplus`` -- ``peft.optimizers.create_loraplus_optimizer`` (``lora_B`` lr x ``loraplus_ratio``),
  handed to ``Trainer(optimizers=(opt, None))``;
* ``riemannian`` -- ``peft.optimizers.create_riemannian_optimizer`` around AdamW (Zhang & Pilanci, 2024:
  ``r x r`` preconditioned LoRA gradients, PEFT's default damping ``reg=0.01``), handed over like LoRA+;
* ``balora`` -- PEFT LoRA with AdamW whose factors are projected onto the balanced manifold after every
  step (:mod:`~optlora_experiments.balora`, a step post-hook on this AdamW), handed over like LoRA+;
* ``full`` -- full fine-tuning with AdamW;
* ``galore`` -- transformers' built-in ``optim="galore_adamw"`` (``galore-torch``) on the target
  linear layers: full fine-tuning with rank-``r`` gradient projection;
* ``reflora`` / ``reflora_s`` / ``scalora`` / ``scalora_i`` -- PEFT LoRA plus the optlora method
  from the registry (``optlora.make_method(name, model, ...)``), attached to the Trainer's optimizer
  by ``optlora.hf.callback``; ScaLoRA-I scales every ``interval_i`` steps.

:meth:`Setup.loop_optimizer` gives the same optimizer for a hand-written loop (tests, benchmarks).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

import optlora

from .models import lora_targets

METHODS = (
    "lora", "lora_r32", "dora", "loraplus", "pissa", "riemannian", "balora", "full", "galore", "reflora", "reflora_s",
    "scalora", "scalora_i",
)  # fmt: skip
OPTLORA_METHODS = ("reflora", "reflora_s", "scalora", "scalora_i")
#: methods whose update is ``scaling * lora_B @ lora_A`` on a PEFT LoRA model (telemetry applies)
LORA_FAMILY = ("lora", "lora_r32", "loraplus", "pissa", "riemannian", "balora", *OPTLORA_METHODS)
#: methods that train every weight (their lr grid is ``--full-lrs``)
FULL_METHODS = ("full", "galore")


def galore_unavailable() -> str | None:
    """Why GaLore cannot run here, or None when ``galore_torch`` imports."""
    try:
        import galore_torch  # noqa: F401
    except ImportError as exc:  # galore_torch's __init__ also imports bitsandbytes
        return f"galore-torch is not usable ({exc}); pip install galore-torch bitsandbytes"
    return None


@dataclass
class Setup:
    """A model ready to train with method ``name``.

    ``optimizer`` is set only when the method needs its own (LoRA+); otherwise the Trainer builds
    AdamW. ``training_args`` are extra ``TrainingArguments`` (GaLore's ``optim``). ``method`` is the
    optlora method, not yet attached (the Trainer callback attaches it to the Trainer's optimizer).
    """

    name: str
    model: torch.nn.Module
    method: optlora.LoRAMethod | None = None
    optimizer: torch.optim.Optimizer | None = None
    training_args: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def trainable_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def loop_optimizer(self, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
        """The optimizer for a hand-written loop, with the optlora method attached (``optimizer.step()`` runs it)."""
        if self.optimizer is not None:
            opt = self.optimizer
        elif self.name == "galore":
            opt = _galore_optimizer(self.model, lr, weight_decay, self.info)
        else:
            opt = _adamw(self.model.parameters(), lr, weight_decay)
        if self.method is not None and self.method.optimizer is None:
            self.method.attach(opt)
        return opt


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


def _galore_params(model, targets, rank: int) -> tuple[list, list]:
    """(projected, rest): 2-D weights of the target linear layers vs everything else."""
    keys = targets if isinstance(targets, list) else None
    low, rest = [], []
    for n, p in model.named_parameters():
        leaf = n.rsplit(".", 2)[-2] if n.count(".") >= 1 else n
        in_block = keys is None or leaf in keys
        (low if p.dim() == 2 and in_block and min(p.shape) > rank and "embed" not in n else rest).append(p)
    return low, rest


def _galore_optimizer(model, lr: float, weight_decay: float, info: dict):
    from galore_torch import GaLoreAdamW

    low, rest = _galore_params(model, info["targets"], info["rank"])
    groups = [
        {"params": rest},
        {"params": low, "rank": info["rank"], "update_proj_gap": info["update_proj_gap"], "scale": info["scale"],
         "proj_type": "std"},
    ]  # fmt: skip
    return GaLoreAdamW(groups, lr=lr, weight_decay=weight_decay)


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
    on_nonfinite: str = "raise",
) -> Setup:
    """Wrap ``model`` for method ``name``.

    ``task_type`` is a PEFT task type (``"SEQ_CLS"``: the classifier head is trained in full;
    ``"CAUSAL_LM"``). ``alpha`` defaults to ``2 * rank``. ``warmup_steps`` are the plain LoRA
    steps before an optlora method starts (RefLoRA Sec. 4 / ScaLoRA Sec. 5 use 100 on long runs).
    ``lr`` is used only by the optimizers built here (LoRA+); the Trainer's comes from its arguments.
    ``on_nonfinite`` goes to the optlora method (``"skip"``: a NaN/Inf gradient is left to the plain
    optimizer step, as for every other method, instead of raising).
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    alpha = float(2 * rank if alpha is None else alpha)
    if name == "lora_r32":
        rank, alpha = 32, alpha * 32 / rank
    targets = targets if targets is not None else lora_targets(model)
    info = {"rank": rank, "alpha": alpha, "lr": lr, "targets": targets}

    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Setup(name, model, info=info)

    if name == "galore":
        reason = galore_unavailable()
        if reason:
            raise RuntimeError(reason)
        for p in model.parameters():
            p.requires_grad_(True)
        info.update(update_proj_gap=galore_gap, scale=galore_scale)
        info["galore_params"] = sum(p.numel() for p in _galore_params(model, targets, rank)[0])
        args = {
            "optim": "galore_adamw",
            "optim_target_modules": targets,
            "optim_args": f"rank={rank},update_proj_gap={galore_gap},scale={galore_scale},proj_type=std",
        }
        return Setup(name, model, training_args=args, info=info)

    init = "pissa_niter_4" if name == "pissa" else "default"
    peft_model = _peft(model, task_type, rank, alpha, targets, init=init, dora=name == "dora")
    if name == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        opt = create_loraplus_optimizer(
            peft_model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_ratio, weight_decay=weight_decay
        )
        info["loraplus_ratio"] = loraplus_ratio
        return Setup(name, peft_model, optimizer=opt, info=info)
    if name == "riemannian":
        from peft.optimizers import create_riemannian_optimizer

        opt = create_riemannian_optimizer(peft_model, torch.optim.AdamW, lr=lr, weight_decay=weight_decay)
        info["riemannian_reg"] = inspect.signature(create_riemannian_optimizer).parameters["reg"].default
        return Setup(name, peft_model, optimizer=opt, info=info)
    if name == "balora":
        from . import balora

        opt = _adamw(peft_model.parameters(), lr, weight_decay)
        info["balora_pairs"] = len(balora.lora_pairs(peft_model))
        balora.install(opt, peft_model)  # projection after every opt.step(); the AdamW state is left as is
        return Setup(name, peft_model, optimizer=opt, info=info)

    method = None
    if name in OPTLORA_METHODS:
        options = {"warmup_steps": warmup_steps, "on_nonfinite": on_nonfinite}
        if name in ("scalora", "scalora_i"):
            options["kappa"] = kappa
        if name == "scalora_i":
            options["interval"] = interval_i
        method = optlora.make_method(name, peft_model, **options)
    if method is not None:  # attached to the Trainer's optimizer by optlora.hf.callback (or loop_optimizer)
        info["optlora"] = {**method.config(), "on_nonfinite": on_nonfinite}
    return Setup(name, peft_model, method=method, info=info)
