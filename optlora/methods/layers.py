"""Layer groups: the one place where a method reads and writes LoRA factors, gradients, moments and base weights.

A :class:`LayerGroup` holds adapters of the same shape, dtype and device, so that every
closed form runs once per group on stacked ``(L, ...)`` tensors. Methods never touch a
parameter directly: they ask a group for its Grams / norms / gradients (*read*), compute
their closed forms with :mod:`optlora.functional`, and hand the result back (*write*:
new gradients, a chain-rule rescaling, a merge). This is the seam where a sharded engine
plugs in: a group whose tensors live in shards computes the same reads from its shards plus
one reduction, and writes into its own shards.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from .. import merge, residual
from ..discovery import LoRAFactors, quantized_base
from ..distributed import is_dtensor, local
from ..functional import Rescaling
from ..optimizer_state import moment_tensors
from .guards import amax

_GET = {
    "A": lambda f: f.lora_A,
    "B": lambda f: f.lora_B,
    "gA": lambda f: f.lora_A.grad,
    "gB": lambda f: f.lora_B.grad,
}


class PairGrams(NamedTuple):
    """ScaLoRA's Grams of ``S^A = [A, dA]`` and ``S^B = [dB, B]`` (effective coordinates), finiteness and row maxima."""

    gram_SA: torch.Tensor  # (L, 2r, 2r)
    gram_SB: torch.Tensor  # (L, 2r, 2r)
    finite: torch.Tensor  # (L,) bool
    amax_SA: torch.Tensor  # (L, 2r): max |entry| of lora_A's rows, then of lora_A.grad's rows (raw, PEFT layout)
    amax_SB: torch.Tensor  # (L, 2r): max |entry| of lora_B.grad's columns, then of lora_B's columns


class Stacked(NamedTuple):
    """One group's factors and gradients, stacked ``(L, ...)`` in the compute dtype (PEFT layout)."""

    A: torch.Tensor  # lora_A, (L, r, in)
    B: torch.Tensor  # lora_B, (L, out, r)
    gA: torch.Tensor
    gB: torch.Tensor
    finite: torch.Tensor  # (L,) bool


def finite_rows(*stacked: torch.Tensor) -> torch.Tensor:
    """Per-layer finiteness of stacked ``(L, ...)`` tensors.

    One float64 sum per tensor instead of an elementwise ``isfinite`` (five kernels): a sum
    is NaN/Inf iff an element is, as float64 sums of float32/bfloat16 values cannot overflow.
    """
    sums = torch.stack([t.flatten(1).sum(1, dtype=torch.float64) for t in stacked])
    return torch.isfinite(sums).all(0)


