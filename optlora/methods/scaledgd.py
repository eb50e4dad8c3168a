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

from ..functional import RANK_TOL, scaledgd_precondition
from .base import LoRAMethod
from .guards import check_rank_tol
from .layers import LayerGroup
from .reflora import preconditioned_in_range


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
        self.rank_tol = check_rank_tol(
            rank_tol if rank_tol is not None else (RANK_TOL if self.compute_dtype == torch.float64 else 1e-5),
            self.compute_dtype,
        )

    def _plan(self, group: LayerGroup) -> dict[str, torch.Tensor]:
        st = group.factors_and_grads(self.compute_dtype)
        s = group.scalings(self.compute_dtype)[:, None, None]
        gram_A, gram_B = group.factor_grams(st)
        # Grams of the effective factors A_eff = sqrt(s) lora_A^T, B_eff = sqrt(s) lora_B
        grad_A, grad_B, ok = scaledgd_precondition(st.gA, st.gB, s * gram_A, s * gram_B, self.rank_tol)
        in_range = preconditioned_in_range(group, grad_A, grad_B)
        return {"finite": st.finite, "ok": ok & st.finite & in_range, "in_range": in_range, "gA": grad_A, "gB": grad_B}

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        group.set_gradients_(plan["gA"], plan["gB"])

    def config(self) -> dict:
        return {**super().config(), "rank_tol": self.rank_tol}
