"""FSDP2: layer groups whose factors, gradients, moments and base weights are DTensor shards.

Under ``torch.distributed.fsdp.fully_shard`` every rank holds, at ``optimizer.step()``, one
block of rows (``Shard(0)``, the default) or columns (``Shard(1)``) of ``lora_A`` (r x in),
``lora_B`` (out x r), their gradients, their optimizer moments and the base weight. The
closed forms need (RefLoRA Thm 3/5, ScaLoRA Thms 3/5):

* Grams whose contraction runs over a sharded dimension, e.g. ``lora_B^T lora_B`` with
  ``lora_B`` split over its ``out`` rows: a sum of per-rank partial Grams;
* products that mix the rank rows of ``lora_A``: ``lora_A lora_A^T``, RefLoRA's
  ``S^-1 lora_A.grad``, ScaLoRA's merge ``B diag(c) A`` into a rank's rows of ``W``. They need
  the whole ``lora_A`` and its gradient, which are thin (r x in);
* per-layer norms and non-finite flags (sums over shards);
* what the range guards read (:mod:`optlora.methods.guards`): the largest entry of every rank
  index of the factors and gradients, of the optimizer moments, and ``||W||_F`` of the base
  weight (maxima and sums over shards).

:func:`exchange_` packs, for every sharded layer of the step, this rank's partial Grams or
norms, its rows of ``lora_A`` and ``lora_A.grad`` (and of ``lora_B`` where a merge needs whole
columns of it), its local non-finite flags and its partial maxima and weight-norm squares into one
byte buffer, and runs **one** ``all_gather`` per step (per device mesh). Every rank then assembles
the same whole ``lora_A``, sums the partial Grams and squares in rank order, takes the maximum of
the maxima and ANDs the flags: it holds bit-identical inputs, runs the same closed forms and
guards and takes the same decisions (finite, skipped, column or scalar). Maxima are exactly those
of one process; a sum of squares over shards rounds differently from a single process's norm, so a
guard comparing it with a limit can differ from one process only within rounding of that limit.
A guard that reads this rank's rows of a *planned* tensor (RefLoRA's preconditioned
``lora_B.grad``) is made to agree by :func:`and_over_ranks`: the per-layer flags are ANDed over the
ranks (one small all-reduce) before the one host sync, which is exact for such guards (the
largest entry fits iff it fits on every rank). Writes go to this rank's shards only: gradients
and moments are rescaled on the shards, and ScaLoRA merges into the rank's own block of ``W``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import merge
from ..discovery import LoRAFactors
from ..distributed import chunk_ranges, is_dtensor, local, shard_dim, shard_range
from .layers import _GET, LayerGroup, PairGrams, Stacked, finite_rows, group_factors

#: what a method reads per layer: RefLoRA/ScaledGD "grams", RefLoRA-S "sqnorms", ScaLoRA "pair"
READS = ("grams", "sqnorms", "pair")
#: the range guards of these reads need every rank index's largest entry (rows of lora_A/grad_A, columns of lora_B/grad_B)
ROW_READS = ("sqnorms", "pair")
#: the order of those maxima in the exchange, and what each reduces over: (stack, reduced dim, rank-index dim of the parameter)
_ROWS = (("A", 2, 0), ("gA", 2, 0), ("B", 1, 1), ("gB", 1, 1))


class _Pack:
    """Tensors of any dtype in one 8-byte-aligned uint8 buffer, moved by a single ``all_gather``."""

    def __init__(self):
        self.items: list[tuple[int, torch.Tensor]] = []
        self.nbytes = 0
        self.out: torch.Tensor | None = None

    def add(self, t: torch.Tensor) -> int:
        offset = -(-self.nbytes // 8) * 8
        self.items.append((offset, t.contiguous()))
        self.nbytes = offset + t.numel() * t.element_size()
        return len(self.items) - 1

    def all_gather(self, group, device: torch.device) -> None:
        buf = torch.zeros(-(-self.nbytes // 8) * 8, dtype=torch.uint8, device=device)
        for offset, t in self.items:
            buf[offset : offset + t.numel() * t.element_size()].copy_(t.reshape(-1).view(torch.uint8))
        world = dist.get_world_size(group)
        out = torch.empty(world * buf.numel(), dtype=torch.uint8, device=device)
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(out, buf, group=group)
        self.out = out.view(world, buf.numel())

    def get(self, slot: int) -> torch.Tensor:
        """Every rank's copy of item ``slot``: shape ``(world, *item.shape)``."""
        offset, t = self.items[slot]
        raw = self.out[:, offset : offset + t.numel() * t.element_size()]
        return raw.view(t.dtype).view(self.out.shape[0], *t.shape).to(t.device)


