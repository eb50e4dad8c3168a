"""ScaledGD (optlora.methods.scaledgd): the baseline of RefLoRA Fig. 2, checked against Tong et al.'s update."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

from optlora import ScaledGD


def _peft_layer(r=2, alpha=4, fin=7, fout=5):
    torch.manual_seed(0)
    base = torch.nn.Sequential()
    base.add_module("w", torch.nn.Linear(fin, fout, bias=False))
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["w"])).double()
    layer = model.base_model.model.w
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return model, layer


def test_scaledgd_step_matches_tong_et_al_in_effective_coordinates():
    model, layer = _peft_layer()  # scaling s = 2
    s = layer.scaling["default"]
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x, y = torch.randn(9, 7, dtype=torch.float64), torch.randn(9, 5, dtype=torch.float64)
    opt = torch.optim.SGD([A, B], lr=0.1)
    ScaledGD(model, warmup_steps=0).attach(opt)
    loss = 0.5 * (model(x) - y).square().sum()
    loss.backward()
    A0, B0, gA, gB = A.detach().clone(), B.detach().clone(), A.grad.clone(), B.grad.clone()
    opt.step()
    # paper notation on effective factors: A_eff = sqrt(s) lora_A^T (in x r), B_eff = sqrt(s) lora_B (out x r)
    Ae, Be = s**0.5 * A0.T, s**0.5 * B0
    dAe, dBe = gA.T / s**0.5, gB / s**0.5  # gradients w.r.t. the effective factors
    eta = s * 0.1  # SGD step on lora params = step s * lr on effective ones
    Ae_new = Ae - eta * dAe @ torch.linalg.inv(Be.T @ Be)
    Be_new = Be - eta * dBe @ torch.linalg.inv(Ae.T @ Ae)
    torch.testing.assert_close(s**0.5 * A.detach().T, Ae_new)
    torch.testing.assert_close(s**0.5 * B.detach(), Be_new)


def test_scaledgd_leaves_rank_deficient_layer_to_plain_step():
    model, layer = _peft_layer()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    with torch.no_grad():
        B.zero_()  # the LoRA init: B^T B singular
    opt = torch.optim.SGD([A, B], lr=0.1)
    method = ScaledGD(model, warmup_steps=0).attach(opt)
    (0.5 * (model(torch.randn(4, 7, dtype=torch.float64)) - 1).square().sum()).backward()
    gB = B.grad.clone()
    B0 = B.detach().clone()
    opt.step()
    torch.testing.assert_close(B.detach(), B0 - 0.1 * gB)
    assert method.stats()["last_skipped_layers"] == ["base_model.model.w[default]"]
