"""Ship a trained model: the full merged model, or its update as a small standard PEFT LoRA adapter.

RefLoRA/RefLoRA-S leave a standard PEFT adapter (``model.save_pretrained`` as usual).
ScaLoRA/ScaLoRA-I merge ``B diag(1 - alpha beta) A`` into the base weights at every
scaling step (ScaLoRA Sec. 3.1), so the accumulated update ``W_now - W_pretrained`` is
no longer of rank ``r`` and the saved adapter alone does not reproduce the model. Two exports:

* :func:`export_merged` -- the full model, ``merge_and_unload()`` + ``save_pretrained``
  (safetensors);
* :func:`export_adapter` -- per LoRA layer, ``Delta = W_now - W_pretrained`` compressed by
  truncated SVD (Eckart-Young: the best rank-k approximation in Frobenius norm) into a
  standard PEFT LoRA adapter for the *original* base model, with the relative error
  ``||Delta - Delta_k||_F / ||Delta||_F`` reported per layer and overall, either at a
  chosen rank or at the smallest rank per layer that meets an error tolerance.

The compressors (:func:`svd_compress`, :func:`lowrank_compress`, :func:`rounding_floor`) live in
:mod:`optlora.compress` and are re-exported here.

Command line (:mod:`optlora.export_cli`):
``optlora export --checkpoint CKPT --base MODEL --out DIR [--format adapter --rank 16 | --tol 0.01]``.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .card import REPORT_FILE, write_card
from .compress import Compressed, lowrank_compress, noise_rank, rank_for_error, rounding_floor, svd_compress
from .discovery import LoRAFactors, is_lora_model, lora_layers, quantized_base
from .residual import ATTR as RESIDUALS
from .residual import attach as attach_residual
from .residual import residuals_of

__all__ = [
    "Compressed",
    "ExportReport",
    "apply_method_state",
    "export_adapter",
    "export_merged",
    "lowrank_compress",
    "noise_rank",
    "rank_for_error",
    "rounding_floor",
    "svd_compress",
    "update_adapter",
    "write_adapter",
    "write_card",
]
_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


# ---------------------------------------------------------------------------------------------- model access
def _dense(f: LoRAFactors, base_weight: torch.Tensor | None, dtype: torch.dtype, live=None) -> torch.Tensor:
    """``W_now - W_pretrained`` (out x in) of one layer: merged base drift plus the live adapter.

    ``live``: ``(W_now, lora_A, lora_B)`` whole, where the module holds shards (FSDP2); else read from ``f``.
    A quantised base weight is never written by optlora: there the drift is the low-rank residual
    that ScaLoRA keeps beside it (:mod:`optlora.residual`, zero for RefLoRA), ``base_weight`` is not
    read (pass ``None``), and the update is relative to the quantised weight the model was trained on.
    """
    w, lora_A, lora_B = live if live is not None else (None, f.lora_A, f.lora_B)
    if quantized_base(f):
        lora = f.scaling * (lora_B.detach().to(dtype) @ lora_A.detach().to(dtype))
        res = residuals_of(f.module.get_base_layer()).get(f.adapter)
        return lora if res is None else lora + res.dense().to(lora.device, dtype)
    w_now = (f.base_weight if w is None else w).detach().to(dtype)
    w_pt = base_weight.detach().to(device=w_now.device, dtype=dtype)
    drift = w_now - w_pt
    if f.fan_in_fan_out:
        drift = drift.T
    return drift + f.scaling * (lora_B.detach().to(w_now.device, dtype) @ lora_A.detach().to(w_now.device, dtype))


@dataclass
class ExportReport:
    """What :func:`export_adapter` wrote: per-layer rank and relative error, overall error."""

    path: str
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {rank, rel_error, norm, ranks_for}
    rel_error: float = 0.0  # ||Delta - Delta_k||_F / ||Delta||_F over all layers together
    rounding_floor: float = 0.0  # the same for storing the base weights in their dtype (see rounding_floor)
    total_rank: int = 0
    parameters: int = 0

    def rank_needed(self, tol: float) -> dict[str, int]:
        """Per layer, the smallest rank whose relative error is ``<= tol`` (from the stored spectra)."""
        return {n: max(1, rank_for_error(v["singular_values"], tol)) for n, v in self.layers.items()}

    def summary(self) -> str:
        ranks = [v["rank"] for v in self.layers.values()]
        lines = [
            f"wrote {self.path}: {len(ranks)} layers, rank {min(ranks)}..{max(ranks)}, "
            f"{self.parameters:,} parameters, relative error {self.rel_error:.3e}",
            "ranks needed per layer (max / sum) for a relative error of:",
        ]
        for tol in (0.5, 0.2, 0.1, 0.05, 0.01, 0.001):
            need = self.rank_needed(tol).values()
            lines.append(f"  {tol:>6g}: max {max(need)}, sum {sum(need)}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        layers = {n: {k: v for k, v in d.items() if k != "singular_values"} for n, d in self.layers.items()}
        return {
            "path": self.path,
            "rel_error": self.rel_error,
            "rounding_floor": self.rounding_floor,
            "total_rank": self.total_rank,
            "layers": layers,
        }


# ---------------------------------------------------------------------------------------------- exports
_LORA_KEYS = (".lora_A.", ".lora_B.", ".lora_embedding_", ".lora_magnitude_vector")


def update_adapter(
    model: nn.Module,
    original: Callable[[LoRAFactors], torch.Tensor],
    *,
    rank: int | None = None,
    tol: float | None = None,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
    path: str = "",
    compress: Callable[..., Compressed] = svd_compress,
    max_fraction: float | None = None,
    tensors_of: Callable[[LoRAFactors], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None,
    peft_state: dict[str, torch.Tensor] | None = None,
):
    """``W_now - W_pretrained`` of every LoRA layer of ``adapter`` as a standard PEFT LoRA adapter.

    Each layer's update is compressed by truncated SVD (:func:`svd_compress`) at relative error
    ``max(tol, rounding floor)`` (:func:`rounding_floor`: the precision of the base weight's dtype) and
    rank at most ``rank`` and, with ``max_fraction``, at most ``max_fraction * m n / (m + n)`` (the
    factors then hold that fraction of the dense layer's numbers). Where the floor exceeds ``tol``
    (bfloat16/float16 bases), the update carries the merges' rounding noise, which no low rank holds
    and no copy in that dtype avoids: the rank is then that of the part above the noise
    (:func:`noise_rank`), and the stated error includes the noise left out. Factors are stored at the
    live adapter's own PEFT scale ``s`` (``lora_alpha = s * rank`` per layer), so the factors mean
    the same in any model that loads them. ``original(f)`` returns layer ``f``'s pretrained
    weight (as stored); it is read one layer at a time. ``compress`` is :func:`svd_compress` (exact
    Eckart-Young) or :func:`lowrank_compress` (randomized, for saving often). Non-LoRA entries of the adapter
    (``modules_to_save``, biases) are carried as PEFT saves them.

    Where the model holds shards (FSDP2, :mod:`optlora.persist_fsdp`), ``tensors_of(f)`` gives layer ``f``'s
    whole ``(W_now, lora_A, lora_B)`` (read one layer at a time, in the order of ``lora_layers``) and
    ``peft_state`` the adapter's whole PEFT state dict (``get_peft_model_state_dict``).

    Returns ``(config, tensors, report)`` for :func:`write_adapter`.
    """
    import peft
    from peft.utils import get_peft_model_state_dict

    if rank is None and tol is None:
        raise ValueError("the adapter export needs rank= (same rank everywhere) and/or tol= (rank per layer)")
    layers = lora_layers(model, adapter)
    adapter = layers[0].adapter
    report = ExportReport(path=path)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    resid2 = total2 = 0.0
    for f in layers:
        with torch.no_grad():
            whole = tensors_of(f) if tensors_of is not None else None
            quantized = quantized_base(f)  # update relative to the quantised weight: residual + adapter, no rounding
            delta = _dense(f, None if quantized else original(f), compute_dtype, whole)
            norm = float(delta.double().norm())
            stored = None if quantized else whole[0] if whole is not None else f.base_weight
            floor = rounding_floor(stored) / norm if norm > 0 and stored is not None else 0.0
            k_max = rank
            if max_fraction is not None:  # beyond this rank the factors are no smaller than the dense layer
                size = max(1, int(max_fraction * delta.shape[0] * delta.shape[1] / sum(delta.shape)))
                k_max = size if k_max is None else min(k_max, size)
            noisy = tol is not None and floor > tol  # the dtype cannot hold the update to tol (half precision)
            if noisy:  # keep what stands above its rounding noise, not the noise itself
                k = noise_rank(delta)
                k_max = k if k_max is None else min(k_max, k)
            layer_tol = None if tol is None else min(max(tol, floor), 0.999)
            if k_max is None and layer_tol is None:
                k_max = min(delta.shape)
            c = compress(delta, rank=k_max, tol=layer_tol)
        root_s = f.scaling**0.5  # s * (B / sqrt s) (A / sqrt s) = B A: the adapter's own scale carries the update
        tensors[f"base_model.model.{f.name}.lora_A.weight"] = (c.lora_A / root_s).to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{f.name}.lora_B.weight"] = (c.lora_B / root_s).to(dtype).contiguous().cpu()
        ranks[f.name], alphas[f.name] = c.rank, f.scaling * c.rank
        report.layers[f.name] = {
            "rank": c.rank,
            "rel_error": c.rel_error,
            "norm": c.norm,
            "rounding_floor": floor,  # relative: the error of storing the base weight in its dtype
            "above_noise": noisy,  # rank chosen by compress.noise_rank (the floor exceeds tol)
            "quantized_base": quantized,  # relative to the quantised weight: load on the same quantised base
            "singular_values": c.singular_values.cpu(),
        }
        resid2 += (c.rel_error * c.norm) ** 2
        total2 += c.norm**2
        report.total_rank += c.rank
        report.parameters += c.lora_A.numel() + c.lora_B.numel()
    report.rel_error = (resid2 / total2) ** 0.5 if total2 > 0 else 0.0
    floors = [v["rounding_floor"] * v["norm"] for v in report.layers.values()]
    report.rounding_floor = (sum(x * x for x in floors) / total2) ** 0.5 if total2 > 0 else 0.0

    src = getattr(model, "peft_config", {}).get(adapter)
    if src is not None:
        live = peft_state if peft_state is not None else get_peft_model_state_dict(model, adapter_name=adapter)
        other = sorted({k for k in live if any(t in k for t in _LORA_KEYS)} - set(tensors))
        if other:
            raise ValueError(
                f"adapter {adapter!r} has LoRA weights outside its Linear layers ({other[:3]}): their update cannot be "
                "written as a compressed adapter. Use optlora.export.export_merged for the full model."
            )
        tensors.update({k: v.contiguous().cpu() for k, v in live.items() if k not in tensors})
        config = copy.deepcopy(src)
    else:
        config = peft.LoraConfig(target_modules=sorted(ranks), lora_dropout=0.0, bias="none")
    order = sorted(ranks, key=len, reverse=True)  # PEFT takes the first matching pattern: longer paths first
    top = max(ranks.values())
    config.r, config.lora_alpha, config.use_rslora = top, top, False
    config.rank_pattern = {n: ranks[n] for n in order}
    config.alpha_pattern = {n: alphas[n] for n in order}
    config.init_lora_weights = True
    config.inference_mode = True
    _check_patterns(config, ranks)
    return config, tensors, report


def _check_patterns(config, ranks: dict[str, int]) -> None:
    """Every layer must resolve to its own rank under PEFT's pattern matching (else nothing is written)."""
    from peft.utils.other import get_pattern_key

    for name, k in ranks.items():
        key = get_pattern_key(list(config.rank_pattern), name)
        if config.rank_pattern.get(key) != k:
            raise RuntimeError(f"PEFT would give layer {name!r} the rank of pattern {key!r}; refusing to write")


def write_adapter(
    out_dir: str | os.PathLike, config, tensors: dict, report: ExportReport, *, safe: bool = True
) -> None:
    """Write ``adapter_config.json``, the weights and the error report (``optlora_export.json``) to ``out_dir``."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    if safe:
        save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(tensors, os.path.join(out_dir, "adapter_model.bin"))
    with open(os.path.join(out_dir, REPORT_FILE), "w") as fh:
        json.dump(report.to_json(), fh, indent=1)


def export_adapter(
    model: nn.Module,
    base: nn.Module,
    out_dir: str | os.PathLike,
    *,
    rank: int | None = None,
    tol: float | None = None,
    adapter: str | None = None,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype = torch.float32,
) -> ExportReport:
    """Save ``W_now - W_pretrained`` of every LoRA layer as a standard PEFT LoRA adapter for ``base``.

    Args:
        model: the trained PEFT model (e.g. after ScaLoRA; RefLoRA works too: its update has rank ``r``).
        base: the *original* pretrained model (same architecture, unmodified weights), plain ``transformers``.
        out_dir: folder for ``adapter_config.json`` + ``adapter_model.safetensors``.
        rank: rank of every layer; with ``tol``, the cap of the per-layer rank.
        tol: per layer, the smallest rank with relative Frobenius error ``<= tol`` (``rank_pattern``).
        dtype: dtype of the saved factors. compute_dtype: of the difference and the SVD.

    Load it with plain PEFT: ``PeftModel.from_pretrained(original_base, out_dir)``. A model saved with
    ``save_pretrained`` while :mod:`optlora.persist` guards it gets the same adapter without ``base``.
    On a quantised base (QLoRA) the update of each quantised layer is relative to its quantised weight,
    which optlora never changes: ScaLoRA's low-rank residual plus the adapter, of rank ``<= R + r``, so
    ``rank=R + r`` (or ``tol=0``) exports it exactly; load it on the same quantised base.
    """
    if is_lora_model(base):
        raise TypeError("base must be the original model without LoRA layers (not a PeftModel)")

    def original(f: LoRAFactors) -> torch.Tensor:
        try:
            return None if quantized_base(f) else base.get_submodule(f.name).weight
        except AttributeError as exc:
            raise ValueError(
                f"base has no module {f.name!r}: is it the same architecture as the trained model?"
            ) from exc

    config, tensors, report = update_adapter(
        model,
        original,
        rank=rank,
        tol=tol,
        adapter=adapter,
        dtype=dtype,
        compute_dtype=compute_dtype,
        path=str(out_dir),
    )
    write_adapter(out_dir, config, tensors, report)
    return report


def export_merged(model: nn.Module, out_dir: str | os.PathLike, *, tokenizer=None, inplace: bool = False) -> str:
    """``merge_and_unload()`` + ``save_pretrained(safe_serialization=True)``: the full fine-tuned model.

    ``inplace=False`` (default) merges a deep copy and leaves ``model`` as it is; ``inplace=True``
    saves memory but unloads the adapters from ``model``.
    """
    if not hasattr(model, "merge_and_unload"):
        raise TypeError(f"expected a PEFT model with merge_and_unload(), got {type(model).__name__}")
    carried = [n for n, m in model.named_modules() if getattr(m, RESIDUALS, None)]
    if carried:
        raise ValueError(
            f"{len(carried)} quantised layer(s) (e.g. {carried[0]}) carry ScaLoRA's low-rank residual, which a "
            "merged quantised model cannot store (re-quantising rounds it away). Use optlora.export.export_adapter("
            "model, base, out_dir, rank=R + r) for an exact adapter on the same quantised base."
        )
    merged = (model if inplace else copy.deepcopy(model)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return os.fspath(out_dir)


def apply_method_state(model: nn.Module, state: dict) -> int:
    """Copy ScaLoRA's merged base weights from ``method.state_dict()`` (or a saved file) into ``model``.

    Low-rank residuals (ScaLoRA on quantised bases) are attached to their layers and filled.
    Matches layer names by path suffix, so the state may come from a method built on the
    ``PeftModel`` or on its base model. Returns the number of weights copied (0 for RefLoRA).
    """
    weights = state.get("base_weights", {})
    paths = {f.name: f for f in lora_layers(model)}

    def layer(name: str, what: str) -> LoRAFactors:
        path = name.rsplit("[", 1)[0]
        hits = [p for p in paths if p == path or path.endswith("." + p) or p.endswith("." + path)]
        if len(hits) != 1:
            raise ValueError(f"cannot match the saved {what} {name!r} to one LoRA layer (matches: {hits})")
        return paths[hits[0]]

    targets = [(layer(name, "base weight"), w) for name, w in weights.items()]  # every lookup before any write
    folds = [(layer(name, "low-rank residual"), saved) for name, saved in state.get("residuals", {}).items()]
    for f, _ in folds:  # ScaLoRA on quantised bases: a residual stands for merges into a quantised weight
        if not quantized_base(f):
            raise ValueError(
                f"the state holds a low-rank residual for {f.name}, whose base layer here is not quantised: the run "
                "trained on a quantised base. Load the base with the same quantization_config. Nothing was written."
            )
    with torch.no_grad():
        for f, w in targets:
            f.base_weight.copy_(w)
        for f, saved in folds:
            attach_residual(f, saved["left"].shape[1]).load_state_dict(saved)
    return len(targets) + len(folds)


def _dtype_kw(dtype: torch.dtype | None) -> dict:
    """``from_pretrained``'s dtype keyword (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
