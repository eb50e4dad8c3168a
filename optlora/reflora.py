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

from .functional import RANK_TOL, reflora_preconditioner, reflora_s_scale
from .method import LayerGroup, LoRAMethod


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
        self.name = "reflora_s" if self.scalar else "reflora"
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        self.rank_tol = (
            rank_tol if rank_tol is not None else (RANK_TOL if self.compute_dtype == torch.float64 else 1e-5)
        )

    def config(self) -> dict:
        return {**super().config(), "scalar": self.scalar}

    def _plan_all(self, groups: list[LayerGroup]) -> list[dict[str, torch.Tensor]]:
        """Stacks and Grams per group; RefLoRA's r x r closed form once for all groups of the same rank.

        Batching the closed form over groups matters on CUDA: ``torch.linalg.eigh`` synchronises
        the device with the host, so one call pair per step instead of one per group shape.
        """
        dt = self.compute_dtype
        parts = []
        for group in groups:
            A, B = group.stack("A", dt), group.stack("B", dt)  # (L, r, in), (L, out, r)
            gA, gB = group.stack("gA", dt), group.stack("gB", dt)
            parts.append((A, B, gA, gB, self._finite(A, B, gA, gB)))
        if self.scalar:
            plans = []
            for A, B, _, _, finite in parts:
                s, ok = reflora_s_scale(A.square().sum((1, 2)), B.square().sum((1, 2)))
                plans.append({"finite": finite, "ok": ok & finite, "P": s.sqrt()})
            return plans
        refs: list = [None] * len(parts)
        buckets: dict[tuple, list[int]] = {}
        for i, (A, *_rest) in enumerate(parts):
            buckets.setdefault((A.shape[1], A.device), []).append(i)
        for idx in buckets.values():
            gram_A = torch.cat([parts[i][0] @ parts[i][0].mT for i in idx])
            gram_B = torch.cat([parts[i][1].mT @ parts[i][1] for i in idx])
            ref = reflora_preconditioner(gram_A, gram_B, rank_tol=self.rank_tol)
            sizes = [parts[i][0].shape[0] for i in idx]
            for i, S, S_inv, ok in zip(idx, ref.S.split(sizes), ref.S_inv.split(sizes), ref.ok.split(sizes)):
                refs[i] = (S, S_inv, ok)
        plans = []
        for (_, _, gA, gB, finite), (S, S_inv, ref_ok) in zip(parts, refs):
            ok = ref_ok & finite
            keep = ok[:, None, None]
            # PEFT layout: lora_A.grad = (dA S^{-1})^T = S^{-1} lora_A.grad ; lora_B.grad = dB S.
            # Skipped layers keep their gradient as is (even an identity product turns 0 * Inf into NaN).
            plans.append(
                {
                    "finite": finite,
                    "ok": ok,
                    "gA": torch.where(keep, S_inv @ gA, gA),
                    "gB": torch.where(keep, gB @ S, gB),
                }
            )
        return plans

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        if self.scalar:
            P = torch.where(plan["ok"], plan["P"], torch.ones_like(plan["P"]))[:, None]
            r = group.factors[0].rank
            self._rescale_group_(group, P.expand(-1, r), (1 / P).expand(-1, r))  # A *= P, B /= P
            return
        grads = [f.lora_A.grad for f in group.factors] + [f.lora_B.grad for f in group.factors]
        torch._foreach_copy_(grads, [*plan["gA"].unbind(0), *plan["gB"].unbind(0)])
