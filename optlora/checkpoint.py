"""A method's exact state on disk, beside the PEFT adapter: one safetensors file, or one DCP folder under FSDP2.

One process (and DDP, where rank 0 writes): ``optlora_state.safetensors`` holds
:meth:`optlora.LoRAMethod.state_dict`: its tensors (for ScaLoRA the live LoRA factors, the merged
base weights of the LoRA layers only, in their own dtype, the merge buffers and the
stochastic-rounding generator states) as safetensors tensors, and everything else (method,
config, step and skip counters) as JSON in the file's metadata. Nothing in it is executed when it
is read. A state saved by earlier versions as ``optlora_state.pt`` is still read, with
``torch.load(weights_only=True)``.

FSDP2 (``method.sharded``): the same ``state_dict()`` holds this rank's DTensor shards, and every
rank writes them with ``torch.distributed.checkpoint`` into the folder ``optlora_state.dcp``
(:func:`save_state` and :func:`load_state` are then collectives: call them on every rank). It is
loaded back shard by shard on any number of ranks, or read whole in one process
(:func:`read_state`: ``optlora export``, :func:`optlora.persist.rebuild`). Its non-tensor entries are
read with ``torch.load(weights_only=True)`` first, so nothing in it is executed either. Both
kinds go through the same transactional ``load_state_dict``.

Sizes, measured on SmolLM2-135M (``bench/checkpoint_size.py``), are in docs/SAVING.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

STATE_FILE = "optlora_state.safetensors"
LEGACY_STATE_FILE = "optlora_state.pt"
#: the folder of a sharded (FSDP2) method state, written by every rank with torch.distributed.checkpoint
SHARDED_STATE = "optlora_state.dcp"
FORMAT = "optlora-state/1"
_TENSOR = "__tensor__"
#: the entry of a sharded state that holds what a safetensors state keeps in its header
_META = "optlora_metadata"

__all__ = [
    "FORMAT",
    "LEGACY_STATE_FILE",
    "SHARDED_STATE",
    "STATE_FILE",
    "find_state",
    "load_state",
    "read_metadata",
    "read_state",
    "save_state",
    "state_steps",
]


def flatten(state: Mapping) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state`` -> (safetensors tensors, metadata); every tensor is replaced by ``{"__tensor__": key}`` in the JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node, path: tuple[str, ...]):
        if isinstance(node, torch.Tensor):
            key = "/".join(path)
            if key in tensors:  # cannot happen for str keys; kept so that a collision can never drop a tensor
                raise ValueError(f"two tensors flatten to the key {key!r}")
            tensors[key] = node.detach().to("cpu").contiguous()
            return {_TENSOR: key}
        if isinstance(node, Mapping):
            if not all(isinstance(k, str) for k in node):
                raise TypeError(f"state keys must be strings, got {[type(k).__name__ for k in node]} at {path}")
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store a {type(node).__name__} at {'/'.join(path)} in a safetensors state")

    skeleton = walk(state, ())
    return tensors, {"format": "pt", "optlora": FORMAT, "state": json.dumps(skeleton)}


def unflatten(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict:
    """Inverse of :func:`flatten`; a missing or unknown tensor key is a clear ``ValueError``."""
    if metadata.get("optlora") != FORMAT or "state" not in metadata:
        raise ValueError(f"not an optlora state file (metadata 'optlora' = {metadata.get('optlora')!r}, want {FORMAT})")

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {_TENSOR}:
                if node[_TENSOR] not in tensors:
                    raise ValueError(f"the state file lists tensor {node[_TENSOR]!r} but does not contain it")
                return tensors[node[_TENSOR]]
            return {k: walk(v) for k, v in node.items()}
        return node

    return walk(json.loads(metadata["state"]))


def _is_sharded(path: str) -> bool:
    """A complete DCP folder (its ``.metadata`` is written last)."""
    return os.path.isfile(os.path.join(path, ".metadata"))


def find_state(path: str | os.PathLike, *, sharded: bool = False) -> str | None:
    """The state in checkpoint folder ``path``, or ``None``: ``optlora_state.safetensors``, the FSDP2 folder
    ``optlora_state.dcp`` or a legacy ``optlora_state.pt`` (``path`` may also be one of them).

    ``sharded``: prefer the DCP folder where a folder holds both (a sharded method loads its shards).
    """
    path = os.fspath(path)
    if os.path.isfile(path) or (os.path.isdir(path) and _is_sharded(path)):
        return path
    names = (
        (SHARDED_STATE, STATE_FILE, LEGACY_STATE_FILE) if sharded else (STATE_FILE, SHARDED_STATE, LEGACY_STATE_FILE)
    )
    for name in names:
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate) or (name == SHARDED_STATE and os.path.isdir(candidate) and _is_sharded(candidate)):
            return candidate
    return None


def save_state(method, directory: str | os.PathLike, *, extra_metadata: Mapping[str, str] | None = None) -> str:
    """Write ``method.state_dict()`` to ``directory/optlora_state.safetensors`` atomically; returns the path.

    The file appears complete or not at all (written to a temporary name, then renamed), so a crash
    while saving never leaves a truncated state next to a checkpoint. ``extra_metadata`` (strings)
    goes into the file header, e.g. the live PEFT adapter configuration (:mod:`optlora.persist`).
    FSDP2 (``method.sharded``): every rank calls it and writes its shards into ``directory/optlora_state.dcp``
    (:mod:`optlora.sharded_checkpoint`), also atomically.
    """
    from safetensors.torch import save_file

    if method.sharded:
        from . import sharded_checkpoint

        return sharded_checkpoint.save(method, directory, {**(extra_metadata or {}), "method": type(method).__name__})
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, STATE_FILE)
    tensors, metadata = flatten(method.state_dict())
    metadata = {**(extra_metadata or {}), **metadata, "method": type(method).__name__}
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header of a safetensors state file, or the metadata entry of a sharded one (``{}`` for a legacy
    ``.pt`` state); no tensor is read."""
    from safetensors import safe_open

    found = find_state(path)
    if found is None or found.endswith(".pt"):
        return {}
    if os.path.isdir(found):
        from . import sharded_checkpoint

        return sharded_checkpoint.read(found, keys=(sharded_checkpoint.META,))[1]
    with safe_open(found, "pt") as fh:
        return dict(fh.metadata() or {})


