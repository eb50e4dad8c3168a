"""The pretrained weights of the LoRA layers, without a second copy in accelerator memory.

ScaLoRA rewrites the base weights in place (ScaLoRA Sec. 3.1), so writing its result as an
adapter for the *original* model needs ``W_pretrained`` next to ``W_now``.
:class:`OriginalWeights` reads each layer's pretrained weight lazily, one layer at a time,
from the base model's safetensors files (a local folder, or the offline Hugging Face cache of
the hub id in ``config._name_or_path``). When the method is built, a few rows of every layer
are read and compared bit for bit with the live weights, so a wrong or changed file is caught
then, cheaply, not after training. Only a layer that no file holds is copied to host (CPU)
memory; a warning states the cost where the base model's folder would avoid it. A file that holds the layer with other values
is never trusted and never replaced by a copy: saving then fails with what to do.
"""

from __future__ import annotations

import glob
import json
import os
import warnings
from dataclasses import dataclass

import torch

from .distributed import is_dtensor, local, shard_range


class HostCopyWarning(UserWarning):
    """Original weights are kept as a host (CPU) copy because no file holds them."""


class OriginalsUnavailable(RuntimeError):
    """The pretrained weights of some LoRA layers cannot be read or were not verified."""


@dataclass
class _FileSource:
    file: str
    key: str


def weight_files(folder: str) -> dict[str, str]:
    """``{tensor key: safetensors file}`` of a model folder (sharded index or single/multiple files)."""
    from safetensors import safe_open

    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as fh:
            return {k: os.path.join(folder, v) for k, v in json.load(fh)["weight_map"].items()}
    out: dict[str, str] = {}
    for file in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        if os.path.basename(file).startswith(("adapter_model", "optlora_state")):
            continue
        with safe_open(file, "pt") as fh:
            out.update(dict.fromkeys(fh.keys(), file))
    return out


def resolve_folder(name_or_path: str | os.PathLike | None) -> str | None:
    """A local folder for a model path or hub id (offline: the local Hugging Face cache only)."""
    if not name_or_path:
        return None
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name, allow_patterns=["*.safetensors", "*.json"], local_files_only=True)
    except Exception:  # noqa: BLE001 - not a hub id, or not in the cache: no files
        return None


def _candidates(path: str, prefix: str) -> list[str]:
    """Keys under which a layer at ``path`` (inside the transformers model) may be stored."""
    keys = [f"{path}.weight"]
    if prefix and path.startswith(prefix + "."):
        keys.append(f"{path[len(prefix) + 1 :]}.weight")
    elif prefix:
        keys.append(f"{prefix}.{path}.weight")
    return keys


