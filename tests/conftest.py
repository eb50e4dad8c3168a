"""Shared builders for the core test-suite: tiny PEFT models and numpy snapshots.

Every model here is built from a config (no download) and is small enough that one
optimizer step takes milliseconds. ``snapshot`` turns the LoRA state a method sees into
float64 numpy arrays for the independent reference in :mod:`optlora.testing.reference`.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub reads it; every model here is built locally
sys.path.insert(0, os.path.dirname(__file__))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402

from optlora.testing import models  # noqa: E402

# One intra-op thread per pytest-xdist worker: CI has 2 cores and runs 2 workers; more threads
# oversubscribe the cores and make tiny-model steps up to ~100x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
    yield


def tiny_mlp(
    dtype=torch.float64,
    *,
    r=2,
    lora_alpha=4,
    random_b=True,
    use_rslora=False,
    rank_pattern=None,
    dims=(6, 5, 4),
    seed=0,
    autocast_adapter_dtype=False,
    **lora_kwargs,
):
    """``Linear(d0, d1) -> Tanh -> Linear(d1, d2)`` with LoRA on both linears (names "0" and "2")."""
    torch.manual_seed(seed)
    d0, d1, d2 = dims
    base = nn.Sequential(nn.Linear(d0, d1), nn.Tanh(), nn.Linear(d1, d2)).to(dtype)
    cfg = LoraConfig(
        r=r,
        lora_alpha=lora_alpha,
        target_modules=["0", "2"],
        lora_dropout=0.0,
        init_lora_weights=False if random_b else True,
        use_rslora=use_rslora,
        rank_pattern=rank_pattern or {},
        **lora_kwargs,
    )
    # PEFT upcasts half-precision adapters to float32 by default; keep every parameter in ``dtype`` unless asked
    return get_peft_model(base, cfg, autocast_adapter_dtype=autocast_adapter_dtype)


def mlp_batch(dtype=torch.float64, dims=(6, 5, 4), n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dims[0], generator=g).to(dtype)
    y = torch.randn(n, dims[-1], generator=g).to(dtype)
    return x, y


def mlp_loss(model, batch):
    x, y = batch
    return (model(x) - y).pow(2).mean()


def tiny_gpt2(dtype=torch.float64, *, r=2, random_b=True, seed=0):
    """One-layer GPT-2 (``Conv1D`` => ``fan_in_fan_out=True``)."""
    model = models.tiny_gpt2(embd=8, layers=1, heads=2, vocab=16, positions=8, dtype=dtype, seed=seed)
    lcfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["c_attn", "c_proj", "c_fc"],
        fan_in_fan_out=True,
        lora_dropout=0.0,
        init_lora_weights=False if random_b else True,
    )
    return get_peft_model(model, lcfg, autocast_adapter_dtype=False)


def tiny_llama(dtype=torch.float64, *, r=2, random_b=True, seed=0):
    """One-layer Llama with LoRA on every linear except the head."""
    model = models.tiny_llama(
        hidden=16, intermediate=24, layers=1, heads=2, kv_heads=1, vocab=32, max_positions=16, dtype=dtype, seed=seed
    )
    lcfg = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        init_lora_weights=False if random_b else True,
    )
    return get_peft_model(model, lcfg, autocast_adapter_dtype=False)


def lm_batch(vocab, n=2, t=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def lora_params(model):
    return [p for p in model.parameters() if p.requires_grad]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().copy()


def snapshot(method, optimizer=None) -> dict:
    """Per adapter: factors, grads, base weight, scale, layout and optimizer state, as float64 numpy."""
    out = {}
    for f in method.factors:
        w = getattr(f.module.get_base_layer(), "weight", None)  # quantised bases may have none (GPTQ: qweight)
        d = {
            "A": np64(f.lora_A),
            "B": np64(f.lora_B),
            "gA": None if f.lora_A.grad is None else np64(f.lora_A.grad),
            "gB": None if f.lora_B.grad is None else np64(f.lora_B.grad),
            "W": None if w is None else np64(w),
            "s": f.scaling,
            "fifo": f.fan_in_fan_out,
        }
        if optimizer is not None:
            for key, p in (("stA", f.lora_A), ("stB", f.lora_B)):
                st = optimizer.state.get(p, {})
                d[key] = {k: (np64(v) if v.dim() else float(v)) for k, v in st.items() if isinstance(v, torch.Tensor)}
                if "step" in d[key]:
                    d[key]["step"] = int(d[key]["step"])
        out[f.name] = d
    return out


def forward_backward(model, loss_fn, batch):
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach()


def observed_step(method, opt, model, loss_fn, batch) -> tuple[dict, dict]:
    """One optimizer step on fresh gradients; :func:`snapshot` right before ``opt.step()`` and after it."""
    opt.zero_grad()
    forward_backward(model, loss_fn, batch)
    before = snapshot(method, opt)
    opt.step()
    return before, snapshot(method, opt)


def tiny_mlp_two_adapters(dtype=torch.float64, seed=0):
    """Two trainable adapters on layer "0" (ranks 2 and 1) and rank 3 on layer "2" via ``rank_pattern``."""
    model = tiny_mlp(dtype, r=2, rank_pattern={"2": 3}, seed=seed)
    model.add_adapter("second", LoraConfig(r=1, lora_alpha=3, target_modules=["0"], init_lora_weights=False))
    model.base_model.set_adapter(["default", "second"])
    model.to(dtype)
    return model


MODEL_KINDS = ["mlp", "mlp_rslora", "mlp_two_adapters", "gpt2", "llama"]


def build(kind: str, dtype=torch.float64, seed=0, **kw):
    """``(model, loss_fn, batch)`` for one of ``MODEL_KINDS``."""
    if kind == "mlp":
        return tiny_mlp(dtype, seed=seed, **kw), mlp_loss, mlp_batch(dtype)
    if kind == "mlp_rslora":
        return tiny_mlp(dtype, r=3, use_rslora=True, seed=seed, **kw), mlp_loss, mlp_batch(dtype)
    if kind == "mlp_two_adapters":
        return tiny_mlp_two_adapters(dtype, seed=seed), mlp_loss, mlp_batch(dtype)
    if kind == "gpt2":
        return tiny_gpt2(dtype, seed=seed, **kw), lm_loss, lm_batch(16)
    if kind == "llama":
        return tiny_llama(dtype, seed=seed, **kw), lm_loss, lm_batch(32)
    raise ValueError(kind)


OPTIMIZERS = {
    "sgd": (torch.optim.SGD, {"lr": 0.05}),
    "sgd_momentum": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}),
    "adamw": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    "adamw_loop": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "foreach": False}),
    "adamw_fused": (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1, "fused": True}),
}


def make_optimizer(name, model):
    cls, kw = OPTIMIZERS[name]
    return cls(lora_params(model), **kw)


def reference_optimizer_step(name, p, g, st):
    """The optimizer's update in numpy (plain SGD, or AdamW from optlora.testing.reference)."""
    from optlora.testing import reference as ref

    cls, kw = OPTIMIZERS[name]
    if cls is torch.optim.SGD:
        mu = kw.get("momentum", 0.0)
        if not mu:
            return p - kw["lr"] * g, st
        buf = g if st.get("momentum_buffer") is None else mu * st["momentum_buffer"] + g
        return p - kw["lr"] * buf, {"momentum_buffer": buf}
    return ref.adamw_step(p, g, st, lr=kw["lr"], weight_decay=kw["weight_decay"])


def train_steps(model, opt, loss_fn, batch, n):
    for _ in range(n):
        opt.zero_grad()
        forward_backward(model, loss_fn, batch)
        opt.step()
