"""Telemetry for LoRA-family runs: rank of the accumulated update, ScaLoRA's column-scaling fraction.

ScaLoRA merges ``W_pt + A B^T - A~ B~^T`` into the frozen weight at every scaling step, so the
accumulated update ``W_now - W_initial`` is no longer confined to rank ``r`` (ScaLoRA Sec. 3,
"the update is not limited to a low-rank subspace"); plain LoRA's stays at rank <= r.
:class:`UpdateRankTracker` measures this: it keeps each layer's initial *effective* weight
``W_0 = base + scaling * lora_B @ lora_A`` on the CPU and, when asked, returns the numerical
rank of ``W_now - W_0`` per layer: the number of singular values above ``rtol`` times the
largest one (computed in float64 on the CPU, so it is expensive; call it every k steps).

The column fraction is ``method.stats()["column_fraction"]``: the share of layers whose last
ScaLoRA step took the column-scaling branch (Theorem 5) rather than the scalar one (Theorem 3).
"""

from __future__ import annotations

import torch

from optlora import find_lora_factors


def effective_weight(f) -> torch.Tensor:
    """``base + scaling * lora_B @ lora_A`` as ``out x in`` float64 on the CPU."""
    w = f.base_weight.detach().to("cpu", torch.float64)
    if f.fan_in_fan_out:
        w = w.T
    return w + f.scaling * (f.lora_B.detach().to("cpu", torch.float64) @ f.lora_A.detach().to("cpu", torch.float64))


def numerical_rank(m: torch.Tensor, rtol: float) -> int:
    """Singular values above ``rtol * max`` (0 for a zero matrix)."""
    s = torch.linalg.svdvals(m)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    return int((s > rtol * s[0]).sum())


class UpdateRankTracker:
    """Numerical rank of ``W_now - W_initial`` for every LoRA layer of a PEFT model.

    Args:
        model: a PEFT LoRA model (before training starts: its current weights are ``W_initial``).
        rtol: relative singular-value tolerance of the numerical rank.
    """

    def __init__(self, model: torch.nn.Module, rtol: float = 1e-3):
        if not 0 < rtol < 1:
            raise ValueError(f"rtol must be in (0, 1), got {rtol}")
        self.rtol = rtol
        self.factors = find_lora_factors(model, skip_unsupported=True)
        if not self.factors:
            raise ValueError("the model has no LoRA layers to track")
        self.initial = {f.name: effective_weight(f).to(torch.float32) for f in self.factors}

    @torch.no_grad()
    def ranks(self) -> dict[str, int]:
        return {
            f.name: numerical_rank(effective_weight(f) - self.initial[f.name].to(torch.float64), self.rtol)
            for f in self.factors
        }

    def summary(self) -> dict[str, float]:
        """``rank_mean``, ``rank_min``, ``rank_max`` over layers, and ``lora_rank`` (r) for reference."""
        r = list(self.ranks().values())
        return {
            "rank_mean": sum(r) / len(r),
            "rank_min": min(r),
            "rank_max": max(r),
            "lora_rank": max(f.rank for f in self.factors),
        }


def column_fraction(method) -> float | None:
    """``method.stats()["column_fraction"]`` for ScaLoRA (None before its first scaling step / other methods)."""
    if method is None:
        return None
    return method.stats().get("column_fraction")


# ---------------------------------------------------------------------------------------- memory (CPU)
def rss_mb() -> float:
    """Current resident set size of this process in MiB (psutil; ``ru_maxrss`` fallback is a lifetime peak)."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil ships with the dev environment
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def trim_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc ``malloc_trim``) before measuring."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
