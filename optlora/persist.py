"""Saving and loading with the ecosystem's own calls stays right while an optlora method trains a model.

ScaLoRA and ScaLoRA-I rewrite the frozen base weights in place (ScaLoRA Sec. 3.1), so PEFT's
adapter alone is no longer the model. When a method is built on a ``PeftModel`` it installs
(:func:`install`, via :func:`optlora.methods.base.on_claim`) two instance-level wrappers on it:

``model.save_pretrained(dir)`` -- also what ``trainer.save_model()``, every Trainer checkpoint
and ``push_to_hub`` call -- writes

* ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA adapter that
  plain ``PeftModel.from_pretrained(original_base, dir)`` loads. For a base-modifying method it is
  the accumulated update ``W_now - W_pretrained`` per layer, truncated SVD (randomized range finder,
  :func:`optlora.export.lowrank_compress`) at relative Frobenius error ``tol`` with rank at most
  ``max_rank`` (:func:`optlora.export.update_adapter`); the exact error of the written factors
  is stated in ``optlora_export.json`` and in the adapter's ``README.md``. For RefLoRA it is PEFT's
  own adapter, which is the model exactly.
* ``optlora_state.safetensors``: the exact state to resume from (:mod:`optlora.checkpoint`).

``model.load_adapter(dir, name)`` -- what the Trainer calls on resume and for
``load_best_model_at_end`` -- restores the trained adapter exactly from that state (all of it
checked before anything is written), and raises when a base-modifying model would otherwise
continue from an adapter without its state (:mod:`optlora.persist_load`). Under FSDP2 saving is
:mod:`optlora.persist_fsdp`.

The pretrained weights come from :class:`optlora.originals.OriginalWeights` (read lazily from the
base model's safetensors files, verified when the method is built). :func:`uninstall` removes the
wrappers. Copies of a guarded model (``copy.deepcopy``, pickling) are not guarded: saving such a copy
of a base-modifying run raises.
"""

from __future__ import annotations

import inspect
import json
import os
import warnings

import torch

from . import checkpoint, export, persist_fsdp, persist_load
from .discovery import lora_layers, quantized_base
from .methods.base import LoRAMethod, on_claim
from .originals import OriginalWeights
from .rebuild import rebuild_model

GUARD = "_optlora_guard"
_WRAPPED = ("save_pretrained", "load_adapter", "disable_adapter")
#: default relative Frobenius error per layer of the saved accumulated update
DEFAULT_TOL = 1e-3

__all__ = ["DEFAULT_TOL", "GUARD", "Guard", "guard_of", "install", "rebuild", "uninstall"]


class _Wrapper:
    """``model.<name>`` calling the guard; a plain object, so deep copies and pickles rebind to the copy."""

    def __init__(self, model, name: str):
        self.model, self.name = model, name
        original = getattr(type(model), name)
        self.__doc__ = original.__doc__
        self.__signature__ = inspect.signature(original).replace(
            parameters=list(inspect.signature(original).parameters.values())[1:]
        )

    def __call__(self, *args, **kwargs):
        guard = self.model.__dict__.get(GUARD)
        original = getattr(type(self.model), self.name)
        if guard is None:
            return original(self.model, *args, **kwargs)
        return getattr(guard, self.name)(self.model, original, args, kwargs)


