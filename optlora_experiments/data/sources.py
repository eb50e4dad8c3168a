"""Where data comes from: ``--data-dir``, ``../shared/data``, the Hugging Face hub, the embedded sample.

Every loader asks :func:`candidate_roots` for the places to look, in this order:

1. ``data_dir`` (CLI ``--data-dir``) when given -- and then *only* there: an explicit folder
   that lacks the files is an error, never a silent fallback. It may be a task folder itself
   (``.../glue/SST-2``, ``.../commonsense/boolq``) or any parent of one (``.../glue``, ``.../data``);
2. ``../shared/data`` relative to the current directory, then relative to this checkout;
3. the hub through :func:`datasets.load_dataset`, unless ``HF_HUB_OFFLINE`` /
   ``HF_DATASETS_OFFLINE`` is set or the hub cannot be reached (:func:`hub_reachable`: one
   quick connection, no retries);
4. the licence-clean sample shipped inside the package (``optlora_experiments/sample``), only
   when the caller allows it (``optlora demo``).

Missing or unreadable data raises :class:`DataError`, whose message is one sentence that says
what to do; the command line prints it and exits with status 2.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[3]
SAMPLE_ROOT = Path(__file__).resolve().parents[1] / "sample"
_TRUE = ("1", "true", "yes", "on")


class DataError(ValueError):
    """Data that cannot be found or read; the message says what to do."""


@dataclass(frozen=True)
class Root:
    """A local folder to search, and how it was chosen (``"--data-dir"``, ``"shared"``, ``"sample"``)."""

    path: Path
    origin: str


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``HF_DATASETS_OFFLINE`` is set to a true value."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether one TCP connection to the hub (``HF_ENDPOINT``) opens within ``timeout`` s; asked once per process.

    Without it, an offline machine would spend about a minute on ``datasets``' visible retries
    before falling back; with it, the loaders go straight to local data, and one line says so.
    """
    from urllib.parse import urlsplit

    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError as exc:
        print(
            f"note: the Hugging Face hub ({url.hostname}) cannot be reached ({exc}); using local data", file=sys.stderr
        )
        return False


def use_hub() -> bool:
    """Whether to try the hub for data: not offline by the environment, and reachable."""
    return not hub_offline() and hub_reachable()


def shared_candidates() -> list[Path]:
    return [Path.cwd() / ".." / "shared" / "data", _REPO_ROOT / ".." / "shared" / "data"]


def candidate_roots(data_dir: str | os.PathLike | None, allow_sample: bool = False) -> list[Root]:
    """Local folders to search, in order (see the module docstring); the hub comes between shared and sample."""
    if data_dir is not None:
        p = Path(data_dir).expanduser()
        if not p.exists():
            raise DataError(f"--data-dir {p} does not exist; pass a folder that holds the task's files")
        if not p.is_dir():
            raise DataError(f"--data-dir {p} is a file; pass the folder that holds it")
        return [Root(p.resolve(), "--data-dir")]
    roots = [Root(c.resolve(), "shared") for c in shared_candidates() if c.is_dir()]
    roots = list({r.path: r for r in roots}.values())  # the two candidates are often the same folder
    if allow_sample:
        roots.append(Root(SAMPLE_ROOT, "sample"))
    return roots


def find_file(root: Path, folders: Iterable[str], names: Iterable[str]) -> Path | None:
    """The first ``root/<folder>/<name>`` (``folder`` may be ``""``: the root itself) that is a file.

    Each name is also tried with ``.gz``. Folder names match case-insensitively and ignore ``-``/``_``
    (``sst2`` finds ``SST-2``).
    """
    names = list(names)
    for folder in folders:
        base = _match_dir(root, folder)
        if base is None:
            continue
        for name in names:
            for cand in (base / name, base / f"{name}.gz"):
                if cand.is_file():
                    return cand
    return None


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def _match_dir(root: Path, rel: str) -> Path | None:
    """``root/rel`` with each path part matched loosely (see :func:`find_file`), or None."""
    cur = root
    for part in [p for p in rel.split("/") if p]:
        exact = cur / part
        if exact.is_dir():
            cur = exact
            continue
        try:
            hits = [d for d in cur.iterdir() if d.is_dir() and _key(d.name) == _key(part)]
        except OSError:
            return None
        if not hits:
            return None
        cur = sorted(hits)[0]
    return cur


def open_text(path: str | os.PathLike) -> io.TextIOBase:
    """Open a UTF-8 text file (a leading BOM is dropped), transparently gunzipping ``*.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def where_looked(roots: list[Root], folders: Iterable[str]) -> str:
    """A short description of the places searched, for error messages."""
    folders = [f for f in folders if f] or [""]
    shown = [str(r.path / f) if f else str(r.path) for r in roots for f in folders[:3]]
    return ", ".join(shown[:6]) + (", ..." if len(shown) > 6 else "")


def load_hub(what: str, *args, **kwargs):
    """``datasets.load_dataset(*args, **kwargs)``, with any failure turned into a :class:`DataError`."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - datasets ships with the hf extra
        raise DataError(
            f"{what} is not available locally and `datasets` is not installed; pip install datasets"
        ) from exc
    try:
        return datasets.load_dataset(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - network, auth, missing config: one clear message
        raise DataError(
            f"could not load {what} from the hub ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "check the connection or pass --data-dir with a local copy"
        ) from exc


def no_data(what: str, roots: list[Root], folders: Iterable[str], hint: str) -> DataError:
    """The error for data found nowhere: where we looked and what to do."""
    looked = where_looked(roots, folders) if roots else "no local data folder (../shared/data does not exist)"
    explicit = any(r.origin == "--data-dir" for r in roots)
    if explicit:
        how = f"pass --data-dir pointing at {hint}"
    elif hub_offline():
        how = f"pass --data-dir pointing at {hint}, or unset HF_HUB_OFFLINE to download it"
    else:
        how = f"pass --data-dir pointing at {hint}"
    return DataError(f"no {what} found (looked in {looked}); {how}")
