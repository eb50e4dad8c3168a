"""The GPU's cost drivers of one optimizer step, counted on CPU: torch ops dispatched and host syncs.

    python bench/op_counts.py                                        # RefLoRA, RefLoRA-S, ScaLoRA, ScaLoRA-I
    python bench/op_counts.py --official PATH/TO/RefLoRA/reflora/reflora.py   # the official code beside
    python bench/op_counts.py --methods reflora --blocks 1,2,4,8,16,32 --sources 12

On a GPU a hook this small is bound by how many kernels it launches and how often the host waits for the
device, not by flops. Both are properties of the code path, so they can be counted on a CPU:

* **ops**: every ATen operator that reaches the backend inside the hook (``TorchDispatchMode``), split into
  *kernels* (an op that computes or copies data: about one kernel launch on CUDA; a ``_foreach_*`` op
  launches one per ~chunk of tensors) and *views/metadata* (``detach``, ``view``, ``select``, ``empty``...:
  no kernel). ``AdamW`` (``foreach=True``, the CUDA default) is counted too, for scale: its ``_foreach`` ops
  and its other ops, most of them reads of its per-parameter ``step`` counters, which AdamW keeps on the host
  on CUDA too (unless ``capturable``/``fused``), so they are no device syncs there.
* **host syncs**: calls that make the host wait for the device on CUDA: ``.item()``, ``bool()``/``float()``
  of a tensor, ``.tolist()``, ``.cpu()``, ``.numpy()`` (``TorchFunctionMode``); ``nonzero``, boolean-mask
  indexing, ``_local_scalar_dense``; ``torch.tensor(python data)`` (a pageable host-to-device copy on CUDA)
  and the linear algebra that checks its result on the host (``torch.linalg.eigh``, ``cholesky``, ``inv``,
  ``svd``, ``solve``, and the ``_ex`` variants with ``check_errors=True``; their documentation says so).

Shapes: LLaMA-3-8B's LoRA layers, r=8 on q, k, v, o (4096->4096, 4096->1024 for k and v), gate, up
(4096->14336) and down (14336->4096) of every block: 7 adapters per block, 4 distinct shapes, 224
adapters for 32 blocks. RefLoRA and RefLoRA-S read only the factors and their gradients, so their base
weights stay on the ``meta`` device (no memory) and the LoRA factors are real float32 tensors (PEFT keeps
adapters in float32 on a bf16 model). ScaLoRA merges into the base weights, so they are real: bfloat16
(the default merge is then stochastic rounding, as on a bf16 GPU run), 436 MiB per block; it runs a
subset of the blocks (``--scalora-blocks``, default 1,2,4: 1.7 GiB at 4) and the table shows how its
counts grow with them. Gradients are random (drawn before each step, outside the count).

Each configuration takes ``--warmup`` 2 plain steps and then 2 due steps; the second plain step and the
second due step are counted (the first of each fills caches). ``plain`` is a step between intervals /
during warm-up: what every method runs on ScaLoRA-I's 9 steps out of 10 (ScaLoRA-I's due step is ScaLoRA's,
so it has no rows of its own). The goal of issue 17: the counts
grow with the number of distinct layer shapes, not with the number of layers, and there is at most one
host sync per due step and none on a plain step. ``--sources N`` lists, per method, the N source lines of
the library that dispatch the most ops per block (where counts still grow with the layers).

The counts are those of the CPU code path. The library takes other branches on CUDA in two places:
``optlora.methods.guards.amax`` (CPU: one ``aminmax`` per tensor; CUDA: one ``_foreach_norm``) and the
scales of the moment transfer (materialised at full shape on CUDA); ``--sources`` shows what they add.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter, defaultdict
from contextlib import ExitStack

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import optlora
from optlora import make_method

#: LLaMA-3-8B's linear layers in a decoder block: name -> (in, out)
LLAMA3_8B = {
    "q_proj": (4096, 4096),
    "k_proj": (4096, 1024),
    "v_proj": (4096, 1024),
    "o_proj": (4096, 4096),
    "gate_proj": (4096, 14336),
    "up_proj": (4096, 14336),
    "down_proj": (14336, 4096),
}
#: Tensor methods / torch functions that wait for the device on CUDA (host reads of device data)
SYNC_CALLS = {"item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "__complex__"}
#: torch functions that copy Python data to the device (a pageable, blocking host-to-device copy on CUDA)
H2D_CALLS = {"tensor", "as_tensor"}
#: ATen ops that synchronise on CUDA whatever their arguments
SYNC_OPS = {
    "aten::_local_scalar_dense",
    "aten::is_nonzero",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::_unique2",
    "aten::unique_dim",
    "aten::unique_consecutive",
    "aten::equal",
    "aten::_linalg_eigh",  # torch.linalg.eigh / eigvalsh: "synchronizes that device with the CPU"
    "aten::linalg_eig",
    "aten::_linalg_svd",
    "aten::linalg_lstsq",
    "aten::_linalg_check_errors",
}
#: ATen ops that synchronise on CUDA when asked to check errors (``check_errors=True``)
CHECKED_OPS = {
    "aten::linalg_cholesky_ex",
    "aten::linalg_inv_ex",
    "aten::linalg_ldl_factor_ex",
    "aten::linalg_lu_factor_ex",
}
#: ops that allocate or alias without a kernel
NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::lift_fresh",
    "aten::detach",
    "aten::alias",
}


def _is_sync_op(name: str, args, kwargs) -> bool:
    if name in SYNC_OPS:
        return True
    if name in CHECKED_OPS:
        return bool(kwargs.get("check_errors", False))
    if name in ("aten::index", "aten::index_put_", "aten::index_put"):  # a boolean mask: nonzero inside
        indices = args[1] if len(args) > 1 else ()
        return any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in indices or ())
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None
    return False


class Tally:
    """Ops and syncs of the regions marked as counted, with the library line that issued each op."""

    def __init__(self, roots: list[str]):
        self.roots = [os.path.abspath(r) for r in roots]
        self.on = False
        self.kernels: Counter = Counter()
        self.views: Counter = Counter()
        self.syncs: Counter = Counter()
        self.sources: Counter = Counter()  # (file:line function) -> ops (kernels + views)
        self.in_sync_call = 0

    def reset(self) -> None:
        self.kernels.clear()
        self.views.clear()
        self.syncs.clear()
        self.sources.clear()

    def source(self) -> str:
        f = sys._getframe(2)
        while f is not None:
            path = os.path.abspath(f.f_code.co_filename)
            if any(path.startswith(r) for r in self.roots) and not path.startswith(os.path.abspath(__file__)):
                rel = path
                for r in self.roots:
                    if path.startswith(r):
                        rel = os.path.relpath(path, os.path.dirname(r))
                return f"{rel}:{f.f_lineno} {f.f_code.co_name}"
            f = f.f_back
        return "(outside the library)"

    def op(self, func, args, kwargs) -> None:
        name = func.name().split(".")[0]  # "aten::add.Tensor" -> "aten::add"
        if self.in_sync_call == 0 and _is_sync_op(name, args, kwargs):
            self.syncs[name] += 1
        if func.is_view or name in NO_KERNEL:
            self.views[name] += 1
        else:
            self.kernels[name] += 1
        self.sources[self.source()] += 1


class _Dispatch(TorchDispatchMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tally.on:
            self.tally.op(func, args, kwargs)
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, tally: Tally):
        super().__init__()
        self.tally = tally

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.tally.on:
            return func(*args, **kwargs)
        if name in H2D_CALLS and not (args and isinstance(args[0], torch.Tensor)):
            self.tally.syncs[f"torch.{name}(python data)"] += 1
        if name in SYNC_CALLS:
            self.tally.syncs[f"Tensor.{name}"] += 1
            self.tally.in_sync_call += 1
            try:
                return func(*args, **kwargs)
            finally:
                self.tally.in_sync_call -= 1
        return func(*args, **kwargs)


def self_check() -> None:
    """The counter must see each kind of sync once (or the counts below would be silently wrong)."""
    tally = Tally([os.path.dirname(__file__)])
    x = torch.ones(3, 4)
    with _Function(tally), _Dispatch(tally):
        tally.on = True
        bool(x.sum() > 0)
        x.sum(1).tolist()
        x.sum().item()
        torch.nonzero(x)
        x[x > 0]
        torch.linalg.eigh(torch.eye(3))
        torch.linalg.cholesky_ex(torch.eye(3))  # no check: no sync
        torch.tensor([1.0])
        tally.on = False
    got = sum(tally.syncs.values())
    if got != 7:
        raise SystemExit(f"op counter self-check failed (7 syncs expected, {got} counted: {dict(tally.syncs)})")


class Block(nn.Module):
    """One decoder block's linear layers (no attention math: the optimizer step only sees the parameters)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        for name, (n_in, n_out) in LLAMA3_8B.items():
            setattr(self, name, nn.Linear(n_in, n_out, bias=False, dtype=dtype))


