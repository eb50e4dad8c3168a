"""Side-by-side step time and memory of PEFT LoRA, RefLoRA, RefLoRA-S, ScaLoRA and ScaLoRA-I.

One command::

    python bench/bench_step.py --preset cpu          # tiny Llama + real MiniLM, float32, CPU
    python bench/bench_step.py --preset llama3-8b    # LLaMA-3-8B layer shapes, bf16, CUDA

Every method gets its own copy of the same model (same seed, same weights) and its own AdamW.
All copies live in one process and are timed in interleaved rounds: in each round every
method runs ``--steps`` optimizer steps (a multiple of ScaLoRA-I's interval, so that its merge
steps are counted in proportion) in a rotated order. A step is forward + backward +
``optimizer.step()`` (with the method's pre-hook) + ``zero_grad``. Reported per method:

* ``ms/step``: median over rounds of the round's mean step time (CUDA events on GPU);
* ``ratio``: median over rounds of (method / LoRA in the same round) with min-max spread;
* ``hook ms``: host time inside the method's pre-hook per step (on CUDA: launch time only);
* ``extra MiB``: persistent memory the method adds (merge buffers);
* ``peak MiB`` / ``peak ratio`` (CUDA only): method's parameters + optimizer state + buffers
  plus the largest transient allocation during its steps;
* ``parity``: worst relative error of one step's weight update vs the unbatched float64
  reference (:mod:`optlora.testing.parity`), computed on a float64 copy of the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from optlora import make_method  # noqa: E402
from optlora.testing import models, parity  # noqa: E402

METHODS = ("lora", "reflora", "reflora_s", "scalora", "scalora_i")
MiB = 1 << 20

PRESETS = {
    # (model, rank, batch, seq) runs; dtype; steps per round; rounds
    "cpu": {
        "runs": [("tiny-llama", 8, 4, 64), ("tiny-llama", 16, 4, 64), ("minilm", 8, 8, 64)],
        "dtype": "float32",
        "steps": 10,
        "rounds": 5,
        "parity_layers": 2,
        "threads": 1,  # one intra-op thread: on a shared machine OpenMP barriers stall on descheduled threads
    },
    "llama3-8b": {
        "runs": [
            ("llama3-8b", 8, 4, 512),
            ("llama3-8b", 16, 4, 512),
            ("llama3-8b", 8, 16, 1024),
            ("llama3-8b", 16, 16, 1024),
        ],
        "dtype": "bfloat16",
        "steps": 10,
        "rounds": 7,
        "parity_layers": 1,
    },
}


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def footprint(model, optimizer, method) -> int:
    """Parameters, buffers, optimizer state and method buffers (gradients are transient)."""
    total = _bytes(model.parameters()) + _bytes(model.buffers())
    total += _bytes(t for st in optimizer.state.values() for t in st.values() if isinstance(t, torch.Tensor))
    return total + extra_bytes(method)


def extra_bytes(method) -> int:
    return _bytes(getattr(method, "buffers", {}).values()) if method is not None else 0


class Runner:
    """One method on its own model copy; times its pre-hook on the host."""

    def __init__(self, kind: str, spec, rank: int, dtype, device, warmup_steps: int):
        self.kind = kind
        self.model = models.build(spec, rank=rank, dtype=dtype, device=device)
        self.optimizer = torch.optim.AdamW(models.lora_parameters(self.model), lr=1e-4)
        self.method = make_method(kind, self.model, warmup_steps=warmup_steps)
        self.hook_s = 0.0
        self.hook_calls = 0
        if self.method is not None:
            inner = self.method._pre_step

            def timed(*args, **kwargs):
                t0 = time.perf_counter()
                inner(*args, **kwargs)
                self.hook_s += time.perf_counter() - t0
                self.hook_calls += 1

            self.method._pre_step = timed  # attach() registers the instance attribute
            self.method.attach(self.optimizer)

    def step(self, batch) -> None:
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_window(runner: Runner, batch, steps: int, cuda: bool) -> tuple[float, int]:
    """Mean seconds per step over ``steps`` steps, and the peak transient bytes (CUDA)."""
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            runner.step(batch)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / steps, torch.cuda.max_memory_allocated() - base
    t0 = time.perf_counter()
    for _ in range(steps):
        runner.step(batch)
    return (time.perf_counter() - t0) / steps, 0


def bench_run(model_name, rank, batch_size, seq, *, dtype, device, steps, rounds, methods, warmup, parity_layers):
    spec = models.SPECS[model_name]
    cuda = torch.device(device).type == "cuda"
    runners = [Runner(k, spec, rank, dtype, device, warmup_steps=1) for k in methods]
    batch = models.make_batch(spec, batch_size, seq, device)
    for r in runners:  # untimed: past the method warm-up, optimizer state allocated, kernels cached
        for _ in range(warmup):
            r.step(batch)
        r.hook_s, r.hook_calls = 0.0, 0
    times = {r.kind: [] for r in runners}
    transient = {r.kind: 0 for r in runners}
    for rnd in range(rounds):
        order = runners[rnd % len(runners) :] + runners[: rnd % len(runners)]
        for r in order:
            t, peak = time_window(r, batch, steps, cuda)
            times[r.kind].append(t)
            transient[r.kind] = max(transient[r.kind], peak)
    rows = []
    for r in runners:
        ratios = [a / b for a, b in zip(times[r.kind], times["lora"])] if "lora" in times else [float("nan")]
        row = {
            "method": r.kind,
            "ms_per_step": 1e3 * statistics.median(times[r.kind]),
            "ms_min": 1e3 * min(times[r.kind]),
            "ms_max": 1e3 * max(times[r.kind]),
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "hook_ms": 1e3 * r.hook_s / max(1, rounds * steps),
            "extra_mib": extra_bytes(r.method) / MiB,
        }
        if cuda:
            row["peak_mib"] = (footprint(r.model, r.optimizer, r.method) + transient[r.kind]) / MiB
        rows.append(row)
    if cuda:
        lora_peak = next((x["peak_mib"] for x in rows if x["method"] == "lora"), float("nan"))
        for x in rows:
            x["peak_ratio"] = x["peak_mib"] / lora_peak
    del runners
    if parity_layers:
        pspec = models.ModelSpec(**{**spec.__dict__, "layers": min(spec.layers, parity_layers)})
        pbatch = models.make_batch(pspec, 2, min(seq, 64), device)
        for x in rows:
            x["parity"] = parity_error(x["method"], pspec, rank, device, pbatch)
    return {"model": spec.label(), "rank": rank, "batch": f"{batch_size}x{seq}", "dtype": str(dtype), "rows": rows}


def parity_error(kind, spec, rank, device, batch) -> float:
    """Worst relative error of one due step's weight update vs the float64 reference."""
    model = models.build(spec, rank=rank, dtype=torch.float64, device=device)
    optimizer = torch.optim.AdamW(models.lora_parameters(model), lr=1e-3)
    method = make_method(kind, model, warmup_steps=1)
    if method is not None:
        method.attach(optimizer)
    model(**batch).loss.backward()  # plain warm-up step: Adam moments exist before the checked step
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return parity.check_step(kind, model, method, optimizer, batch)


