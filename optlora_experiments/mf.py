"""Low-rank matrix factorisation with plain GD (RefLoRA Sec. 4.1, Fig. 2).

Problem: ``min 1/2 ||A B^T - Y||_F^2`` with ``Y`` (m x n) a random rank-r target (top-r
SVD part of a Gaussian matrix), LoRA initialisation ``A ~ N(0, 1)``, ``B = 0``, and one
plain GD warm-up step shared by every method (RefLoRA and ScaledGD cannot leave
``B = 0``: RefLoRA's geometric mean is 0 there, RefLoRA Assumption 1). ``L = 1`` for this loss.

Every method runs *through the library* on a real PEFT model: an ``nn.Linear(m, n,
bias=False)`` with zero weight wrapped by ``get_peft_model`` (``r``, ``lora_alpha = r``,
so the PEFT scaling ``s`` is 1); forwarding the m x m identity gives ``A B^T`` with
``A = lora_A^T``, ``B = lora_B``; the optimizer is ``torch.optim.SGD`` with the method
attached as a step pre-hook. Methods:

* ``lora`` -- plain GD;
* ``scaledgd`` -- Tong, Ma & Chi (2021), :class:`optlora.ScaledGD`;
* ``reflora`` / ``reflora_s`` -- :class:`optlora.RefLoRA` (Theorem 3 / Theorem 5);
* ``scalora`` -- :class:`optlora.ScaLoRA` with ``kappa = damping / (L s eta)`` (theory value for damping 1);
* ``scalora_i`` -- ScaLoRA-I (``interval = I``) with a damped ``kappa`` (the undamped
  value diverges for ``I > 1`` under plain GD; measured, see docs/RESULTS.md).

Result file (one per learning rate): ``{"methods": {NAME: SERIES}, "config": {...}}``
where ``SERIES`` maps each of ``loss, norm_A, norm_B, grad_norm_A, grad_norm_B,
wall_time`` to a list with one float per optimizer step ``t = 0 .. steps-1``: the loss,
``||lora_A||_F``, ``||lora_B||_F`` and their raw autograd gradient norms at the iterate
the step starts from (paper Fig. 2b), and the seconds elapsed after that step. A run
whose loss or gradient becomes non-finite is stopped: its last recorded loss is the
non-finite value and the remaining entries are NaN. ``config`` holds the options, this
file's ``lr``, every method's library config, ``initial_loss`` and ``environment``.

``optlora mf --out DIR`` writes ``DIR/lr_<lr>/results.json`` for every learning rate,
``DIR/results.json`` (a copy for the first, primary, learning rate), ``DIR/summary.csv``
(one row per lr and method) and the figures ``DIR/loss.png``, ``DIR/balance.png`` (one
panel / row per lr) and ``DIR/lr_<lr>/{loss,balance}.png``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from optlora.cliutil import HelpFormatter

from . import results as res

METHODS = ("lora", "scaledgd", "reflora", "reflora_s", "scalora", "scalora_i")
SERIES = ("loss", "norm_A", "norm_B", "grad_norm_A", "grad_norm_B", "wall_time")
FULL_STEPS, QUICK_STEPS = 500, 100
LIPSCHITZ = 1.0  # of W -> 1/2 ||W - Y||^2


@dataclass
class MFConfig:
    """Options of one matrix-factorisation comparison (defaults: RefLoRA Sec. 4.1's setup)."""

    m: int = 100
    n: int = 80
    rank: int = 4
    steps: int = FULL_STEPS
    lrs: tuple[float, ...] = (0.01, 0.03)
    methods: tuple[str, ...] = METHODS
    seed: int = 0
    warmup_steps: int = 1
    target: float = 1e-6
    scalora_damping: float = 1.0
    scalora_i_interval: int = 5
    scalora_i_damping: float = 0.1
    dtype: str = "float64"
    threads: int = 1

    def __post_init__(self):
        for k in ("m", "n", "rank", "steps", "scalora_i_interval", "threads"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise ValueError(f"{k} must be a positive int, got {getattr(self, k)!r}")
        if self.rank > min(self.m, self.n):
            raise ValueError(f"rank ({self.rank}) must be <= min(m, n) = {min(self.m, self.n)}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be an int >= 1 (B = 0 at the LoRA init), got {self.warmup_steps!r}")
        self.lrs = tuple(float(x) for x in self.lrs)
        if not self.lrs or any(not (x > 0 and math.isfinite(x)) for x in self.lrs):
            raise ValueError(f"lrs must be positive finite numbers, got {self.lrs}")
        self.methods = tuple(self.methods)
        bad = [x for x in self.methods if x not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown method(s) {bad}; choose from {list(METHODS)}")
        for k in ("target", "scalora_damping", "scalora_i_damping"):
            if not (getattr(self, k) > 0 and math.isfinite(getattr(self, k))):
                raise ValueError(f"{k} must be a positive finite number, got {getattr(self, k)!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def make_problem(cfg: MFConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ``Y`` (m x n, rank r) and the shared initial ``lora_A`` (r x m, entries N(0, 1))."""
    g = torch.Generator().manual_seed(cfg.seed)
    U, s, Vh = torch.linalg.svd(torch.randn(cfg.m, cfg.n, generator=g, dtype=torch.float64), full_matrices=False)
    Y = (U[:, : cfg.rank] * s[: cfg.rank]) @ Vh[: cfg.rank]
    A0 = torch.randn(cfg.rank, cfg.m, generator=g, dtype=torch.float64)
    return Y.to(cfg.torch_dtype), A0.to(cfg.torch_dtype)


def build_model(cfg: MFConfig, A0: torch.Tensor):
    """PEFT model whose effective weight is ``lora_B @ lora_A`` (scaling 1), at the LoRA init ``(A0, 0)``."""
    from peft import LoraConfig, get_peft_model

    base = torch.nn.Sequential()
    base.add_module("w", torch.nn.Linear(cfg.m, cfg.n, bias=False))
    torch.nn.init.zeros_(base.w.weight)
    model = get_peft_model(base, LoraConfig(r=cfg.rank, lora_alpha=cfg.rank, target_modules=["w"]))
    model.to(cfg.torch_dtype)
    layer = model.base_model.model.w
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A0)
        layer.lora_B["default"].weight.zero_()
    return model, layer


def make_method(name: str, model, lr: float, cfg: MFConfig):
    """The library method for ``name`` (None for plain LoRA); ScaLoRA's ``kappa = damping / (L s lr)``."""
    import optlora

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
    kwargs = {"warmup_steps": cfg.warmup_steps}
    scaling = 1.0  # lora_alpha = r
    if name == "scalora":
        kwargs["kappa"] = cfg.scalora_damping / (LIPSCHITZ * scaling * lr)
    elif name == "scalora_i":
        kwargs.update(interval=cfg.scalora_i_interval, kappa=cfg.scalora_i_damping / (LIPSCHITZ * scaling * lr))
    return optlora.make_method(name, model, **kwargs)


def run_method(name: str, lr: float, cfg: MFConfig, problem=None, progress: bool = False) -> tuple[dict, dict]:
    """Train one method with SGD at ``lr``; returns (series dict, the method's config)."""
    from tqdm.auto import tqdm

    Y, A0 = problem if problem is not None else make_problem(cfg)
    model, layer = build_model(cfg, A0)
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    opt = torch.optim.SGD([A, B], lr=lr)
    method = make_method(name, model, lr, cfg)
    if method is not None:
        method.attach(opt)
    eye = torch.eye(cfg.m, dtype=cfg.torch_dtype)
    out = {k: [] for k in SERIES}
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=f"{name} lr={lr:g}", leave=False, disable=not progress)
    for _ in bar:
        opt.zero_grad(set_to_none=True)
        loss = 0.5 * (model(eye) - Y).square().sum()
        loss.backward()
        lv = loss.item()
        out["loss"].append(lv)
        out["norm_A"].append(A.detach().norm().item())
        out["norm_B"].append(B.detach().norm().item())
        out["grad_norm_A"].append(A.grad.norm().item())
        out["grad_norm_B"].append(B.grad.norm().item())
        diverged = not all(math.isfinite(out[k][-1]) for k in SERIES if k != "wall_time")
        if not diverged:
            try:
                opt.step()
            except RuntimeError as exc:  # the method refuses non-finite gradients
                if "non-finite" not in str(exc):
                    raise
                diverged = True
        out["wall_time"].append(time.perf_counter() - start)
        if diverged:
            if math.isfinite(lv):
                out["loss"][-1] = math.inf
            break
    bar.close()
    for k in SERIES:  # pad a stopped run to the common length
        out[k] += [math.nan] * (cfg.steps - len(out[k]))
    return out, (method.config() if method is not None else {"method": "lora"})


def steps_to_target(losses: list[float], target: float) -> int | None:
    """First step ``t`` with ``loss[t] <= target * loss[0]``, or None if never reached."""
    goal = target * losses[0]
    for t, v in enumerate(losses):
        if math.isfinite(v) and v <= goal:
            return t
    return None


def run_mf(cfg: MFConfig, progress: bool = False) -> dict[float, dict]:
    """Every method at every learning rate: ``{lr: {"methods": ..., "config": ...}}`` (the result-file schema).

    Runs with ``cfg.threads`` torch threads (restored afterwards): these r x r and 100 x 80
    problems are far faster single-threaded, especially on a loaded machine. A two-step
    throw-away run first keeps one-off start-up costs out of the timings.
    """
    problem = make_problem(cfg)
    env = res.environment("cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        warm = MFConfig(**{**asdict(cfg), "steps": 2})
        for name in dict.fromkeys(("lora", *cfg.methods)):
            run_method(name, cfg.lrs[0], warm, problem)
        out = {}
        for lr in cfg.lrs:
            methods, configs = {}, {}
            for name in cfg.methods:
                methods[name], configs[name] = run_method(name, lr, cfg, problem, progress)
            config = asdict(cfg)
            config.update(
                lr=lr,
                lipschitz=LIPSCHITZ,
                peft_scaling=1.0,
                initial_loss=methods[cfg.methods[0]]["loss"][0],
                method_configs=configs,
                environment={**env, "torch_threads": cfg.threads},
            )
            out[lr] = {"methods": methods, "config": config}
    finally:
        torch.set_num_threads(threads)
    return out


def summary_rows(all_results: dict[float, dict], target: float) -> list[dict]:
    """One row per (lr, method): steps to ``target`` x initial loss, final and best loss, divergence, time."""
    rows = []
    for lr, result in all_results.items():
        for name, s in result["methods"].items():
            finite = [v for v in s["loss"] if math.isfinite(v)]
            times = [v for v in s["wall_time"] if math.isfinite(v)]
            rows.append(
                {
                    "lr": lr,
                    "method": name,
                    "steps_to_target": steps_to_target(s["loss"], target),
                    "final_loss": s["loss"][-1] if math.isfinite(s["loss"][-1]) else math.inf,
                    "best_loss": min(finite) if finite else math.nan,
                    "diverged": not math.isfinite(s["loss"][-1]),
                    "wall_time_s": times[-1] if times else 0.0,
                }
            )
    return rows


def format_table(rows: list[dict], target: float, steps: int) -> str:
    """Plain-text table of :func:`summary_rows` (steps to target, final loss, time)."""
    reach_head = f"steps to {target:g}x L0"
    head = f"{'lr':>7} {'method':<10} {reach_head:>18} {'final loss':>11} {'time (s)':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        reach = str(r["steps_to_target"]) if r["steps_to_target"] is not None else f">{steps - 1}"
        final = "diverged" if r["diverged"] else f"{r['final_loss']:.3e}"
        lines.append(f"{r['lr']:>7g} {r['method']:<10} {reach:>18} {final:>11} {r['wall_time_s']:>9.2f}")
    return "\n".join(lines)


def lr_dirname(lr: float) -> str:
    return f"lr_{lr:g}"


def write_results(all_results: dict[float, dict], out: str | Path, cfg: MFConfig, plots: bool = True) -> list[Path]:
    """Write ``out/lr_<lr>/results.json`` per lr, ``out/results.json`` (first lr), ``out/summary.csv`` and plots."""
    out = Path(out)
    written = []
    for i, (lr, result) in enumerate(all_results.items()):
        res.validate_mf_results(result)
        written.append(res.write_json(out / lr_dirname(lr) / "results.json", result))
        if i == 0:
            written.append(res.write_json(out / "results.json", result))
    written.append(res.write_csv(out / "summary.csv", summary_rows(all_results, cfg.target)))
    if plots:
        from . import plots as pl

        written += pl.plot_mf_comparison(all_results, out)
        for lr, result in all_results.items():
            written += pl.plot_mf(result, out / lr_dirname(lr))
    return written


# ----------------------------------------------------------------------------- CLI
def add_parser(subparsers) -> argparse.ArgumentParser:
    d = MFConfig()
    p = subparsers.add_parser(
        "mf",
        help="matrix-factorisation toy (RefLoRA Fig. 2): LoRA vs ScaledGD vs RefLoRA(-S) vs ScaLoRA(-I)",
        description=__doc__.split("\n\n")[0] + " Every method runs through optlora on a PEFT model with plain SGD.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--out", default="runs/mf", help="output folder (results.json, lr_<lr>/results.json, plots)")
    p.add_argument("--m", type=int, default=d.m, help="rows of the target Y (= in_features of the LoRA layer)")
    p.add_argument("--n", type=int, default=d.n, help="columns of Y (= out_features)")
    p.add_argument("--rank", type=int, default=d.rank, help="rank of Y and LoRA rank r")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"optimizer steps per run (default {FULL_STEPS}; {QUICK_STEPS} with --quick)",
    )
    p.add_argument("--lrs", type=float, nargs="+", default=list(d.lrs), help="SGD learning rates; the first is primary")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to compare, from {', '.join(METHODS)}",
    )
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the target and of the initial A")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="plain GD steps shared by every method")
    p.add_argument("--target", type=float, default=d.target, help="report steps until loss <= target x initial loss")
    p.add_argument("--scalora-damping", type=float, default=d.scalora_damping, help="ScaLoRA kappa = damping/(L s lr)")
    p.add_argument("--scalora-i-interval", type=int, default=d.scalora_i_interval, help="ScaLoRA-I interval I")
    p.add_argument(
        "--scalora-i-damping", type=float, default=d.scalora_i_damping, help="ScaLoRA-I kappa = damping/(L s lr)"
    )
    p.add_argument("--dtype", choices=("float64", "float32"), default=d.dtype, help="dtype of the model")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (small problems: 1 is fastest)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK_STEPS} steps instead of {FULL_STEPS}")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (also off when stderr is not a TTY)")
    p.set_defaults(func=run)
    return p


