"""The verdict of the whole-state oracle on one observed ``optimizer.step()`` (rules: :mod:`.oracle`)."""

from __future__ import annotations

import numpy as np
import torch

from . import reference as ref
from . import reference_step as rs
from .oracle import (
    CLASS6,
    MARGIN,
    Snapshot,
    Verdict,
    _np,
    _state,
    differences,
    dtype_name,
    is_due,
    layer_input,
    method_kind,
    method_spec,
    optimizer_spec,
    param_names,
    same,
)

#: tag of a finding of this oracle (docs/RELIABILITY.md, "Findings"): with ``compute_dtype=torch.float32`` a value
#: leaving float32's range inside the closed form or the preconditioned gradient changes the step, unreported
COMPUTE_RANGE = "compute_dtype range"
COMPUTE_RANGE_TEXT = (
    "the step is the one the compute dtype gives when a value leaves its range (overflow in the closed form, or "
    "gradients flushed to zero), not the reference's; nothing is reported"
)
LAYER_KEYS = {"Ap": "lora_A", "Bp": "lora_B", "gAp": "lora_A.grad", "gBp": "lora_B.grad", "W": "base weight"}


def finite_inputs(L: dict) -> bool:
    return all(np.isfinite(L[k]).all() for k in ("Ap", "Bp", "gAp", "gBp") if L[k] is not None)


def extremes(L: dict, expected: dict, decision: dict, kind: str, method) -> dict:
    """How close the reference's step comes to the ends of the floating-point range (ratios; see MARGIN)."""
    dtypes, out = L["dtypes"], {"over": 0.0, "under": np.inf, "growth": 0.0, "compute": 0.0}
    for key, (value, _, stored) in expected.items():
        if key[0] != "mid":
            continue
        dtype = dtypes["weight"] if key[1] in ("W", "buffer") else dtypes["param"]
        if not np.isfinite(stored).all() or not np.isfinite(value).all():
            out["over"] = np.inf
        elif value.size:
            out["over"] = max(out["over"], float(np.abs(value).max()) / ref.LARGEST[dtype])
    tiny = ref.SMALLEST_NORMAL[dtypes["param"]]
    out["flushed"] = False
    for key, axis in ((("mid", "Ap", None), 1), (("mid", "Bp", None), 0)):
        if kind not in ("reflora_s", "scalora") or not decision.get("ok"):
            break  # only a rescaling moves the factors' rows
        before = np.abs(L[key[1]]).max(axis)
        rows = np.abs(expected[key][0]).max(axis)
        if (rows > 0).any():
            out["under"] = min(out["under"], float(rows[rows > 0].min()) / tiny)
        out["flushed"] |= bool(((before >= tiny) & (rows > 0) & (rows < tiny)).any())  # 0: a zero scaling (Thm 3)
    out["multiplier"] = _multipliers(L, decision, kind)
    if kind == "scalora" and decision.get("ok"):
        coeff = 1.0 - decision["alpha"] * decision["beta"]
        limit = method.max_merge_growth(getattr(torch, dtypes["weight"]))
        out["growth"] = ref.merge_growth(L["Ap"], L["Bp"], L["s"], coeff, L["W"]) / limit
        thin = np.abs(L["Bp"] * coeff[None, :]).max()
        out["over"] = max(out["over"], float(thin) / ref.LARGEST[dtypes["work"]])
    # the closed forms multiply Gram entries (ScaLoRA's K is a Hadamard product of Grams): their range in compute
    grams = [
        L["s"] * (L["Ap"] ** 2).sum(1),
        (L["gAp"] ** 2).sum(1),
        L["s"] * (L["Bp"] ** 2).sum(0),
        (L["gBp"] ** 2).sum(0),
    ]
    d = np.concatenate(grams)
    d = d[d > 0]
    cd = method_spec(method, kind)["compute"]
    if d.size:
        with np.errstate(all="ignore"):
            hi, lo = np.float64(d.max()) ** 2 / ref.LARGEST[cd], ref.SMALLEST_NORMAL[cd] / np.float64(d.min()) ** 2
        out["compute"] = float(max(hi, lo))
    return out


