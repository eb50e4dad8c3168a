"""ScaledGD (Tong, Ma & Chi, JMLR 2021) as an optlora method: the baseline of RefLoRA Fig. 2.

ScaledGD preconditions each factor's gradient by the inverse Gram matrix of the other::

    dA <- dA (B^T B)^{-1},      dB <- dB (A^T A)^{-1}

(paper notation, ``A`` m x r, ``B`` n x r, weight ``A B^T``). It runs through the same
optimizer step pre-hook as RefLoRA, so any optimizer takes the preconditioned step.

PEFT layout and scaling: the Grams are those of the *effective* factors
``A_eff = sqrt(s) lora_A^T`` and ``B_eff = sqrt(s) lora_B`` (``s`` = PEFT scaling), so
``lora_A.grad <- (s lora_B^T lora_B)^{-1} lora_A.grad`` and
``lora_B.grad <- lora_B.grad (s lora_A lora_A^T)^{-1}``. With SGD at learning rate ``eta``
this is ScaledGD on the effective factors with step ``s * eta`` (the same convention as
ScaLoRA's ``kappa = 1/(L s eta)``); for ``s = 1`` it is exactly Tong et al.'s update.

Unlike RefLoRA it is not balanced: a layer with a (near) rank-deficient factor, e.g.
PEFT's ``lora_B = 0`` init, has no inverse and is left to the plain step for that
step (``stats()["last_skipped_layers"]``); use ``warmup_steps >= 1``.
"""

from __future__ import annotations

import torch

from optlora.functional import RANK_TOL
from optlora.method import LayerGroup, LoRAMethod


def _inverse_gram(gram: torch.Tensor, rank_tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched inverse of SPD r x r Grams through ``eigh``; ``ok`` False (and I returned) if rank deficient."""
    ok = torch.isfinite(gram).flatten(1).all(1)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device).expand_as(gram)
    w, V = torch.linalg.eigh(torch.where(ok[:, None, None], 0.5 * (gram + gram.mT), eye))
    ok = ok & (w[:, -1] > 0) & (w[:, 0] > rank_tol * w[:, -1])
    w = torch.where(ok[:, None], w, torch.ones_like(w))
    inv = (V / w[:, None, :]) @ V.mT
    return torch.where(ok[:, None, None], inv, eye), ok


class ScaledGD(LoRAMethod):
    """ScaledGD preconditioning of LoRA gradients (baseline; not one of the papers' methods).

    Args:
        model: a PEFT model with LoRA ``Linear`` adapters.
        warmup_steps: plain steps first (PEFT's ``lora_B = 0`` makes ``B^T B`` singular).
        interval: precondition every ``interval`` steps after warm-up.
        rank_tol: relative eigenvalue floor below which a Gram counts as singular.
        **kwargs: ``on_nonfinite``, ``skip_unsupported``, ``compute_dtype`` as in :class:`optlora.RefLoRA`.
    """

    name = "scaledgd"

    def __init__(self, model: torch.nn.Module, *, warmup_steps: int = 1, interval: int = 1, rank_tol=None, **kwargs):
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        self.rank_tol = (
            rank_tol if rank_tol is not None else (RANK_TOL if self.compute_dtype == torch.float64 else 1e-5)
        )

    def _plan(self, group: LayerGroup) -> dict[str, torch.Tensor]:
        dt = self.compute_dtype
        A, B = group.stack("A", dt), group.stack("B", dt)  # (L, r, in), (L, out, r)
        gA, gB = group.stack("gA", dt), group.stack("gB", dt)
        finite = self._finite(A, B, gA, gB)
        s = group.scalings(dt)[:, None, None]
        inv_gram_B, ok_B = _inverse_gram(s * (B.mT @ B), self.rank_tol)  # (B_eff^T B_eff)^{-1}
        inv_gram_A, ok_A = _inverse_gram(s * (A @ A.mT), self.rank_tol)  # (A_eff^T A_eff)^{-1}
        ok = finite & ok_A & ok_B
        keep = ok[:, None, None]
        return {
            "finite": finite,
            "ok": ok,
            "gA": torch.where(keep, inv_gram_B @ gA, gA),  # PEFT: (dA Gb^{-1})^T = Gb^{-1} lora_A.grad
            "gB": torch.where(keep, gB @ inv_gram_A, gB),
        }

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        for i, f in enumerate(group.factors):
            f.lora_A.grad.copy_(plan["gA"][i])
            f.lora_B.grad.copy_(plan["gB"][i])

    def config(self) -> dict:
        return {**super().config(), "rank_tol": self.rank_tol}
