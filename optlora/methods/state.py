"""Checks of a saved method state, run before :meth:`optlora.LoRAMethod.load_state_dict` writes anything.

A method state is loaded transactionally: names, shapes, dtypes, method, configuration,
counters, the guards' skip counts and generator states are all checked first; a state that
does not fit raises ``ValueError`` and leaves the method and its model exactly as they were.

Under FSDP2 a live tensor is a DTensor shard. A saved tensor fits it if it has the *global*
shape: a DTensor (e.g. loaded by ``torch.distributed.checkpoint`` into the live layout), or a
whole tensor, of which each rank then takes its block. A plain tensor of a rank's local shape
is refused (it would be one rank's shard). Every rank checks its own part, and the ranks then
agree (:func:`agree_over_ranks`): if one rank refuses, all raise before any writes, so no rank
continues with a state the others refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from ..distributed import is_dtensor, local
from . import guards


def describe(value) -> str:
    if is_dtensor(value):
        return f"tensor {tuple(value.shape)} {value.dtype} (sharded: {tuple(local(value).shape)} on this rank)"
    if isinstance(value, torch.Tensor):
        return f"tensor {tuple(value.shape)} {value.dtype}"
    return type(value).__name__


def check_tensors(what: str, saved, live: Mapping[str, torch.Tensor]) -> None:
    """Refuse a saved ``{name: tensor}`` that does not match ``live`` exactly (names, shapes, dtypes).

    A shape is never broadcast (a (1, n) tensor does not fit a (4, n) weight) and a dtype never cast.
    Shapes are global: a live FSDP2 shard takes a whole tensor or a DTensor of the same global shape.
    """
    if not isinstance(saved, Mapping):
        raise ValueError(f"state_dict[{what!r}] must be a mapping of name -> tensor, got {type(saved).__name__}")
    _check_names(what, saved, live)
    for name, want in live.items():
        got = saved[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            hint = ""
            if isinstance(got, torch.Tensor) and is_dtensor(want) and got.shape == local(want).shape:
                hint = (
                    " (this rank's shard, not the whole tensor: load sharded states with "
                    "optlora.checkpoint.load_state on every rank)"
                )
            raise ValueError(
                f"state_dict[{what!r}][{name!r}] is {describe(got)}, this model has {describe(want)}{hint}: "
                "nothing was loaded"
            )


def _check_names(what: str, saved: Mapping, live: Mapping) -> None:
    missing, extra = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or extra:
        raise ValueError(
            f"state_dict[{what!r}] does not match this model's LoRA layers: "
            + (f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} " if missing else "")
            + (f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}" if extra else "")
            + ". Was it saved from a model with the same LoRA configuration?"
        )


def check_nested(what: str, saved, live: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """:func:`check_tensors` for ``{name: {key: tensor}}`` (a layer's factors, a low-rank residual's parts)."""
    if not isinstance(saved, Mapping) or not all(isinstance(v, Mapping) for v in saved.values()):
        raise ValueError(f"state_dict[{what!r}] must map 'path[adapter]' -> {{name: tensor}}")
    _check_names(what, saved, live)  # names first (also where ``live`` is empty)
    for key in sorted({k for v in live.values() for k in v}):
        check_tensors(f"{what}.{key}", {n: v.get(key) for n, v in saved.items()}, {n: v[key] for n, v in live.items()})


def layer_path(name: str) -> str:
    """``"path[adapter]"`` -> ``"path"``."""
    return name.rsplit("[", 1)[0] if name.endswith("]") else name


def by_path(saved):
    """Key a saved ``{name: tensor}`` by layer path (states saved before this version used ``path[adapter]``)."""
    if not isinstance(saved, dict):
        return saved
    out: dict = {}
    for name, t in saved.items():
        path = layer_path(name) if isinstance(name, str) else name
        same = (
            isinstance(t, torch.Tensor)
            and isinstance(out.get(path), torch.Tensor)
            and torch.equal(local(out[path]), local(t))
        )
        if path in out and not same:
            raise ValueError(f"state_dict has two different tensors for layer {path!r}")
        out[path] = t
    return out


def _count(key: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state_dict[{key!r}] must be an int >= 0, got {value!r}")
    return value


def check_counters(state, config: dict) -> None:
    """Method, configuration, ``steps``, ``method_steps`` and (if saved) the guards' ``skipped`` counts."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a method state_dict is a mapping, got {type(state).__name__}")
    missing = [k for k in ("config", "steps", "method_steps") if k not in state]
    if missing:
        raise ValueError(f"state_dict has no {missing}: not an optlora method state (keys: {sorted(state)[:8]})")
    saved = state["config"]
    if saved != config:
        diff = (
            {
                k: (saved.get(k), config.get(k))
                for k in sorted(set(saved) | set(config))
                if saved.get(k) != config.get(k)
            }
            if isinstance(saved, Mapping)
            else saved
        )
        raise ValueError(
            f"state_dict was saved by another method or configuration (saved, this method): {diff}; "
            f"this method is {config}"
        )
    steps, method_steps = _count("steps", state["steps"]), _count("method_steps", state["method_steps"])
    if method_steps > steps:
        raise ValueError(f"state_dict has method_steps={method_steps} > steps={steps}: corrupted")
    if "skipped" in state:  # states written before the fault guards have none: the counts start at 0
        skipped = state["skipped"]
        if not isinstance(skipped, Mapping) or set(skipped) != set(guards.REASONS):
            raise ValueError(
                f"state_dict['skipped'] must map each of {list(guards.REASONS)} to a count, got "
                f"{sorted(skipped) if isinstance(skipped, Mapping) else type(skipped).__name__}"
            )
        for reason, n in skipped.items():
            _count(f"skipped.{reason}", n)


