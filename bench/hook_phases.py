"""Where the time of optlora's step hook goes, phase by phase (CPU, one thread, real training steps).

    python bench/hook_phases.py                                  # every method, MiniLM as in peer_reflora.py
    python bench/hook_phases.py --methods reflora_s --ops        # plus the torch ops of each phase (profiler)
    python bench/hook_phases.py --phase LayerGroup.stack --phase finite_rows   # time other functions too

Each method runs ``--steps`` training steps on its own copy of the model of ``bench/peer_reflora.py`` (real
MiniLM, LoRA r=8 on the 37 linear layers but the head, AdamW, batch 16x64) after ``--warmup`` untimed steps.
During them the functions of the library named in :data:`PHASES` (and ``--phase``) are wrapped, in this
process only, by a timer: every call adds its thread CPU time to its phase; a phase's *self* time is its
time minus that of the phases called inside it, so the self times add up to the hook's total. What is left
of the hook outside every phase is the hook's own Python (``hook (rest)``). Names are looked up in every
loaded ``optlora`` module: ``function`` (a module function, replaced wherever a module imported it by
name) or ``Class.method``; a name that does not exist (the library was reorganised) is listed and
skipped, so the bench keeps working on a moved layout (add the new names with ``--phase``).

``--ops`` also profiles the same steps with ``torch.profiler`` and prints, per phase, the number of torch
operators dispatched and their self CPU time (the profiler's own overhead inflates both times; read them
as shares). ``plain`` is RefLoRA on a model whose warm-up never ends: every step is a plain step, i.e.
the checks that run on every step (ScaLoRA-I's 9 steps out of 10).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter, defaultdict
from contextlib import contextmanager, nullcontext
from functools import wraps

import torch

from optlora import make_method
from optlora.testing import models

#: (phase label, what it stands for): the default functions timed
PHASES = {
    "evaluate_closure": "every step: optimizer.step(closure)",
    "refuse_merged_adapters": "every step: PEFT merge_adapter() refusal",
    "nonfinite_layers": "plain step: NaN/Inf check of every LoRA tensor (+1 host read)",
    "amax": "fused max-abs reduction (CPU: aminmax per tensor)",
    "LoRAMethod._active_groups": "grouping: adapters with gradients, regrouping check",
    "LoRAMethod._check_moments": "moments exist for every rescaled parameter",
    "exchange_": "FSDP2 exchange (nothing without FSDP2)",
    "RefLoRA._plan_all": "plan: stacks, Grams, closed forms, guards",
    "ScaLoRA._plan_all": "plan: stacks, Grams, closed forms, guards",
    "LayerGroup.factors_and_grads": "staging: factors and gradients stacked in the compute dtype",
    "LayerGroup.stack": "staging: one torch.stack + dtype copy",
    "LayerGroup.pair_grams": "ScaLoRA: [A;dA], [dB,B] stacked, Grams, finiteness, row maxima",
    "LayerGroup.pair": "staging: one stack + one converting copy",
    "finite_rows": "finiteness: float64 sums of the stacks",
    "LayerGroup.factor_grams": "Grams A A^T, B^T B",
    "LayerGroup.factor_sqnorms": "||A||^2, ||B||^2",
    "reflora_preconditioner": "closed form: S, S^-1 (two eigh)",
    "reflora_precondition": "S^-1 dA, dB S",
    "reflora_s_scale": "closed form: s = ||B|| / ||A||",
    "scalora_scalings": "closed form: column + scalar scalings",
    "LayerGroup.row_amax": "range: per-rank-index maxima",
    "preconditioned_in_range": "range: new gradients fit their dtype",
    "LoRAMethod._rescaling_in_range": "range: rescaled factors, gradients, moments stay finite/normal",
    "LayerGroup.moment_amax": "range: maxima of the optimizer moments",
    "ScaLoRA._merge_in_range": "range: merge growth and finite merged weight",
    "LayerGroup.weight_norms": "range: ||W||_F of every base weight",
    "LoRAMethod._host_flags": "the one host read of the per-layer flags",
    "_restrict": "apply to a subset of a group",
    "RefLoRA._apply": "apply",
    "ScaLoRA._apply": "apply",
    "LayerGroup.set_gradients_": "write the preconditioned gradients",
    "LayerGroup.rescale_": "moment transfer: factors, gradients, moments (one _foreach_mul_)",
    "LayerGroup._rescale_operands": "moment transfer: the tensor and scale lists (Python)",
    "LayerGroup.merge_": "merge into the base weights",
    "LoRAMethod._record": "stats of the step",
    "release_": "FSDP2 release (nothing without FSDP2)",
}
METHODS = {  # label -> (method, options)
    "reflora": ("reflora", {}),
    "reflora_s": ("reflora_s", {}),
    "scalora": ("scalora", {}),
    "scalora_i": ("scalora_i", {"interval": 10}),
    "plain": ("reflora", {"warmup_steps": 10**9}),
}


class PhaseTimer:
    """Thread-CPU timers around named library functions, with self time and the observed nesting."""

    def __init__(self):
        self.total: dict[str, float] = defaultdict(float)
        self.self_: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.parent: dict[str, Counter] = defaultdict(Counter)
        self.stack: list[list] = []  # [name, start, time spent in children]
        self.record_ops = False
        self.undo: list = []

    def enter(self, name: str) -> None:
        self.stack.append([name, time.thread_time(), 0.0])

    def leave(self) -> None:
        name, start, inner = self.stack.pop()
        spent = time.thread_time() - start
        self.total[name] += spent
        self.self_[name] += spent - inner
        self.calls[name] += 1
        self.parent[name][self.stack[-1][0] if self.stack else None] += 1
        if self.stack:
            self.stack[-1][2] += spent

    def wrap(self, name: str, fn):
        timer = self

        @wraps(fn)
        def timed(*args, **kwargs):
            ctx = torch.profiler.record_function(f"phase::{name}") if timer.record_ops else nullcontext()
            timer.enter(name)
            try:
                with ctx:
                    return fn(*args, **kwargs)
            finally:
                timer.leave()

        return timed

    def install(self, names) -> list[str]:
        """Wrap every ``names`` entry found in a loaded optlora module; returns the names not found."""
        mods = [m for n, m in list(sys.modules.items()) if n == "optlora" or n.startswith("optlora.")]
        missing = []
        for name in names:
            if "." in name:
                cls_name, attr = name.split(".", 1)
                owners = {id(c): c for m in mods if isinstance(c := getattr(m, cls_name, None), type)}
                owners = [c for c in owners.values() if attr in vars(c)]
                if not owners:
                    missing.append(name)
                for c in owners:
                    fn = vars(c)[attr]
                    self.undo.append((c, attr, fn))
                    setattr(c, attr, self.wrap(name, fn))
                continue
            targets = [(m, fn) for m in mods if callable(fn := vars(m).get(name)) and not isinstance(fn, type)]
            if not targets:
                missing.append(name)
            for m, fn in targets:
                self.undo.append((m, name, fn))
                setattr(m, name, self.wrap(name, fn))
        return missing

    def uninstall(self) -> None:
        for owner, attr, fn in reversed(self.undo):
            setattr(owner, attr, fn)
        self.undo.clear()

    def depth(self, name: str) -> int:
        d, seen = 0, set()
        while name is not None and name not in seen:
            seen.add(name)
            name = self.parent[name].most_common(1)[0][0] if self.parent[name] else None
            d += name is not None
        return d

    def tree(self) -> list[str]:
        """Phase names in call order of a depth-first walk of the observed nesting."""
        children: dict[str | None, list[str]] = defaultdict(list)
        for name in self.calls:
            children[self.parent[name].most_common(1)[0][0]].append(name)
        out: list[str] = []

        def walk(node):
            for child in sorted(children.get(node, []), key=lambda n: -self.total[n]):
                out.append(child)
                walk(child)

        walk(None)
        return out


@contextmanager
def timed_phases(names):
    timer = PhaseTimer()
    missing = timer.install(names)
    try:
        yield timer, missing
    finally:
        timer.uninstall()


def measure(label: str, rank: int, batch, steps: int, warmup: int, names, ops: bool) -> None:
    from peer_reflora import build_minilm  # the same model as the peer table

    name, options = METHODS[label]
    model = build_minilm(rank)
    optimizer = torch.optim.AdamW(models.lora_parameters(model), lr=1e-4)
    method = make_method(name, model, **{"warmup_steps": 1, **options})
    per_step = []
    with timed_phases(names) as (timer, missing):
        method._pre_step = timer.wrap("HOOK", method._pre_step)
        method.attach(optimizer)

        def train(n: int) -> None:
            for _ in range(n):
                model(**batch).loss.backward()
                t0 = timer.total["HOOK"]
                optimizer.step()
                per_step.append(timer.total["HOOK"] - t0)
                optimizer.zero_grad(set_to_none=True)

        train(warmup)
        for d in (timer.total, timer.self_, timer.calls, timer.parent):
            d.clear()
        per_step.clear()
        train(steps)
        print(
            f"\n### {label}: hook {1e3 * timer.total['HOOK'] / steps:.2f} ms/step thread CPU "
            f"(median step {1e3 * statistics.median(per_step):.2f}), {len(method.factors)} layers, {steps} steps"
        )
        if missing:
            print(f"(not in this library, skipped: {', '.join(missing)})")
        print("| phase | calls/step | ms/step | self ms/step | self % of hook | what |")
        print("|---|---|---|---|---|---|")
        hook = timer.total["HOOK"]
        for n in timer.tree():
            shown = "  " * timer.depth(n) + ("hook (rest)" if n == "HOOK" else n)
            print(
                f"| {shown} | {timer.calls[n] / steps:.1f} | {1e3 * timer.total[n] / steps:.3f} | "
                f"{1e3 * timer.self_[n] / steps:.3f} | {100 * timer.self_[n] / hook:.0f}% | {PHASES.get(n, '')} |"
            )
        if ops:
            profile_ops(timer, train, steps)


def profile_ops(timer: PhaseTimer, train, steps: int) -> None:
    """torch ops per innermost phase over ``steps`` steps (torch.profiler; counts exact, times inflated)."""
    timer.record_ops = True
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        train(steps)
    timer.record_ops = False
    agg: dict[str, Counter] = defaultdict(Counter)
    us: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.name.startswith("phase::") or e.cpu_parent is None and not e.name.startswith("aten::"):
            continue
        phase, p = None, e.cpu_parent
        while p is not None:
            if p.name.startswith("phase::"):
                phase = p.name[len("phase::") :]
                break
            p = p.cpu_parent
        if phase is None or not e.name.startswith("aten::") or _under_aten(e):
            continue  # outside the hook, or an op called inside another op (counted once, at the top)
        agg[phase][e.name] += 1
        us[phase] += e.cpu_time_total
    print("\ntorch ops dispatched by the library (top-level aten ops), per innermost phase, per step:")
    print("| phase | ops/step | op CPU ms/step (profiled) | most frequent ops |")
    print("|---|---|---|---|")
    for phase in sorted(agg, key=lambda k: -sum(agg[k].values())):
        top = ", ".join(f"{op[6:]} {n / steps:.0f}" for op, n in agg[phase].most_common(4))
        print(f"| {phase} | {sum(agg[phase].values()) / steps:.0f} | {us[phase] / 1e3 / steps:.3f} | {top} |")


def _under_aten(e) -> bool:
    p = e.cpu_parent
    while p is not None and not p.name.startswith("phase::"):
        if p.name.startswith("aten::"):
            return True
        p = p.cpu_parent
    return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--batch", default="16x64")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--phase", action="append", default=[], help="also time this function (name or Class.method)")
    ap.add_argument("--ops", action="store_true", help="also count the torch ops of each phase (torch.profiler)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bs, seq = (int(x) for x in args.batch.split("x"))
    batch = models.make_batch(models.SPECS["minilm"], bs, seq, "cpu")
    names = list(dict.fromkeys([*PHASES, *args.phase]))
    for label in args.methods.split(","):
        measure(label, args.rank, batch, args.steps, args.warmup, names, args.ops)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