def _multipliers(L: dict, decision: dict, kind: str) -> float:
    """How close a rescaling's nonzero multipliers and their powers (2 for second moments) come to the ends of
    the normal range of the dtype the rescale computes in (the factor's dtype, at least float32)."""
    if kind not in ("reflora_s", "scalora") or not decision.get("ok"):
        return 0.0
    m = np.abs(
        np.concatenate([decision["alpha"], decision["beta"]])
        if kind == "scalora"
        else np.array([decision["P"], 1 / decision["P"]])
    )
    m = m[m > 0]
    squares = any(k in st for st in (L["stA"], L["stB"]) for k in ("exp_avg_sq", "max_exp_avg_sq"))
    powers = np.concatenate([m, m**2]) if squares else m
    rd = "float64" if L["dtypes"]["param"] == "float64" else "float32"
    if not powers.size:
        return 0.0
    with np.errstate(all="ignore"):
        return float(max(powers.max() / ref.LARGEST[rd], ref.SMALLEST_NORMAL[rd] / powers.min()))


def decline_justified(kind: str, decision: dict, ext: dict, rank_tol: float) -> bool:
    """The reference agrees that the closed form is undefined or the step is at the edge of the range."""
    near_singular = decision.get("margin", np.inf) < MARGIN["rank"] * rank_tol
    edge = ext["over"] > 1 / MARGIN["range"] or ext["under"] < MARGIN["range"]
    edge = edge or ext["growth"] > 1 / MARGIN["growth"] or ext["compute"] > 1 / MARGIN["range"]
    edge = edge or ext["multiplier"] > 1 / MARGIN["range"]
    return (not decision["ok"]) or near_singular or edge


def apply_wrong(kind: str, decision: dict, ext: dict, rank_tol: float) -> str | None:
    """Why the method must not have taken this step, if the reference is sure (else None)."""
    if not decision["ok"] and decision.get("margin", 0.0) < rank_tol / MARGIN["rank"]:
        return "the closed form is undefined here (degenerate)"
    if ext["over"] >= 1:
        return "the step leaves the floating-point range"
    if ext["flushed"]:
        return "it flushes a factor row into the subnormal range"
    if ext["growth"] > MARGIN["growth"]:
        return f"the merge grows the rounding error {ext['growth']:.1f}x the method's limit"
    return None


def compare(
    actual: torch.Tensor | None, value, tol: float, stored, transpose: bool = False
) -> tuple[str | None, float]:
    """``(problem or None, error / tolerance)`` of one tensor against its expectation (Frobenius norm over the
    entries that are finite everywhere; NaN/Inf must sit exactly where the rounded reference has them)."""
    if actual is None:
        return "is None", np.inf
    a = _np(actual)
    a = a.T if transpose else a
    if a.shape != value.shape:
        return f"has shape {a.shape}, the reference {value.shape}", np.inf
    if not (np.array_equal(np.isnan(a), np.isnan(stored)) and np.array_equal(np.isposinf(a), np.isposinf(stored))):
        bad, want = int((~np.isfinite(a)).sum()), int((~np.isfinite(stored)).sum())
        return f"has NaN/Inf at {bad} entries, the reference at {want}", np.inf
    both = np.isfinite(a) & np.isfinite(stored) & np.isfinite(value)
    err = rs.norm(np.where(both, a - value, 0.0))
    ratio = err / tol if tol > 0 else (0.0 if err == 0 else np.inf)
    if ratio > 1:
        return (
            f"is off by {err:.3g} (tolerance {tol:.3g}, ||ref|| {rs.norm(np.where(both, value, 0)):.3g})",
            ratio,
        )
    return None, ratio


