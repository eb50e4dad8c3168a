"""Fault cases of issue #8 beyond one injected value: tied weights, bad arguments and misuse of the API.

Part of the catalogue of :mod:`optlora.testing.fault_cases` (which lists every case); each case returns an
:class:`~optlora.testing.faults.Outcome` judged by the whole-state oracle where a step is observed.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial

import torch

from .. import RefLoRA, ScaLoRA, make_method
from .faults import METHODS, Case, Outcome, Setup, classify, expect_error, expected, loss, observe, run_step, tiny_model
from .oracle import capture, differences


# ---------------------------------------------------------------------------------------- tied weights
def _tied_llama(targets, **lora):
    import peft

    from .models import tiny_llama

    base = tiny_llama(hidden=16, intermediate=24, layers=1, vocab=32, tie_embeddings=True)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **lora)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "tied layer is part of the adapter" warning
        return peft.get_peft_model(base, cfg)


def _function_kept(build_model: Callable, method_name: str, **options) -> Outcome:
    """At ``lr = 0`` a method's step must leave every output (and the embedding) unchanged, to rounding, and
    the whole state as the oracle expects it."""
    model = build_model()
    ids = torch.randint(0, 32, (2, 6), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skip_unsupported's warning
        method = make_method(method_name, model, warmup_steps=0, **options).attach(opt)
    with torch.no_grad():
        y0 = model(input_ids=ids).logits.double()
    model(input_ids=ids, labels=ids).loss.backward()
    outcome = classify(method, *observe(method, opt, opt.step))
    with torch.no_grad():
        y1 = model(input_ids=ids).logits.double()
    change = float((y1 - y0).norm() / y0.norm())
    if outcome.kind == "corrupt" or change > 1e-5:
        return Outcome("corrupt", f"relative output change {change:.2e}; {outcome.detail}", outcome.known)
    return Outcome(outcome.kind, f"relative output change {change:.1e}", ratio=outcome.ratio)


def _shared_linear(kind: str):
    """``"elsewhere"``: a LoRA layer's ``nn.Linear`` is also used without LoRA; ``"two_lora"``: two LoRA
    layers on one weight; ``"reused"``: one LoRA layer used twice (legitimate: its function is one)."""
    import peft
    from torch import nn

    torch.manual_seed(0)
    lin = nn.Linear(6, 6)
    if kind == "elsewhere":
        base = nn.Sequential(lin, nn.Tanh(), lin)
    elif kind == "two_lora":
        other = nn.Linear(6, 6)
        other.weight = lin.weight
        base = nn.Sequential(lin, nn.Tanh(), other)
    else:
        base = nn.Sequential(lin)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"] if kind != "reused" else ["0"]))
    if kind == "reused":
        model.base_model.model.add_module("1", nn.Tanh())
        model.base_model.model.add_module("2", model.base_model.model[0])
    return model


def _reused_lora_keeps_function() -> Outcome:
    model = _shared_linear("reused")
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.3)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    method = ScaLoRA(model, warmup_steps=0).attach(opt)
    with torch.no_grad():
        y0 = model(x).double()
    model(x).pow(2).sum().backward()
    outcome = classify(method, *observe(method, opt, opt.step))
    with torch.no_grad():
        change = float((model(x).double() - y0).norm() / y0.norm())
    if outcome.kind != "applied" or change > 1e-5:
        return Outcome("corrupt", f"relative output change {change:.1e}; {outcome.kind}: {outcome.detail}")
    return Outcome("applied", f"relative output change {change:.1e}", ratio=outcome.ratio)


def tied_cases() -> list[Case]:
    lm_head = partial(_tied_llama, ["q_proj", "lm_head"])
    return [
        Case("tied weights", "ScaLoRA, LoRA on a tied lm_head", partial(expect_error, lambda: ScaLoRA(lm_head()))),
        Case(
            "tied weights",
            "ScaLoRA-I, LoRA on a tied lm_head",
            partial(expect_error, lambda: make_method("scalora_i", lm_head())),
        ),
        Case("tied weights", "RefLoRA, LoRA on a tied lm_head", partial(_function_kept, lm_head, "reflora")),
        Case("tied weights", "RefLoRA-S, LoRA on a tied lm_head", partial(_function_kept, lm_head, "reflora_s")),
        Case(
            "tied weights",
            "ScaLoRA skip_unsupported=True on a tied lm_head (plain LoRA there)",
            partial(_function_kept, lm_head, "scalora", skip_unsupported=True),
        ),
        Case(
            "tied weights",
            "ScaLoRA, LoRA on an nn.Linear also used without LoRA",
            partial(expect_error, lambda: ScaLoRA(_shared_linear("elsewhere"))),
        ),
        Case(
            "tied weights",
            "ScaLoRA, two LoRA layers on one shared weight",
            partial(expect_error, lambda: ScaLoRA(_shared_linear("two_lora"))),
        ),
        Case("tied weights", "ScaLoRA, one LoRA layer used twice", _reused_lora_keeps_function),
    ]


# ---------------------------------------------------------------------------------------- arguments
BAD_ARGUMENTS = [
    ("scalora", {"kappa": 1e100}),
    ("scalora", {"kappa": 1e-30}),
    ("scalora", {"kappa": float("nan")}),
    ("scalora", {"kappa": float("inf")}),
    ("scalora", {"kappa": -1.0}),
    ("scalora", {"kappa": 0}),
    ("scalora", {"kappa": True}),
    ("scalora", {"kappa": "1"}),
    ("scalora", {"mode": "nnls"}),
    ("scalora", {"merge_precision": "fp8"}),
    ("scalora", {"seed": -1}),
    ("scalora", {"seed": 1.5}),
    ("reflora", {"warmup_steps": -1}),
    ("reflora", {"warmup_steps": 2.0}),
    ("reflora", {"warmup_steps": True}),
    ("reflora", {"interval": 0}),
    ("scalora_i", {"interval": False}),
    ("reflora", {"on_nonfinite": "ignore"}),
    ("reflora", {"compute_dtype": torch.bfloat16}),
    ("reflora", {"skip_unsupported": "yes"}),
    ("reflora", {"rank_tol": 0.0}),
    ("reflora", {"rank_tol": -1.0}),
    ("reflora", {"rank_tol": 1.0}),
    ("reflora", {"rank_tol": float("nan")}),
    ("reflora_s", {"rank_tol": 1e-20, "compute_dtype": torch.float32}),
    ("scaledgd", {"rank_tol": 2.0}),
]


def argument_cases() -> list[Case]:
    return [
        Case("arguments", f"{m}({', '.join(f'{k}={v!r}' for k, v in kw.items())})", partial(_bad_argument, m, kw))
        for m, kw in BAD_ARGUMENTS
    ]


def _bad_argument(method: str, kwargs: dict) -> Outcome:
    """Refused at construction with a clear error, and the model as it was."""
    model, _ = tiny_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = expect_error(lambda: make_method(method, model, **kwargs))
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, state[k])]
    return Outcome("corrupt", f"refused, but changed {changed[:4]}") if changed else outcome


# ---------------------------------------------------------------------------------------- misuse
def _closure_step(method_name: str, keyword: bool) -> Outcome:
    """``step(closure)`` must take the method's step: the whole state bit-identical to ``backward(); step()``'s,
    which the oracle judges."""
    finals, outcome = [], None
    for use_closure in (True, False):
        model, method, opt, batch = Setup(method_name, plain=1, options={"interval": 1}).build()
        opt.zero_grad()
        if use_closure:

            def closure(model=model, batch=batch, opt=opt):
                opt.zero_grad()
                value = loss(model, batch)
                value.backward()
                return value

            opt.step(closure=closure) if keyword else opt.step(closure)
        else:
            loss(model, batch).backward()
            outcome = classify(method, *observe(method, opt, opt.step))
        finals.append(capture(method, opt))
    changed = differences(*finals)
    if outcome.kind == "corrupt" or changed:
        return Outcome("corrupt", f"differs from backward+step in {changed[:4]}; {outcome.detail}", outcome.known)
    return Outcome(outcome.kind, "bit-identical to backward+step", ratio=outcome.ratio)


def _merged_adapter(method_name: str) -> Outcome:
    model, method, opt, _ = Setup(method_name).build()
    model.merge_adapter()
    return expected(classify(method, *observe(method, opt, opt.step)), ("error",))


def _all_layers_skipped(method_name: str) -> Outcome:
    def inject(model, method, opt):
        for f in method.factors:
            f.lora_A.grad.view(-1)[0] = math.nan

    return run_step(Setup(method_name, options={"on_nonfinite": "skip"}), inject, ("skip",))


def _short_run(method_name: str) -> Outcome:
    model, method, opt, batch = Setup(method_name, plain=2, options={"warmup_steps": 10}).build()
    outcome = classify(method, *observe(method, opt, opt.step))  # a third step, still in the warm-up
    note = method.stats().get("note", "")
    if outcome.kind == "corrupt" or "warmup_steps=10" not in note or method.method_steps:
        return Outcome("corrupt", f"{outcome.kind}: {outcome.detail}; note: {note[:120]}", outcome.known)
    return Outcome("plain", note[:120], ratio=outcome.ratio)


def _gradscaler_overflow() -> Outcome:
    model, method, opt, batch = Setup("scalora", plain=1).build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    opt.zero_grad()
    scaler.scale(loss(model, batch)).backward()
    method.factors[0].lora_A.grad.view(-1)[0] = math.inf
    scaler.unscale_(opt)  # GradScaler's own division of the gradients, before the observed call
    before, mid, after, exc = observe(method, opt, lambda: scaler.step(opt))
    changed = differences(before, after)
    if exc is not None or mid is not None or changed:
        return Outcome("corrupt", f"the skipped step changed {changed[:4]} (exception: {exc!r})")
    return Outcome("skip", "GradScaler skipped the step; nothing changed, the method did not count it")


def _adam_own_keys() -> Outcome:
    class OwnKeys(torch.optim.Adam):
        def step(self, closure=None):
            for group in self.param_groups:
                for q in group["params"]:
                    st = self.state[q]
                    st["m"] = st.get("m", torch.zeros_like(q)) + q.grad
                    q.data.add_(st["m"], alpha=-1e-3)

    model, batch = tiny_model()
    opt = OwnKeys([p for p in model.parameters() if p.requires_grad])
    method = ScaLoRA(model, warmup_steps=1).attach(opt)
    for _ in range(2):
        opt.zero_grad()
        loss(model, batch).backward()
        if method.steps == 1:
            return expected(classify(method, *observe(method, opt, opt.step)), ("error",))
        opt.step()
    return Outcome("corrupt", "unreachable")


def _attach_errors() -> list[Case]:
    def lbfgs():
        model, _ = tiny_model()
        RefLoRA(model).attach(torch.optim.LBFGS([p for p in model.parameters() if p.requires_grad]))

    def twice():
        model, _ = tiny_model()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        RefLoRA(model).attach(opt)
        ScaLoRA(model).attach(opt)

    def no_lora_params():
        model, _ = tiny_model()
        RefLoRA(model).attach(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))

    return [
        Case("misuse", "attach to LBFGS (re-evaluates the closure)", partial(expect_error, lbfgs)),
        Case("misuse", "two methods on one optimizer", partial(expect_error, twice)),
        Case("misuse", "optimizer without the LoRA parameters", partial(expect_error, no_lora_params)),
    ]


def misuse_cases() -> list[Case]:
    out = []
    for m in METHODS:
        out += [
            Case("misuse", f"{m}: optimizer.step(closure)", partial(_closure_step, m, False)),
            Case("misuse", f"{m}: optimizer.step(closure=closure)", partial(_closure_step, m, True)),
            Case("misuse", f"{m}: model.merge_adapter() between backward and step", partial(_merged_adapter, m)),
            Case("misuse", f"{m}: every layer skipped (not a method step)", partial(_all_layers_skipped, m)),
            Case("misuse", f"{m}: run shorter than warmup_steps", partial(_short_run, m)),
        ]
    out.append(Case("misuse", "GradScaler skips an overflowing step", _gradscaler_overflow))
    out.append(Case("misuse", "Adam subclass keeping moments under its own keys", _adam_own_keys))
    return out + _attach_errors()
