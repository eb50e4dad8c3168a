"""Every fine-tuning method trains a tiny model a few steps; ScaLoRA's accumulated update leaves rank r."""

from __future__ import annotations

import pytest
import torch

import optlora
from optlora_experiments import baselines
from optlora_experiments.models import tiny_classifier, tiny_tokenizer
from optlora_experiments.telemetry import UpdateRankTracker, column_fraction, numerical_rank


def _batch(tok, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, len(tok), (n, 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 2, (n,), generator=g)}


def _train(setup, tok, steps, lr=1e-2):
    losses = []
    opt = setup.loop_optimizer(lr)
    for s in range(steps):
        loss = setup.model(**_batch(tok, seed=s)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name", baselines.METHODS)
def test_every_method_trains(name):
    if name == "galore" and baselines.galore_unavailable():
        pytest.skip(baselines.galore_unavailable())
    tok = tiny_tokenizer()
    model = tiny_classifier(tok, hidden=16, layers=1)
    setup = baselines.build(name, model, task_type="SEQ_CLS", lr=1e-2, rank=2, warmup_steps=1, interval_i=2)
    before = {n: p.detach().clone() for n, p in setup.model.named_parameters() if p.requires_grad}
    losses = _train(setup, tok, 3)
    assert all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n, p in setup.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert moved, "no trainable parameter changed"
    if name in baselines.OPTLORA_METHODS:
        kind = optlora.ScaLoRA if name.startswith("scalora") else optlora.RefLoRA
        assert isinstance(setup.method, kind) and setup.method.name == name
        assert setup.method.steps == 3 and setup.method.method_steps >= 1
    else:
        assert setup.method is None
    if name == "full":
        assert setup.trainable_params == sum(p.numel() for p in model.parameters())
    if name in ("lora", "lora_r32", "dora", "pissa"):
        assert any("lora_" in n for n in moved) and all("lora_" in n or "classifier" in n for n in moved)
    if name == "lora_r32":
        assert setup.info["rank"] == 32 and setup.info["alpha"] == 2 * 32  # alpha / r = 2 as at rank 2
    if name == "galore":
        assert setup.training_args["optim"] == "galore_adamw" and "rank=2" in setup.training_args["optim_args"]


def test_loraplus_uses_larger_lr_for_b():
    tok = tiny_tokenizer()
    setup = baselines.build("loraplus", tiny_classifier(tok, hidden=16, layers=1), task_type="SEQ_CLS", lr=1e-3, rank=2)
    lrs = {g["lr"] for g in setup.optimizer.param_groups if g["params"]}
    assert 1e-3 in lrs and 16e-3 in lrs
    assert setup.loop_optimizer(1e-3) is setup.optimizer  # the Trainer gets it through optimizers=(opt, None)


def test_build_rejects_bad_input():
    tok = tiny_tokenizer()
    with pytest.raises(ValueError, match="unknown method"):
        baselines.build("adalora", tiny_classifier(tok), task_type="SEQ_CLS", lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        baselines.build("lora", tiny_classifier(tok), task_type="SEQ_CLS", lr=0.0)


def test_numerical_rank_of_known_matrices():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(20, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 15, generator=g, dtype=torch.float64)
    assert numerical_rank(m, 1e-6) == 3
    assert numerical_rank(torch.zeros(4, 4, dtype=torch.float64), 1e-3) == 0
    noisy = m + 1e-9 * torch.randn(20, 15, generator=g, dtype=torch.float64)
    assert numerical_rank(noisy, 1e-6) == 3 and numerical_rank(noisy, 1e-14) == 15


def test_update_rank_grows_above_r_for_scalora_only():
    tok = tiny_tokenizer()
    r, steps = 2, 12
    out = {}
    for name in ("lora", "scalora"):
        model = tiny_classifier(tok, hidden=16, layers=1, seed=0)
        setup = baselines.build(name, model, task_type="SEQ_CLS", lr=1e-2, rank=r, warmup_steps=2)
        tracker = UpdateRankTracker(setup.model, rtol=1e-6)
        assert tracker.summary()["rank_max"] == 0  # nothing moved yet
        _train(setup, tok, steps)
        out[name] = tracker.summary()
        if name == "scalora":
            frac = column_fraction(setup.method)
            assert frac is not None and 0.0 <= frac <= 1.0
    assert out["lora"]["rank_max"] <= r and out["lora"]["lora_rank"] == r
    assert out["scalora"]["rank_mean"] > r
