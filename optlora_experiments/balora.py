"""BaLoRA (Castin, Nadjahi, Ablin, Peyré, "Balanced LoRA: Removing Parameter Invariance to Accelerate
Convergence", ICML 2026, arXiv 2605.31484): LoRA whose factors are projected onto the balanced manifold
after every optimizer step. An experiment baseline, not part of the library.

In PEFT's convention a LoRA layer adds ``s * B @ A`` with ``A = lora_A.weight`` (``r x in``),
``B = lora_B.weight`` (``out x r``) and ``s = alpha / r``. The paper writes the update ``A B`` with its
``A`` (``a x r``) in PEFT's ``B`` place and its ``B`` (``r x b``) in PEFT's ``A`` place, so its balanced
manifold ``{A^T A = B B^T}`` reads here::

    A @ A.T == B.T @ B                      (both r x r)

and is the same for the scaled factors ``(sqrt(s) A, sqrt(s) B)``, so ``s`` plays no part.

:func:`balance` is the projection of the paper's Algorithm 1, as its authors' code runs it for BaLoRA
(``ProjectionCallback``, ``project_every=1``): with the polar decompositions ``A = S_A R_A``
(``S_A = (A A^T)^{1/2}``, ``R_A`` orthonormal rows) and ``B = R_B S_B`` (``S_B = (B^T B)^{1/2}``), and the
SVD ``S_B S_A = U diag(sigma) V^T``::

    A' = diag(sigma)^{1/2} V^T R_A,    B' = R_B U diag(sigma)^{1/2}

so ``B' A' = R_B S_B S_A R_A = B A`` (the adapted weight is unchanged) and
``A' A'^T = B'^T B' = diag(sigma)`` (balanced). The optimizer state (AdamW's moments) is left as it is:
the projection only replaces the factor values after the step, as in the authors' implementation. A layer
whose ``B`` (or ``A``) is still zero is not projected (see :func:`project_model`: with a linear lr warm-up
the first step has lr 0, and projecting ``(A, 0)`` would zero ``A`` for good).
:func:`install` sets it up as a step post-hook of one optimizer (nothing global); the returned handle removes it.
"""

from __future__ import annotations

import torch


def _polar_left(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``a = S @ R`` for a wide ``a`` (``r x n``): ``S = (a a^T)^{1/2}`` (``r x r``), ``R`` with orthonormal rows."""
    u, d, vh = torch.linalg.svd(a, full_matrices=False)
    return (u * d) @ u.T, u @ vh


def balance(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BaLoRA's projection of ``(A, B)`` (PEFT shapes ``r x in``, ``out x r``) onto ``{A A^T = B^T B}``, keeping ``B A``.

    See the module docstring (paper Sec. 4 / Algorithm 1). Computed in ``a``'s dtype (float32 at least);
    the SVD of ``S_B S_A`` is sign-fixed (largest entry of each right singular vector positive), so a
    balanced pair with distinct singular values is returned unchanged (idempotent).
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"need A (r x in) and B (out x r) of one rank r, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.promote_types(a.dtype, torch.float32)
    a64, b64 = a.to(dtype), b.to(dtype)
    s_a, r_a = _polar_left(a64)
    s_bt, r_bt = _polar_left(b64.T)  # B^T = S_B R_B^T  <=>  B = R_B S_B (S_B symmetric)
    u, sigma, vh = torch.linalg.svd(s_bt @ s_a)  # S_B S_A, with S_B = S_B^T
    sign = torch.sign(vh.gather(1, vh.abs().argmax(dim=1, keepdim=True)).squeeze(1))
    sign[sign == 0] = 1
    u, vh = u * sign, vh * sign[:, None]
    root = sigma.clamp_min(0).sqrt()
    a_new = (root[:, None] * vh) @ r_a
    b_new = r_bt.T @ (u * root)
    return a_new.to(a.dtype), b_new.to(b.dtype)


def lora_pairs(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter, torch.nn.Parameter]]:
    """``(name, lora_A.weight, lora_B.weight)`` of every trainable 2-D LoRA pair of a PEFT model (every adapter)."""
    params = dict(model.named_parameters())
    out = []
    for name, a in params.items():
        if ".lora_A." not in name:
            continue
        b = params.get(name.replace(".lora_A.", ".lora_B."))
        if b is not None and a.dim() == 2 and b.dim() == 2 and a.requires_grad and b.requires_grad:
            out.append((name.replace(".lora_A.", ".").removesuffix(".weight"), a, b))
    return out


@torch.no_grad()
def project_model(pairs) -> int:
    """Replace every pair's factors by their balanced projection (in place, same tensors); returns the pairs skipped.

    A pair with a zero factor is left as it is: its product is 0, whose balanced factorisation is (0, 0), a
    saddle that gradient steps never leave. This happens after a step with lr 0 -- the first step of a linear
    lr warm-up, with PEFT's ``B = 0`` initialisation -- which the paper's runs (constant lr) never take.
    """
    skipped = 0
    for _, a, b in pairs:
        if not (a.any() and b.any()):
            skipped += 1
            continue
        a_new, b_new = balance(a, b)
        a.copy_(a_new)
        b.copy_(b_new)
    return skipped


def install(optimizer: torch.optim.Optimizer, model: torch.nn.Module):
    """Project ``model``'s LoRA factors after every ``optimizer.step()``; returns the hook handle (``.remove()``)."""
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError("BaLoRA: the model has no trainable LoRA layers (lora_A / lora_B weights)")
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: project_model(pairs))