def _sample_rows(n: int, start: int = 0) -> list[int]:
    return sorted({start + r for r in (0, n // 3, n // 2, (2 * n) // 3, n - 1) if n > 0})


def _sampled(sl, w: torch.Tensor, shape: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """A few rows of the file's tensor ``sl`` and the same entries of the live weight ``w`` (FSDP2: of this rank's
    block, so no collective; another rank checks its own block)."""
    rng = shard_range(w)
    dim, offset, size = rng if rng is not None else (0, 0, shape[0])
    rows = _sample_rows(size, offset) if dim == 0 else _sample_rows(shape[0])
    if not rows:  # this rank holds no rows of the weight
        return torch.zeros(0), torch.zeros(0)
    got = torch.stack([sl[r : r + 1][0] for r in rows]).to(w.dtype)
    block = local(w.detach())
    if dim == 0:
        want = block[[r - offset for r in rows]]
    else:
        got, want = got[:, offset : offset + size], block[rows]
    return got, want.to("cpu")


class OriginalWeights:
    """``W_pretrained`` of LoRA layers, keyed by module path inside the transformers model.

    Build with :meth:`resolve` while the live weights are still the pretrained ones (when the
    method is built). :meth:`get` returns one layer's weight as stored (``in x out`` for
    ``fan_in_fan_out`` layers), read from its file or host copy.
    """

    def __init__(self, sources: dict[str, _FileSource | torch.Tensor], *, folder: str | None, problems: dict[str, str]):
        self.sources = sources
        self.folder = folder
        self.problems = problems  # layer path -> why its original weight is not available

    # ------------------------------------------------------------------ build
    @classmethod
    def resolve(
        cls,
        live: dict[str, torch.Tensor],
        *,
        folder: str | os.PathLike | None,
        prefix: str = "",
        host_copy: bool = True,
        stacklevel: int = 2,
    ) -> OriginalWeights:
        """Map every layer of ``live`` (``{path: current base weight}``) to a verified source.

        Args:
            live: the live base weights, which must still be the pretrained ones.
            folder: the base model's folder or hub id (``None``: no files).
            prefix: the model's ``base_model_prefix`` (files may be saved with or without it).
            host_copy: copy to host memory the layers that no file holds (else they are unavailable).
        """
        from safetensors import safe_open

        local = resolve_folder(folder)
        files = weight_files(local) if local else {}
        sources: dict[str, _FileSource | torch.Tensor] = {}
        problems: dict[str, str] = {}
        missing = []
        handles: dict[str, object] = {}
        try:
            for path, w in live.items():
                key = next((k for k in _candidates(path, prefix) if k in files), None)
                if key is None:
                    missing.append(path)
                    continue
                if files[key] not in handles:
                    handles[files[key]] = safe_open(files[key], "pt").__enter__()
                sl = handles[files[key]].get_slice(key)
                shape = tuple(sl.get_shape())
                if shape != tuple(w.shape):
                    problems[path] = f"{files[key]}:{key} has shape {shape}, the live weight {tuple(w.shape)}"
                    continue
                got, want = _sampled(sl, w, shape)
                if not torch.equal(got, want):
                    problems[path] = (
                        f"{files[key]}:{key} differs from the live weight when the method was built (the model "
                        "was changed after loading, or the file is not the one it was loaded from)"
                    )
                    continue
                sources[path] = _FileSource(files[key], key)
        finally:
            for h in handles.values():
                h.__exit__(None, None, None)
        sharded = [p for p in missing if is_dtensor(live[p])]
        for p in sharded:  # a host copy of a shard is not the weight: under FSDP2 the files are the originals
            problems[p] = f"no file holds it (looked in {local or folder}), and under FSDP2 no host copy is taken"
        missing = [p for p in missing if p not in problems]
        if missing and host_copy:
            # said only where passing the folder would help: a model loaded from a name whose files are not found
            # here, or a folder that holds none of its layers. A model built from a config, and layers that its
            # files lack (created when it was loaded, e.g. beside a new head), exist nowhere else: nothing to say.
            if folder and (local is None or len(missing) == len(live)):
                nbytes = sum(live[p].numel() * live[p].element_size() for p in missing)
                where = f"{local} holds none of them" if local else f"{folder} is not a local folder nor cached"
                warnings.warn(
                    f"no safetensors file holds the pretrained weights of {len(missing)} LoRA layer(s) ({where}); "
                    f"keeping a host (CPU) copy of them, {nbytes / 2**20:.1f} MiB, so that save_pretrained can write "
                    "the accumulated update. Pass the base model's folder with "
                    "optlora.persist.install(method, original=...) to avoid it.",
                    HostCopyWarning,
                    stacklevel=stacklevel + 1,
                )
            for p in missing:
                sources[p] = live[p].detach().to("cpu", copy=True)
        else:
            for p in missing:
                problems[p] = f"no file holds it (looked in {local or folder})"
        return cls(sources, folder=local, problems=problems)

    # ------------------------------------------------------------------ use
    def get(self, path: str, device: torch.device | str = "cpu") -> torch.Tensor:
        """The pretrained weight of layer ``path`` on ``device`` (read now; nothing is cached)."""
        src = self.sources.get(path)
        if src is None:
            why = self.problems.get(path, "the layer was not a LoRA layer when the method was built")
            raise OriginalsUnavailable(f"the pretrained weight of {path!r} is not available: {why}")
        if isinstance(src, torch.Tensor):
            return src.to(device)
        from safetensors import safe_open

        with safe_open(src.file, "pt", device="cpu") as fh:
            return fh.get_tensor(src.key).to(device)

    def require(self, paths) -> None:
        """Raise :class:`OriginalsUnavailable` naming every layer of ``paths`` without a verified source."""
        bad = [p for p in paths if p not in self.sources]
        if bad:
            reasons = "; ".join(f"{p}: {self.problems.get(p, 'unknown layer')}" for p in bad[:3])
            raise OriginalsUnavailable(
                f"the pretrained weights of {len(bad)} LoRA layer(s) are not available, so the accumulated update "
                f"W_now - W_pretrained cannot be written ({reasons}{' ...' if len(bad) > 3 else ''}). Nothing was "
                "written. Build the method right after loading the model, or pass the folder of the weights the "
                "model started from: optlora.persist.install(method, original='path/to/base')."
            )

    def describe(self) -> str:
        files = sum(isinstance(s, _FileSource) for s in self.sources.values())
        hosts = len(self.sources) - files
        parts = [f"{files} layer(s) read from {self.folder}"] if files else []
        if hosts:
            parts.append(f"{hosts} layer(s) from a host copy taken when the method was built")
        if self.problems:
            parts.append(f"{len(self.problems)} unavailable")
        return ", ".join(parts) or "none"