def _lookup(snap: Snapshot, key: str, moment, names: tuple, path: str):
    """The tensor of ``snap`` that reference key ``key`` (and ``moment``) stands for."""
    a, b, w = names
    if key == "buffer":
        return snap.method.get("buffers", {}).get(path)
    if key in ("stA", "stB"):
        actual = snap.opt_state.get(a if key == "stA" else b, {}).get(moment)
        return torch.as_tensor(actual, dtype=torch.float64) if moment == "step" and actual is not None else actual
    part = snap.grads if key in ("gAp", "gBp") else snap.tensors
    return part.get({"Ap": a, "gAp": a, "Bp": b, "gBp": b, "W": w}[key])


def _input(L: dict, key: str, moment):
    return L[key].get(moment) if key in ("stA", "stB") else L.get(key)


def _layer_tensors(before, mid, after, f, L, exp, names, take) -> tuple[list[tuple[str, str]], float]:
    """One layer's tensors after the method (``mid``) and after the step against the reference ``exp``.

    A tensor the reference leaves exactly as it was (a weight without a merge, a gradient without a method
    step, anything at ``mid`` of a layer the method does not take) must be bit-identical to before.
    """
    problems, worst, path = [], 0.0, f.name.rsplit("[", 1)[0]
    for (stage, key, moment), (value, tol, stored) in exp["tensors"].items():
        snap = mid if stage == "mid" else after
        old = _lookup(before, key, moment, names, path)
        actual = _lookup(snap, key, moment, names, path)
        if key == "buffer" and old is None:
            continue
        label = f"{LAYER_KEYS.get(key, key)}" + (f"[{moment}]" if moment else "")
        where = "after the method" if stage == "mid" else "after the step"
        given = _input(L, key, moment)
        kept = given is not None and np.array_equal(value, given, equal_nan=True)
        if (kept and np.array_equal(stored, given, equal_nan=True)) or (stage == "mid" and not take):
            if not same(old, actual):
                problems.append((f"{f.name}: {label} changed {where}; the reference leaves it as it was", ""))
            continue
        transpose = key in ("W", "buffer") and f.fan_in_fan_out
        problem, ratio = compare(actual, np.asarray(value), tol, np.asarray(stored), transpose)
        worst = max(worst, ratio if np.isfinite(ratio) else 0.0)
        if problem:
            problems.append((f"{f.name}: {label} {problem} ({where})", ""))
    return problems, worst


def _untouched(before, mid, after, f, names: tuple, due: bool, reported: str | None) -> list[tuple[str, str]]:
    """A layer with NaN/Inf under ``on_nonfinite="skip"``: nothing of it moves, in the method or in the update.

    A move in the optimizer's update is issue #16 class 6 (tagged), one in the method is not.
    """
    a, b, w = names
    problems = []
    parts = [("tensors", a), ("tensors", b), ("tensors", w), ("opt_state", a), ("opt_state", b)]
    for part, key in [*parts, ("grads", a), ("grads", b)]:
        if key is None:
            continue
        old = getattr(before, part).get(key)
        if not same(old, getattr(mid, part).get(key)):
            problems.append((f"{f.name}: skipped for NaN/Inf, but the method changed {part}[{key}]", ""))
            continue
        new = getattr(after, part).get(key)
        if part == "grads" and new is None:
            continue  # a skipped layer's gradient may be dropped for the step
        if not same(old, new):
            tag = CLASS6 if key != w and (not due or reported == "nonfinite") else ""
            problems.append((f"{f.name}: skipped for NaN/Inf, but {part}[{key}] moved in the step", tag))
    return problems


