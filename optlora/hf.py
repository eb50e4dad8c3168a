"""Hugging Face ``Trainer`` / TRL integration: attach, checkpoint and resume an optlora method.

Common case (any ``transformers.Trainer`` subclass, incl. TRL's ``SFTTrainer``)::

    method = optlora.ScaLoRA(model, warmup_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[optlora.hf.callback(method)])
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

The callback attaches ``method`` to the optimizer the Trainer builds (``on_train_begin``;
accelerate's ``AcceleratedOptimizer`` is unwrapped). The method runs in the optimizer's
step pre-hook, i.e. once per *optimizer* step (after gradient accumulation), after
Trainer's gradient clipping (``max_grad_norm``) and AMP unscaling, and before the LR
scheduler step, so all of these act as without optlora, on the gradients of the LoRA factors
(what ScaLoRA's rescaled factors change for ``max_grad_norm``: README, docs/PERFORMANCE.md).

Every checkpoint is complete without the callback's help: the Trainer saves it with
``model.save_pretrained``, which a method built on a ``PeftModel`` guards (:mod:`optlora.persist`):
a standard PEFT adapter (for ScaLoRA, the accumulated update for the original base) plus
``optlora_state.safetensors`` with the exact method state. On resume the Trainer calls
``model.load_adapter``, which the same guard turns into an exact restore. The callback writes the
state itself only where no guard did (a method built on a module that is not a ``PeftModel``), and
on resume restores it where the guard has not already: found automatically for
``resume_from_checkpoint=True`` and for checkpoints inside ``args.output_dir``; for a
checkpoint elsewhere pass ``callback(method, resume_from=path)`` or use
:class:`OptLoRATrainer` (or :class:`OptLoRAMixin` with your own Trainer class), which
sees the path given to ``train``.

This module needs ``transformers`` only; ``trl`` is optional and never imported.
"""

from __future__ import annotations

import os
import warnings

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from . import checkpoint, persist
from .checkpoint import SHARDED_STATE, STATE_FILE, read_state
from .methods import LoRAMethod
from .optimizer_state import unwrap_optimizer

__all__ = [
    "SHARDED_STATE",
    "STATE_FILE",
    "OptLoRACallback",
    "OptLoRAMixin",
    "OptLoRATrainer",
    "callback",
    "load_state",
    "read_state",
    "save_state",
]


def save_state(method: LoRAMethod, directory: str | os.PathLike) -> str:
    """Write ``method``'s exact state to ``directory/optlora_state.safetensors``; returns its path.

    FSDP2 (``method.sharded``): call it on every rank; each rank writes its shards with
    ``torch.distributed.checkpoint`` into the folder ``directory/optlora_state.dcp`` (:mod:`optlora.checkpoint`).
    """
    guard = persist.guard_of(method)
    if guard is not None and guard.method is method:
        return guard.write_state(method.model, os.fspath(directory))
    return checkpoint.save_state(method, directory)


def load_state(method: LoRAMethod, path: str | os.PathLike) -> None:
    """Restore ``method`` from a checkpoint folder or state (everything checked before anything is written).

    FSDP2: call it on every rank; each rank reads only its shards of a sharded state (any number of
    ranks may have written it), or its blocks of a whole one.
    """
    checkpoint.load_state(method, path)


def _restored_from(method: LoRAMethod, folder: str) -> bool:
    """Whether the guard's ``load_adapter`` already restored ``method`` exactly from ``folder``."""
    guard = persist.guard_of(method)
    return bool(
        guard is not None and guard.method is method and guard.loaded_from == (os.path.abspath(folder), method.steps)
    )


def _is_main(args) -> bool:
    return bool(getattr(args, "should_save", True))


