"""The whole-step reference of the oracle (optlora.testing.reference_step) and its storage model.

The reference must be independent of optlora (numpy only), agree with torch's optimizers in float64, round
exactly as torch stores bfloat16/float16/float32, and give tolerances that shrink with the dtype's unit
roundoff instead of a fixed percentage.
"""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch

from optlora.testing import reference as ref
from optlora.testing import reference_step as rs

ROOT = pathlib.Path(__file__).resolve().parents[1] / "optlora" / "testing"


def test_the_reference_step_does_not_import_optlora():
    imports = set()
    for node in ast.walk(ast.parse((ROOT / "reference_step.py").read_text())):
        if isinstance(node, ast.ImportFrom):
            imports.add(("." * node.level) + (node.module or ""))
        elif isinstance(node, ast.Import):
            imports.update(a.name for a in node.names)
    assert imports <= {"__future__", "numpy", "."}, imports


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_round_to_matches_torchs_storage(dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=g, dtype=torch.float64) * torch.logspace(-45, 38, 4000, dtype=torch.float64)
    ties = torch.tensor([1 + 2.0**-8, 1 + 3 * 2.0**-8, 3.4e38, 3.39e38, -3.4e38, 1e-40, 2.0**-149], dtype=torch.float64)
    x = torch.cat([x, ties, -ties])
    want = x.to(dtype).double().numpy()
    got = ref.round_to(x.numpy(), str(dtype).removeprefix("torch."))
    np.testing.assert_array_equal(got, want)


def _optimizer_cases():
    return [
        ("adamw", torch.optim.AdamW, {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-4, "weight_decay": 0.1}),
        ("adam", torch.optim.Adam, {"lr": 0.01, "betas": (0.8, 0.99), "eps": 1e-8, "weight_decay": 0.1}),
        (
            "adamw",
            torch.optim.AdamW,
            {"lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": True},
        ),
        ("sgd", torch.optim.SGD, {"lr": 0.1}),
        ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
        ("sgd", torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ]


@pytest.mark.parametrize("kind,cls,hyper", _optimizer_cases())
def test_optimizer_reference_equals_torch_in_float64(kind, cls, hyper):
    g = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(5, 3, generator=g, dtype=torch.float64))
    opt = cls([p], **hyper)
    spec = {"kind": kind, **{k: v for k, v in {**_defaults(cls), **hyper}.items() if k in _keys(kind)}}
    st, value = {}, p.detach().numpy().copy()
    for _ in range(3):
        p.grad = torch.randn(5, 3, generator=g, dtype=torch.float64)
        value, st = rs.optimizer_step(value, p.grad.numpy().copy(), st, spec, rs.EXACT)
        opt.step()
        np.testing.assert_allclose(value, p.detach().numpy(), rtol=1e-14, atol=1e-15)
    for key, t in opt.state[p].items():
        np.testing.assert_allclose(np.asarray(st[key], dtype=np.float64), t.double().numpy(), rtol=1e-14, atol=1e-15)


def _defaults(cls) -> dict:
    return {k: v for k, v in cls([torch.nn.Parameter(torch.zeros(1))]).defaults.items()}


def _keys(kind: str) -> tuple:
    if kind == "sgd":
        return ("lr", "momentum", "dampening", "weight_decay", "nesterov")
    return ("lr", "betas", "eps", "weight_decay", "amsgrad")