def format_table(result: dict) -> str:
    cuda = "peak_mib" in result["rows"][0]
    head = "| method | ms/step | min-max ms | ratio to LoRA (min-max) | hook ms | extra MiB |"
    head += " peak MiB | peak ratio |" if cuda else ""
    head += " parity rel. err |"
    lines = [f"{result['model']}, r={result['rank']}, batch {result['batch']}, {result['dtype']}", "", head]
    lines.append("|" + "---|" * (head.count("|") - 1))
    for x in result["rows"]:
        line = (
            f"| {x['method']} | {x['ms_per_step']:.2f} | {x['ms_min']:.2f}-{x['ms_max']:.2f} | "
            f"{x['ratio']:.3f} ({x['ratio_min']:.3f}-{x['ratio_max']:.3f}) | {x['hook_ms']:.2f} | {x['extra_mib']:.1f} |"
        )
        if cuda:
            line += f" {x['peak_mib']:.0f} | {x['peak_ratio']:.4f} |"
        line += f" {x['parity']:.1e} |" if "parity" in x else " - |"
        lines.append(line)
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--steps", type=int, default=None, help="steps per method per round (multiple of 10)")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=12, help="untimed steps per method first")
    ap.add_argument("--runs", default=None, help="subset of the preset's runs by index, e.g. 0,2")
    ap.add_argument("--no-parity", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--dtype", default=None, help="override the preset's dtype, e.g. bfloat16")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    preset = PRESETS[args.preset]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.preset == "llama3-8b" and device == "cpu":
        print("warning: llama3-8b shapes on CPU are very slow; use a GPU", file=sys.stderr)
    threads = args.threads or (preset.get("threads") if device == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    methods = [m for m in args.methods.split(",") if m]
    if methods[0] != "lora":
        methods = ["lora"] + [m for m in methods if m != "lora"]
    runs = preset["runs"]
    if args.runs:
        runs = [runs[int(i)] for i in args.runs.split(",")]
    steps, rounds = args.steps or preset["steps"], args.rounds or preset["rounds"]
    dtype = getattr(torch, args.dtype or preset["dtype"])
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} steps={steps} rounds={rounds}")
    if device.startswith("cuda"):
        print(torch.cuda.get_device_name())
    results = []
    for model_name, rank, bs, seq in runs:
        res = bench_run(
            model_name,
            rank,
            bs,
            seq,
            dtype=dtype,
            device=device,
            steps=steps,
            rounds=rounds,
            methods=methods,
            warmup=args.warmup,
            parity_layers=0 if args.no_parity else preset["parity_layers"],
        )
        print("\n" + format_table(res), flush=True)
        results.append(res)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "device": device, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