class LayerGroup:
    """Same-shape, same-dtype, same-device adapters, processed as one batch."""

    def __init__(self, factors: list[LoRAFactors]):
        self.factors = factors

    def __len__(self) -> int:
        return len(self.factors)

    def subset(self, factors: list[LoRAFactors]) -> LayerGroup:
        """A group of the same kind holding only ``factors`` (e.g. the adapters that received a gradient)."""
        return type(self)(factors)

    def restrict(self, idx: list[int]) -> LayerGroup:
        """The adapters ``idx`` of this group, as a group of the same kind (e.g. the layers a step applies to)."""
        return self.subset([self.factors[i] for i in idx])

    @property
    def rank(self) -> int:
        return self.factors[0].rank

    # ------------------------------------------------------------------ read
    def stack(self, what: str, dtype: torch.dtype) -> torch.Tensor:
        """``what`` in {"A", "B", "gA", "gB"}: stacked (L, ...) copy in ``dtype``."""
        return torch.stack([_GET[what](f).detach() for f in self.factors]).to(dtype)

    def pair(self, first: str, second: str, dtype: torch.dtype, dim: int) -> torch.Tensor:
        """``[first_l, second_l]`` concatenated along ``dim`` (1: rows, 2: columns) for every layer ``l``.

        (L, 2a, b) or (L, a, 2b) in ``dtype``, built with one stack and one converting copy
        (instead of two stacks, two conversions and a ``cat``).
        """
        L = len(self.factors)
        X = torch.stack(
            [_GET[first](f).detach() for f in self.factors] + [_GET[second](f).detach() for f in self.factors]
        )
        X = X.view(2, L, *X.shape[1:])
        a, b = X.shape[2:]
        if dim == 1:
            return torch.empty(L, 2, a, b, dtype=dtype, device=X.device).copy_(X.transpose(0, 1)).view(L, 2 * a, b)
        return torch.empty(L, a, 2, b, dtype=dtype, device=X.device).copy_(X.permute(1, 2, 0, 3)).view(L, a, 2 * b)

    def scalings(self, dtype: torch.dtype) -> torch.Tensor:
        """PEFT scales as an (L,) tensor; cached (no host-to-device copy per step) until a scale changes."""
        key = (dtype, tuple(f.scaling for f in self.factors))
        if getattr(self, "_scalings_key", None) != key:
            self._scalings = torch.tensor(key[1], dtype=dtype, device=self.factors[0].lora_A.device)
            self._scalings_key = key
        return self._scalings

    def factors_and_grads(self, dtype: torch.dtype) -> Stacked:
        """``lora_A, lora_B, lora_A.grad, lora_B.grad`` stacked in ``dtype``, and per-layer finiteness."""
        A, B = self.stack("A", dtype), self.stack("B", dtype)  # (L, r, in), (L, out, r)
        gA, gB = self.stack("gA", dtype), self.stack("gB", dtype)
        return Stacked(A, B, gA, gB, finite_rows(A, B, gA, gB))

    def factor_grams(self, stacked: Stacked) -> tuple[torch.Tensor, torch.Tensor]:
        """``A^T A = lora_A lora_A^T`` and ``B^T B = lora_B^T lora_B`` (r x r each, per layer)."""
        return stacked.A @ stacked.A.mT, stacked.B.mT @ stacked.B

    def factor_sqnorms(self, stacked: Stacked) -> tuple[torch.Tensor, torch.Tensor]:
        """``||A||_F^2`` and ``||B||_F^2`` per layer."""
        return stacked.A.square().sum((1, 2)), stacked.B.square().sum((1, 2))

    def row_amax(self, stacked: Stacked) -> dict[str, torch.Tensor]:
        """Largest |entry| of each rank index (``(L, r)`` each): rows of ``lora_A``, ``grad_A``, columns of ``lora_B``, ``grad_B``."""
        return {
            "lora_A": stacked.A.abs().amax(-1),
            "grad_A": stacked.gA.abs().amax(-1),
            "lora_B": stacked.B.abs().amax(1),
            "grad_B": stacked.gB.abs().amax(1),
        }

    def pair_grams(self, dtype: torch.dtype) -> PairGrams:
        """Grams of ``S^A = [A, dA]``, ``S^B = [dB, B]`` in effective coordinates, per-layer finiteness and row maxima.

        Effective factors absorb the PEFT scale ``s`` into both: ``A_eff = sqrt(s) lora_A^T``,
        ``B_eff = sqrt(s) lora_B`` (ScaLoRA Theorems 3/5 are stated for ``W = W_pt + A B^T``).
        """
        XA = self.pair("A", "gA", dtype, dim=1)  # (L, 2r, in)  = [lora_A; lora_A.grad] = S^A^T (raw)
        XB = self.pair("gB", "B", dtype, dim=2)  # (L, out, 2r) = [lora_B.grad, lora_B] = S^B   (raw)
        gram_SA, gram_SB = XA @ XA.mT, XB.mT @ XB
        # a Gram diagonal entry is a row's sum of squares: finite iff the row is (float64 cannot overflow
        # on float32/bfloat16 values); in float32 compute, check the factors themselves
        if dtype == torch.float64:
            finite = torch.isfinite(gram_SA.diagonal(dim1=1, dim2=2).sum(1) + gram_SB.diagonal(dim1=1, dim2=2).sum(1))
        else:
            finite = finite_rows(XA, XB)
        return PairGrams(*self.effective_pair_grams(gram_SA, gram_SB), finite, XA.abs().amax(-1), XB.abs().amax(1))

    def effective_pair_grams(self, gram_SA: torch.Tensor, gram_SB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw pair Grams to effective coordinates: the blocks of ``lora_A`` and ``lora_B`` times ``sqrt(s)`` each."""
        L, r = gram_SA.shape[0], gram_SA.shape[1] // 2
        root_s = self.scalings(gram_SA.dtype).sqrt()[:, None].expand(L, r)
        ones = torch.ones_like(root_s)
        dA, dB = torch.cat([root_s, ones], 1), torch.cat([ones, root_s], 1)
        return gram_SA * (dA[:, :, None] * dA[:, None, :]), gram_SB * (dB[:, :, None] * dB[:, None, :])

    def weight_norms(self) -> torch.Tensor:
        """``||W||_F`` of every adapter's base weight, ``(L,)`` in float32 or better (one fused reduction)."""
        weights = [f.base_weight.detach() for f in self.factors]
        dtype = torch.promote_types(weights[0].dtype, torch.float32)
        return torch.stack(torch._foreach_norm(weights, 2, dtype=dtype))

    def moment_amax(self, optimizer: torch.optim.Optimizer, rule: dict[str, int]) -> dict[tuple, torch.Tensor]:
        """Largest |entry| of the optimizer moments a rescaling multiplies, by ``(which, power, dtype)``.

        ``which`` is ``"grad_A"`` (``lora_A``'s moments, scaled like its gradient) or ``"grad_B"``; each
        value is a float64 ``(L,)`` tensor (0 for layers without that state), from one fused reduction.
        """
        tensors, per_layer = [], []
        for f in self.factors:
            keys = []
            for p, which in ((f.lora_A, "grad_A"), (f.lora_B, "grad_B")):
                for t, power in moment_tensors(optimizer, rule, p):
                    tensors.append(local(t))  # FSDP2: this rank's shard (the exchange takes the max over ranks)
                    keys.append((which, power, t.dtype))
            per_layer.append(keys)
        if not tensors:
            return {}
        values = amax(tensors)
        L = len(self.factors)
        if all(keys == per_layer[0] for keys in per_layer):  # the usual case: one layout, no per-tensor kernels
            table = values.view(L, len(per_layer[0]))
            columns: dict[tuple, list[int]] = {}
            for j, key in enumerate(per_layer[0]):
                columns.setdefault(key, []).append(j)
            return {key: table[:, cols].amax(1) for key, cols in columns.items()}
        out: dict[tuple, list] = {}
        flat = iter(values.unbind(0))
        zero = torch.zeros((), dtype=torch.float64, device=values.device)
        for i, keys in enumerate(per_layer):
            for key in keys:
                row = out.setdefault(key, [zero] * L)
                row[i] = torch.maximum(row[i], next(flat))
        return {key: torch.stack(row) for key, row in out.items()}

    # ------------------------------------------------------------------ write
    def set_gradients_(self, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
        """Overwrite every adapter's ``lora_A.grad`` / ``lora_B.grad`` with the stacked ``(L, ...)`` tensors."""
        grads = [f.lora_A.grad for f in self.factors] + [f.lora_B.grad for f in self.factors]
        torch._foreach_copy_(grads, [*grad_A.unbind(0), *grad_B.unbind(0)])

    def rescale_(
        self,
        rescaling: Rescaling,
        optimizer: torch.optim.Optimizer | None = None,
        rule: dict[str, int] | None = None,
        *,
        full_scales: bool = False,
    ) -> None:
        """Apply a chain-rule rescaling (:func:`optlora.functional.chain_rule_rescaling`) to the whole group.

        Factors, gradients and (with ``optimizer`` and its moment ``rule``) the moments are
        multiplied in one ``torch._foreach_mul_``. Scales stay in float32 or better, so
        half-precision storage is rounded once. ``full_scales`` materialises the per-layer scales
        to full shape so that the multi-tensor CUDA fast path applies (float32 tensors).
        """
        tensors, scales, _ = self._rescale_operands(rescaling, optimizer, rule, full_scales)
        torch._foreach_mul_(tensors, scales)

    def _rescale_operands(
        self, rescaling: Rescaling, optimizer, rule, full_scales: bool
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
        """Every tensor :meth:`rescale_` multiplies, its broadcastable scale and whether it is ``lora_A``'s side.

        ``lora_A``-side scales are (r, 1) (the rank index is ``lora_A``'s row), ``lora_B``-side (1, r).
        """
        cast: dict[tuple, torch.Tensor] = {}
        first = self.factors[0]
        shape_A, shape_B = (len(self.factors), *first.lora_A.shape), (len(self.factors), *first.lora_B.shape)
        by_name = rescaling._asdict()

        def scale(which: str, dtype: torch.dtype, power: int = 1) -> torch.Tensor:
            key = (which, dtype, power)
            if key not in cast:
                row = which in ("lora_A", "grad_A")  # lora_A is r x in: the rank index is its row
                t = by_name[which].to(torch.promote_types(dtype, torch.float32))
                t = t if power == 1 else t**power
                t = t[:, :, None] if row else t[:, None, :]
                cast[key] = t.expand(shape_A if row else shape_B).contiguous() if full_scales else t
            return cast[key]

        tensors, scales, sides = [], [], []
        for i, f in enumerate(self.factors):
            for t, which in (
                (f.lora_A, "lora_A"),
                (f.lora_B, "lora_B"),
                (f.lora_A.grad, "grad_A"),
                (f.lora_B.grad, "grad_B"),
            ):
                tensors.append(t)
                scales.append(scale(which, t.dtype)[i])
                sides.append(which in ("lora_A", "grad_A"))
            if optimizer is None or rule is None:
                continue
            for p, which in ((f.lora_A, "grad_A"), (f.lora_B, "grad_B")):
                for t, power in moment_tensors(optimizer, rule, p):
                    tensors.append(t)
                    scales.append(scale(which, t.dtype, power)[i])
                    sides.append(which == "grad_A")
        return tensors, scales, sides

    def merge_(
        self,
        coeff: torch.Tensor,
        *,
        mode: str,
        buffers: dict[str, torch.Tensor],
        generator,
    ) -> None:
        """``W_l += s_l lora_B_l diag(coeff_l) lora_A_l`` into every adapter's base weight (ScaLoRA Sec. 3.1)."""
        for i, f in enumerate(self.factors):
            w = f.base_weight
            merge.merge_low_rank_(
                w.data,
                f.lora_B.detach(),
                f.lora_A.detach(),
                coeff[i],
                f.scaling,
                fan_in_fan_out=f.fan_in_fan_out,
                mode=mode,
                buffer=buffers.get(f.name),
                generator=generator(w.device),
            )

    def fold_into_residuals_(
        self, coeff: torch.Tensor, residuals: list[residual.LowRankResidual], compute_dtype: torch.dtype
    ) -> None:
        """``U_l V_l <- rank-R truncation of (U_l V_l + s_l lora_B_l diag(coeff_l) lora_A_l)``: ScaLoRA's merge
        (Sec. 3.1) for adapters on quantised bases, into their low-rank residuals (:func:`optlora.residual.fold_`)."""
        scale = self.scalings(coeff.dtype)[:, None] * coeff  # (L, r): s_l * coeff_l
        left = torch.stack([f.lora_B.detach() for f in self.factors]).to(coeff.dtype) * scale[:, None, :]
        right = torch.stack([f.lora_A.detach() for f in self.factors])
        residual.fold_(residuals, left, right, compute_dtype)


def group_factors(factors: list[LoRAFactors]) -> list[LayerGroup]:
    """Partition adapters into groups of the same device, dtypes, shapes and kind of base (order kept)."""
    groups: dict[tuple, list[LoRAFactors]] = defaultdict(list)
    for f in factors:
        key = (f.lora_A.device, f.lora_A.dtype, f.lora_B.dtype, tuple(f.lora_A.shape), tuple(f.lora_B.shape))
        key += (quantized_base(f),)  # merged into the weight or into a residual: never in one group
        if is_dtensor(f.lora_A) or is_dtensor(f.lora_B):  # FSDP2: also the mesh and every placement
            w = f.base_weight
            mesh = getattr(f.lora_A, "device_mesh", None)
            key += (id(mesh), _placements(f.lora_A), _placements(f.lora_B), _placements(w), f.fan_in_fan_out)
        groups[key].append(f)
    return [LayerGroup(v) for v in groups.values()]


def _placements(t: torch.Tensor) -> tuple | None:
    return tuple(str(p) for p in t.placements) if is_dtensor(t) else None