def judge(method, opt, before: Snapshot, mid: Snapshot | None, after: Snapshot, exc, clear: bool) -> Verdict:
    """The verdict of one observed step (module docstring of :mod:`.oracle`); ``clear``: ``exc`` is a clear error."""
    if exc is not None:
        changed = differences(before, after)
        if clear and not changed:
            return Verdict("error")
        what = f"changed {', '.join(changed[:6])}" if changed else "nothing changed"
        return Verdict("corrupt", [(f"{type(exc).__name__} (clear: {clear}); {what}", "")])
    if mid is None:
        return Verdict("corrupt", [("optimizer.step() returned without running its pre-hooks", "")])
    problems: list[tuple[str, str]] = []
    step = before.method["steps"] + 1
    if after.method["steps"] != step:
        problems.append((f"steps went from {step - 1} to {after.method['steps']}", ""))
    due, kind, names = is_due(method, step), method_kind(method), param_names(method.model, opt)
    reasons = dict(after.method.get("last_skip_reasons", {})) if due else {}
    if not any(f.lora_A.grad is not None and f.lora_B.grad is not None for f in method.factors):
        reasons = {}  # a due step without gradients is a plain one: the reasons are the last due step's
    try:
        opt_spec, m_spec = optimizer_spec(opt), method_spec(method, kind)
        inputs = [layer_input(method, f, before, names) for f in method.factors]
    except ValueError as e:
        return Verdict("corrupt", [(f"cannot judge: {e}", "")])
    aliases: dict[int, list[str]] = {}  # one tensor may have several names (a module used twice, tied weights)
    for n, t in method.model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(t), []).append(n)
    owned, applied, counted, stochastic, worst = set(), [], dict.fromkeys(before.method["skipped"], 0), False, 0.0
    for f, L in zip(method.factors, inputs):
        trio = (names[id(f.lora_A)], names[id(f.lora_B)], names.get(id(f.base_weight)))
        owned |= {n for t in (f.lora_A, f.lora_B, f.base_weight) for n in aliases.get(id(t), ())}
        live = L["gAp"] is not None and L["gBp"] is not None
        if live and not finite_inputs(L):
            if method.on_nonfinite == "raise":
                problems.append((f"{f.name}: NaN/Inf in a factor or gradient was not refused", ""))
                continue
            counted["nonfinite"] += 1
            if due and reasons.get(f.name) != "nonfinite":
                problems.append((f"{f.name}: NaN/Inf not reported as a 'nonfinite' skip ({reasons.get(f.name)})", ""))
            problems += _untouched(before, mid, after, f, trio, due, reasons.get(f.name))
            continue
        reason = reasons.get(f.name)
        if reason is not None:
            counted[reason] = counted.get(reason, 0) + 1
        take = due and live and reason is None
        exp = rs.expect(kind, L, m_spec, opt_spec, apply=take)
        found, ratio = _layer_tensors(before, mid, after, f, L, exp, trio, take)
        chosen = exp  # the decision whose step the library took
        for alt in [a for a in exp["alternatives"] if a["decision"]["ok"]] if found and take else ():
            other, other_ratio = _layer_tensors(before, mid, after, f, L, alt, trio, take)
            if not other:  # the step of another decision that rounding allows (reference_step.expect)
                found, ratio, chosen = [], other_ratio, alt
                break
        wide = exp.get("out_of_range")
        if found and take and wide is not None and not _layer_tensors(before, mid, after, f, L, wide, trio, take)[0]:
            found, chosen = [(f"{f.name}: {COMPUTE_RANGE_TEXT}", COMPUTE_RANGE)], wide
        problems += found
        worst = max(worst, ratio)
        if reason == "nonfinite":
            problems.append((f"{f.name}: reported 'nonfinite' with finite factors and gradients", ""))
        elif reason is not None:
            full = rs.expect(kind, L, m_spec, opt_spec, apply=True)
            ext = extremes(L, full["tensors"], full["decision"], kind, method)
            may_skip = any(not alt["decision"]["ok"] for alt in full["alternatives"])  # within rounding of a boundary
            if not (may_skip or decline_justified(kind, full["decision"], ext, m_spec["rank_tol"])):
                problems.append((f"{f.name}: declined ({reason}) a step the reference takes: {_fmt(ext)}", ""))
        elif take:
            applied.append(f.name)
            stochastic |= L["merge_mode"] == "stochastic"
            ext = extremes(L, chosen["tensors"], chosen["decision"], kind, method)
            if why := apply_wrong(kind, chosen["decision"], ext, m_spec["rank_tol"]):
                problems.append((f"{f.name}: applied, but {why}: {_fmt(ext)}", ""))
    problems += _others(before, after, opt, opt_spec, names, owned)
    problems += _counters(method, before, after, due, applied, counted, stochastic)
    if problems:
        return Verdict("corrupt", problems, worst)
    return Verdict("plain" if not due else "skip" if reasons or counted["nonfinite"] else "applied", [], worst)