class Guard:
    """What :func:`install` attaches to a ``PeftModel``: its method, original weights and save options."""

    def __init__(
        self, method: LoRAMethod | None, originals: OriginalWeights | None, *, tol: float, max_rank, exact_state=True
    ):
        self.method = method
        self.originals = originals
        self.tol = tol
        self.max_rank = max_rank
        self.exact_state = exact_state
        self.loaded_from: tuple[str, int] | None = None  # (folder, steps) of the last exact restore
        self.merges = bool(method is not None and method.merges)
        self.changed_before = False  # an earlier method (or a rebuild) left merged updates in the base weights

    @property
    def base_changed(self) -> bool:
        """Whether the base weights carry merged updates (a base-modifying method applied at least once)."""
        m = self.method
        return self.changed_before or bool(m is not None and m.merges and m.method_steps > 0)

    # copies of the model get an orphan guard: it has no method and refuses to save a changed base
    def __deepcopy__(self, memo):
        return _orphan(self.merges, self.base_changed)

    def __reduce__(self):
        return (_orphan, (self.merges, self.base_changed))

    # ------------------------------------------------------------------ disable_adapter
    def disable_adapter(self, model, original, args, kwargs):
        """PEFT's model without adapters is the pretrained model only while nothing was merged into its weights."""
        if self.base_changed:
            who = type(self.method).__name__ if self.method is not None else "an optlora method"
            raise RuntimeError(
                f"model.disable_adapter() would not give the pretrained model: {who} has merged its updates into the "
                "base weights (ScaLoRA Sec. 3.1), so the model without adapters is the trained model minus only the "
                "live adapter. For a reference model (TRL DPO/KTO ref_model, KL penalties) load a separate copy of "
                "the original base: AutoModel*.from_pretrained(base) and pass it as ref_model (TRL: ref_model=...), "
                "or train with RefLoRA, which leaves the base weights untouched."
            )
        return original(model, *args, **kwargs)

    # ------------------------------------------------------------------ save
    def save_pretrained(self, model, original, args, kwargs):
        bound = inspect.signature(original).bind(model, *args, **kwargs)
        explicit_main = "is_main_process" in bound.arguments or "is_main_process" in bound.arguments.get("kwargs", {})
        bound.apply_defaults()
        opts = dict(bound.arguments)
        extra = opts.pop("kwargs", {})
        opts.pop("self")
        directory = os.fspath(opts.pop("save_directory"))
        if self.method is None:
            if self.merges or self.changed_before:
                raise RuntimeError(
                    "this is a copy of a model (or a model rebuilt from a checkpoint) whose base weights an optlora method "
                    "rewrites; its adapter alone is not the model and the copy has no original weights to write the "
                    "accumulated update. Save the model the method was built on, or the full model: "
                    "optlora.export.export_merged(copy, dir)."
                )
            return original(model, directory, **opts, **extra)
        m = self.method
        if m.sharded:  # FSDP2: every rank, or the main rank with a whole state_dict
            return persist_fsdp.save_pretrained(self, model, original, opts, extra, directory, explicit_main)
        is_main = bool(opts.get("is_main_process", True))
        if not m.merges:
            original(model, directory, **opts, **extra)
            if is_main and self.exact_state:
                self.write_state(model, directory)
            return None
        _, mine, others = self.split_adapters(model, opts)
        written = None
        if mine and is_main:  # compute first: anything that can fail fails before a file is written
            self.originals.require([f.name for f in lora_layers(model, mine[0]) if not quantized_base(f)])
            written = self.update_adapter(model, mine[0], directory)
        if others:
            original(model, directory, **{**opts, "selected_adapters": others}, **extra)
        if written is not None:
            self.write_update(model, directory, mine[0], written, opts, self.exact_state)
        if is_main and self.exact_state:
            self.write_state(model, directory)
        return None

    def split_adapters(self, model, opts: dict) -> tuple[list[str], list[str], list[str]]:
        """``(trained, mine, others)``: the adapters the method trains, those of them ``save_pretrained`` selected,
        and the selected ones it does not train; refuses (nothing written) when several trained adapters merge
        into the same base weights, whose accumulated update cannot be split between them."""
        m = self.method
        selected = list(opts.get("selected_adapters") or model.peft_config)
        trained = sorted({f.adapter for f in m.factors})
        mine = [a for a in trained if a in selected]
        if len(trained) > 1 and mine:
            raise ValueError(
                f"{type(m).__name__} trains {len(trained)} adapters ({trained}) that merge into shared base "
                "weights; their accumulated update cannot be split into separate adapters. Nothing was written. "
                "Save the full model (optlora.export.export_merged) and the state (optlora.checkpoint.save_state)."
            )
        return trained, mine, [a for a in selected if a not in trained]

    def update_adapter(self, model, adapter: str, directory: str, *, tensors_of=None, peft_state=None):
        """``(folder, (config, tensors, report))`` of the accumulated update of ``adapter`` (nothing written)."""
        layers = lora_layers(model, adapter)
        out = directory if adapter == "default" else os.path.join(directory, adapter)
        dtype = layers[0].lora_A.dtype
        dtype = dtype if dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16) else torch.float32
        built = export.update_adapter(
            model,
            lambda f: self.originals.get(f.name, "cpu" if tensors_of is not None else f.base_weight.device),
            rank=self.max_rank,
            tol=self.tol,
            adapter=adapter,
            dtype=dtype,
            path=out,
            compress=export.lowrank_compress,
            max_fraction=None if self.max_rank is not None else 1.0,
            tensors_of=tensors_of,
            peft_state=peft_state,
        )
        return out, built

    def write_update(self, model, directory: str, adapter: str, written, opts: dict, exact_state) -> None:
        """Write what :meth:`update_adapter` computed: the adapter, its error report and its model card."""
        out, (config, tensors, report) = written
        export.write_adapter(out, config, tensors, report, safe=bool(opts.get("safe_serialization", True)))
        export.write_card(
            model,
            directory,
            report,
            method=self.method,
            adapter=adapter,
            tol=self.tol,
            max_rank=self.max_rank,
            exact_state=exact_state,
        )

    def write_state(self, model, directory: str) -> str:
        """Write the exact state (and the live PEFT configuration, for :func:`rebuild`); returns the file path."""
        adapters = sorted({f.adapter for f in self.method.factors})
        configs = {a: model.peft_config[a].to_dict() for a in adapters if a in model.peft_config}
        extra = {"peft_config": json.dumps(configs, default=lambda o: sorted(o) if isinstance(o, set) else str(o))}
        return checkpoint.save_state(self.method, directory, extra_metadata=extra)

    # ------------------------------------------------------------------ load (optlora.persist_load)
    def load_adapter(self, model, original, args, kwargs):
        return persist_load.load_adapter(self, model, original, args, kwargs)

    def changed_layers(self, model) -> list[str]:
        """LoRA layers whose live base weight differs from the pretrained one (reads the originals)."""
        return persist_load.changed_layers(self, model)


