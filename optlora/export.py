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

Command line (:mod:`optlora.export_cli`):
``optlora export --checkpoint CKPT --base MODEL --out DIR [--format adapter --rank 16 | --tol 0.01]``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from .discovery import LoRAFactors, is_lora_model, lora_layers, quantized_base
from .residual import ATTR as RESIDUALS
from .residual import attach as attach_residual
from .residual import residuals_of

STATE_FILE = "optlora_state.pt"  # same name as optlora.hf.STATE_FILE (hf is not imported here)
SHARDED_STATE = "optlora_state.dcp"  # optlora.hf.SHARDED_STATE: an FSDP2 run's state, one shard per rank
_TASK_TO_AUTO = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
    "FEATURE_EXTRACTION": "AutoModel",
}


# ---------------------------------------------------------------------------------------------- SVD
def rank_for_error(singular_values: torch.Tensor, tol: float) -> int:
    """Smallest ``k`` with ``sqrt(sum_{i>k} s_i^2) / sqrt(sum_i s_i^2) <= tol`` (0 for a zero matrix)."""
    if not 0 <= tol < 1:
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    s2 = singular_values.double().square()
    total = float(s2.sum())
    if total == 0.0:
        return 0
    tail = s2.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{i>=k} s_i^2
    tail = torch.cat([tail, tail.new_zeros(1)])
    ok = (tail.sqrt() / total**0.5 <= tol).nonzero()
    return int(ok[0])


@dataclass
class Compressed:
    """``Delta ~ lora_B @ lora_A`` (PEFT layout, scaling 1) with its relative Frobenius error."""

    lora_A: torch.Tensor  # k x in
    lora_B: torch.Tensor  # out x k
    rank: int
    rel_error: float
    norm: float  # ||Delta||_F
    singular_values: torch.Tensor


def svd_compress(delta: torch.Tensor, *, rank: int | None = None, tol: float | None = None) -> Compressed:
    """Truncated SVD of ``delta`` (out x in) at ``rank``, or the smallest rank meeting ``tol`` (capped by ``rank``).

    The factors split the singular values evenly: ``lora_B = U_k sqrt(S_k)``, ``lora_A = sqrt(S_k) V_k^T``.
    A zero ``delta`` gives rank 1 zero factors (PEFT needs ``r >= 1``) and error 0.
    """
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    if rank is None and tol is None:
        raise ValueError("give rank=, tol= or both")
    if rank is not None and (not isinstance(rank, int) or rank < 1):
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    d = delta.float() if delta.dtype not in (torch.float32, torch.float64) else delta
    U, S, Vh = torch.linalg.svd(d, full_matrices=False)
    full = S.numel()
    k = rank_for_error(S, tol) if tol is not None else full
    if rank is not None:
        k = min(k, rank) if tol is not None else min(rank, full)
    k = max(k, 1)
    norm = float(S.double().square().sum().sqrt())
    resid = float(S[k:].double().square().sum().sqrt())
    root = S[:k].sqrt()
    return Compressed(
        lora_A=root[:, None] * Vh[:k],
        lora_B=U[:, :k] * root[None, :],
        rank=k,
        rel_error=resid / norm if norm > 0 else 0.0,
        norm=norm,
        singular_values=S,
    )