def _fmt(ext: dict) -> str:
    return ", ".join(f"{k} {v:.2g}" for k, v in ext.items())


def _others(before: Snapshot, after: Snapshot, opt, opt_spec: dict, names: dict, owned: set) -> list[tuple[str, str]]:
    """Parameters the optimizer holds outside the method's layers take its plain update; all else is unchanged."""
    problems, stepped = [], set()
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in owned:
                continue
            stepped.add(name)
            g = _np(before.grads.get(name))
            value = _np(before.tensors.get(name, p))
            exp = rs.expect_param(value, g, _state(before.opt_state.get(name, {})), opt_spec, dtype_name(p.dtype))
            for (_, key, moment), (v, tol, stored) in exp.items():
                actual = after.tensors.get(name, p) if key == "p" else after.opt_state.get(name, {}).get(moment)
                if moment == "step" and actual is not None:
                    actual = torch.as_tensor(actual, dtype=torch.float64)
                problem, _ = compare(actual, np.asarray(v), tol, np.asarray(stored))
                if problem:
                    problems.append((f"{name} (not a method layer){'' if key == 'p' else f'[{moment}]'} {problem}", ""))
    rest = {n for n in set(before.tensors) | set(before.grads) | set(before.opt_state) if n not in owned | stepped}
    problems += [(f"{d} changed", "") for d in differences(before, after, keys=rest)]
    grads = [n for n in stepped if not same(before.grads.get(n), after.grads.get(n))]
    problems += [(f"the gradient of {n} (not a method layer) changed", "") for n in grads]
    if not same(before.hyper, after.hyper):
        problems.append(("the optimizer's hyperparameters changed", ""))
    if not torch.equal(before.rng, after.rng):
        problems.append(("torch's global RNG state changed", ""))
    return problems


def _counters(method, before, after, due, applied, counted, stochastic) -> list[tuple[str, str]]:
    """``method_steps``, the skip counts, the last skip reasons and the rounding generators."""
    problems = []
    b, a = before.method, after.method
    want = b["method_steps"] + int(due and bool(applied))
    if a["method_steps"] != want:
        problems.append((f"method_steps {b['method_steps']} -> {a['method_steps']}, expected {want}", ""))
    for reason in sorted(set(b["skipped"]) | set(a["skipped"])):
        got, exp = a["skipped"].get(reason, 0) - b["skipped"].get(reason, 0), counted.get(reason, 0)
        if got != exp:
            tag = CLASS6 if reason == "nonfinite" and not due else ""
            problems.append((f"skipped[{reason!r}] grew by {got}, expected {exp}", tag))
    if not due and a.get("last_skip_reasons") != b.get("last_skip_reasons"):
        problems.append(("last_skip_reasons changed on a step that is not due", ""))
    if "rng" in b and same(b["rng"], a.get("rng")) == stochastic:
        problems.append((f"the rounding generator {'did not advance' if stochastic else 'advanced'}", ""))
    extra = set(a) - set(b)
    if extra:
        problems.append((f"the method's state gained {sorted(extra)}", ""))
    return problems