def _orphan(merges: bool, changed: bool = False) -> Guard:
    g = Guard(None, None, tol=DEFAULT_TOL, max_rank=None)
    g.merges, g.changed_before = merges, changed
    return g


# ---------------------------------------------------------------------------------------------- install
def guard_of(model) -> Guard | None:
    """The guard installed on ``model`` (or on ``method.model``), if any."""
    model = model.model if isinstance(model, LoRAMethod) else model
    return model.__dict__.get(GUARD)


def _peft_parts(model):
    inner = model.get_base_model()
    config = getattr(inner, "config", None)
    names = [getattr(config, "_name_or_path", None), getattr(inner, "name_or_path", None)]
    names += [getattr(c, "base_model_name_or_path", None) for c in model.peft_config.values()]
    return next((n for n in names if n), None), getattr(inner, "base_model_prefix", "")


def install(
    method: LoRAMethod,
    *,
    original: str | os.PathLike | None = None,
    tol: float | None = None,
    max_rank: int | None = None,
    host_copy: bool = True,
    exact_state: bool | None = None,
    _stacklevel: int = 1,
) -> Guard | None:
    """Guard ``method.model``'s ``save_pretrained`` / ``load_adapter`` (done when a method is built).

    Call it again to change the options: ``original`` (the folder or hub id of the weights the model
    started from, verified against the live weights, so only before the first merge), ``tol``
    (relative Frobenius error per layer of the saved update, default :data:`DEFAULT_TOL`) and
    ``max_rank`` (cap of the per-layer rank; the error then states what the cap costs) and
    ``exact_state`` (``False``: write the adapter only, e.g. before ``push_to_hub`` of a final model;
    a folder saved so cannot resume a base-modifying run, and loading it to resume raises; the Trainer
    callback still writes the state into checkpoints).
    Returns ``None`` for a model that is not a ``PeftModel`` (nothing to wrap).
    """
    model = method.model
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        if method.merges:
            warnings.warn(
                f"{type(method).__name__} was built on a {type(model).__name__}, not on the PeftModel: "
                "PeftModel.save_pretrained is not guarded and would save the adapter without the merged base "
                "weights. Build the method on the PeftModel.",
                stacklevel=_stacklevel + 1,
            )
        return None
    if tol is not None and not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    if max_rank is not None and (not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be an int >= 1, got {max_rank!r}")
    old = model.__dict__.get(GUARD)
    originals = old.originals if old is not None else None
    if method.merges and (original is not None or originals is None):
        if original is not None and (method.method_steps > 0 or (old is not None and old.method is not method)):
            raise ValueError(
                "original= is verified against the live weights, which must still be the pretrained ones: pass it "
                "right after building the method, before training"
            )
        adapters = sorted({f.adapter for f in method.factors})
        # quantised weights are never written (ScaLoRA keeps their merges in residuals): no original needed
        live = {f.name: f.base_weight for a in adapters for f in lora_layers(model, a) if not quantized_base(f)}
        name, prefix = _peft_parts(model)
        originals = OriginalWeights.resolve(
            live, folder=original or name, prefix=prefix, host_copy=host_copy, stacklevel=_stacklevel + 1
        )
    guard = Guard(
        method,
        originals,
        tol=tol if tol is not None else (old.tol if old is not None else DEFAULT_TOL),
        max_rank=max_rank if max_rank is not None else (old.max_rank if old is not None else None),
        exact_state=exact_state if exact_state is not None else (old.exact_state if old is not None else True),
    )
    guard.changed_before = old is not None and old.base_changed
    model.__dict__[GUARD] = guard
    for name in _WRAPPED:
        model.__dict__[name] = _Wrapper(model, name)
    return guard


def uninstall(model) -> None:
    """Remove the wrappers and the guard: ``save_pretrained`` / ``load_adapter`` are PEFT's again."""
    model = model.model if isinstance(model, LoRAMethod) else model
    for name in (*_WRAPPED, GUARD):
        model.__dict__.pop(name, None)


def _on_claim(method: LoRAMethod) -> None:
    install(method, _stacklevel=4)  # warnings point at the line that built the method


on_claim(_on_claim)


# ---------------------------------------------------------------------------------------------- rebuild
def rebuild(base_model, folder: str | os.PathLike, *, adapter: str = "default"):
    """The exact trained ``PeftModel`` from a checkpoint folder and the *original* base model.

    Uses the live adapter configuration and tensors of the folder's optlora state (a safetensors file,
    or the FSDP2 ``optlora_state.dcp`` read whole in this process; no method object needed): LoRA
    factors, merged base weights and the adapter's non-LoRA entries (:func:`optlora.rebuild.rebuild_model`).
    Where merged base weights were applied, the model gets a guard without a method: its
    ``save_pretrained`` and ``disable_adapter`` raise (its adapter alone is not the model, and without
    adapters it is not the pretrained model); save it with :func:`optlora.export.export_merged`.
    """
    model, changed = rebuild_model(base_model, folder, adapter=adapter)
    if changed:
        model.__dict__[GUARD] = _orphan(True, True)
        for name in _WRAPPED:
            model.__dict__[name] = _Wrapper(model, name)
    return model
