"""A method's exact state on disk: one safetensors file beside the PEFT adapter, no pickle.

``optlora_state.safetensors`` holds :meth:`optlora.LoRAMethod.state_dict`: its tensors (for
ScaLoRA the live LoRA factors, the merged base weights of the LoRA layers only, in their own
dtype, the merge buffers and the stochastic-rounding generator states) as safetensors
tensors, and everything else (method, config, step counters) as JSON in the file's metadata.
Nothing in it is executed when it is read. A state saved by earlier versions as
``optlora_state.pt`` is still read, with ``torch.load(weights_only=True)``.

Sizes, measured on SmolLM2-135M (``bench/checkpoint_size.py``), are in docs/SAVING.md.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import torch

STATE_FILE = "optlora_state.safetensors"
LEGACY_STATE_FILE = "optlora_state.pt"
FORMAT = "optlora-state/1"
_TENSOR = "__tensor__"

__all__ = [
    "FORMAT",
    "LEGACY_STATE_FILE",
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


def find_state(path: str | os.PathLike) -> str | None:
    """The state file in checkpoint folder ``path`` (safetensors first, then the legacy ``.pt``), or ``None``."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    for name in (STATE_FILE, LEGACY_STATE_FILE):
        candidate = os.path.join(path, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def save_state(method, directory: str | os.PathLike, *, extra_metadata: Mapping[str, str] | None = None) -> str:
    """Write ``method.state_dict()`` to ``directory/optlora_state.safetensors`` atomically; returns the path.

    The file appears complete or not at all (written to a temporary name, then renamed), so a crash
    while saving never leaves a truncated state next to a checkpoint. ``extra_metadata`` (strings)
    goes into the file header, e.g. the live PEFT adapter configuration (:mod:`optlora.persist`).
    """
    from safetensors.torch import save_file

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
    """The header of a safetensors state file (``{}`` for a legacy ``.pt`` state); no tensor is read."""
    from safetensors import safe_open

    found = find_state(path)
    if found is None or found.endswith(".pt"):
        return {}
    with safe_open(found, "pt") as fh:
        return dict(fh.metadata() or {})


def state_steps(path: str | os.PathLike) -> int | None:
    """The ``steps`` counter of a saved safetensors state, from the file header only (``None`` if unreadable)."""
    try:
        return int(json.loads(read_metadata(path)["state"])["steps"])
    except Exception:  # noqa: BLE001 - a missing or unreadable header just means "not this state"
        return None


def read_state(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a saved method state: a checkpoint folder, ``optlora_state.safetensors`` or a legacy ``optlora_state.pt``."""
    found = find_state(path)
    if found is None:
        raise FileNotFoundError(f"no optlora method state ({STATE_FILE}) at {os.fspath(path)}")
    if found.endswith(".pt"):
        return torch.load(found, map_location=map_location, weights_only=True)
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
    """Restore ``method`` from a checkpoint folder or state file (checked before anything is written); returns it."""
    state = read_state(path)
    method.load_state_dict(state)
    return state