class OptLoRACallback(TrainerCallback):
    """Attach ``method`` to the Trainer's optimizer, save its state with every checkpoint, restore it on resume.

    Args:
        method: an :class:`optlora.LoRAMethod` built on the model given to the Trainer.
        resume_from: checkpoint folder to restore from when training resumes (only needed
            for checkpoints outside ``args.output_dir``; :class:`OptLoRATrainer` sets it).
    """

    def __init__(self, method: LoRAMethod, *, resume_from: str | os.PathLike | None = None):
        if not isinstance(method, LoRAMethod):
            raise TypeError(f"expected an optlora method (e.g. optlora.RefLoRA(model)), got {type(method).__name__}")
        self.method = method
        self.resume_from = None if resume_from is None else os.fspath(resume_from)
        self.loaded_from: str | None = None

    # -------------------------------------------------------------- resume
    def _checkpoint_for(self, args, state) -> str:
        if self.resume_from is not None:
            return self.resume_from
        candidate = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if checkpoint.find_state(candidate) is not None:
            return candidate
        raise RuntimeError(
            f"the Trainer resumed at global step {state.global_step}, but {candidate} holds no {STATE_FILE} (or, "
            f"under FSDP2, {SHARDED_STATE}), "
            "so the optlora method state (step counters; ScaLoRA's merged base weights) cannot be restored. Pass the "
            "checkpoint folder: optlora.hf.callback(method, resume_from=path), or use optlora.hf.OptLoRATrainer."
        )

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("the Trainer did not pass its optimizer to on_train_begin; attach the method manually")
        m = self.method
        if m.optimizer is not None and m.optimizer is not unwrap_optimizer(optimizer):
            m.detach()  # a new optimizer (e.g. auto_find_batch_size restarted the loop)
        if m.optimizer is None:
            m.attach(unwrap_optimizer(optimizer))
        note = m.never_applied_note(planned_steps=getattr(state, "max_steps", None) or None)
        if note:  # e.g. max_steps=50 with warmup_steps=100: the run would silently be plain LoRA
            warnings.warn(note, UserWarning, stacklevel=2)
        if state.global_step > 0:  # Trainer resets the state unless it resumes from a checkpoint
            guard = persist.guard_of(m)
            if guard is not None and guard.method is m and guard.loaded_from and m.steps == state.global_step:
                ckpt = guard.loaded_from[0]  # the Trainer's load_adapter restored the method exactly
            else:
                ckpt = self._checkpoint_for(args, state)
                if not _restored_from(m, ckpt):
                    load_state(m, ckpt)
            self.loaded_from = ckpt
            if m.steps > state.global_step:
                raise RuntimeError(
                    f"{ckpt}/{STATE_FILE} was saved at method step {m.steps}, after the Trainer's step "
                    f"{state.global_step}: the method state and the Trainer checkpoint do not belong together"
                )
        return control

    # -------------------------------------------------------------- save
    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.method.sharded:  # FSDP2: every rank writes its shards (the Trainer saves no guarded adapter state)
            save_state(self.method, folder)
        # the guarded save_pretrained has written it already, unless the model is not a guarded PeftModel
        elif _is_main(args) and checkpoint.state_steps(folder) != self.method.steps:
            save_state(self.method, folder)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        note = self.method.never_applied_note()
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        # Trainer reloaded the best adapter: bring ScaLoRA's merged base weights back to the same step.
        best = state.best_model_checkpoint
        if getattr(args, "load_best_model_at_end", False) and best and checkpoint.find_state(best) is not None:
            if not _restored_from(self.method, best):
                load_state(self.method, best)
        return control


def callback(method: LoRAMethod, *, resume_from: str | os.PathLike | None = None) -> OptLoRACallback:
    """The :class:`OptLoRACallback` for ``method``: ``Trainer(..., callbacks=[optlora.hf.callback(method)])``."""
    return OptLoRACallback(method, resume_from=resume_from)


class OptLoRAMixin:
    """Mixin for any ``Trainer`` subclass: ``method=`` keyword, and resume from any checkpoint path.

    Example with TRL::

        class OptLoRASFTTrainer(optlora.hf.OptLoRAMixin, trl.SFTTrainer):
            pass

        trainer = OptLoRASFTTrainer(model=model, args=cfg, train_dataset=ds, method=optlora.RefLoRA(model))
    """

    def __init__(self, *args, method: LoRAMethod, **kwargs):
        self.optlora_callback = OptLoRACallback(method)
        callbacks = list(kwargs.pop("callbacks", None) or [])
        kwargs["callbacks"] = [*callbacks, self.optlora_callback]
        super().__init__(*args, **kwargs)

    @property
    def optlora_method(self) -> LoRAMethod:
        return self.optlora_callback.method

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        path = resume_from_checkpoint
        if path is True:
            path = get_last_checkpoint(self.args.output_dir)
        if isinstance(path, (str, os.PathLike)):
            self.optlora_callback.resume_from = os.fspath(path)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class OptLoRATrainer(OptLoRAMixin, Trainer):
    """``transformers.Trainer`` with an optlora method: ``OptLoRATrainer(model=..., args=..., method=method)``."""
