"""Numeric parity of optlora's batched fast path against an unbatched float64 reference.

For one optimizer step on which the method is due, the weight update of every LoRA layer,
``dW = W_eff(after) - W_eff(before)`` with ``W_eff = W_base + s * lora_B @ lora_A``, is
computed twice:

* *fast*: what ``optimizer.step()`` actually did (method pre-hook, batched over layers of
  the same shape, then torch's AdamW);
* *reference*: layer by layer in numpy float64 from the papers' formulas, using the
  independent implementation in :mod:`optlora.testing.reference` (RefLoRA: geometric mean by
  matrix square roots, Thm 3; RefLoRA-S: Thm 5; ScaLoRA: hybrid rule of Thms 3/5, merge
  and chain-rule moment transfer) followed by a textbook AdamW step.

The relative error ``||dW_fast - dW_ref||_F / ||dW_ref||_F`` (worst layer) is reported.
Run it in float64 to test the math of the fast path; in lower precision it measures storage
rounding as well.
"""

from __future__ import annotations

import numpy as np
import torch

from ..discovery import find_lora_factors
from . import reference as ref


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to("cpu", torch.float64).numpy().copy()


def _state(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> dict:
    st = optimizer.state.get(p, {})
    out = {k: _np(v) for k, v in st.items() if k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    if "step" in st:
        out["step"] = int(st["step"])
    return out


def snapshot(factors, optimizer) -> list[dict]:
    """Everything the reference needs, per layer, in float64 numpy (PEFT layout)."""
    snap = []
    for f in factors:
        W = _np(f.base_weight)
        snap.append(
            {
                "name": f.name,
                "Ap": _np(f.lora_A),
                "Bp": _np(f.lora_B),
                "gAp": _np(f.lora_A.grad),
                "gBp": _np(f.lora_B.grad),
                "W": W.T if f.fan_in_fan_out else W,  # out x in
                "s": f.scaling,
                "fifo": f.fan_in_fan_out,
                "stA": _state(optimizer, f.lora_A),
                "stB": _state(optimizer, f.lora_B),
            }
        )
    return snap


def effective(layer: dict) -> np.ndarray:
    return layer["W"] + layer["s"] * layer["Bp"] @ layer["Ap"]


def reference_layer(kind: str, L: dict, hyper: dict, kappa: float, mode: str = "hybrid") -> np.ndarray:
    """Reference ``W_eff`` after one step of ``kind`` on layer snapshot ``L`` (out x in).

    ``mode`` (ScaLoRA): ``"hybrid"`` (ScaLoRA's hybrid rule) or ``"scalar"`` (robust scalar rule, ScaLoRA Thm 3).
    """
    Ap, Bp, gAp, gBp, W, s = L["Ap"], L["Bp"], L["gAp"], L["gBp"], L["W"], L["s"]
    stA, stB = L["stA"], L["stB"]
    if kind == "reflora":
        gAp, gBp = ref.peft_reflora_grads(Ap, Bp, gAp, gBp)
    elif kind == "reflora_s":
        P = np.sqrt(ref.reflora_s_scale(Ap.T, Bp))
        ones = np.ones(Ap.shape[0])
        Ap, Bp, gAp, gBp = Ap * P, Bp / P, gAp / P, gBp * P
        stA, stB = ref.transfer(stA, row=ones / P), ref.transfer(stB, col=ones * P)
    elif kind in ("scalora", "scalora_i"):
        if mode == "scalar":
            rs = np.sqrt(s)
            x, y, _ = ref.scalar_kkt(ref.scalar_quantities(rs * Ap.T, rs * Bp, gAp.T, gBp), kappa)
            alpha, beta = np.full(Ap.shape[0], np.sqrt(x)), np.full(Ap.shape[0], np.sqrt(y))
        else:
            alpha, beta, _ = ref.peft_scalora_scalings(Ap, Bp, gAp, gBp, s, kappa)
        if np.any(alpha != 0) or np.any(beta != 0):  # all-zero = no gain: the layer is skipped
            W = ref.peft_merge(W, Ap, Bp, s, 1.0 - alpha * beta)
            Ap, Bp = alpha[:, None] * Ap, Bp * beta[None, :]
            gAp, gBp = beta[:, None] * gAp, gBp * alpha[None, :]
            stA, stB = ref.transfer(stA, row=beta), ref.transfer(stB, col=alpha)
    elif kind != "lora":
        raise ValueError(f"unknown method {kind!r}")
    Ap, _ = ref.adamw_step(Ap, gAp, stA, **hyper)
    Bp, _ = ref.adamw_step(Bp, gBp, stB, **hyper)
    return W + s * Bp @ Ap


def check_step(kind: str, model, method, optimizer, batch: dict) -> float:
    """Run one forward/backward/step and return the worst relative error of ``dW`` vs the reference.

    The method must be due on this step (``method.is_due(method.steps + 1)``); ScaLoRA's ``kappa``
    and ``mode`` are read from the method.
    """
    kappa, mode = getattr(method, "kappa", None), getattr(method, "mode", "hybrid")
    if method is not None and not method.is_due(method.steps + 1):
        raise RuntimeError(f"{kind} is not due on the next step; parity would test a plain step")
    factors = method.factors if method is not None else find_lora_factors(model)
    group = optimizer.param_groups[0]
    hyper = {"lr": group["lr"], "betas": group["betas"], "eps": group["eps"], "weight_decay": group["weight_decay"]}
    hyper["amsgrad"] = bool(group.get("amsgrad", False))
    model(**batch).loss.backward()
    before = snapshot(factors, optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    after = snapshot(factors, optimizer)
    # layers the method documents as skipped (rank-deficient factor, e.g. out_features < r) take the plain step
    skipped = set(method.stats().get("last_skipped_layers", [])) if method is not None else set()
    worst = 0.0
    for b, a in zip(before, after):
        d_fast = effective(a) - effective(b)
        d_ref = reference_layer("lora" if b["name"] in skipped else kind, b, hyper, kappa, mode) - effective(b)
        worst = max(worst, float(np.linalg.norm(d_fast - d_ref) / max(np.linalg.norm(d_ref), 1e-300)))
    return worst
