"""The FSDP2 side of :mod:`optlora.checkpoint`: a sharded method state in ``optlora_state.dcp``.

Under FSDP2 ``method.state_dict()`` holds DTensor shards (LoRA factors, ScaLoRA's merged base
weights and merge buffers) and, for ScaLoRA, one rounding-generator state per rank. Every rank
writes its shards with ``torch.distributed.checkpoint`` (:func:`save`); a resumed run loads them
back on any number of ranks into the live layout (:func:`load`), and one process can read the
whole state (:func:`read`: export and :func:`optlora.persist.rebuild`). What a safetensors state
keeps in its header (method, live PEFT configuration) is the entry ``optlora_metadata``.

Non-tensor entries of a DCP checkpoint are pickles; they are unpickled with
``torch.load(weights_only=True)`` first (:class:`_WeightsOnlyPlanner`), so a checkpoint cannot
run code when it is read. The folder is written under a temporary name and renamed once
complete, so a crash while saving never leaves half a state next to a checkpoint.
"""

from __future__ import annotations

import io
import os
import shutil

import torch
import torch.distributed as dist

SHARDED_STATE = "optlora_state.dcp"  # optlora.checkpoint.SHARDED_STATE
META = "optlora_metadata"


def _planner():
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class _WeightsOnlyPlanner(DefaultLoadPlanner):
        """DCP's default load planner, but a non-tensor entry must unpickle under ``weights_only=True``."""

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            data = value.getvalue()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - anything a weights-only unpickler refuses
                raise ValueError(
                    f"the sharded state's entry {read_item.dest_index.fqn!r} is not plain data (refused by "
                    f"torch.load(weights_only=True)): {exc}"
                ) from exc
            super().load_bytes(read_item, io.BytesIO(data))

    return _WeightsOnlyPlanner()


def _mesh_group(method):
    return method.factors[0].lora_A.device_mesh.get_group()


def save(method, directory: str | os.PathLike, metadata: dict[str, str]) -> str:
    """Every rank writes its shards of ``method.state_dict()`` into ``directory/optlora_state.dcp``; returns the path.

    A collective over the method's device mesh. Written as ``optlora_state.dcp.tmp`` and renamed by the
    mesh's first rank once every rank has written (then a barrier), so the folder is complete or absent.
    """
    import torch.distributed.checkpoint as dcp

    group = _mesh_group(method)
    first = dist.get_rank(group) == 0
    path = os.path.join(os.fspath(directory), SHARDED_STATE)
    tmp = path + ".tmp"
    if first:
        os.makedirs(directory, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier(group=group)
    dcp.save({**method.state_dict(), META: dict(metadata)}, checkpoint_id=tmp, process_group=group)
    if first:  # dcp.save returns on every rank once the coordinator wrote .metadata
        old = path + ".old"
        if os.path.isdir(path):
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    dist.barrier(group=group)
    return path


def template(live: dict, metadata) -> dict:
    """What DCP should load: every saved entry, a tensor laid out as the live one (this rank's shard) if any.

    Built from the checkpoint's metadata, so entries the live method does not hold (another rank's
    generator state, the metadata entry) are loaded too, whole; ``load_state_dict`` validates them.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out: dict = {}
    for fqn, meta in metadata.state_dict_metadata.items():
        path = metadata.planner_data[fqn]
        node, have = out, live
        for key in path[:-1]:
            node = node.setdefault(key, {})
            have = have.get(key, {}) if isinstance(have, dict) else {}
        current = have.get(path[-1]) if isinstance(have, dict) else None
        if isinstance(meta, TensorStorageMetadata):
            if isinstance(current, torch.Tensor) and tuple(current.shape) == tuple(meta.size):
                node[path[-1]] = torch.empty_like(current)
            else:
                node[path[-1]] = torch.empty(meta.size, dtype=meta.properties.dtype)
        else:
            node[path[-1]] = None  # non-tensor values are replaced by the saved ones
    return out


def _metadata(path: str):
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as exc:  # noqa: BLE001 - a damaged folder: say what it is
        raise ValueError(f"{path} is not a readable torch.distributed.checkpoint folder: {exc}") from exc


def read(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> tuple[dict, dict]:
    """The whole state in this process (no collective, also inside a distributed run): ``(state, metadata)``.

    ``keys``: read only these top-level entries.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    state = template({}, _metadata(path))
    if keys is not None:
        state = {k: v for k, v in state.items() if k in keys}
    dcp.load(state, checkpoint_id=path, planner=_planner(), no_dist=True)
    meta = state.pop(META, None) or {}
    return state, dict(meta)


def load(method, path: str | os.PathLike) -> dict:
    """Every rank loads its shards of the state in ``path`` into ``method`` (a collective); returns the state.

    The state is laid out as the live one (any number of ranks may have written it) and then goes
    through ``method.load_state_dict``: checked on every rank, the ranks agree, then written.
    """
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    state = template(method.state_dict(), _metadata(path))
    dcp.load(state, checkpoint_id=path, planner=_planner(), process_group=_mesh_group(method))
    state.pop(META, None)
    method.load_state_dict(state)
    return state