def build(blocks: int, rank: int, real_base: bool, base_dtype: torch.dtype) -> nn.Module:
    """``blocks`` LLaMA-3-8B blocks with PEFT LoRA on every projection; base weights on ``meta`` unless ``real_base``."""
    from peft import LoraConfig, inject_adapter_in_model

    with torch.device("meta"):
        model = nn.ModuleDict({"layers": nn.ModuleList([Block(base_dtype) for _ in range(blocks)])})
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LLAMA3_8B))
    model = inject_adapter_in_model(cfg, model)
    g = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        lora = name.endswith((".lora_A.default", ".lora_B.default"))
        if lora or (real_base and name.endswith(".base_layer")):
            module.to_empty(device="cpu")
            if lora:  # adapters in float32, as get_peft_model keeps them on a bf16 model (autocast_adapter_dtype)
                module.float()
            with torch.no_grad():
                w = module.weight
                w.copy_(torch.randn(w.shape, generator=g, dtype=torch.float32).mul_(0.02).to(w.dtype))
    return model


def lora_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def draw_grads(params, g: torch.Generator) -> None:
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).mul_(1e-3)


def count_method(kind: str, code: str, blocks: int, args, official=None) -> dict:
    """Counts of one plain and one due step of ``kind`` by ``code`` ("optlora" or "official") on ``blocks`` blocks."""
    real_base = kind == "scalora"
    model = build(blocks, args.rank, real_base, getattr(torch, args.base_dtype))
    params = lora_params(model)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    roots = [os.path.dirname(optlora.__file__)] + ([args.official] if args.official else [])
    tally = Tally(roots)
    hook = Tally(roots)  # the hook alone

    def counted(fn):
        def call(*a, **k):
            hook.on = True
            try:
                return fn(*a, **k)
            finally:
                hook.on = False

        return call

    w = args.warmup
    if code == "optlora":
        method = make_method(kind, model, warmup_steps=w)
        method._pre_step = counted(method._pre_step)  # attach() registers the instance attribute
        method.attach(opt)
    else:
        scalar = kind == "reflora_s"
        # its RefLoRA-S hook runs after the step and integrate_into_optimizer() calls it once (using up one
        # warm-up step): one more makes its first refactoring follow optimizer step w + 1, as optlora's does
        ref = official(model, warmup_steps=w + scalar, use_scalar=scalar)
        ref.dummy_step, ref.step = counted(ref.dummy_step), counted(ref.step)
        ref.integrate_into_optimizer(opt)
    g = torch.Generator().manual_seed(1)
    out = {}
    with ExitStack() as stack:
        for t in (tally, hook):
            stack.enter_context(_Function(t))
            stack.enter_context(_Dispatch(t))
        for step in range(1, w + 3):
            draw_grads(params, g)
            tally.reset()
            hook.reset()
            tally.on = True
            opt.step()
            tally.on = False
            opt.zero_grad(set_to_none=True)
            if step in (w, w + 2):  # the last plain step; the second due step
                out["plain" if step == w else "due"] = {
                    "hook_kernels": sum(hook.kernels.values()),
                    "hook_views": sum(hook.views.values()),
                    "hook_syncs": dict(hook.syncs),
                    # AdamW = the step outside the hook: its _foreach ops (one multi-tensor launch per ~chunk of
                    # tensors on CUDA) and its reads of the per-parameter step counters, which live on the host
                    # (CPU) on CUDA too unless capturable/fused, so they are no device syncs
                    "adamw_foreach": sum(n for k, n in (tally.kernels - hook.kernels).items() if "_foreach_" in k),
                    "adamw_other": sum(n for k, n in (tally.kernels - hook.kernels).items() if "_foreach_" not in k),
                    "sources": dict(hook.sources),
                    "top_kernels": dict(hook.kernels.most_common(8)),
                }
    if code == "optlora":
        out["skipped"] = dict(method.stats()["skipped"])
    return out


