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

from .. import merge
from ..functional import chain_rule_rescaling, scalora_merge_coefficient, scalora_scalings
from .base import LoRAMethod, check_tensors
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
        **kwargs,
    ):
        if not (isinstance(kappa, (int, float)) and kappa > 0 and kappa == kappa and kappa != float("inf")):
            raise ValueError(f"kappa must be a positive finite number, got {kappa!r}")
        if mode not in ("hybrid", "column", "scalar"):
            raise ValueError(f"mode must be 'hybrid', 'column' or 'scalar', got {mode!r}")
        merge.resolve_mode(merge_precision, torch.float32)  # validates the name
        super().__init__(model, warmup_steps=warmup_steps, interval=interval, **kwargs)
        self.name = "scalora" if interval == 1 else "scalora_i"
        self.kappa = float(kappa)
        self.mode = mode
        self.merge_precision = merge_precision
        self.seed = int(seed)
        self.buffers: dict[str, torch.Tensor] = {}
        shared: dict[int, torch.Tensor | None] = {}  # adapters of one layer merge into one weight: one buffer
        for f in self.factors:
            key = id(f.base_weight)
            if key not in shared:
                shared[key] = merge.new_buffer(f.base_weight, merge_precision)
            if shared[key] is not None:
                self.buffers[f.name] = shared[key]
        self._generators: dict[torch.device, torch.Generator] = {}
        for f in self.factors:  # eagerly: a checkpoint taken before the first merge must still hold the RNG state
            self._generator(f.base_weight.device)

    def config(self) -> dict:
        return {**super().config(), "kappa": self.kappa, "mode": self.mode, "merge_precision": self.merge_precision}

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
        group.merge_(coeff, mode=self.merge_precision, buffers=self.buffers, generator=self._generator)
        self._rescale_group_(group, chain_rule_rescaling(alpha, beta))

    # ------------------------------------------------------------------ state
    def _layers(self) -> dict[str, torch.Tensor]:
        """Base weight of every merged layer, keyed by its module path (adapters of one layer share it)."""
        return {_path(f.name): f.base_weight for f in self.factors}

    def _layer_buffers(self) -> dict[str, torch.Tensor]:
        return {_path(f.name): b for f in self.factors if (b := self.buffers.get(f.name)) is not None}

    def state_dict(self) -> dict:
        """Counters, the live factors, the merged base weights, merge buffers and the rounding RNG state.

        ScaLoRA's model is ``W_now + s B A`` with ``W_now`` rewritten at every merge (Sec. 3.1), so the
        factors and the base weights are only right together: both are saved here (tensors are not
        copied). Base weights and buffers are keyed by layer path, factors by ``path[adapter]``.
        """
        return {
            **super().state_dict(),
            "factors": {f.name: {"lora_A": f.lora_A.detach(), "lora_B": f.lora_B.detach()} for f in self.factors},
            "base_weights": {path: w.detach() for path, w in self._layers().items()},
            "buffers": self._layer_buffers(),
            "rng": {str(d): g.get_state() for d, g in self._generators.items()},
        }

    def check_state_dict(self, state) -> None:
        """Config and counters (:meth:`LoRAMethod.check_state_dict`), then every tensor's name, shape and dtype."""
        super().check_state_dict(state)
        missing = [k for k in ("base_weights", "rng") if k not in state]
        if missing:
            raise ValueError(f"a ScaLoRA state_dict needs {missing} (ScaLoRA rewrites the base weights)")
        check_tensors("base_weights", _by_path(state["base_weights"]), self._layers())
        check_tensors("buffers", _by_path(state.get("buffers", {})), self._layer_buffers())
        if "factors" in state:  # states saved before the factors were part of it rely on the PEFT adapter
            factors = state["factors"]
            if not isinstance(factors, dict) or not all(isinstance(v, dict) for v in factors.values()):
                raise ValueError("state_dict['factors'] must map 'path[adapter]' -> {'lora_A': ..., 'lora_B': ...}")
            for which in ("lora_A", "lora_B"):
                got = {n: v.get(which) for n, v in factors.items()}
                check_tensors(f"factors.{which}", got, {f.name: getattr(f, which) for f in self.factors})
        self._rng_plan(state["rng"])

    def _rng_plan(self, rng, *, warn: bool = False) -> dict[torch.device, torch.Tensor]:
        """Saved generator state per live device (checked on a scratch generator); one device maps to one."""
        if not isinstance(rng, dict):
            raise ValueError(f"state_dict['rng'] must map device -> generator state, got {type(rng).__name__}")
        try:
            saved = {torch.device(d): st for d, st in rng.items()}
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"state_dict['rng'] has a key that is not a device: {exc}") from exc
        if len(saved) == 1 and len(self._generators) == 1:  # e.g. saved on cuda:1, resumed on cuda:0
            (dev,), (other, st) = self._generators, next(iter(saved.items()))
            saved = {dev: st} if other.type == dev.type else saved
        plan = {}
        for dev in self._generators:
            if dev not in saved:
                if warn and self._rounds_stochastically():
                    warnings.warn(
                        f"the state has no stochastic-rounding generator state for {dev} (saved: {list(rng)}); "
                        "later merges round with other random bits than the saved run (the model itself is exact)",
                        stacklevel=4,
                    )
                continue
            st = saved[dev]
            st = st.cpu() if isinstance(st, torch.Tensor) else st
            try:
                torch.Generator(device=dev).set_state(st)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ValueError(f"state_dict['rng'][{str(dev)!r}] is not a generator state: {exc}") from exc
            plan[dev] = st
        return plan

    def _write_state(self, state) -> None:
        rng = self._rng_plan(state["rng"], warn=True)
        weights, buffers = _by_path(state["base_weights"]), _by_path(state.get("buffers", {}))
        with torch.no_grad():
            for f in self.factors if "factors" in state else ():
                f.lora_A.copy_(state["factors"][f.name]["lora_A"])
                f.lora_B.copy_(state["factors"][f.name]["lora_B"])
            for path, w in self._layers().items():
                w.copy_(weights[path])
            for path, b in self._layer_buffers().items():
                b.copy_(buffers[path])
        for dev, st in rng.items():
            self._generators[dev].set_state(st)
        super()._write_state(state)

    def _rounds_stochastically(self) -> bool:
        return any(merge.resolve_mode(self.merge_precision, f.base_weight.dtype) == "stochastic" for f in self.factors)

    def stats(self) -> dict:
        out = super().stats()
        out.update(kappa=self.kappa, mode=self.mode)
        if self._last:
            col = self._last["column"]
            out["column_fraction"] = float(col.sum()) / max(1, col.numel())
        return out


def _path(name: str) -> str:
    """``"path[adapter]"`` -> ``"path"``."""
    return name.rsplit("[", 1)[0] if name.endswith("]") else name


def _by_path(saved):
    """Key a saved ``{name: tensor}`` by layer path (states saved before this version used ``path[adapter]``)."""
    if not isinstance(saved, dict):
        return saved
    out: dict = {}
    for name, t in saved.items():
        path = _path(name) if isinstance(name, str) else name
        same = isinstance(t, torch.Tensor) and isinstance(out.get(path), torch.Tensor) and torch.equal(out[path], t)
        if path in out and not same:
            raise ValueError(f"state_dict has two different tensors for layer {path!r}")
        out[path] = t
    return out
