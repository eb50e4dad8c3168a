"""Hugging Face ``Trainer`` / TRL integration: attach, checkpoint and resume an optlora method.

Common case (any ``transformers.Trainer`` subclass, incl. TRL's ``SFTTrainer``)::

    method = optlora.ScaLoRA(model, warmup_steps=100)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[optlora.hf.callback(method)])
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

The callback attaches ``method`` to the optimizer the Trainer builds (``on_train_begin``;
accelerate's ``AcceleratedOptimizer`` is unwrapped). The method runs in the optimizer's
step pre-hook, i.e. once per *optimizer* step (after gradient accumulation), after
Trainer's gradient clipping (``max_grad_norm``) and AMP unscaling, and before the LR
scheduler step, so all of these behave exactly as without optlora.

On every checkpoint the callback writes ``method.state_dict()`` (step counters and, for
ScaLoRA, the merged base weights, merge buffers and rounding RNG state, which the PEFT
adapter checkpoint does not contain) to ``<checkpoint>/optlora_state.pt``. On resume it
reloads it from the checkpoint the Trainer resumed from: found automatically for
``resume_from_checkpoint=True`` and for checkpoints inside ``args.output_dir``; for a
checkpoint elsewhere pass ``callback(method, resume_from=path)`` or use
:class:`OptLoRATrainer` (or :class:`OptLoRAMixin` with your own Trainer class), which
sees the path given to ``train``.

This module needs ``transformers`` only; ``trl`` is optional and never imported.
"""

from __future__ import annotations

import os
import warnings

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .methods import LoRAMethod
from .optimizer_state import unwrap_optimizer

STATE_FILE = "optlora_state.pt"
#: the folder of a sharded (FSDP2) method state, written by every rank with torch.distributed.checkpoint
SHARDED_STATE = "optlora_state.dcp"

__all__ = [
    "SHARDED_STATE",
    "STATE_FILE",
    "OptLoRACallback",
    "OptLoRAMixin",
    "OptLoRATrainer",
    "callback",
    "load_state",
    "save_state",
]


def save_state(method: LoRAMethod, directory: str | os.PathLike) -> str:
    """Write ``method.state_dict()`` to ``directory/optlora_state.pt``; returns the file path.

    FSDP2 (``method.sharded``): call it on every rank; each rank writes its shards with
    ``torch.distributed.checkpoint`` into the folder ``directory/optlora_state.dcp``.
    """
    if method.sharded:
        import torch.distributed.checkpoint as dcp

        path = os.path.join(directory, SHARDED_STATE)
        dcp.save(method.state_dict(), checkpoint_id=path)
        return path
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    torch.save(method.state_dict(), path)
    return path


def read_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a saved method state (a checkpoint folder or the ``optlora_state.pt`` file itself).

    A sharded (FSDP2) state folder ``optlora_state.dcp`` is read whole, into this process.
    """
    path = os.fspath(path)
    sharded = path if path.endswith(SHARDED_STATE) else os.path.join(path, SHARDED_STATE)
    if os.path.isdir(sharded):
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "no process group: loading in one process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            return _load_state_dict_from_keys(checkpoint_id=sharded)
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no optlora method state at {path}")
    return torch.load(path, map_location=map_location, weights_only=True)


def load_state(method: LoRAMethod, path: str | os.PathLike) -> None:
    """Restore ``method`` (counters, ScaLoRA's base weights, buffers, RNG) from a checkpoint folder or file.

    FSDP2: call it on every rank; each rank reads only its shards of a sharded state (any
    number of ranks may have written it), or its blocks of a whole one.
    """
    sharded = os.path.join(os.fspath(path), SHARDED_STATE)
    if method.sharded and os.path.isdir(sharded):
        import torch.distributed.checkpoint as dcp

        state = _template(method.state_dict(), dcp.FileSystemReader(sharded).read_metadata())
        dcp.load(state, checkpoint_id=sharded)
        method.load_state_dict(state)
        return
    method.load_state_dict(read_state(path))


def _template(live: dict, metadata) -> dict:
    """What DCP should load: every saved entry, a tensor laid out as the live one (this rank's shard) if any.

    Built from the checkpoint's metadata, so entries the live method does not hold yet (e.g. the
    rounding generator before its first merge) are loaded too; ``load_state_dict`` validates them.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out: dict = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        path = metadata.planner_data[fqn]
        node, have = out, live
        for key in path[:-1]:
            node = node.setdefault(key, {})
            have = have.get(key, {}) if isinstance(have, dict) else {}
        current = have.get(path[-1]) if isinstance(have, dict) else None
        if isinstance(meta, TensorStorageMetadata):
            if isinstance(current, torch.Tensor) and tuple(current.shape) == tuple(meta.size):
                node[path[-1]] = torch.empty_like(current)
            else:
                node[path[-1]] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            node[path[-1]] = current  # non-tensor values are replaced by the saved ones
    return out


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
        if os.path.isfile(os.path.join(candidate, STATE_FILE)) or os.path.isdir(os.path.join(candidate, SHARDED_STATE)):
            return candidate
        raise RuntimeError(
            f"the Trainer resumed at global step {state.global_step}, but {candidate}/{STATE_FILE} does not exist, "
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
            ckpt = self._checkpoint_for(args, state)
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
        if _is_main(args) or self.method.sharded:  # FSDP2: every rank writes its shards
            save_state(self.method, os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"))
        return control

    def on_train_end(self, args, state, control, **kwargs):
        note = self.method.never_applied_note()
        if note:
            warnings.warn(note, UserWarning, stacklevel=2)
        # Trainer reloaded the best adapter: bring ScaLoRA's merged base weights back to the same step.
        best = state.best_model_checkpoint
        saved = best and (
            os.path.isfile(os.path.join(best, STATE_FILE)) or os.path.isdir(os.path.join(best, SHARDED_STATE))
        )
        if getattr(args, "load_best_model_at_end", False) and saved:
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