def agree_over_ranks(check, mesh) -> None:
    """Run ``check()`` on every rank of ``mesh`` (FSDP2); if any rank raises ``ValueError``, every rank raises.

    One ``all_gather_object`` of the error messages; ``mesh`` ``None`` (one process): just ``check()``.
    """
    if mesh is None or not dist.is_initialized():
        check()
        return
    try:
        check()
        error = None
    except ValueError as exc:
        error = str(exc)
    group = mesh.get_group()
    errors = [None] * dist.get_world_size(group)
    dist.all_gather_object(errors, error, group=group)
    bad = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if bad:
        rank, message = bad[0]
        where = "" if error is not None else f"rank {rank} refused the state, so every rank does: "
        raise ValueError(where + (error if error is not None else message))


# ---------------------------------------------------------------------------------------------- generators
def rng_key(device: torch.device, rank: int | None) -> str:
    """Key of a generator state: the device (one process), or ``"<device type>@<rank>"`` (FSDP2: one per rank)."""
    return str(device) if rank is None else f"{device.type}@{rank}"


def _parse(key) -> tuple[torch.device, int | None]:
    if not isinstance(key, str):
        raise ValueError(f"state_dict['rng'] has a key that is not a device: {key!r}")
    dev, _, rank = key.partition("@")
    try:
        return torch.device(dev), (int(rank) if rank else None)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ValueError(f"state_dict['rng'] has a key that is not a device or device@rank: {key!r}") from exc


def rng_plan(rng, devices: list[torch.device], rank: int | None, world: int) -> tuple[dict, str | None]:
    """The saved generator state for each live device in ``devices`` (checked on a scratch generator).

    ``rank``: this process's rank under FSDP2 (``None``: one process). A rank takes the states saved
    by the same rank; one process takes those saved by one process, a single saved device mapping to
    a single live device of the same type (saved on ``cuda:1``, resumed on ``cuda:0``). Returns the
    plan and, where the resumed merges cannot draw the saved run's random bits, why (a device or rank
    without a saved state, or another number of processes: the blocks each rank rounds differ).
    """
    if not isinstance(rng, Mapping):
        raise ValueError(f"state_dict['rng'] must map device -> generator state, got {type(rng).__name__}")
    parsed = {key: _parse(key) for key in rng}
    ranks = {r for _, r in parsed.values()}
    mine = {dev: rng[key] for key, (dev, r) in parsed.items() if r == rank}
    if rank is not None:  # saved per rank: match by device type
        by_type = {saved.type: st for saved, st in mine.items()}
        mine = {d: by_type[d.type] for d in devices if d.type in by_type}
    elif len(mine) == 1 and len(devices) == 1 and next(iter(mine)).type == devices[0].type:
        mine = {devices[0]: next(iter(mine.values()))}
    plan, missing = {}, []
    for dev in devices:
        if dev not in mine:
            missing.append(str(dev))
            continue
        st = mine[dev]
        st = local(st).cpu() if isinstance(st, torch.Tensor) else st
        try:
            torch.Generator(device=dev).set_state(st)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"state_dict['rng'] for {dev} is not a generator state: {exc}") from exc
        plan[dev] = st
    saved_world = 1 if None in ranks or not ranks else len(ranks)
    why = None
    if missing:
        why = f"the state has no stochastic-rounding generator state for {missing} (saved: {sorted(rng)})"
    elif saved_world != world:
        why = f"the state was saved by {saved_world} process(es), this run has {world}"
    return plan, why