def _padded(x: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``x`` zero-padded to ``size`` along ``dim`` (every rank sends equal-sized blocks)."""
    if x.shape[dim] == size:
        return x
    out = x.new_zeros(*x.shape[:dim], size, *x.shape[dim + 1 :])
    out.narrow(dim, 0, x.shape[dim]).copy_(x)
    return out


def _amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x.abs().amax(dim)``; 0 where ``dim`` is empty (a rank that holds no entries along it)."""
    if x.shape[dim]:
        return x.abs().amax(dim)
    return x.new_zeros(x.shape[:dim] + x.shape[dim + 1 :])


def _select_layers(x, index: dict, idx: list[int]):
    """``x`` (the exchange: tensors with the layer as leading dim, nested dicts, flags) at layers ``idx``."""
    if isinstance(x, dict):
        return {k: _select_layers(v, index, idx) for k, v in x.items()}
    if isinstance(x, torch.Tensor):
        if x.device not in index:
            index[x.device] = torch.tensor(idx, device=x.device)
        return x.index_select(0, index[x.device])
    return x


def _rank_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum over the leading (rank) dimension in rank order: the same bits on every rank."""
    acc = parts[0].clone()
    for k in range(1, parts.shape[0]):
        acc += parts[k]
    return acc


class ShardedLayerGroup(LayerGroup):
    """Same-shape adapters whose tensors are FSDP2 shards (one mesh, one placement per tensor role).

    Reads (:meth:`factors_and_grads`, :meth:`factor_grams`, :meth:`factor_sqnorms`,
    :meth:`pair_grams`, and the guards' :meth:`row_amax`, :meth:`weight_norms`, :meth:`moment_amax`)
    answer from the step's exchange (:func:`exchange_`) and return the same values on every rank: the
    whole ``lora_A`` and its gradient, this rank's rows of ``lora_B`` and its gradient (or the whole of
    them, where a merge needs it), summed Grams and norms, whole-tensor maxima and agreed flags. Plans
    made from them therefore hold whole ``lora_A``-side tensors and, on the ``lora_B`` side, the layout
    of the reads; writes narrow them to this rank's blocks. :meth:`restrict` keeps the exchange of the
    layers it keeps, so a partial skip needs no second exchange.
    """

    def __init__(self, factors: list[LoRAFactors]):
        super().__init__(factors)
        f = factors[0]
        if not (is_dtensor(f.lora_A) and is_dtensor(f.lora_B)):
            raise RuntimeError(f"{f.name}: lora_A and lora_B must both be FSDP2 shards (fully_shard the whole model)")
        self.mesh = f.lora_A.device_mesh
        self.dim_A, self.dim_B = shard_dim(f.lora_A), shard_dim(f.lora_B)
        # every adapter of the group has the same shapes and placements: this rank's blocks, once
        self._range_A, self._range_B = shard_range(f.lora_A), shard_range(f.lora_B)
        self._x: dict | None = None  # the current step's exchange

    # ------------------------------------------------------------------ layout
    def _weight_ranges(self, f: LoRAFactors) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(offset, size)`` along ``out`` and along ``in`` of this rank's block of the base weight (cached)."""
        if getattr(self, "_w_ranges", None) is None:
            self._w_ranges = self._weight_block(self.factors[0])
        return self._w_ranges

    @staticmethod
    def _weight_block(f: LoRAFactors) -> tuple[tuple[int, int], tuple[int, int]]:
        w = f.base_weight
        ranges = [(0, w.shape[0]), (0, w.shape[1])]
        rng = shard_range(w)
        if rng is not None:
            ranges[rng[0]] = rng[1:]
        return (ranges[1], ranges[0]) if f.fan_in_fan_out else (ranges[0], ranges[1])

    def _whole_B(self, reads: str, merges: bool) -> bool:
        """Whether ``lora_B`` and its gradient must be gathered whole (else: partial Grams over ``out``)."""
        if reads == "sqnorms":
            return False
        if self.dim_B != 0:
            return True  # split over r: the Grams over out need every column block
        if not merges:
            return False
        f = self.factors[0]  # the merge needs lora_B's rows for this rank's rows of W along out
        out_axis = 1 if f.fan_in_fan_out else 0
        return not (is_dtensor(f.base_weight) and shard_dim(f.base_weight) == out_axis)

    def _local_stack(self, what: str) -> torch.Tensor:
        return torch.stack([local(_GET[what](f)).detach() for f in self.factors])

    # ------------------------------------------------------------------ exchange
    def _post(self, pack: _Pack, dtype: torch.dtype, reads: str, merges: bool, moments=None) -> None:
        """Put this rank's contribution for the step into ``pack`` (no communication).

        ``moments``: ``(optimizer, rule)`` whose moments a rescaling multiplies (their maxima are sent), or ``None``.
        """
        if reads not in READS:
            raise ValueError(f"reads must be one of {READS}, got {reads!r}")
        stacks = {w: self._local_stack(w) for w in ("A", "B", "gA", "gB")}
        whole_B = self._whole_B(reads, merges)
        slots = {"finite": pack.add(finite_rows(*stacks.values()))}
        if reads == "sqnorms":
            sq = torch.stack([stacks[w].to(dtype).square().sum((1, 2)) for w in ("A", "B")], 1)  # (L, 2)
            slots["sqnorms"] = pack.add(sq)
        else:
            world = self.mesh.size()
            gathered = [("A", self.dim_A), ("gA", self.dim_A)]
            gathered += [("B", self.dim_B), ("gB", self.dim_B)] if whole_B else []
            for w, d in gathered:
                n = _GET[w](self.factors[0]).shape[d]
                slots[w] = pack.add(_padded(stacks[w], d + 1, chunk_ranges(n, world)[0][1]))
            if not whole_B:
                B = stacks["B"].to(dtype) if reads == "grams" else torch.cat([stacks["gB"], stacks["B"]], 2).to(dtype)
                slots["gram_B"] = pack.add(B.mT @ B)
        if reads in ROW_READS:
            slots["rows"] = pack.add(self._local_rows(stacks, dtype))
        if merges and is_dtensor(self.factors[0].base_weight):
            slots["weight_sq"] = pack.add(self._local_weight_sq())
        keys = []
        if moments is not None:
            table = LayerGroup.moment_amax(self, *moments)  # maxima of this rank's shards of the moments
            keys = sorted(table, key=str)
            if keys:
                slots["moments"] = pack.add(torch.stack([table[k] for k in keys], 1))  # (L, K)
        self._x = {"dtype": dtype, "reads": reads, "whole_B": whole_B, "slots": slots, "local": stacks}
        self._x["moment_keys"] = keys

    def _local_rows(self, stacks: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """This rank's largest |entry| of every rank index of ``lora_A``, its gradient, ``lora_B``, its gradient.

        ``(L, 4, r)`` in ``dtype``; 0 at rank indices this rank holds none of, so that the maximum over
        ranks is the whole tensor's (exactly: rounding to ``dtype`` is monotone).
        """
        L, r = len(self.factors), self.rank
        out = torch.zeros(L, len(_ROWS), r, dtype=dtype, device=stacks["A"].device)
        for j, (w, reduced, rank_dim) in enumerate(_ROWS):
            d, offset, size = self._range_A if w in ("A", "gA") else self._range_B
            part = _amax(stacks[w], reduced)
            if d == rank_dim:  # this rank holds the rank indices offset .. offset + size, whole
                out[:, j, offset : offset + size] = part
            else:  # every rank index, over this rank's block of the other dimension
                out[:, j] = part
        return out

    def _local_weight_sq(self) -> torch.Tensor:
        """``||block of W||_F^2`` of this rank's block of every base weight, float64 ``(L,)`` (one fused reduction)."""
        weights = [local(f.base_weight).detach() for f in self.factors]
        dtype = torch.promote_types(weights[0].dtype, torch.float32)
        return torch.stack(torch._foreach_norm(weights, 2, dtype=dtype)).double().square()

    def _collect(self, pack: _Pack) -> None:
        """Assemble the whole tensors, sum the partials and AND the flags (identically on every rank)."""
        x = self._x
        dtype, world = x["dtype"], self.mesh.size()
        for name, slot in x["slots"].items():
            parts = pack.get(slot)
            if name == "finite":
                x[name] = parts.all(0)
            elif name in ("sqnorms", "gram_B", "weight_sq"):
                x[name] = _rank_sum(parts)
            elif name in ("rows", "moments"):
                x[name] = parts.amax(0)  # a maximum of maxima: exact, NaN propagates
            else:  # the valid rows of every rank's block, in rank order
                d = self.dim_A if name in ("A", "gA") else self.dim_B
                n = _GET[name](self.factors[0]).shape[d]
                blocks = [parts[k].narrow(d + 1, 0, size) for k, (_, size) in enumerate(chunk_ranges(n, world))]
                x[name] = torch.cat(blocks, d + 1).to(dtype)

    def _exchanged(self, dtype: torch.dtype | None = None) -> dict:
        if self._x is None or "finite" not in self._x:
            raise RuntimeError("a sharded layer group was read outside a step's exchange (optlora internal error)")
        if dtype is not None and dtype != self._x["dtype"]:
            raise RuntimeError(f"exchanged in {self._x['dtype']}, read in {dtype} (optlora internal error)")
        return self._x

    def release(self) -> None:
        self._x = None

    def restrict(self, idx: list[int]) -> ShardedLayerGroup:
        """The adapters ``idx`` as a sharded group that holds their rows of this step's exchange (no communication)."""
        sub = super().restrict(idx)
        if self._x is not None:
            sub._x = _select_layers(self._x, {}, idx)
        return sub

    # ------------------------------------------------------------------ read
    def factors_and_grads(self, dtype: torch.dtype) -> Stacked:
        """Whole ``lora_A`` and gradient; ``lora_B`` and gradient as this rank's rows or whole (see class doc)."""
        x = self._exchanged(dtype)
        loc = {w: t.to(dtype) for w, t in x["local"].items()}
        A, gA = (x["A"], x["gA"]) if "A" in x else (loc["A"], loc["gA"])
        B, gB = (x["B"], x["gB"]) if x["whole_B"] else (loc["B"], loc["gB"])
        return Stacked(A, B, gA, gB, x["finite"])

    def factor_grams(self, stacked: Stacked) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._exchanged()
        gram_B = x["gram_B"] if "gram_B" in x else stacked.B.mT @ stacked.B
        return stacked.A @ stacked.A.mT, gram_B

    def factor_sqnorms(self, stacked: Stacked) -> tuple[torch.Tensor, torch.Tensor]:
        sq = self._exchanged()["sqnorms"]
        return sq[:, 0], sq[:, 1]

    def row_amax(self, stacked: Stacked) -> dict[str, torch.Tensor]:
        """The whole tensors' maxima per rank index (max over ranks of each rank's, from the exchange)."""
        rows = self._exchanged()["rows"]
        return dict(zip(("lora_A", "grad_A", "lora_B", "grad_B"), rows.unbind(1)))

    def weight_norms(self) -> torch.Tensor:
        """``||W||_F`` of the whole base weights: the square root of the rank-ordered sum of every rank's block."""
        x = self._exchanged()
        if "weight_sq" not in x:  # base weights not sharded: every rank holds them whole
            return super().weight_norms()
        return x["weight_sq"].sqrt()

    def moment_amax(self, optimizer: torch.optim.Optimizer, rule: dict[str, int]) -> dict[tuple, torch.Tensor]:
        """The whole moments' maxima (max over ranks of each rank's shards, from the exchange)."""
        x = self._exchanged()
        if "moment_keys" not in x or (x["moment_keys"] and "moments" not in x):
            raise RuntimeError("optimizer moments were read but not exchanged (optlora internal error)")
        return {k: x["moments"][:, j] for j, k in enumerate(x["moment_keys"])}

    def pair_grams(self, dtype: torch.dtype) -> PairGrams:
        x = self._exchanged(dtype)
        XA = torch.cat([x["A"], x["gA"]], 1)
        if "gram_B" in x:
            gram_SB = x["gram_B"]
        else:
            XB = torch.cat([x["gB"], x["B"]], 2)
            gram_SB = XB.mT @ XB
        rows = x["rows"]  # (L, 4, r): lora_A, grad_A, lora_B, grad_B
        amax_SA, amax_SB = torch.cat([rows[:, 0], rows[:, 1]], 1), torch.cat([rows[:, 3], rows[:, 2]], 1)
        return PairGrams(*self.effective_pair_grams(XA @ XA.mT, gram_SB), x["finite"], amax_SA, amax_SB)

    # ------------------------------------------------------------------ write
    def set_gradients_(self, grad_A: torch.Tensor, grad_B: torch.Tensor) -> None:
        whole_B = self._exchanged()["whole_B"]
        dst, src = [], []
        for i, f in enumerate(self.factors):
            dst += [local(f.lora_A.grad), local(f.lora_B.grad)]
            src += [grad_A[i].narrow(*self._range_A), grad_B[i].narrow(*self._range_B) if whole_B else grad_B[i]]
        torch._foreach_copy_(dst, src)

    def _rescale_operands(self, rescaling, optimizer, rule, full_scales):
        """The plain operands on this rank's shards; a scale along a sharded dimension narrowed to the block.

        Gradients and moments are laid out as their parameter (FSDP2 builds them alike); a local
        shape that disagrees is refused rather than broadcast.
        """
        tensors, scales, sides = super()._rescale_operands(rescaling, optimizer, rule, False)
        out_t, out_s = [], []
        for t, s, side_A in zip(tensors, scales, sides):
            d, offset, size = self._range_A if side_A else self._range_B
            lt = local(t)
            if lt.shape[d] != size:
                raise RuntimeError(
                    f"a sharded LoRA gradient or moment is laid out unlike its parameter: {tuple(lt.shape)}"
                )
            if s.shape[d] != 1:
                s = s.narrow(d, offset, size)
            out_t.append(lt)
            out_s.append(s.expand(lt.shape).contiguous() if full_scales else s)
        return out_t, out_s, sides

    def merge_(self, coeff: torch.Tensor, *, mode: str, buffers: dict[str, torch.Tensor], generator) -> None:
        """``W += s B diag(coeff) A`` into this rank's block of every base weight (ScaLoRA Sec. 3.1)."""
        x = self._exchanged()
        for i, f in enumerate(self.factors):
            w = local(f.base_weight.detach())
            (out_off, out_n), (in_off, in_n) = self._weight_ranges(f)
            lora_A = x["A"][i].narrow(1, in_off, in_n).to(f.lora_A.dtype)
            if x["whole_B"]:
                lora_B = x["B"][i].narrow(0, out_off, out_n).to(f.lora_B.dtype)
            else:
                lora_B = local(f.lora_B.detach())
                if self._range_B[1:] != (out_off, out_n):
                    raise RuntimeError(f"{f.name}: lora_B and the base weight are sharded differently along out")
            buffer = buffers.get(f.name)
            merge.merge_low_rank_(
                w,
                lora_B,
                lora_A,
                coeff[i],
                f.scaling,
                fan_in_fan_out=f.fan_in_fan_out,
                mode=mode,
                buffer=None if buffer is None else local(buffer),
                generator=generator(w.device),
            )


def group_layers(factors: list[LoRAFactors]) -> list[LayerGroup]:
    """:func:`optlora.methods.layers.group_factors`, with FSDP2-sharded adapters in :class:`ShardedLayerGroup`.

    Refuses a model where some LoRA factors are FSDP2 shards and others are not: their
    gradients are not reduced the same way (``fully_shard`` the root module too).
    """
    groups = group_factors(factors)
    sharded = [is_dtensor(g.factors[0].lora_A) or is_dtensor(g.factors[0].lora_B) for g in groups]
    if any(sharded) and not all(sharded):
        plain = next(g.factors[0].name for g, s in zip(groups, sharded) if not s)
        raise RuntimeError(
            f"some LoRA layers are FSDP2 shards and others (e.g. {plain}) are not; apply fully_shard to the root "
            "module as well (fully_shard(model) after the per-layer calls), so that every LoRA parameter is sharded"
        )
    return [ShardedLayerGroup(g.factors) if s else g for g, s in zip(groups, sharded)]


def exchange_(groups: list[LayerGroup], dtype: torch.dtype, reads: str, merges: bool, moments=None) -> int:
    """One ``all_gather`` (per device mesh) of every sharded group's contribution; no-op without them.

    ``moments``: ``(optimizer, rule)`` when the step's rescaling multiplies optimizer moments (their
    maxima travel too). Returns the bytes this rank sent (it receives that many from every rank).
    """
    by_mesh: dict[int, list[ShardedLayerGroup]] = {}
    for g in groups:
        if isinstance(g, ShardedLayerGroup):
            by_mesh.setdefault(id(g.mesh), []).append(g)
    sent = 0
    for gs in by_mesh.values():
        pack = _Pack()
        for g in gs:
            g._post(pack, dtype, reads, merges, moments)
        mesh = gs[0].mesh
        pack.all_gather(mesh.get_group(), torch.device(mesh.device_type))
        for g in gs:
            g._collect(pack)
        sent += pack.out.shape[1]
    return sent


def release_(groups: list[LayerGroup]) -> None:
    """Drop the step's exchanged tensors (whole ``lora_A`` copies) once the step is done."""
    for g in groups:
        if isinstance(g, ShardedLayerGroup):
            g.release()


def and_over_ranks(flags: torch.Tensor, groups: list[LayerGroup]) -> torch.Tensor:
    """Per-layer bool ``flags`` (identical layout on every rank) ANDed over the ranks of the groups' device meshes.

    One all-reduce MIN of this small tensor per mesh, on the device, before the caller's host sync;
    ``flags`` unchanged without sharded groups. Every rank must call it (it is a collective).
    """
    meshes = {id(g.mesh): g.mesh for g in groups if isinstance(g, ShardedLayerGroup)}
    if not meshes:
        return flags
    agreed = flags.to(torch.uint8)
    for mesh in meshes.values():
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=mesh.get_group())
    return agreed.bool()