def _layer(dtype: str, seed: int = 0, r: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    L = {
        "Ap": rng.standard_normal((r, 6)),
        "Bp": rng.standard_normal((5, r)),
        "gAp": rng.standard_normal((r, 6)),
        "gBp": rng.standard_normal((5, r)),
        "W": rng.standard_normal((5, 6)),
        "buffer": None,
        "s": 2.0,
        "merge_mode": "nearest",
        "dtypes": {"param": dtype, "weight": dtype, "work": "float64" if dtype == "float64" else "float32"},
    }
    L["stA"] = {"exp_avg": 0.1 * L["gAp"], "exp_avg_sq": 0.01 * L["gAp"] ** 2, "step": 1.0}
    L["stB"] = {"exp_avg": 0.1 * L["gBp"], "exp_avg_sq": 0.01 * L["gBp"] ** 2, "step": 1.0}
    for key in ("Ap", "Bp", "gAp", "gBp", "W"):  # stored values: exactly representable in the dtype
        L[key] = ref.round_to(L[key], dtype)
    return L


ADAMW = {"kind": "adamw", "lr": 0.01, "betas": (0.9, 0.999), "eps": 1e-4, "weight_decay": 0.01, "amsgrad": False}


@pytest.mark.parametrize("kind", ["reflora", "reflora_s", "scalora", "scaledgd"])
def test_tolerances_scale_with_the_unit_roundoff(kind):
    """Each tensor's tolerance is a small multiple of its dtype's rounding: far below the old 12.5% in bfloat16,
    and it shrinks by about the ratio of the unit roundoffs from bfloat16 to float32 to float64."""
    method = {"kind": kind, "kappa": 1.0, "mode": "hybrid", "compute": "float64", "rank_tol": 1e-10}
    worst = {}
    for dtype in ("bfloat16", "float32", "float64"):
        exp = rs.expect(kind, _layer(dtype), method, ADAMW, apply=True)
        assert exp["decision"]["ok"]
        rel = [tol / max(np.linalg.norm(v), 1e-300) for v, tol, _ in exp["tensors"].values() if np.linalg.norm(v) > 0]
        worst[dtype] = max(rel)
        assert worst[dtype] <= 16 * rs.SPREAD_MULTIPLE * ref.UNIT_ROUNDOFF[dtype], (dtype, worst[dtype])
    assert worst["bfloat16"] < 0.05 < 0.125
    assert worst["float64"] < worst["float32"] < worst["bfloat16"]


def test_a_plain_step_changes_no_gradient_and_no_weight():
    exp = rs.expect("scalora", _layer("float32"), {"kind": "scalora", "kappa": 1.0}, ADAMW, apply=False)
    L = _layer("float32")
    for stage in ("mid", "end"):
        np.testing.assert_array_equal(exp["tensors"][(stage, "W", None)][0], L["W"])
        np.testing.assert_array_equal(exp["tensors"][(stage, "gAp", None)][0], L["gAp"])
    np.testing.assert_array_equal(exp["tensors"][("mid", "Ap", None)][0], L["Ap"])


def test_decisions_from_grams_equal_the_factor_formulas():
    """The closed forms the oracle takes from Grams equal the reference's factor-based formulas."""
    rng = np.random.default_rng(3)
    A, B, G = (rng.standard_normal(s) for s in ((6, 2), (5, 2), (6, 5)))
    dA, dB = G @ B, G.T @ A  # gradients of one full-weight gradient: dB^T B = A^T G B = A^T dA
    K, lam = ref.column_system(A, B, dA, dB)
    q, q_K = ref.scalar_quantities(A, B, dA, dB), ref.scalar_quantities_of(K, lam)
    assert q == pytest.approx(q_K, rel=1e-12)
    alpha, beta, column, ok = ref.scalora_decision(K, lam, 1.0)
    a_h, b_h, c_h = ref.hybrid(A, B, dA, dB, 1.0)
    np.testing.assert_allclose(alpha, a_h, rtol=1e-12)
    np.testing.assert_allclose(beta, b_h, rtol=1e-12)
    assert (column, ok) == (c_h, True)
    sv = np.linalg.svd(B @ A.T, compute_uv=False)
    product = (sv[1] / sv[0]) ** 2
    assert ref.reflora_margin(A.T @ A, B.T @ B) == pytest.approx(min(ref.gram_ratio(A.T @ A), product), rel=1e-9)


def test_scalora_at_lora_init_keeps_b_and_a_stationary_point_takes_no_step():
    rng = np.random.default_rng(4)
    A, dA, dB = rng.standard_normal((6, 2)), np.zeros((6, 2)), rng.standard_normal((5, 2))
    K, lam = ref.column_system(A, np.zeros((5, 2)), dA, dB)
    alpha, beta, column, ok = ref.scalora_decision(K, lam, 1.0)
    assert ok and not column and np.all(beta == 1.0) and np.all(alpha > 0)
    K, lam = ref.column_system(A, rng.standard_normal((5, 2)), np.zeros((6, 2)), np.zeros((5, 2)))
    assert not ref.scalora_decision(K, lam, 1.0)[3]


def test_kahan_and_fp32_merges_keep_the_compensated_sum():
    """The merge buffer's expectation: ``W' - c' = W - c + inc`` (Kahan) and ``buffer' = buffer + inc`` (fp32)."""
    L = _layer("bfloat16")
    method = {"kind": "scalora", "kappa": 1.0, "mode": "hybrid", "compute": "float64"}
    d = rs.closed_form("scalora", L, method)
    inc = L["s"] * (L["Bp"] * (1 - d["alpha"] * d["beta"])) @ L["Ap"]
    for mode, buf in (("kahan", np.zeros_like(L["W"])), ("fp32", L["W"].copy())):
        exp = rs.expect("scalora", {**L, "merge_mode": mode, "buffer": buf}, method, ADAMW, apply=True)
        W, _, W_stored = exp["tensors"][("mid", "W", None)]
        b, _, b_stored = exp["tensors"][("mid", "buffer", None)]
        if mode == "kahan":
            np.testing.assert_allclose(W - b, L["W"] + inc, rtol=1e-12)
            # the compensation is stored in the weight's dtype: the sum holds to its rounding of c
            atol = (
                2 * ref.UNIT_ROUNDOFF["bfloat16"] * np.abs(b_stored).max()
                + 4 * ref.UNIT_ROUNDOFF["float32"] * np.abs(W).max()
            )
            np.testing.assert_allclose(W_stored - b_stored, L["W"] + inc, atol=atol)
            assert np.abs(W_stored - (L["W"] + inc)).max() > atol  # ... which the weight alone does not keep
        else:
            np.testing.assert_allclose(b, L["W"] + inc, rtol=1e-12)
            np.testing.assert_array_equal(W_stored, ref.round_to(b_stored, "bfloat16"))
