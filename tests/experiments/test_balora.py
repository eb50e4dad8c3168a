"""BaLoRA's projection: keeps B A, balances A A^T = B^T B, idempotent; the baselines train through the Trainer."""

from __future__ import annotations

import pytest
import torch

from optlora_experiments import balora, baselines, finetune
from optlora_experiments.models import tiny_classifier, tiny_tokenizer


def _pair(r=4, n_in=12, n_out=9, seed=0, scale_b=1e-2):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(r, n_in, generator=g, dtype=torch.float64)
    b = scale_b * torch.randn(n_out, r, generator=g, dtype=torch.float64)  # unbalanced: B much smaller than A
    return a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_keeps_the_product_balances_and_is_idempotent(seed):
    a, b = _pair(seed=seed)
    a2, b2 = balora.balance(a, b)
    assert a2.dtype == b2.dtype == torch.float64 and a2.shape == a.shape and b2.shape == b.shape
    prod = b @ a
    assert torch.allclose(b2 @ a2, prod, rtol=0, atol=1e-13 * prod.abs().max())
    gram_a, gram_b = a2 @ a2.T, b2.T @ b2
    assert torch.allclose(gram_a, gram_b, rtol=0, atol=1e-12 * gram_a.abs().max())
    assert not torch.allclose(a @ a.T, b.T @ b, atol=1e-3)  # it was not balanced before
    a3, b3 = balora.balance(a2, b2)
    assert torch.allclose(a3, a2, rtol=0, atol=1e-12) and torch.allclose(b3, b2, rtol=0, atol=1e-12)
    # the singular values of B A split evenly: A' A'^T = diag(sigma(B A))
    sigma = torch.linalg.svdvals(prod)[: a.shape[0]]
    assert torch.allclose(torch.linalg.eigvalsh(gram_a).flip(0), sigma, rtol=1e-10)


def test_projection_rejects_bad_shapes_and_keeps_the_dtype():
    with pytest.raises(ValueError, match="one rank r"):
        balora.balance(torch.zeros(3, 5), torch.zeros(4, 2))
    a, b = _pair()
    a2, b2 = balora.balance(a.float(), b.float())
    assert a2.dtype == torch.float32 and torch.allclose(b2 @ a2, (b @ a).float(), atol=1e-6)


def test_the_hook_projects_after_every_step_and_leaves_the_adam_state():
    tok = tiny_tokenizer()
    setup = baselines.build("balora", tiny_classifier(tok, hidden=16, layers=1), task_type="SEQ_CLS", lr=1e-2, rank=2)
    pairs = balora.lora_pairs(setup.model)
    assert pairs and setup.info["balora_pairs"] == len(pairs)
    opt = setup.loop_optimizer(1e-2)
    assert opt is setup.optimizer and isinstance(opt, torch.optim.AdamW)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        ids = torch.randint(5, len(tok), (8, 10), generator=g)
        loss = setup.model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.randint(0, 2, (8,))).loss
        loss.backward()
        before = {name: (a.detach().clone(), b.detach().clone()) for name, a, b in pairs}
        opt.step()
        opt.zero_grad(set_to_none=True)
        for name, a, b in pairs:
            ga, gb = a @ a.T, b.T @ b
            assert torch.allclose(ga, gb, atol=1e-5 * max(1.0, float(ga.abs().max()))), (step, name)
            assert opt.state[a]["step"] == step + 1 and "exp_avg" in opt.state[a]  # the state is AdamW's own
        assert all(not torch.equal(a, before[n][0]) for n, a, _ in pairs)  # the factors moved


def test_riemannian_wraps_adamw_with_pefts_preconditioner():
    tok = tiny_tokenizer()
    setup = baselines.build("riemannian", tiny_classifier(tok, hidden=16, layers=1), task_type="SEQ_CLS", lr=1e-3)
    assert isinstance(setup.optimizer, torch.optim.AdamW) and setup.method is None
    assert setup.info["riemannian_reg"] == 0.01 and setup.loop_optimizer(1e-3) is setup.optimizer


def test_both_train_through_the_trainer_harness(data_root, tmp_path):
    recs = finetune.run_finetune(
        "sst2", ["lora", "riemannian", "balora"], out_dir=tmp_path, data_dir=data_root, holdout_frac=0.0,
        model="tiny", steps=4, batch_size=8, progress=False, eval_batch_size=8, plots=False, telemetry_every=2,
    )  # fmt: skip
    by = {r["method"]: r for r in recs}
    for m in ("riemannian", "balora"):
        losses = [s["loss"] for s in by[m]["steps"]]
        assert len(losses) == 4 and all(v == v for v in losses) and by[m]["final"]["score"] is not None
        assert by[m]["steps"][0]["loss"] == by["lora"]["steps"][0]["loss"]  # same init and first batch
        assert [s["loss"] for s in by[m]["steps"][1:]] != [s["loss"] for s in by["lora"]["steps"][1:]]
        assert by[m]["config"]["method_info"]["rank"] == 8 and by[m]["steps"][-1]["rank_mean"] > 0  # it learned
    assert by["balora"]["steps"][0]["lr"] == 0.0  # the warm-up's first step: B stays 0, the projection waits


def test_a_zero_factor_is_not_projected_to_zero():
    a, b = _pair()
    pairs = [("l", a.clone(), torch.zeros_like(b))]
    assert balora.project_model(pairs) == 1 and torch.equal(pairs[0][1], a)  # A kept: (A, 0) -> (0, 0) would be dead
    pairs = [("l", a.clone(), b.clone())]
    assert balora.project_model(pairs) == 0 and torch.allclose(pairs[0][2] @ pairs[0][1], b @ a, atol=1e-12)