def config_from_args(args: argparse.Namespace) -> MFConfig:
    """:class:`MFConfig` from parsed options (``--steps`` > ``--quick`` preset > default)."""
    steps = args.steps if args.steps is not None else (QUICK_STEPS if args.quick else FULL_STEPS)
    return MFConfig(
        m=args.m,
        n=args.n,
        rank=args.rank,
        steps=steps,
        lrs=tuple(args.lrs),
        methods=tuple(args.methods),
        seed=args.seed,
        warmup_steps=args.warmup_steps,
        target=args.target,
        scalora_damping=args.scalora_damping,
        scalora_i_interval=args.scalora_i_interval,
        scalora_i_damping=args.scalora_i_damping,
        dtype=args.dtype,
        threads=args.threads,
    )


def run(args: argparse.Namespace) -> int:
    try:
        cfg = config_from_args(args)
    except ValueError as exc:
        print(f"optlora mf: error: {exc}", file=sys.stderr)
        return 2
    progress = not args.no_progress and sys.stderr.isatty()
    all_results = run_mf(cfg, progress=progress)
    print(f"Matrix factorisation m={cfg.m} n={cfg.n} r={cfg.rank}, {cfg.steps} SGD steps, loss 1/2||AB^T - Y||^2")
    print(format_table(summary_rows(all_results, cfg.target), cfg.target, cfg.steps))
    written = write_results(all_results, args.out, cfg, plots=not args.no_plots)
    kinds = "results.json, summary.csv" + ("" if args.no_plots else ", *.png")
    print(f"wrote {len(written)} files under {args.out}/ ({kinds})")
    return 0
