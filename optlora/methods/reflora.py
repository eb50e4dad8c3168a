"""RefLoRA and RefLoRA-S (Zhang, Li, Giannakis, arXiv:2505.18877).

LoRA's factorisation ``A B^T`` is not unique: ``(A P, B P^{-T})`` gives the same weight
for any invertible ``P``. RefLoRA picks, at every step, the equivalent factorisation
whose gradient step minimises an upper bound on the loss.

* **RefLoRA** (Theorem 3, balanced case): refactor with ``S = P P^T`` the geometric mean
  ``(A^T A)^{-1} # (B^T B)``, step, refactor back. This is gradient preconditioning
  ``dA <- dA S^{-1}``, ``dB <- dB S`` before the optimizer step, so it works with any
  optimizer and needs no moment transfer (the paper's "refactor back" for Adam).
* **RefLoRA-S** (Theorem 5): ``S = s* I`` with ``s* = ||B||_F / ||A||_F``; the factors
  themselves are refactored (``A <- sqrt(s*) A``, ``B <- B / sqrt(s*)``), their gradients
  follow the chain rule and Adam/SGD moments are rescaled (RefLoRA Sec. 3.3).
"""

from __future__ import annotations

import torch

from ..functional import (
    RANK_TOL,
    chain_rule_rescaling,
    reflora_precondition,
    reflora_preconditioner,
    reflora_s_factor_scalings,
    reflora_s_scale,
)
from .base import LoRAMethod
from .guards import check_rank_tol, fits
from .layers import LayerGroup


def preconditioned_in_range(group: LayerGroup, grad_A: torch.Tensor, grad_B: torch.Tensor) -> torch.Tensor:
    """Per layer: the new gradients (compute dtype) are finite and representable in the gradients' dtype."""
    f = group.factors[0]
    top_A, top_B = grad_A.abs().flatten(1).amax(1).double(), grad_B.abs().flatten(1).amax(1).double()
    return fits(top_A, f.lora_A.dtype) & fits(top_B, f.lora_B.dtype)


class RefLoRA(LoRAMethod):
    """RefLoRA (``scalar=False``) or RefLoRA-S (``scalar=True``) for a PEFT LoRA model.

    Example::

        optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-4)
        method = optlora.RefLoRA(model, warmup_steps=100)
        method.attach(optimizer)        # optimizer.step() now takes RefLoRA's step

    Args:
        model: a PEFT model with LoRA ``Linear`` adapters.
        scalar: RefLoRA-S (scalar refactoring, ``O((m+n) r)`` per layer) instead of RefLoRA.
        warmup_steps: plain LoRA steps first. PEFT initialises ``lora_B = 0``, where the
            geometric mean is 0 and RefLoRA cannot move (violates Assumption 1). The paper
            uses 100 (GLUE, LLaMA2/3) or 200 (LLaMA-7B).
        interval: apply every ``interval`` steps after warm-up (plain steps in between).
        on_nonfinite: ``"raise"`` a ``RuntimeError`` naming the layers (nothing modified)
            or ``"skip"`` them (left to the plain optimizer step).
        skip_unsupported: train unsupported LoRA layers (DoRA, Embedding, Conv) as plain
            LoRA instead of raising.
        compute_dtype: dtype of the r x r math (float64 default, float32 allowed).

    A layer whose factor is rank deficient (smallest Gram eigenvalue below
    ``rank_tol`` times the largest) or zero is skipped for that step: its gradient is
    left as is (``stats()["last_skipped_layers"]`` names it).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        scalar: bool = False,
        warmup_steps: int = 100,
        interval: int = 1,
        rank_tol: float | None = None,
        **kwargs,
    ):
        self.scalar = bool(scalar)
        self.transfers_moments = self.scalar
        self.reads = "sqnorms" if self.scalar else "grams"
        self.name = "reflora_s" if self.scalar else "reflora"
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        self.rank_tol = check_rank_tol(
            rank_tol if rank_tol is not None else (RANK_TOL if self.compute_dtype == torch.float64 else 1e-5),
            self.compute_dtype,
        )

    def config(self) -> dict:
        return {**super().config(), "scalar": self.scalar}

    def _plan_all(self, groups: list[LayerGroup]) -> list[dict[str, torch.Tensor]]:
        """Stacks and Grams per group; RefLoRA's r x r closed form once for all groups of the same rank.

        Batching the closed form over groups matters on CUDA: ``torch.linalg.eigh`` synchronises
        the device with the host, so one call pair per step instead of one per group shape.
        """
        parts = [g.factors_and_grads(self.compute_dtype) for g in groups]
        if self.scalar:
            plans = []
            for g, st in zip(groups, parts):
                s, ok = reflora_s_scale(*g.factor_sqnorms(st))
                alpha, beta = reflora_s_factor_scalings(s, g.rank)
                in_range = self._rescaling_in_range(g, alpha, beta, g.row_amax(st))
                plans.append({"finite": st.finite, "ok": ok & st.finite & in_range, "in_range": in_range, "s": s})
            return plans
        refs: list = [None] * len(parts)
        buckets: dict[tuple, list[int]] = {}
        for i, st in enumerate(parts):
            buckets.setdefault((st.A.shape[1], st.A.device), []).append(i)
        for idx in buckets.values():
            grams = [groups[i].factor_grams(parts[i]) for i in idx]
            gram_A, gram_B = torch.cat([g[0] for g in grams]), torch.cat([g[1] for g in grams])
            ref = reflora_preconditioner(gram_A, gram_B, rank_tol=self.rank_tol)
            sizes = [parts[i].A.shape[0] for i in idx]
            for i, S, S_inv, ok in zip(idx, ref.S.split(sizes), ref.S_inv.split(sizes), ref.ok.split(sizes)):
                refs[i] = (S, S_inv, ok)
        plans = []
        for g, st, (S, S_inv, ref_ok) in zip(groups, parts, refs):
            ok = ref_ok & st.finite
            grad_A, grad_B = reflora_precondition(st.gA, st.gB, S, S_inv, ok)
            in_range = preconditioned_in_range(g, grad_A, grad_B)
            plans.append({"finite": st.finite, "ok": ok & in_range, "in_range": in_range, "gA": grad_A, "gB": grad_B})
        return plans

    def _range_advice(self) -> str:
        return "The factors' scales differ too much for the gradient's dtype; compute_dtype=torch.float64 may help."

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        if self.scalar:
            # float64 scalings (exact inverses to float64 rounding) whatever the compute dtype: sqrt(s) and
            # 1/sqrt(s) rounded separately in float32 would change float64 weights by float32 rounding
            s = torch.where(plan["ok"], plan["s"], torch.ones_like(plan["s"])).double()
            self._rescale_group_(group, chain_rule_rescaling(*reflora_s_factor_scalings(s, group.rank)))
            return
        group.set_gradients_(plan["gA"], plan["gB"])
