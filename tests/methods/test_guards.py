"""optlora.methods.guards: argument checks, the every-step checks, closures, merged adapters, range limits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build, forward_backward, lora_params, mlp_batch, mlp_loss, snapshot, tiny_mlp, train_steps

import optlora
from optlora.methods import guards

METHODS = {
    "reflora": lambda m, **kw: optlora.RefLoRA(m, **kw),
    "reflora_s": lambda m, **kw: optlora.RefLoRA(m, scalar=True, **kw),
    "scalora": lambda m, **kw: optlora.ScaLoRA(m, kappa=0.3, **kw),
    "scaledgd": lambda m, **kw: optlora.ScaledGD(m, **kw),
}


# ---------------------------------------------------------------------------------------- arguments
def test_check_int_accepts_integers_only():
    assert guards.check_int("n", np.int64(3), 0) == 3
    for bad in (True, 2.0, "2", -1, None):
        with pytest.raises(ValueError, match="n must be an int >= 0"):
            guards.check_int("n", bad, 0)


@pytest.mark.parametrize("kappa", [1e-13, 1e13, 1e100, 0.0, -1.0, math.nan, math.inf, True, "1", None])
def test_kappa_out_of_range_is_refused(kappa):
    with pytest.raises(ValueError, match=r"kappa must be a real number in \[1e-12, 1e\+12\]"):
        guards.check_kappa(kappa)


def test_kappa_range_ends_and_numpy_floats_are_accepted():
    assert guards.check_kappa(1e-12) == 1e-12 and guards.check_kappa(np.float32(2.0)) == 2.0
    assert optlora.ScaLoRA(tiny_mlp(), kappa=1e12).kappa == 1e12


@pytest.mark.parametrize("rank_tol", [0.0, -1.0, 1.0, math.nan, 1e-30])
def test_rank_tol_must_resolve_in_the_compute_dtype(rank_tol):
    with pytest.raises(ValueError, match="rank_tol"):
        optlora.RefLoRA(tiny_mlp(), rank_tol=rank_tol)
    with pytest.raises(ValueError, match="rank_tol"):
        optlora.ScaledGD(tiny_mlp(), rank_tol=rank_tol)
    with pytest.raises(ValueError, match="rank_tol"):  # below float32's resolution
        optlora.RefLoRA(tiny_mlp(), rank_tol=1e-10, compute_dtype=torch.float32)


@pytest.mark.parametrize(
    "kwargs", [{"seed": -1}, {"seed": 0.5}, {"skip_unsupported": 1}, {"warmup_steps": True}, {"interval": 2.0}]
)
def test_other_bad_arguments(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        optlora.ScaLoRA(tiny_mlp(), **kwargs)


# ---------------------------------------------------------------------------------------- every step
def test_amax_is_fused_ordered_and_propagates_nan():
    ts = [torch.tensor([1.0, -3.0]), torch.tensor([2.0], dtype=torch.bfloat16), torch.tensor([math.nan, 1.0])]
    ts.append(torch.tensor([-math.inf], dtype=torch.float64))
    out = guards.amax(ts)
    assert out.dtype == torch.float64 and out[:2].tolist() == [3.0, 2.0]
    assert math.isnan(out[2]) and out[3] == math.inf
    assert guards.amax([]).numel() == 0


def test_amax_of_empty_tensors_is_zero():
    """An FSDP2 rank may hold no rows of a factor or moment: its maximum is 0 (the max over ranks is unchanged)."""
    ts = [torch.zeros(0, 4), torch.tensor([-2.0, 1.0]), torch.zeros(3, 0, dtype=torch.bfloat16), torch.tensor([5.0])]
    assert guards.amax(ts).tolist() == [0.0, 2.0, 0.0, 5.0]
    assert guards.amax([torch.zeros(0)]).tolist() == [0.0]


@pytest.mark.parametrize("missing_grad", [False, True])
def test_nonfinite_layers_agree_sees_per_layer_flags_and_decides(missing_grad):
    """With ``agree`` (FSDP2: AND over the ranks) the per-layer flags go through it before the sync, in the
    layout every rank shares whichever gradients exist, and its answer decides: here another rank found a NaN."""
    model = tiny_mlp()
    method = optlora.RefLoRA(model)
    forward_backward(model, mlp_loss, mlp_batch())
    if missing_grad:
        method.factors[0].lora_A.grad = None
    seen = []

    def other_rank_found_nan_in_layer_1(flags):
        seen.append(flags.clone())
        return flags & (torch.arange(len(flags)) != 1)

    bad = guards.nonfinite_layers(method.factors, agree=other_rank_found_nan_in_layer_1)
    assert seen[0].dtype == torch.bool and seen[0].tolist() == [True] * len(method.factors)
    assert bad == [method.factors[1].name]
    method.factors[0].lora_B.grad.view(-1)[0] = math.nan  # and this rank's own NaN
    assert guards.nonfinite_layers(method.factors, agree=lambda flags: flags) == [method.factors[0].name]


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("where", ["warmup", "between"])
def test_nonfinite_gradient_on_a_plain_step_raises_before_anything_changes(name, where):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    warm, interval, steps = (5, 1, 1) if where == "warmup" else (0, 3, 1)
    method = METHODS[name](model, warmup_steps=warm, interval=interval).attach(opt)
    train_steps(model, opt, loss_fn, batch, steps)
    assert not method.is_due(method.steps + 1)
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    method.factors[0].lora_B.grad[0, 0] = math.nan
    before = snapshot(method, opt)
    with pytest.raises(RuntimeError, match=r"non-finite.*base_model\.model\.0\[default\].*Nothing was modified"):
        opt.step()
    after = snapshot(method, opt)
    for layer in before:
        for key in ("A", "B", "W"):
            np.testing.assert_array_equal(before[layer][key], after[layer][key])
        assert before[layer]["stA"].keys() == after[layer]["stA"].keys()
    assert method.steps == steps


def test_skip_mode_does_not_check_plain_steps():
    """on_nonfinite='skip': a warm-up step is the plain optimizer step, as without optlora (no sync)."""
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = optlora.RefLoRA(model, warmup_steps=5, on_nonfinite="skip").attach(opt)
    forward_backward(model, loss_fn, batch)
    method.factors[0].lora_A.grad[0, 0] = math.nan
    opt.step()
    assert method.steps == 1 and torch.isnan(method.factors[0].lora_A).any()


@pytest.mark.parametrize("name", list(METHODS))
def test_merged_adapter_between_backward_and_step_is_refused(name):
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.AdamW(lora_params(model), lr=0.01)
    method = METHODS[name](model, warmup_steps=1).attach(opt)
    train_steps(model, opt, loss_fn, batch, 1)
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    model.merge_adapter()
    before = snapshot(method, opt)
    with pytest.raises(RuntimeError, match="merged into their base weights.*unmerge_adapter"):
        opt.step()
    after = snapshot(method, opt)
    for layer in before:
        np.testing.assert_array_equal(before[layer]["W"], after[layer]["W"])
        np.testing.assert_array_equal(before[layer]["A"], after[layer]["A"])
    model.unmerge_adapter()
    opt.step()  # unmerged: the step goes through
    assert method.steps == 2


def test_merged_adapter_without_gradient_is_allowed():
    """Merging for evaluation after zero_grad(set_to_none=True) touches no trained parameter: no error."""
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, warmup_steps=0).attach(opt)
    model.merge_adapter()
    opt.zero_grad(set_to_none=True)
    opt.step()
    assert method.steps == 1 and method.method_steps == 0


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("keyword", [False, True])
def test_step_with_closure_applies_the_method(name, keyword):
    """``step(closure)`` evaluates the closure first, then the method: the same step as backward(); step()."""
    results = []
    for use_closure in (True, False):
        model, loss_fn, batch = build("mlp")
        opt = torch.optim.SGD(lora_params(model), lr=0.05, momentum=0.9)
        method = METHODS[name](model, warmup_steps=1).attach(opt)
        train_steps(model, opt, loss_fn, batch, 1)
        opt.zero_grad()
        if use_closure:

            def closure(model=model, opt=opt, batch=batch):
                opt.zero_grad()
                loss = mlp_loss(model, batch)
                loss.backward()
                return loss

            loss = opt.step(closure=closure) if keyword else opt.step(closure)
            assert torch.isfinite(loss)
        else:
            forward_backward(model, loss_fn, batch)
            opt.step()
        assert method.method_steps == 1
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_closure_evaluated_twice_raises():
    replaced_args, _ = guards.evaluate_closure((object(), lambda: torch.tensor(1.0)), {})
    evaluated = replaced_args[1]
    assert evaluated() == 1.0
    with pytest.raises(RuntimeError, match="more than once"):
        evaluated()
    assert guards.evaluate_closure((object(),), {}) is None


# ---------------------------------------------------------------------------------------- range
def test_multiplier_limits():
    amax = torch.tensor([1.0, 0.0, 1e30, math.nan], dtype=torch.float64)
    lo, hi = guards.multiplier_limits(amax, 1, torch.float32, keep_normal=True)
    f32 = torch.finfo(torch.float32)
    assert hi[0] == pytest.approx(f32.max / 2) and hi[1] == pytest.approx(f32.max)  # only the multiplier itself
    assert hi[2] == pytest.approx(f32.max / 2 / 1e30)
    assert lo[0] == pytest.approx(f32.tiny) and lo[2] == pytest.approx(f32.tiny**1.0)  # the multiplier's own floor
    assert lo[3] == math.inf and hi[3] == 0  # NaN state: no multiplier is safe
    lo2, hi2 = guards.multiplier_limits(torch.tensor([4.0], dtype=torch.float64), 2, torch.bfloat16)
    assert hi2[0] == pytest.approx(min(math.sqrt(torch.finfo(torch.bfloat16).max / 8), math.sqrt(f32.max)))
    m = torch.tensor([[1.0, 0.0], [1e20, 1.0], [math.inf, 1.0]])
    ok = guards.within_limits(m, [(torch.full((3, 2), 1e-3, dtype=torch.float64), torch.full((3, 2), 1e3))])
    assert ok.tolist() == [True, False, False]  # 0 is exact; 1e20 and inf are out of range


def test_all_layers_skipped_is_not_a_method_step_and_is_reported():
    model, loss_fn, batch = build("mlp")
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = optlora.ScaLoRA(model, warmup_steps=0, on_nonfinite="skip").attach(opt)
    forward_backward(model, loss_fn, batch)
    for f in method.factors:
        f.lora_B.grad[0, 0] = math.inf
    opt.step()
    stats = method.stats()
    assert method.method_steps == 0 and stats["skipped"]["nonfinite"] == 2
    assert set(stats["last_skip_reasons"].values()) == {"nonfinite"}
    assert "has not been applied" in stats["note"] and "every layer was skipped" in stats["note"]


def test_kappa_too_large_for_the_weights_is_skipped_with_a_warning():
    model = tiny_mlp(torch.float32)
    batch = mlp_batch(torch.float32)
    opt = torch.optim.SGD(lora_params(model), lr=0.0)
    method = optlora.ScaLoRA(model, warmup_steps=0, kappa=1e6).attach(opt)
    with torch.no_grad():
        y0 = model(batch[0]).clone()
    forward_backward(model, mlp_loss, batch)
    with pytest.warns(RuntimeWarning, match="kappa=1e\\+06.*Try a smaller kappa"):
        opt.step()
    with torch.no_grad():
        assert torch.equal(model(batch[0]), y0)
    assert method.stats()["skipped"]["out_of_range"] == 2 and method.method_steps == 0


def test_short_run_note():
    model = tiny_mlp()
    opt = torch.optim.SGD(lora_params(model), lr=0.01)
    method = optlora.RefLoRA(model, warmup_steps=10).attach(opt)
    assert "note" not in method.stats()
    train_steps(model, opt, mlp_loss, mlp_batch(), 2)
    assert "all 2 steps were warm-up (warmup_steps=10)" in method.stats()["note"]
    assert "will never be applied" in method.never_applied_note(planned_steps=10)
    assert method.never_applied_note(planned_steps=11) is not None  # still nothing applied so far