def state_steps(path: str | os.PathLike) -> int | None:
    """The ``steps`` counter of a saved state, without reading its tensors (``None`` if unreadable)."""
    try:
        found = find_state(path)
        if found is not None and os.path.isdir(found):
            from . import sharded_checkpoint

            return int(sharded_checkpoint.read(found, keys=("steps",))[0]["steps"])
        return int(json.loads(read_metadata(path)["state"])["steps"])
    except Exception:  # noqa: BLE001 - a missing or unreadable header just means "not this state"
        return None


def read_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a saved method state whole, into this process: a checkpoint folder, ``optlora_state.safetensors``,
    an FSDP2 ``optlora_state.dcp`` folder (every rank's shards) or a legacy ``optlora_state.pt``."""
    found = find_state(path)
    if found is None:
        raise FileNotFoundError(f"no optlora method state ({STATE_FILE} or {SHARDED_STATE}) at {os.fspath(path)}")
    if found.endswith(".pt"):
        return torch.load(found, map_location=map_location, weights_only=True)
    if os.path.isdir(found):
        from . import sharded_checkpoint

        return sharded_checkpoint.read(found)[0]
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(found, "pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(found, device=str(map_location))
    except SafetensorError as exc:
        raise ValueError(f"{found} is not a readable safetensors file: {exc}") from exc
    return unflatten(tensors, metadata)


def load_state(method, path: str | os.PathLike) -> dict:
    """Restore ``method`` from a checkpoint folder or state (checked before anything is written); returns it.

    FSDP2: call it on every rank. A sharded state is loaded shard by shard into the live layout; a
    whole one (safetensors) is read by every rank, each taking its blocks.
    """
    found = find_state(path, sharded=method.sharded)
    if found is not None and os.path.isdir(found) and method.sharded:
        from . import sharded_checkpoint

        return sharded_checkpoint.load(method, found)
    state = read_state(found if found is not None else path)
    method.load_state_dict(state)
    return state