# ---------------------------------------------------------------------------------------------- model access
def _dense(f: LoRAFactors, base_weight: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """``W_now - W_pretrained`` (out x in) of one layer: merged base drift plus the live adapter.

    A quantised base weight is never written by optlora: there the drift is the low-rank residual
    that ScaLoRA keeps beside it (:mod:`optlora.residual`, zero for RefLoRA), and ``base_weight``
    is not read. The update is then relative to the quantised weight the model was trained on.
    """
    lora = f.scaling * (f.lora_B.detach().to(dtype) @ f.lora_A.detach().to(dtype))
    res = residuals_of(f.module.get_base_layer()).get(f.adapter)
    if quantized_base(f):
        return lora if res is None else lora + res.dense().to(dtype)
    w_now = f.base_weight.detach().to(dtype)
    w_pt = base_weight.detach().to(device=w_now.device, dtype=dtype)
    drift = w_now - w_pt
    if f.fan_in_fan_out:
        drift = drift.T
    return drift + lora


@dataclass
class ExportReport:
    """What :func:`export_adapter` wrote: per-layer rank and relative error, overall error."""

    path: str
    layers: dict[str, dict] = field(default_factory=dict)  # name -> {rank, rel_error, norm, ranks_for}
    rel_error: float = 0.0  # ||Delta - Delta_k||_F / ||Delta||_F over all layers together
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
        return {"path": self.path, "rel_error": self.rel_error, "total_rank": self.total_rank, "layers": layers}


# ---------------------------------------------------------------------------------------------- exports
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

    Load it with plain PEFT: ``PeftModel.from_pretrained(original_base, out_dir)``. On a quantised
    base (QLoRA) the update of each quantised layer is relative to its quantised weight, which
    optlora never changes: ScaLoRA's low-rank residual plus the adapter, of rank ``<= R + r``, so
    ``rank=R + r`` (or ``tol=0``) exports it exactly; load it on the same quantised base.
    """
    import peft
    from safetensors.torch import save_file

    if rank is None and tol is None:
        raise ValueError("export_adapter needs rank= (same rank everywhere) and/or tol= (rank per layer)")
    if is_lora_model(base):
        raise TypeError("base must be the original model without LoRA layers (not a PeftModel)")
    layers = lora_layers(model, adapter)
    adapter = layers[0].adapter
    report = ExportReport(path=os.fspath(out_dir))
    tensors: dict[str, torch.Tensor] = {}
    resid2 = total2 = 0.0
    for f in layers:
        try:
            w_pt = None if quantized_base(f) else base.get_submodule(f.name).weight
        except AttributeError as exc:
            raise ValueError(
                f"base has no module {f.name!r}: is it the same architecture as the trained model?"
            ) from exc
        with torch.no_grad():
            c = svd_compress(_dense(f, w_pt, compute_dtype), rank=rank, tol=tol)
        tensors[f"base_model.model.{f.name}.lora_A.weight"] = c.lora_A.to(dtype).contiguous().cpu()
        tensors[f"base_model.model.{f.name}.lora_B.weight"] = c.lora_B.to(dtype).contiguous().cpu()
        report.layers[f.name] = {
            "rank": c.rank,
            "rel_error": c.rel_error,
            "norm": c.norm,
            "singular_values": c.singular_values.cpu(),
        }
        resid2 += (c.rel_error * c.norm) ** 2
        total2 += c.norm**2
        report.total_rank += c.rank
        report.parameters += c.lora_A.numel() + c.lora_B.numel()
    report.rel_error = (resid2 / total2) ** 0.5 if total2 > 0 else 0.0

    src = model.peft_config[adapter] if hasattr(model, "peft_config") else None
    ranks = {n: v["rank"] for n, v in report.layers.items()}
    r0 = max(ranks.values())
    config = peft.LoraConfig(
        r=r0,
        lora_alpha=r0,  # scaling 1: the factors carry the update
        target_modules=sorted(ranks),
        rank_pattern={n: k for n, k in ranks.items() if k != r0},
        alpha_pattern={n: k for n, k in ranks.items() if k != r0},
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=bool(getattr(src, "fan_in_fan_out", False)),
        task_type=getattr(src, "task_type", None),
        modules_to_save=getattr(src, "modules_to_save", None),
        base_model_name_or_path=getattr(src, "base_model_name_or_path", None),
    )
    if getattr(src, "modules_to_save", None):
        from peft.utils import get_peft_model_state_dict

        extra = get_peft_model_state_dict(model, adapter_name=adapter)
        tensors.update({k: v.to(dtype).contiguous().cpu() for k, v in extra.items() if ".lora_" not in k})
    os.makedirs(out_dir, exist_ok=True)
    config.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out_dir, "optlora_export.json"), "w") as fh:
        json.dump(report.to_json(), fh, indent=1)
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
    done = 0

    def layer(name: str, what: str) -> LoRAFactors:
        path = name.rsplit("[", 1)[0]
        hits = [p for p in paths if p == path or path.endswith("." + p) or p.endswith("." + path)]
        if len(hits) != 1:
            raise ValueError(f"cannot match the saved {what} {name!r} to one LoRA layer (matches: {hits})")
        return paths[hits[0]]

    with torch.no_grad():
        for name, w in weights.items():
            layer(name, "base weight").base_weight.copy_(w)
            done += 1
        for name, saved in state.get("residuals", {}).items():  # ScaLoRA on quantised bases
            attach_residual(layer(name, "low-rank residual"), saved["left"].shape[1]).load_state_dict(saved)
            done += 1
    return done


def _dtype_kw(dtype: torch.dtype | None) -> dict:
    """``from_pretrained``'s dtype keyword (``dtype`` since transformers 4.56, ``torch_dtype`` before)."""
    if dtype is None:
        return {}
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def load_trained(checkpoint: str, base: str, *, task: str | None = None, dtype: torch.dtype | None = None):
    """Rebuild a trained model: ``base`` (hub id or path) + the PEFT adapter and optlora state in ``checkpoint``.

    Returns ``(peft_model, auto_class)``.
    """
    import peft
    import transformers

    cfg = peft.PeftConfig.from_pretrained(checkpoint)
    task = task or (cfg.task_type.value if hasattr(cfg.task_type, "value") else cfg.task_type) or "FEATURE_EXTRACTION"
    auto = getattr(transformers, _TASK_TO_AUTO.get(str(task).upper(), "AutoModel"))
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(base, **_dtype_kw(dtype)), checkpoint)
    state_file = os.path.join(checkpoint, STATE_FILE)
    sharded = os.path.join(checkpoint, SHARDED_STATE)
    if os.path.isdir(sharded):  # written by every rank of an FSDP2 run: read whole here
        import warnings

        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        with warnings.catch_warnings():  # "no process group: loading in one process" is the intent here
            warnings.simplefilter("ignore", UserWarning)
            apply_method_state(model, _load_state_dict_from_keys(checkpoint_id=sharded))
    elif os.path.isfile(state_file):
        apply_method_state(model, torch.load(state_file, map_location="cpu", weights_only=True))
    return model, auto
