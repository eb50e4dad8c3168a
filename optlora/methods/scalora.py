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

import torch

from .. import merge, residual
from ..discovery import merge_problem, quantized_base
from ..functional import chain_rule_rescaling, scalora_merge_coefficient, scalora_scalings
from .base import LoRAMethod
from .layers import LayerGroup


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
        if not (isinstance(kappa, (int, float)) and kappa > 0 and kappa == kappa and kappa != float("inf")):
            raise ValueError(f"kappa must be a positive finite number, got {kappa!r}")
        if mode not in ("hybrid", "column", "scalar"):
            raise ValueError(f"mode must be 'hybrid', 'column' or 'scalar', got {mode!r}")
        merge.resolve_mode(merge_precision, torch.float32)  # validates the name
        if residual_rank is not None and (type(residual_rank) is not int or residual_rank < 1):
            raise ValueError(f"residual_rank must be None or an int >= 1, got {residual_rank!r}")
        if residual_rank is not None:
            self.merges = False  # let discovery accept quantised bases; every layer is checked below
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        self.residual_rank = residual_rank
        self.residuals: dict[str, residual.LowRankResidual] = {}  # adapter name -> its residual (quantised bases)
        if residual_rank is not None:
            del self.merges  # ScaLoRA merges: into the base weight, or into the residual
            self._attach_residuals(residual_rank)
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

    def _attach_residuals(self, rank: int) -> None:
        """A residual for every adapter on a quantised base; any other layer must take an exact merge."""
        problems = [f"{f.name}: {why}" for f in self.factors if not quantized_base(f) and (why := merge_problem(f))]
        if problems:
            raise ValueError("ScaLoRA cannot merge into these LoRA layers:\n  " + "\n  ".join(problems))
        for f in self.factors:
            if quantized_base(f):
                self.residuals[f.name] = residual.attach(f, rank)

    def config(self) -> dict:
        out = {**super().config(), "kappa": self.kappa, "mode": self.mode, "merge_precision": self.merge_precision}
        if self.residual_rank is not None:
            out["residual_rank"] = self.residual_rank
        return out

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def _plan_all(self, groups: list[LayerGroup]) -> list[dict[str, torch.Tensor]]:
        """Grams per group; the 2r x 2r closed forms once for all groups of the same rank (fewer kernels)."""
        grams = [g.pair_grams(self.compute_dtype) for g in groups]
        plans: list = [None] * len(groups)
        buckets: dict[tuple, list[int]] = {}
        for i, (gram_SA, _, _) in enumerate(grams):
            buckets.setdefault((gram_SA.shape[-1], gram_SA.device), []).append(i)
        for idx in buckets.values():
            gram_SA = torch.cat([grams[i][0] for i in idx])
            gram_SB = torch.cat([grams[i][1] for i in idx])
            finite = torch.cat([grams[i][2] for i in idx])
            sc = scalora_scalings(gram_SA, gram_SB, self.kappa, self.mode)
            ok = sc.ok & finite
            one = torch.ones_like(sc.alpha)
            alpha = torch.where(ok[:, None], sc.alpha, one)
            beta = torch.where(ok[:, None], sc.beta, one)
            column = sc.column & ok
            sizes = [grams[i][2].shape[0] for i in idx]
            for i, *parts in zip(idx, *(t.split(sizes) for t in (finite, ok, column, alpha, beta))):
                plans[i] = dict(zip(("finite", "ok", "column", "alpha", "beta"), parts))
        return plans

    def _apply(self, group: LayerGroup, plan: dict[str, torch.Tensor]) -> None:
        alpha, beta = plan["alpha"], plan["beta"]
        # float32 at least: rounding 1 - alpha*beta to bf16 would change the model's function at the merge
        work = torch.promote_types(group.factors[0].lora_B.dtype, torch.float32)
        coeff = scalora_merge_coefficient(alpha, beta).to(work)
        group.merge_(
            coeff,
            mode=self.merge_precision,
            buffers=self.buffers,
            generator=self._generator,
            residuals=self.residuals,
            compute_dtype=self.compute_dtype,
        )
        self._rescale_group_(group, chain_rule_rescaling(alpha, beta))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Counters, the merged base weights, merge buffers and the rounding RNG state.

        The base weights are not part of a PEFT adapter checkpoint, so they are saved here.
        """
        out = {
            **super().state_dict(),
            "base_weights": {f.name: f.base_weight.detach() for f in self.factors if f.name not in self.residuals},
            "buffers": dict(self.buffers),
            "rng": {str(d): g.get_state() for d, g in self._generators.items()},
        }
        if self.residuals:  # quantised bases are never written: their merged increments live here
            out["residuals"] = {name: r.state_dict() for name, r in self.residuals.items()}
        return out

    def load_state_dict(self, state: dict) -> None:
        names = {f.name for f in self.factors if f.name not in self.residuals}
        if set(state["base_weights"]) != names:
            raise ValueError("state_dict's merged base weights do not match this model's LoRA layers")
        if set(state.get("residuals", {})) != set(self.residuals):
            raise ValueError(
                f"state_dict's low-rank residuals ({sorted(state.get('residuals', {}))}) do not match this model's "
                f"quantised LoRA layers ({sorted(self.residuals)})"
            )
        super().load_state_dict(state)
        with torch.no_grad():
            for f in self.factors:
                if f.name in self.residuals:
                    self.residuals[f.name].load_state_dict(state["residuals"][f.name])
                    continue
                f.base_weight.copy_(state["base_weights"][f.name])
                if f.name in self.buffers:
                    self.buffers[f.name].copy_(state["buffers"][f.name])
        for dev, st in state.get("rng", {}).items():
            self._generator(torch.device(dev)).set_state(st.cpu() if isinstance(st, torch.Tensor) else st)

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
