"""The float64 reference of one whole ``optimizer.step()`` on one LoRA layer: the method's pre-step, then the
optimizer's own update, written from the papers without importing optlora (numpy only, like
:mod:`.reference`, whose formulas it composes).

A layer is a dict of float64 arrays in PEFT layout (``Ap`` r x in, ``Bp`` out x r, their gradients ``gAp``,
``gBp``, the base weight ``W`` out x in, the PEFT scale ``s``) with the optimizer state of each factor (``stA``,
``stB``: ``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ..., ``step``) and the storage dtype of every tensor.
:func:`run` returns the state after the method (``mid``) and after the optimizer (``end``):

* **RefLoRA** (Thm 3): ``gA <- S^-1 gA``, ``gB <- gB S`` with ``S`` the geometric mean; no moment transfer.
* **RefLoRA-S** (Thm 5): ``A <- sqrt(s*) A``, ``B <- B / sqrt(s*)``, gradients by the chain rule, first moments
  by the gradient's multiplier, second moments by its square (Sec. 3.3).
* **ScaLoRA** (Thms 3, 5): merge ``s B diag(1 - alpha beta) A`` into ``W``, ``A <- diag(alpha) A``,
  ``B <- B diag(beta)``, ``gA <- diag(beta) gA``, ``gB <- gB diag(alpha)``, moments likewise (Lemmas 3.3/3.6).
* **ScaledGD** (Tong et al. 2021): ``gA <- (s B^T B)^-1 gA``, ``gB <- gB (s A A^T)^-1``.
* then **AdamW / Adam / SGD** exactly as their papers define them (:func:`.reference.adamw_step`,
  :func:`.reference.sgd_step`).

:func:`expect` runs it three times to give every output tensor a tolerance from measured rounding (the rule of
docs/RELIABILITY.md, "How a case is judged"): exactly; with every stored intermediate rounded to its storage
dtype (:func:`.reference.round_to`); and with the closed forms' inputs perturbed by the compute dtype's unit
roundoff (their conditioning). The spread of the last two around the first is the measured rounding error.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref

#: the tolerance is this multiple of the measured rounding (docs/RELIABILITY.md)
SPREAD_MULTIPLE = 4.0
#: the closed forms' conditioning is measured from this many random perturbations (the largest is taken)
PERTURBATIONS = 4


def _rows(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x * scale[:, None]


def _cols(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return x * scale[None, :]


def _transfer(st: dict, scale: np.ndarray, side, rnd) -> dict:
    """Moments of a rescaled factor (chain rule): power 1 by ``scale``, power 2 by its square (Lemmas 3.3/3.6)."""
    out = dict(st)
    for key, power in (("exp_avg", 1), ("momentum_buffer", 1), ("exp_avg_sq", 2), ("max_exp_avg_sq", 2)):
        if out.get(key) is not None:
            out[key] = rnd(side(out[key], scale**power), "param")
    return out


def closed_form(
    kind: str, L: dict, method: dict, perturb: float = 0.0, seed: int = 0, grams: str = "float64", wide: bool = False
) -> dict:
    """The method's decision for one layer from its factors and gradients, in float64.

    Every closed form is a function of Gram matrices (and their Hadamard products, ScaLoRA's ``K``). Two ways
    to measure how it treats rounding: ``perturb`` multiplies every input entry by ``1 +- perturb`` (random
    signs; at least one ulp of 1) first, and ``grams`` forms the Grams (and ``K``) in that dtype, the compute
    dtype, and takes the rest in float64: where their entries are subnormal there, the spread shows it; where
    they overflow, that is not rounding and the run returns ``{"ok": False, "overflow": True}``. ``wide``
    instead keeps the whole closed form in ``grams`` with overflow and underflow as they come (what a method
    computing everything in its compute dtype would get). Returns ``{"ok": bool, ...}`` with ``S`` /
    ``S_inv`` (RefLoRA, ScaledGD: the two preconditioners), ``P`` (RefLoRA-S: ``sqrt(s*)``) or ``alpha``,
    ``beta``, ``column`` (ScaLoRA), and ``margin`` (RefLoRA, ScaledGD: the Gram eigenvalue ratio).
    """
    Ap, Bp, gAp, gBp, s = L["Ap"], L["Bp"], L["gAp"], L["gBp"], L["s"]
    if perturb:
        rng = np.random.default_rng(seed)
        Ap, Bp, gAp, gBp = (x * (1 + perturb * rng.choice([-1.0, 1.0], x.shape)) for x in (Ap, Bp, gAp, gBp))
    errors = {"all": "ignore"} if grams == "float64" or wide else {"all": "ignore", "over": "raise"}
    try:
        with np.errstate(**errors):
            return _closed_form(kind, Ap, Bp, gAp, gBp, s, method, _products(grams, wide))
    except np.linalg.LinAlgError:  # a singular system (e.g. rounded Grams): no closed form from these inputs
        return {"ok": False, "margin": 0.0}
    except FloatingPointError:
        return {"ok": False, "margin": 0.0, "overflow": True}


def _products(dtype: str, wide: bool):
    """``mm(X, Y)``: ``X @ Y`` formed in ``dtype``; ``mm(X)``: ``X`` rounded to ``dtype``. Returned in float64,
    or (``wide``) kept in ``dtype``, so that everything computed from them stays in numpy's float32 arithmetic
    (products, sums and cancellations rounded, subnormals and overflow as they come)."""

    def mm(X, Y=None):
        out = np.asarray(X, dtype=dtype) if Y is None else np.asarray(X, dtype=dtype) @ np.asarray(Y, dtype=dtype)
        return out if wide else out.astype(np.float64)

    return mm


def _closed_form(kind: str, Ap, Bp, gAp, gBp, s: float, method: dict, mm) -> dict:
    if kind in ("reflora", "scaledgd"):
        scale = 1.0 if kind == "reflora" else s  # ScaledGD: Grams of the effective factors
        GA, GB = mm(scale * mm(Ap, Ap.T)), mm(scale * mm(Bp.T, Bp))
        ok = bool(np.isfinite(GA).all() and np.isfinite(GB).all())
        margin = (
            (ref.reflora_margin(GA, GB) if kind == "reflora" else min(ref.gram_ratio(GA), ref.gram_ratio(GB)))
            if ok
            else 0.0
        )
        if not margin > 0:
            return {"ok": False, "margin": margin}
        if kind == "scaledgd":
            return {"ok": True, "S_inv": np.linalg.inv(GB), "S": np.linalg.inv(GA), "margin": margin}
        S = ref.geometric_mean(GA, GB)
        return {"ok": bool(np.isfinite(S).all()), "S_inv": np.linalg.inv(S), "S": S, "margin": margin}
    if kind == "reflora_s":
        a, b = (
            np.sqrt(mm(Ap.reshape(1, -1), Ap.reshape(-1, 1))[0, 0]),
            np.sqrt(mm(Bp.reshape(1, -1), Bp.reshape(-1, 1))[0, 0]),
        )
        P = np.sqrt(b / a) if a > 0 and b > 0 else np.nan
        ok = bool(np.isfinite(a) and np.isfinite(b) and np.isfinite(P) and P > 0)
        return {"ok": ok, "P": float(P) if ok else 1.0}
    if kind in ("scalora", "scalora_i"):
        rs = np.sqrt(s)  # effective factors A = sqrt(s) Ap^T, B = sqrt(s) Bp; dA = gAp^T, dB = gBp
        SA, SB = np.concatenate([rs * Ap.T, gAp.T], 1), np.concatenate([gBp, rs * Bp], 1)
        GSA, GSB = mm(SA.T, SA), mm(SB.T, SB)
        r = Ap.shape[0]
        K, lam = mm(GSA * GSB), np.concatenate([np.diag(GSB)[:r], np.diag(GSA)[r:]])
        if not (np.isfinite(K).all() and np.isfinite(lam).all()):
            return {"ok": False}
        alpha, beta, column, ok = ref.scalora_decision(K, lam, method["kappa"], method.get("mode", "hybrid"))
        ok = ok and bool(np.isfinite(alpha).all() and np.isfinite(beta).all())
        return {"ok": ok, "alpha": alpha, "beta": beta, "column": column}
    raise ValueError(f"no reference for method {kind!r}")


def _merge(L: dict, coeff: np.ndarray, rnd: Storage) -> tuple[np.ndarray, np.ndarray | None]:
    """``W + s B diag(coeff) A`` (ScaLoRA Sec. 3.1) and the merge buffer, in each merge mode's storage.

    ``nearest``: one rounding into the weight's dtype; ``stochastic``: modelled as nearest (its error is at
    most one ulp, the tolerance's floor allows it); ``fp32``: the float32 master copy takes the sum, the weight
    its rounded copy; ``kahan``: the buffer ``c`` carries what rounding dropped, so that ``W' - c' = W - c + inc``.
    """
    W, buf, mode, s = L["W"], L.get("buffer"), L.get("merge_mode", "nearest"), L["s"]
    left = rnd(L["Bp"] * coeff[None, :], "work")  # the thin factor, rounded once
    if mode == "nearest":
        return rnd(W + s * rnd(left, "weight") @ L["Ap"], "weight"), buf
    inc = rnd(rnd(s * left, "f32") @ L["Ap"], "f32")
    if mode == "fp32":
        new = rnd(buf + inc, "f32")
        return rnd(new, "weight"), new
    if mode == "kahan":
        y = rnd(inc - buf, "f32")
        t = rnd(W + y, "weight")
        return t, (np.zeros_like(buf) if rnd.exact else rnd(rnd(t - W, "f32") - y, "weight"))
    return rnd(W + inc, "weight"), buf  # stochastic


def method_step(kind: str, L: dict, method: dict, rnd, decision: dict) -> dict:
    """The layer after the method's pre-step (nothing changes where ``decision["ok"]`` is False)."""
    out = {k: L.get(k) for k in ("Ap", "Bp", "gAp", "gBp", "W", "buffer", "stA", "stB")}
    if not decision["ok"] or kind == "lora":
        return out
    with np.errstate(all="ignore"):
        if kind in ("reflora", "scaledgd"):
            cast = decision.get("product", "float64")  # the dtype the preconditioned gradients are formed in
            gA, gB = (np.asarray(x, dtype=cast) for x in (L["gAp"], L["gBp"]))
            out["gAp"] = rnd(np.asarray(decision["S_inv"], dtype=cast) @ gA, "param")
            out["gBp"] = rnd(gB @ np.asarray(decision["S"], dtype=cast), "param")
            return out
        if kind == "reflora_s":
            r, P = L["Ap"].shape[0], decision["P"]
            alpha, beta = np.full(r, P), np.full(r, 1 / P)
        else:
            alpha, beta = decision["alpha"], decision["beta"]
            out["W"], out["buffer"] = _merge(L, 1.0 - alpha * beta, rnd)
        out["Ap"], out["Bp"] = rnd(_rows(L["Ap"], alpha), "param"), rnd(_cols(L["Bp"], beta), "param")
        out["gAp"], out["gBp"] = rnd(_rows(L["gAp"], beta), "param"), rnd(_cols(L["gBp"], alpha), "param")
        out["stA"] = _transfer(L["stA"], beta, _rows, rnd)
        out["stB"] = _transfer(L["stB"], alpha, _cols, rnd)
    return out


def optimizer_step(p, g, st: dict, opt: dict, rnd) -> tuple[np.ndarray, dict]:
    """The optimizer's own update of one parameter (``g is None``: the optimizer leaves it and its state)."""
    if g is None:
        return p, st
    hyper = {k: v for k, v in opt.items() if k != "kind"}
    store = lambda x: rnd(x, "param")  # noqa: E731 - the parameter's and its state's storage
    with np.errstate(all="ignore"):
        if opt["kind"] in ("adamw", "adam"):
            new_p, new = ref.adamw_step(p, g, st, decoupled=opt["kind"] == "adamw", rnd=store, **hyper)
        elif opt["kind"] == "sgd":
            new_p, new = ref.sgd_step(p, g, st, rnd=store, **hyper)
        else:
            raise ValueError(f"no reference for optimizer {opt['kind']!r}")
    return new_p, {**st, **new}


def run(kind: str, L: dict, method: dict, opt: dict, rnd, decision: dict) -> dict:
    """``{"mid": ..., "end": ...}``: the layer after the method's pre-step and after the optimizer's update."""
    mid = method_step(kind, L, method, rnd, decision)
    A, stA = optimizer_step(mid["Ap"], mid["gAp"], mid["stA"], opt, rnd)
    B, stB = optimizer_step(mid["Bp"], mid["gBp"], mid["stB"], opt, rnd)
    end = {**mid, "Ap": A, "Bp": B, "stA": stA, "stB": stB}
    return {"mid": mid, "end": end}


class Storage:
    """The storage model: ``rnd(x, role)`` rounds ``x`` to the dtype of ``role`` (``"param"``: a factor, its
    gradient and optimizer state; ``"weight"``: the base weight; ``"work"``: the merge's thin factor; ``"f32"``).

    float32, bfloat16 and float16 round to nearest (:func:`.reference.round_to`: overflow and subnormals
    included). float64 cannot be rounded from float64: it takes the standard model of floating-point
    arithmetic, ``x (1 + d)`` with ``|d| <= u`` drawn at random (Higham, *Accuracy and Stability of Numerical
    Algorithms*, Sec. 2.2), so that its spread measures how the roundings of a chain of operations add up.
    ``Storage(None)`` keeps every intermediate exact (float64).
    """

    def __init__(self, dtypes: dict | None, seed: int = 0):
        self.dtypes = dtypes
        self.exact = dtypes is None
        self.rng = np.random.default_rng(seed)

    def __call__(self, x, role: str):
        if self.exact:
            return x
        dtype = "float32" if role == "f32" else self.dtypes.get(role, "float64")
        if dtype == "float64":
            x = np.asarray(x, dtype=np.float64)
            return x * (1 + ref.UNIT_ROUNDOFF["float64"] * self.rng.uniform(-1.0, 1.0, x.shape))
        return ref.round_to(x, dtype)


EXACT = Storage(None)


def flatten(state: dict) -> dict:
    """``{("mid" | "end", key, moment-or-None): array}`` of a :func:`run` result (the step counter as a float)."""
    out = {}
    for stage, layer in state.items():
        for key, value in layer.items():
            if key in ("stA", "stB"):
                for moment, v in value.items():
                    out[(stage, key, moment)] = np.asarray(v, dtype=np.float64)
            elif value is not None:
                out[(stage, key, None)] = value
    return out


def _dtype_of(key: tuple, L: dict) -> str:
    if key[1] == "W" or (key[1] == "buffer" and L.get("merge_mode") == "kahan"):
        return L["dtypes"]["weight"]
    return "float32" if key[1] == "buffer" else L["dtypes"]["param"]


def norm(x) -> float:
    """Frobenius norm of the finite entries, scaled first so that values near the end of the range do not overflow."""
    x = np.asarray(x, dtype=np.float64)
    x = np.where(np.isfinite(x), x, 0.0)
    top = float(np.abs(x).max()) if x.size else 0.0
    return top * float(np.linalg.norm(x / top)) if top > 0 else 0.0


def _spread(a: np.ndarray, b: np.ndarray) -> float:
    both = np.isfinite(a) & np.isfinite(b)
    return norm(np.where(both, a - b, 0.0))


def signature(kind: str, decision: dict) -> tuple:
    """The discrete part of a decision: whether there is a step, and ScaLoRA's case (column theorem or scalar,
    and which scalings are exactly zero: the one-sided optima of Thm 3)."""
    if kind != "scalora" or not decision["ok"]:
        return (decision["ok"],)
    return (True, decision["column"], tuple(decision["alpha"] == 0), tuple(decision["beta"] == 0))


def _tensors(kind, L, method, opt, decision, extra: float = 0.0, moved=()) -> dict:
    """``{key: (value, tolerance, stored)}`` of one decision (see :func:`expect`)."""
    exact_run = flatten(run(kind, L, method, opt, EXACT, decision))
    stored_run = flatten(run(kind, L, method, opt, Storage(L["dtypes"]), decision))
    spreads = {key: _spread(stored_run[key], v) for key, v in exact_run.items()}
    for other in moved:
        for key, v in flatten(run(kind, L, method, opt, EXACT, other)).items():
            spreads[key] = max(spreads[key], _spread(stored_run[key], exact_run[key]) + _spread(v, exact_run[key]))
    tensors = {}
    for key, value in exact_run.items():
        # one rounding of the result: u ||x||. Stochastic rounding (modelled as nearest) errs by up to one ulp, at
        # most 2u|x| per entry; the multiple covers it (its mean error is at most half an ulp, as nearest's bound)
        floor = ref.UNIT_ROUNDOFF[_dtype_of(key, L)]
        size = norm(value)
        tol = SPREAD_MULTIPLE * max(spreads[key] + extra * size, floor * size)
        tensors[key] = (value, tol, stored_run[key])
    return tensors


def expect(kind: str, L: dict, method: dict, opt: dict, apply: bool) -> dict:
    """Expected values and tolerances of every tensor of one layer after the method and after the optimizer.

    ``apply``: the method takes its step on this layer (else only the optimizer's update). Returns
    ``{"decision": ..., "tensors": {key: (value, tolerance, stored)}, "alternatives": [...]}``: ``value`` the
    exact float64 result, ``stored`` the result with storage rounding (its non-finite entries are the ones the
    dtype must show), and ``tolerance = SPREAD_MULTIPLE * max(measured spread, u * ||value||)`` in the Frobenius
    norm (module docstring). ``alternatives``: where a run that measures rounding (a perturbation, or the closed
    form in the compute dtype) reaches another discrete decision (:func:`signature`), the decision is within
    rounding of a boundary of the theorem; each such decision, with the same rule plus ``n u_compute`` relative
    for closed-form values known only to the compute dtype, is as acceptable as the float64 one.
    """
    kind = kind if apply else "lora"
    decision = closed_form(kind, L, method) if kind != "lora" else {"ok": False}
    compute = method.get("compute", "float64")
    n = max(2, *L["Ap"].shape, *L["Bp"].shape)
    moves = []
    if kind != "lora":
        # the backward error of a Gram's inner products of length n: gamma_n ~ n u (Higham, Sec. 3.1), and at
        # least one ulp of 1 (2u: a relative change of u itself is a tie that rounds back to the input)
        moves = [{"perturb": n * ref.UNIT_ROUNDOFF[compute], "seed": i} for i in range(PERTURBATIONS)]
        moves += [{"grams": compute}] if compute != "float64" else []
    moved = [d for d in (closed_form(kind, L, method, **move) for move in moves) if not d.get("overflow")]
    mine = signature(kind, decision)
    same = [d for d in moved if d["ok"] and signature(kind, d) == mine] if decision["ok"] else []
    others = {signature(kind, d): d for d in moved if signature(kind, d) != mine}
    alternatives = [
        {"decision": d, "tensors": _tensors(kind, L, method, opt, d, n * ref.UNIT_ROUNDOFF[compute])}
        for d in others.values()
    ]
    out = {"decision": decision, "tensors": _tensors(kind, L, method, opt, decision, 0.0, same)}
    out["alternatives"], out["out_of_range"] = alternatives, None
    if kind != "lora" and compute != "float64":
        # everything in the compute dtype, overflow and underflow as they come: not rounding, but what a method
        # that lets the compute dtype's range change its step silently would do (the judge names it)
        wide = closed_form(kind, L, method, grams=compute, wide=True)
        if wide["ok"]:
            extra, exact_product = n * ref.UNIT_ROUNDOFF[compute], dict(wide)  # its spread: the float32 product
            wide["product"] = compute
            tensors = _tensors(kind, L, method, opt, wide, extra, [exact_product])
            out["out_of_range"] = {"decision": wide, "tensors": tensors}
    return out


def expect_param(p: np.ndarray, g, st: dict, opt: dict, dtype: str) -> dict:
    """Expected value and tolerance of a parameter the method does not own, and of its state, after the
    optimizer's update (the same rule as :func:`expect`): ``{(key, moment-or-None): (value, tolerance, stored)}``."""
    runs = [optimizer_step(p, g, st, opt, model) for model in (EXACT, Storage({"param": dtype}))]
    flat = [
        {("end", "p", None): q, **{("end", "st", k): np.asarray(v, np.float64) for k, v in s.items()}} for q, s in runs
    ]
    out = {}
    for key, value in flat[0].items():
        finite = np.where(np.isfinite(value), value, 0.0)
        floor = ref.UNIT_ROUNDOFF[dtype] * norm(finite)
        out[key] = (value, SPREAD_MULTIPLE * max(_spread(flat[1][key], value), floor), flat[1][key])
    return out
