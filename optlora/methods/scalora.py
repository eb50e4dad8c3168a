"""ScaLoRA and ScaLoRA-I (Zhang, Yang, Cai, Giannakis, arXiv:2510.23818).

At every scaling step, rewrite the current weight without changing it::

    W = (W_pt + A B^T - A~ B~^T) + A~ B~^T,     A~ = A diag(alpha),  B~ = B diag(beta)

merge the first part into the frozen base weight and continue training from the
optimally scaled factors. The scalings minimise the first-order part of the
Lipschitz bound on the loss after one step (ScaLoRA Sec. 3):

* **column scaling** (Theorem 5): ``[alpha; beta] = sqrt(kappa v)`` with ``K v = lambda``,
  used when ``v > 0``;
* **scalar scaling** (Theorem 3): otherwise (the paper's hybrid rule, per layer).

``kappa = 1/(L eta)``. The optimizer's moments follow the chain rule
(``lora_A``'s by ``beta``, ``lora_B``'s by ``alpha``; Lemmas 3.3/3.6), so AdamW is never
reset. Because the increments are merged, the accumulated update is no longer confined
to rank r. **ScaLoRA-I** does the same every ``interval`` steps.
"""

from __future__ import annotations

import warnings

import torch

from .. import merge, residual
from ..discovery import quantized_base
from ..distributed import copy_into_, is_dtensor, local, shard_like
from ..functional import chain_rule_rescaling, scalora_merge_coefficient, scalora_merge_growth, scalora_scalings
from . import guards
from .base import LoRAMethod
from .layers import LayerGroup
from .state import by_path, check_nested, check_tensors, layer_path, rng_key, rng_plan


