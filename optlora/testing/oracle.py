"""The whole-state oracle (issue #16, class 7): after ``optimizer.step()`` returns, every tensor and counter a
method touches is compared with an independent expectation.

:func:`capture` snapshots the *whole* state: every tensor of the model's ``state_dict`` (LoRA factors, base
weights, everything else), every gradient, every optimizer state tensor (moments and step counters) and
hyperparameter, torch's global RNG state, and the method's own state (counters, skip counts, last skip
reasons, ScaLoRA's merge buffers, low-rank residuals and rounding-generator states). :func:`.judge.judge` then
takes the snapshots before the step, between the method's pre-hook and the optimizer's update (``mid``) and
after the step, and checks them against:

* a **refusal** (the step raised): every snapshot entry bit-identical to before;
* a layer the method **applies** to: :func:`.reference_step.expect`, the float64 reference of the method's
  pre-step and the optimizer's update, at ``mid`` and at the end, within a tolerance from measured rounding;
* a layer the method **declines** (``"degenerate"``/``"out_of_range"``): the same reference without the
  method (the plain optimizer step), where the reference confirms that the closed form is undefined or the
  step leaves the range (with margins, :data:`MARGIN`), else the decline is reported;
* a layer with **NaN/Inf** under ``on_nonfinite="skip"``: untouched, factors, moments and step counters as
  they were, its gradients as they were or ``None``, and counted in ``stats()``: on due and plain steps alike
  (issue #16 class 6; the library does not do this yet: such problems carry :data:`CLASS6`);
* a **plain** step (warm-up, between intervals): the optimizer's update alone;
* everything else: bit-identical; torch's RNG untouched; the method's rounding generator advanced exactly
  when a stochastic merge happened; ``steps`` + 1, ``method_steps`` + 1 iff a layer took the method's step,
  each skip counted once under its reason.

Where rounding in the compute dtype can flip a discrete decision (ScaLoRA's case, a skip), the step of each
decision a rounding run reaches is accepted (:func:`.reference_step.expect`). A step that matches only the
compute dtype's out-of-range arithmetic is a finding of this oracle, tagged ``judge.COMPUTE_RANGE``
(docs/RELIABILITY.md, "Findings of this oracle"). Low-rank residuals (quantised bases) have no reference yet:
the judge says it cannot judge them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

#: tag of the problems that issue #16 class 6 ("a skipped layer does not move") will fix
CLASS6 = "#16 class 6"
#: a decline needs the reference to agree within these margins: an eigenvalue ratio below ``rank x rank_tol``,
#: a value above ``1/range`` of the largest finite one or below ``range x`` the smallest normal one, a merge
#: growth above ``1/growth`` of the method's limit; an applied step must stay below ``rank_tol/rank``, the
#: range itself and ``growth x`` the limit
MARGIN = {"rank": 100.0, "range": 16.0, "growth": 2.0}
OPTIMIZERS = {torch.optim.AdamW: "adamw", torch.optim.Adam: "adam", torch.optim.SGD: "sgd"}
HYPER = {
    "adamw": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}


def _clone(x):
    if isinstance(x, torch.Tensor):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return x


@dataclass
class Snapshot:
    tensors: dict  # model state_dict name -> tensor
    grads: dict  # trainable parameter name -> gradient or None
    opt_state: dict  # parameter name -> {state key: tensor or value}
    hyper: list  # the optimizer's param_groups without their parameters
    method: dict  # counters, skip counts and reasons, merge buffers, residuals, generator states
    rng: torch.Tensor  # torch's global CPU RNG state


def param_names(model, opt) -> dict[int, str]:
    """``id(parameter) -> name`` for every model parameter and every parameter the optimizer holds."""
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    for i, group in enumerate(opt.param_groups):
        for j, p in enumerate(group["params"]):
            names.setdefault(id(p), f"optimizer param {i}.{j}")
    return names


def capture(method, opt, model=None) -> Snapshot:
    """Clones of the whole state of ``model`` (default ``method.model``), ``opt`` and ``method``."""
    model = model if model is not None else method.model
    names = param_names(model, opt)
    params = {id(p): p for group in opt.param_groups for p in group["params"]}
    params.update({id(p): p for p in model.parameters() if p.requires_grad})
    own = {}
    if method is not None:
        state, stats = method.state_dict(), method.stats()
        own = {
            k: _clone(state[k])
            for k in ("steps", "method_steps", "skipped", "buffers", "rng", "residuals")
            if k in state
        }
        own["last_skip_reasons"] = dict(stats.get("last_skip_reasons", {}))
    tensors = {n: t.detach().clone() for n, t in model.state_dict().items()}
    tensors.update({names[i]: p.detach().clone() for i, p in params.items() if names[i] not in tensors})
    return Snapshot(
        tensors=tensors,
        grads={names[i]: _clone(p.grad) for i, p in params.items()},
        opt_state={names[id(p)]: _clone(dict(s)) for p, s in opt.state.items() if id(p) in names},
        hyper=[_clone({k: v for k, v in g.items() if k != "params"}) for g in opt.param_groups],
        method=own,
        rng=torch.get_rng_state(),
    )


def same(a, b) -> bool:
    """Bit-identical (NaN equal to NaN), recursively through dicts and lists."""
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(((a == b) | (a.isnan() & b.isnan())).all()) if a.is_floating_point() else torch.equal(a, b)
    return a == b


def differences(before: Snapshot, after: Snapshot, keys=None) -> list[str]:
    """Names of every snapshot entry that differs (``keys``: only those model tensors/parameters)."""
    out = []
    for part in ("tensors", "grads", "opt_state"):
        x, y = getattr(before, part), getattr(after, part)
        for name in sorted(set(x) | set(y)):
            if (keys is None or name in keys) and not same(x.get(name), y.get(name)):
                out.append(f"{part}[{name}]")
    if keys is None:
        out += [] if same(before.hyper, after.hyper) else ["optimizer hyperparameters"]
        out += [
            f"method {k}"
            for k in sorted(set(before.method) | set(after.method))
            if not same(before.method.get(k), after.method.get(k))
        ]
        out += [] if torch.equal(before.rng, after.rng) else ["torch's global RNG state"]
    return out


# ---------------------------------------------------------------------------------------- per-layer inputs
def _np(t) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


def _state(st: dict) -> dict:
    return {k: (float(v) if k == "step" else _np(v)) for k, v in st.items() if isinstance(v, torch.Tensor)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def merge_mode(method, weight_dtype: torch.dtype) -> str:
    """The merge a ScaLoRA ``merge_precision`` means for a weight dtype (README, Options): ``"auto"`` rounds
    bfloat16/float16 weights stochastically, float32/float64 weights always merge with one rounding."""
    mode = method.config().get("merge_precision", "auto")
    if weight_dtype not in (torch.bfloat16, torch.float16):
        return "nearest"
    return "stochastic" if mode == "auto" else mode


def layer_input(method, f, snap: Snapshot, names: dict[int, str]) -> dict:
    """One layer of ``snap`` as the float64 arrays :mod:`.reference_step` takes (PEFT layout, ``W`` out x in)."""
    if f.name in getattr(method, "residuals", {}):
        raise ValueError(f"the oracle has no reference for low-rank residuals yet ({f.name})")
    a, b, w = names[id(f.lora_A)], names[id(f.lora_B)], names.get(id(f.base_weight))
    W = None if w is None else _np(snap.tensors[w])
    if W is not None and f.fan_in_fan_out:
        W = W.T
    wdtype = f.base_weight.dtype
    work = torch.promote_types(torch.promote_types(f.lora_B.dtype, wdtype), torch.float32)
    buffers = snap.method.get("buffers", {})
    buf = buffers.get(f.name.rsplit("[", 1)[0])
    buf = None if buf is None else (_np(buf).T if f.fan_in_fan_out else _np(buf))
    return {
        "Ap": _np(snap.tensors[a]),
        "Bp": _np(snap.tensors[b]),
        "gAp": _np(snap.grads.get(a)),
        "gBp": _np(snap.grads.get(b)),
        "W": W,
        "buffer": buf,
        "s": f.scaling,
        "stA": _state(snap.opt_state.get(a, {})),
        "stB": _state(snap.opt_state.get(b, {})),
        "merge_mode": merge_mode(method, wdtype) if method.merges else None,
        "dtypes": {"param": dtype_name(f.lora_A.dtype), "weight": dtype_name(wdtype), "work": dtype_name(work)},
    }


def optimizer_spec(opt) -> dict:
    """``{"kind": "adamw" | "adam" | "sgd", hyperparameters}`` of the optimizer (one parameter group)."""
    kind = OPTIMIZERS.get(type(opt))
    if kind is None or len(opt.param_groups) != 1:
        raise ValueError(f"the oracle has no reference for {type(opt).__name__} with {len(opt.param_groups)} group(s)")
    group = opt.param_groups[0]
    if group.get("maximize"):
        raise ValueError("the oracle has no reference for maximize=True")
    return {"kind": kind, **{k: group[k] for k in HYPER[kind]}}


def method_spec(method, kind: str) -> dict:
    cfg = method.config()
    spec = {"kind": kind, "compute": dtype_name(method.compute_dtype)}
    spec.update({k: cfg[k] for k in ("kappa", "mode") if k in cfg})
    spec["rank_tol"] = getattr(method, "rank_tol", 0.0)
    return spec


def method_kind(method) -> str:
    cfg = method.config()
    if cfg["method"] == "reflora" and cfg.get("scalar"):
        return "reflora_s"
    return "scalora" if cfg["method"] in ("scalora", "scalora_i") else cfg["method"]


def is_due(method, step: int) -> bool:
    """Whether optimizer step ``step`` (1-based) is due: after ``warmup_steps``, every ``interval`` (README)."""
    cfg = method.config()
    warmup, interval = cfg["warmup_steps"], cfg["interval"]
    return step > warmup and (step - warmup - 1) % interval == 0


@dataclass
class Verdict:
    kind: str  # "error", "skip", "applied", "plain", or "corrupt" when problems is not empty
    problems: list[tuple[str, str]] = field(default_factory=list)  # (text, tag: CLASS6 or "")
    ratio: float = 0.0  # the largest error / tolerance seen (how close the passing tensors came)