def per_block(counts: dict[int, dict], phase: str, key: str) -> float:
    """Growth of ``key`` per block between the two largest block counts (0: it does not grow with layers)."""
    bs = sorted(counts)
    if len(bs) < 2:
        return float("nan")
    lo, hi = bs[-2], bs[-1]
    return (counts[hi][phase][key] - counts[lo][phase][key]) / (hi - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", help="path of your copy of the official RefLoRA reflora.py")
    ap.add_argument("--methods", default="reflora,reflora_s,scalora", help="of reflora, reflora_s, scalora")
    ap.add_argument("--blocks", default="1,32", help="block counts for RefLoRA / RefLoRA-S (32 = 224 adapters)")
    ap.add_argument("--scalora-blocks", default="1,2,4", help="block counts for ScaLoRA (real base weights)")
    ap.add_argument("--base-dtype", default="bfloat16", help="ScaLoRA's base weights (bfloat16: 436 MiB per block)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--sources", type=int, default=6, help="library lines with the most ops per block, per method")
    args = ap.parse_args(argv)
    if args.warmup < 2:
        ap.error("--warmup must be >= 2 (the second plain step is counted)")
    unknown = set(args.methods.split(",")) - {"reflora", "reflora_s", "scalora"}
    if unknown:  # ScaLoRA-I's due step is ScaLoRA's and its other steps are plain steps: nothing new to count
        ap.error(f"--methods: {', '.join(sorted(unknown))}; choose from reflora, reflora_s, scalora")
    torch.set_num_threads(1)
    self_check()
    official = None
    if args.official:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from peer_reflora import load_official

        official = load_official(args.official)
    rows = []
    growth = {}
    for kind in args.methods.split(","):
        blocks = [int(b) for b in (args.scalora_blocks if kind == "scalora" else args.blocks).split(",")]
        codes = ["optlora"] + (["official"] if official is not None and kind in ("reflora", "reflora_s") else [])
        for code in codes:
            counts = {}
            for b in blocks:
                counts[b] = count_method(kind, code, b, args, official)
                print(f"  counted {code} {kind}, {b} block(s)", file=sys.stderr, flush=True)
                for phase in ("due", "plain"):
                    c = counts[b][phase]
                    rows.append((kind, code, b, phase, c, counts[b].get("skipped")))
            growth[(kind, code)] = counts
    print(
        f"\nLLaMA-3-8B LoRA shapes, r={args.rank}, 7 adapters per block (4 distinct shapes); ScaLoRA base weights "
        f"{args.base_dtype}; CPU code path; AdamW foreach=True"
    )
    print()
    print(
        "| method | code | blocks (adapters) | step | hook kernels | hook views/metadata | hook host syncs | "
        "AdamW: _foreach ops + other ops | skipped layers |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, code, b, phase, c, skipped in rows:
        syncs = sum(c["hook_syncs"].values())
        what = ", ".join(f"{k} {v}" for k, v in sorted(c["hook_syncs"].items()))
        skip = "" if not skipped else sum(skipped.values())
        print(
            f"| {kind} | {code} | {b} ({7 * b}) | {phase} | {c['hook_kernels']} | {c['hook_views']} | "
            f"{syncs}{f' ({what})' if what else ''} | {c['adamw_foreach']} + {c['adamw_other']} | {skip} |"
        )
    print()
    print("Growth per block (7 adapters) between the two largest block counts: 0 = independent of the layer count.")
    print()
    print("| method | code | step | hook kernels / block | hook views / block | hook syncs / block |")
    print("|---|---|---|---|---|---|")
    for (kind, code), counts in growth.items():
        for phase in ("due", "plain"):
            for c in counts.values():
                c[phase]["n_syncs"] = sum(c[phase]["hook_syncs"].values())
            k = per_block(counts, phase, "hook_kernels")
            v = per_block(counts, phase, "hook_views")
            s = per_block(counts, phase, "n_syncs")
            print(f"| {kind} | {code} | {phase} | {k:.1f} | {v:.1f} | {s:.1f} |")
    if args.sources:
        print()
        print("Where the per-block ops come from (ops per block, kernels + views, due step; plain step in brackets):")
        for (kind, code), counts in growth.items():
            bs = sorted(counts)
            if len(bs) < 2:
                continue
            lo, hi = bs[-2], bs[-1]
            diff: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
            for i, phase in enumerate(("due", "plain")):
                for src, n in counts[hi][phase]["sources"].items():
                    diff[src][i] += n / (hi - lo)
                for src, n in counts[lo][phase]["sources"].items():
                    diff[src][i] -= n / (hi - lo)
            top = sorted(diff.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[: args.sources]
            print(f"\n{kind} ({code}):")
            for src, (due, plain) in top:
                if due or plain:
                    print(f"  {due:7.1f} [{plain:6.1f}]  {src}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