class ScaLoRA(LoRAMethod):
    """ScaLoRA (``interval=1``) or ScaLoRA-I (``interval=I``) for a PEFT LoRA model.

    Example::

        optimizer = torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=2e-4)
        method = optlora.ScaLoRA(model, warmup_steps=100)        # interval=10 for ScaLoRA-I
        method.attach(optimizer)

    Args:
        model: a PEFT model with LoRA ``Linear`` adapters on plain floating-point layers.
        warmup_steps: plain LoRA steps first (PEFT's ``lora_B = 0`` init makes the column
            system singular; the scalar rule handles it, but a short warm-up is gentler).
        interval: scale-and-merge every ``interval`` steps (ScaLoRA-I); plain steps between.
        kappa: ``1/(L eta)`` in effective coordinates (PEFT scale absorbed in the factors).
            It sets the size of the rescaled factors (``A~^T A~ ~ kappa``). Under Adam the
            literal ``1/(L lr)`` is far too large. The default 1.0 keeps the factors near PEFT's
            initial scale; tune it like a learning rate (README, docs/RESULTS.md).
        mode: ``"hybrid"`` (paper), ``"column"`` or ``"scalar"``.
        merge_precision: how increments enter bfloat16/float16 base weights:
            ``"auto"`` (= ``"stochastic"`` for half precision), ``"nearest"``, ``"kahan"``
            (extra buffer per weight) or ``"fp32"`` (float32 master copy). See
            :mod:`optlora.merge`. Float32/64 weights always merge exactly.
        seed: seed of the stochastic-rounding generator (identical on every DDP rank).
        residual_rank: for layers whose base weight is quantised (bitsandbytes 4/8-bit, GPTQ, ...)
            and cannot absorb a merge exactly: keep their merged increments in a rank-``R``
            low-rank residual beside the base layer (:mod:`optlora.residual`), truncated by SVD
            after each merge; ``stats()["residual_dropped"]`` reports the largest share of the merged
            increments' norm that truncation cut off (over layers). ``None`` (default)
            refuses quantised bases. Plain floating-point bases always merge exactly.
        on_nonfinite, skip_unsupported, compute_dtype: as in :class:`optlora.RefLoRA`.
    """

    name = "scalora"
    transfers_moments = True
    merges = True
    #: a layer is skipped when its merge would enlarge the first-order rounding-error bound of its function
    #: by more than G_max = max(merge_f32_units * u_float32 / u_weight, merge_growth_half)
    #: (:func:`optlora.functional.scalora_merge_growth`): 32 units of float32 rounding for float32/float64
    #: weights, 4x the weight's own rounding for bfloat16/float16. Measured G: 1.0-1.15 at kappa=1 and at
    #: most 2.6 at kappa=10 on SmolLM2-135M; up to ~25 at kappa=10 on small random Llamas (docs/RELIABILITY.md)
    merge_f32_units = 32.0
    merge_growth_half = 4.0
    reads = "pair"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        warmup_steps: int = 100,
        interval: int = 1,
        kappa: float = 1.0,
        mode: str = "hybrid",
        merge_precision: str = "auto",
        seed: int = 0,
        residual_rank: int | None = None,
        **kwargs,
    ):
        kappa = guards.check_kappa(kappa)
        seed = guards.check_int("seed", seed, 0)
        if mode not in ("hybrid", "column", "scalar"):
            raise ValueError(f"mode must be 'hybrid', 'column' or 'scalar', got {mode!r}")
        merge.resolve_mode(merge_precision, torch.float32)  # validates the name
        if residual_rank is not None:
            residual_rank = guards.check_int("residual_rank", residual_rank, 1)
        self.residual_rank = residual_rank
        self._quantized_ok = residual_rank is not None  # discovery: quantised bases take a residual, not a refusal
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        #: adapter name -> its low-rank residual, for the adapters on quantised bases
        self.residuals: dict[str, residual.LowRankResidual] = {}
        quantized = [f for f in self.factors if residual_rank is not None and quantized_base(f)]
        if quantized and self.sharded:
            self._refuse_sharded_residuals(quantized[0].name)  # before a hook is registered on the model
        for f in quantized:
            self.residuals[f.name] = residual.attach(f, residual_rank)
        self.name = "scalora" if interval == 1 else "scalora_i"
        self.kappa = float(kappa)
        self.mode = mode
        self.merge_precision = merge_precision
        self.seed = int(seed)
        self.buffers: dict[str, torch.Tensor] = {}
        shared: dict[int, torch.Tensor | None] = {}  # adapters of one layer merge into one weight: one buffer
        for f in self.factors:
            if f.name in self.residuals:
                continue
            key = id(f.base_weight)
            if key not in shared:
                shared[key] = merge.new_buffer(f.base_weight, merge_precision)
            if shared[key] is not None:
                self.buffers[f.name] = shared[key]
        self._generators: dict[torch.device, torch.Generator] = {}

    def config(self) -> dict:
        out = {**super().config(), "kappa": self.kappa, "mode": self.mode, "merge_precision": self.merge_precision}
        if self.residual_rank is not None:
            out["residual_rank"] = self.residual_rank
        return out

    def attach(self, optimizer) -> ScaLoRA:
        self._refuse_sharded_residuals()
        super().attach(optimizer)
        # a model sharded by fully_shard after construction: merge buffers follow their weights' blocks
        sharded: dict[int, torch.Tensor] = {}  # adapters of one weight share one buffer
        for f in self.factors:
            buf = self.buffers.get(f.name)
            if buf is not None and is_dtensor(f.base_weight) and not is_dtensor(buf):
                if id(buf) not in sharded:
                    sharded[id(buf)] = shard_like(buf, f.base_weight)
                self.buffers[f.name] = sharded[id(buf)]
        return self

    def _refuse_sharded_residuals(self, layer: str | None = None) -> None:
        """Residuals are whole tensors beside whole base layers: FSDP2-sharded factors are refused (at construction,
        attach, or the first due step after ``fully_shard``), before anything is touched."""
        layer = layer or next(iter(self.residuals), None)
        if layer is not None and self.sharded:
            raise RuntimeError(
                f"ScaLoRA(residual_rank=...) keeps whole low-rank residuals beside quantised base layers (e.g. {layer}) "
                "and does not support FSDP2-sharded LoRA factors; on a sharded quantised model use optlora.RefLoRA "
                "(or scalar=True for RefLoRA-S), which only touches the LoRA factors, or run ScaLoRA(residual_rank=R) "
                "in one process or under DDP."
            )

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _plan_all(self, groups: list[LayerGroup]) -> list[dict[str, torch.Tensor]]:
        """Grams per group; the 2r x 2r closed forms once for all groups of the same rank (fewer kernels).

        A layer is applied only where the scalings exist (``ok``) and its step stays in range
        (``in_range``): the rescaled factors, gradients and moments are finite and the merge keeps
        the model's function to rounding (:meth:`_merge_in_range`). Other layers are not touched.
        """
        self._refuse_sharded_residuals()  # (sharded after attach): before anything is read or written
        grams = [g.pair_grams(self.compute_dtype) for g in groups]
        plans: list = [None] * len(groups)
        buckets: dict[tuple, list[int]] = {}
        for i, pg in enumerate(grams):
            buckets.setdefault((pg.gram_SA.shape[-1], pg.gram_SA.device), []).append(i)
        for idx in buckets.values():
            gram_SA = torch.cat([grams[i].gram_SA for i in idx])
            gram_SB = torch.cat([grams[i].gram_SB for i in idx])
            finite = torch.cat([grams[i].finite for i in idx])
            sc = scalora_scalings(gram_SA, gram_SB, self.kappa, self.mode)
            ok = sc.ok & finite
            one = torch.ones_like(sc.alpha)
            alpha = torch.where(ok[:, None], sc.alpha, one)
            beta = torch.where(ok[:, None], sc.beta, one)
            sizes = [grams[i].finite.shape[0] for i in idx]
            for i, *parts in zip(idx, *(t.split(sizes) for t in (finite, ok, sc.column, alpha, beta))):
                plans[i] = dict(zip(("finite", "ok", "column", "alpha", "beta"), parts))
        for g, pg, plan in zip(groups, grams, plans):
            r = g.rank
            rows = {"lora_A": pg.amax_SA[:, :r], "grad_A": pg.amax_SA[:, r:], "grad_B": pg.amax_SB[:, :r]}
            rows["lora_B"] = pg.amax_SB[:, r:]
            in_range = self._rescaling_in_range(g, plan["alpha"], plan["beta"], rows)
            plan["in_range"] = in_range & self._merge_in_range(g, pg, plan["alpha"], plan["beta"])
            plan["ok"] = plan["ok"] & plan["in_range"]
            plan["column"] = plan["column"] & plan["ok"]
        return plans

    def _merge_in_range(self, group: LayerGroup, pg, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
        """Per layer: the merge keeps the function to rounding and every intermediate is finite.

        ``G = scalora_merge_growth(...) <= max_merge_growth(dtype)`` (the merge enlarges the function's
        rounding error by at most that factor), ``1 - alpha beta`` finite, the thin factor
        ``lora_B diag(1 - alpha beta)`` and every term of its product with ``lora_A`` finite in the merge's
        working dtype, the merged weight finite in the weight's dtype. Reads ``||W||_F`` of every base weight (one fused reduction).
        """
        r = group.rank
        f = group.factors[0]
        coeff = scalora_merge_coefficient(alpha, beta)
        gram_A, gram_B = pg.gram_SA[:, :r, :r], pg.gram_SB[:, r:, r:]
        if f.name in self.residuals:  # ||W_q|| + ||U V|| bounds the weight the layer stands for (homogeneous groups)
            res = [self.residuals[g.name] for g in group.factors]
            weight_norm = torch.stack([x.base_norm + x.norm for x in res]).to(gram_A.dtype)
        else:
            weight_norm = group.weight_norms().to(gram_A.dtype)
        growth = scalora_merge_growth(gram_A, gram_B, alpha, beta, weight_norm)
        before = weight_norm + (gram_A * gram_B).sum((-2, -1)).clamp_min(0).sqrt()
        # the merge target: the base weight, or (quantised base) the float32 residual
        target = self.residuals[f.name].left.dtype if f.name in self.residuals else f.base_weight.dtype
        work = torch.promote_types(torch.promote_types(f.lora_B.dtype, target), torch.float32)
        left = pg.amax_SB[:, r:].double() * coeff.double().abs()  # per column of lora_B diag(1 - alpha beta)
        scaling = group.scalings(gram_A.dtype).double()[:, None]  # the cached compute-dtype tensor: no host copy
        # every term of the merge's matmul (and so its partial sums) is at most s |B_ik c_k A_kj|
        product = (scaling * left * pg.amax_SA[:, :r].double()).sum(-1)
        thin = guards.fits(left, work).all(-1) & guards.fits(product, work)
        merged = guards.fits((growth * before).double(), target)
        return torch.isfinite(coeff).all(-1) & (growth <= self.max_merge_growth(target)) & thin & merged

    def max_merge_growth(self, weight_dtype: torch.dtype) -> float:
        """The largest merge growth ``G`` accepted for base weights of ``weight_dtype`` (see :attr:`merge_f32_units`)."""
        eps32, eps = torch.finfo(torch.float32).eps, torch.finfo(weight_dtype).eps
        return max(self.merge_f32_units * eps32 / eps, self.merge_growth_half)

    def _range_advice(self) -> str:
        return (
            f"With kappa={self.kappa:g} the rescaled adapter may be far larger than the base weights; the merge's "
            "rounding error grows with kappa (limit: ScaLoRA.max_merge_growth(dtype), docs/RELIABILITY.md). "
            "Try a smaller kappa."
        )

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        alpha, beta = plan["alpha"], plan["beta"]
        # in float64 from the scalings the rescale applies (a float32 compute dtype included): 1 - alpha*beta
        # then matches alpha*beta to float64 rounding, and merge_low_rank_ forms lora_B * coefficient in
        # float64 before a single rounding, so neither a bf16/float32 rounding nor a float32 overflow of the
        # coefficient (tiny factors: alpha*beta > 3e38 while lora_B * coefficient is moderate) reaches the weight
        coeff = scalora_merge_coefficient(alpha.double(), beta.double())
        if group.factors[0].name in self.residuals:  # quantised bases (groups are homogeneous: group_factors)
            group.fold_into_residuals_(coeff, [self.residuals[f.name] for f in group.factors], self.compute_dtype)
        else:
            group.merge_(coeff, mode=self.merge_precision, buffers=self.buffers, generator=self._generator)
        self._rescale_group_(group, chain_rule_rescaling(alpha, beta))

    # ------------------------------------------------------------------ state
    def _layers(self) -> dict[str, torch.Tensor]:
        """Base weight of every merged layer, keyed by its module path (adapters of one layer share it)."""
        return {layer_path(f.name): f.base_weight for f in self.factors if f.name not in self.residuals}

    def _layer_buffers(self) -> dict[str, torch.Tensor]:
        return {layer_path(f.name): b for f in self.factors if (b := self.buffers.get(f.name)) is not None}

    def _rank(self) -> tuple[int | None, int]:
        """``(rank, world size)`` of the FSDP2 mesh (``(None, 1)`` in one process or under DDP)."""
        if not self.sharded:
            return None, 1
        mesh = self.factors[0].lora_A.device_mesh
        return mesh.get_local_rank(), mesh.size()

    def _devices(self) -> list[torch.device]:
        """The devices the base weights (this rank's blocks of them) are on now: one rounding generator each."""
        return sorted({local(w).device for w in self._layers().values()}, key=str)

    def state_dict(self) -> dict:
        """Counters, the live factors, the merged base weights, merge buffers and the rounding RNG state.

        ScaLoRA's model is ``W_now + s B A`` with ``W_now`` rewritten at every merge (Sec. 3.1), so the
        factors and the base weights are only right together: both are saved here (tensors are not
        copied; under FSDP2 they are this rank's DTensor shards). Base weights and buffers are keyed by
        layer path, factors by ``path[adapter]``. ``rng`` holds the stochastic-rounding generator of
        every device that holds a base weight now (seeded if no merge drew from it yet); under FSDP2 each
        rank rounds its own blocks with its own generator, so each rank saves its own, as
        ``"<device type>@<rank>"``.
        """
        rank, _ = self._rank()
        out = {
            **super().state_dict(),
            "factors": {f.name: {"lora_A": f.lora_A.detach(), "lora_B": f.lora_B.detach()} for f in self.factors},
            "base_weights": {path: w.detach() for path, w in self._layers().items()},
            "buffers": self._layer_buffers(),
            "rng": {rng_key(d, rank): self._generator(d).get_state() for d in self._devices()},
        }
        if self.residuals:  # quantised bases are never written: their merged increments live here
            out["residuals"] = {name: r.state_dict() for name, r in self.residuals.items()}
        return out

    def check_state_dict(self, state) -> None:
        """Config and counters (:meth:`LoRAMethod.check_state_dict`), then every tensor's name, shape and dtype."""
        super().check_state_dict(state)
        missing = [k for k in ("base_weights", "rng") if k not in state]
        if missing:
            raise ValueError(f"a ScaLoRA state_dict needs {missing} (ScaLoRA rewrites the base weights)")
        check_tensors("base_weights", by_path(state["base_weights"]), self._layers())
        check_tensors("buffers", by_path(state.get("buffers", {})), self._layer_buffers())
        if "factors" in state:  # states saved before the factors were part of it rely on the PEFT adapter
            live = {f.name: {"lora_A": f.lora_A, "lora_B": f.lora_B} for f in self.factors}
            check_nested("factors", state["factors"], live)
        if self.residuals or "residuals" in state:  # quantised bases: their merged increments (optlora.residual)
            live = {n: {k: getattr(r, k) for k in residual.STATE_KEYS} for n, r in self.residuals.items()}
            check_nested("residuals", state.get("residuals", {}), live)
        rng_plan(state["rng"], self._devices(), *self._rank())

    def _write_state(self, state) -> None:
        rng, why = rng_plan(state["rng"], self._devices(), *self._rank())
        if why is not None and self._rounds_stochastically():
            warnings.warn(
                f"{why}: later merges round with other random bits than the saved run would have (the model "
                "itself is restored exactly)",
                stacklevel=4,
            )
        weights, buffers = by_path(state["base_weights"]), by_path(state.get("buffers", {}))
        with torch.no_grad():  # FSDP2: a whole saved tensor fills this rank's block (copy_into_)
            for f in self.factors if "factors" in state else ():
                copy_into_(f.lora_A, state["factors"][f.name]["lora_A"])
                copy_into_(f.lora_B, state["factors"][f.name]["lora_B"])
            for path, w in self._layers().items():
                copy_into_(w, weights[path])
            for path, b in self._layer_buffers().items():
                copy_into_(b, buffers[path])
            for name, res in self.residuals.items():
                res.load_state_dict(state["residuals"][name])
        for dev, st in rng.items():
            self._generator(dev).set_state(st)
        super()._write_state(state)

    def _rounds_stochastically(self) -> bool:
        return any(merge.resolve_mode(self.merge_precision, w.dtype) == "stochastic" for w in self._layers().values())

    def stats(self) -> dict:
        out = super().stats()
        out.update(kappa=self.kappa, mode=self.mode)
        if self._last:
            col = self._last["column"]
            out["column_fraction"] = float(col.sum()) / max(1, col.numel())
        if self.residuals:
            report = self.residual_report()
            out["residual_rank"] = self.residual_rank
            out["residual_dropped"] = max(
                r["dropped"] / r["merged"] if r["merged"] > 0 else 0.0 for r in report.values()
            )
        return out

    def residual_report(self) -> dict[str, dict[str, float]]:
        """Per quantised layer: ``merged`` = summed Frobenius norm of the merged increments, ``dropped`` = summed
        norm truncation has cut off (the weight is within ``dropped`` of exact ScaLoRA's), ``norm`` = ``||U V||_F``."""
        if not self.residuals:
            return {}
        dev = next(iter(self.residuals.values())).merged.device  # (a model split over devices: gather on one)
        rows = torch.stack([torch.stack([r.merged, r.dropped, r.norm]).to(dev) for r in self.residuals.values()])
        keys = ("merged", "dropped", "norm")
        return {n: dict(zip(keys, row)) for n, row in zip(self.residuals, rows.cpu().tolist())}  # one sync
