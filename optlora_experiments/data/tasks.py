"""``load_task(name)``: any GLUE-format folder, LLM-Adapters set or mix, GSM8K -- wherever it lives.

Task names (``optlora finetune --task``):

* a GLUE task (``sst2``, ``cola``, ``mrpc``, ``stsb``, ``qnli``, ``rte``, ``qqp``, ``mnli``, ``wnli``)
  or any folder of GLUE-format ``train.tsv`` + ``dev.tsv`` -> classification / regression, scored on dev;
* ``gsm8k`` -> generation (train on GSM8K train, score on test);
* ``gsm8k_match`` -> pair classification: does this first solution step belong to this GSM8K
  problem? (the demo task; :func:`optlora_experiments.data.adapters.match_rows`);
* ``commonsense`` -> generation, trained on a mix of commonsense train splits (default: boolq,
  ARC-Easy, ARC-Challenge, openbookqa -- the ones available offline) and scored on each test set;
* ``math`` -> generation, trained on GSM8K train + LLM-Adapters' math_data, scored on GSM8K and SVAMP;
* one LLM-Adapters set (``boolq``, ``piqa``, ``AQuA``, ...) or a folder holding ``train.json`` /
  ``test.json`` in that format -> generation on that set.

``train_sets`` / ``eval_sets`` replace the training mix and the evaluation sets of the generation
tasks (any LLM-Adapters set or mix name, ``gsm8k``, ``commonsense_170k``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import adapters as A
from . import glue as G
from .sources import SAMPLE_ROOT, DataError, _key, candidate_roots, find_file, no_data, use_hub

KINDS = ("classification", "regression", "generation")


@dataclass
class TaskData:
    """A task ready to encode: rows per split, what kind of head it needs and how it is scored."""

    name: str
    kind: str  # classification | regression | generation
    train: list[dict]
    evals: dict[str, list[dict]]  # evaluation set name -> rows (dev / test sets)
    label_names: list[str] | None = None
    metrics: tuple[str, ...] = ("accuracy",)  # the first is the primary metric
    sources: dict[str, str] = field(default_factory=dict)  # split -> file path / hub id / sample

    @property
    def num_labels(self) -> int:
        return 1 if self.kind == "regression" else len(self.label_names or ())

    @property
    def task_type(self) -> str:
        """The PEFT task type."""
        return "CAUSAL_LM" if self.kind == "generation" else "SEQ_CLS"


def _locate(what, data_dir, allow_sample, folders, names, self_keys, hub_ok, hint) -> Path | None:
    """The file to read: ``--data-dir`` (only there) > ../shared/data > hub (None) > sample; else DataError.

    ``folders`` are relative to each root; ``""`` (the root itself) counts only when the root's name
    matches one of ``self_keys`` (so ``--data-dir .../glue/MRPC`` is never read as SST-2).
    """
    roots = candidate_roots(data_dir, allow_sample)

    def search(rs):
        for r in rs:
            use_self = _key(r.path.name) in self_keys
            p = find_file(r.path, [f for f in folders if f or use_self], names)
            if p is not None:
                return p
        return None

    found = search([r for r in roots if r.origin != "sample"])
    if found is not None:
        return found
    if data_dir is None and hub_ok and use_hub():
        return None
    found = search([r for r in roots if r.origin == "sample"])
    if found is not None:
        return found
    raise no_data(what, roots, [f for f in folders if f], hint)


def _glue(task: str | None, folder: str, data_dir) -> TaskData:
    """A GLUE-format task; ``task`` is the canonical GLUE name (None for another folder)."""
    name = task or folder
    train_path = _locate(f"GLUE-format data for {name!r} (train.tsv + dev.tsv)", data_dir, False,
                         ["", folder, f"glue/{folder}"], G.TRAIN_FILES, {_key(folder), _key(name)},
                         task in G.GLUE_TASKS, f"a folder with {folder}/train.tsv and dev.tsv (or glue/{folder}/...)")  # fmt: skip
    if train_path is None:
        train, names = G.from_hub(task, "train")
        dev, _ = G.from_hub(task, "dev")
        src_train = src_dev = f"hub: nyu-mll/glue {G.GLUE_TASKS[task].hub_config}"
    else:
        dev_path = find_file(train_path.parent, [""], G.DEV_FILES)
        if dev_path is None:
            raise DataError(f"{train_path.parent} has train.tsv but no dev.tsv; add the dev split (GLUE format)")
        table, dev_table = G.read_tsv(train_path), G.read_tsv(dev_path)
        names = G.label_names(task, table.raw_labels, G.is_regression(task, table))
        train = G.finalize_labels(table, names, train_path)
        dev = G.finalize_labels(dev_table, names, dev_path)
        src_train, src_dev = str(train_path), str(dev_path)
    spec = G.GLUE_TASKS.get(task or "")
    regression = names is None
    metrics = spec.metrics if spec else (("pearson", "spearman") if regression else ("accuracy",))
    kind = "regression" if regression else "classification"
    return TaskData(name, kind, train, {"dev": dev}, names, metrics, {"train": src_train, "dev": src_dev})


def gsm8k_records(split: str, data_dir=None, allow_sample: bool = False) -> tuple[list[dict], str]:
    """GSM8K ``question``/``answer`` records of ``split`` and where they came from."""
    path = _locate(f"GSM8K {split} data (gsm8k/{split}.jsonl)", data_dir, allow_sample, ["", "gsm8k"],
                   [f"{split}.jsonl"], {"gsm8k"}, True, f"a folder with gsm8k/{split}.jsonl (JSON lines: question, answer)")  # fmt: skip
    if path is None:
        try:
            return A.gsm8k_from_hub(split), "hub: openai/gsm8k main"
        except DataError as exc:
            path = find_file(SAMPLE_ROOT, ["gsm8k"], [f"{split}.jsonl"]) if allow_sample else None
            if path is None:
                raise
            print(f"note: {exc}; using the embedded sample instead")
    return A.read_gsm8k_jsonl(path), str(path)


def _canonical_set(name: str) -> str:
    for known in (*A.COMMONSENSE_SETS, *A.MATH_SETS, *A.MIX_FILES):
        if _key(known) == _key(name):
            return known
    return name


def _adapters_set(name: str, split: str, data_dir, folder: Path | None = None) -> tuple[list[dict], str]:
    """Generation rows of one LLM-Adapters set or mix, or of GSM8K; ``folder``: that set's own folder."""
    if folder is not None:
        f = find_file(folder, [""], [f"{split}.json"])
        if f is None:
            raise DataError(f"{folder} has no {split}.json; an LLM-Adapters-format folder needs train.json / test.json")
        return A.read_adapters_json(f, name), str(f)
    if _key(name) == "gsm8k":
        recs, src = gsm8k_records("train" if split == "train" else "test", data_dir)
        return A.gsm8k_rows(recs), src
    canon = _canonical_set(name)
    if canon in A.MIX_FILES:
        folders, files = ["", "math", "commonsense"], [f"{canon}.json", f"{A.MIX_FILES[canon]}.json"]
    else:
        folders, files = ["", canon, f"commonsense/{canon}", f"math/{canon}"], [f"{split}.json"]
    hub_ok = canon in A.MIX_FILES or canon in A.COMMONSENSE_SETS or canon in A.MATH_SETS
    path = _locate(f"{canon} {split} data (LLM-Adapters JSON)", data_dir, False, folders, files, {_key(canon)}, hub_ok,
                   f"a folder with {canon}/{split}.json (or commonsense/{canon}/..., math/{canon}/...)")  # fmt: skip
    if path is None:
        return A.adapters_from_hub(canon, split), f"hub: {A.hub_url(canon, split)}"
    return A.read_adapters_json(path, canon), str(path)


def _generation(name, train_sets, eval_sets, data_dir, folder: Path | None = None) -> TaskData:
    """A generation task: the rows of every training set concatenated, each evaluation set on its own."""
    own = {folder.name: folder} if folder is not None else {}
    train, evals, sources = [], {}, {}
    for s in train_sets:
        rows, sources[f"train:{s}"] = _adapters_set(s, "train", data_dir, own.get(s))
        train += rows
    for s in eval_sets:
        evals[s], sources[s] = _adapters_set(s, "test", data_dir, own.get(s))
    if not train:
        raise DataError(f"task {name!r} has no training data; pass --train-sets (e.g. gsm8k train_math_data)")
    return TaskData(name, "generation", train, evals, None, ("accuracy",), sources)


def _task_folder(task: str, data_dir) -> Path | None:
    """A folder named ``task`` (GLUE or LLM-Adapters format) under the data roots, or the root itself."""
    for r in candidate_roots(data_dir):
        for rel in ("", task, f"glue/{task}", f"commonsense/{task}", f"math/{task}"):
            if rel == "" and _key(r.path.name) != _key(task):
                continue
            base = find_file(r.path, [rel], (*G.TRAIN_FILES, "test.json"))
            if base is not None:
                return base.parent
    return None


def _from_folder(folder: Path, train_sets, eval_sets) -> TaskData:
    if find_file(folder, [""], G.TRAIN_FILES):
        return _glue(G.glue_name(folder.name), folder.name, folder)
    if find_file(folder, [""], ("test.json",)):
        has_train = find_file(folder, [""], ("train.json",)) is not None
        own = [folder.name]
        return _generation(folder.name, train_sets or (own if has_train else []), eval_sets or own, None, folder)
    raise DataError(f"{folder} has neither train.tsv + dev.tsv (GLUE format) nor train.json/test.json (LLM-Adapters)")


def load_task(
    task: str,
    data_dir=None,
    *,
    train_sets: list[str] | None = None,
    eval_sets: list[str] | None = None,
    allow_sample: bool = False,
) -> TaskData:
    """Load ``task`` (see the module docstring); raises :class:`DataError` saying what to do."""
    train_sets, eval_sets = list(train_sets or []), list(eval_sets or [])
    if any(sep in task for sep in ("/", "\\")) or task.startswith("."):
        p = Path(task).expanduser()
        if not p.is_dir():
            raise DataError(f"--task {task}: no such folder; pass a GLUE-format or LLM-Adapters-format task folder")
        return _from_folder(p.resolve(), train_sets, eval_sets)
    key = _key(task)
    glue = G.glue_name(task)
    if glue is not None:
        if train_sets or eval_sets:
            raise DataError(f"--train-sets/--eval-sets apply to generation tasks, not to GLUE task {task!r}")
        return _glue(glue, G.GLUE_TASKS[glue].folder, data_dir)
    if key == "gsm8kmatch":
        recs, src = gsm8k_records("train", data_dir, allow_sample)
        test, test_src = gsm8k_records("test", data_dir, allow_sample)
        return TaskData("gsm8k_match", "classification", A.match_rows(recs), {"test": A.match_rows(test)},
                        ["other", "own"], ("accuracy", "f1"), {"train": src, "test": test_src})  # fmt: skip
    defaults = {
        "gsm8k": (["gsm8k"], ["gsm8k"]),
        "commonsense": (list(A.COMMONSENSE_TRAIN), [s for s in A.COMMONSENSE_SETS if s != "social_i_qa"]),
        "math": (list(A.MATH_TRAIN), list(A.MATH_EVAL)),
    }
    canon = _canonical_set(task)
    if key in defaults:
        tr, ev = defaults[key]
        return _generation(key, train_sets or tr, eval_sets or ev, data_dir)
    if canon in A.COMMONSENSE_SETS or canon in A.MATH_SETS:
        return _generation(canon, train_sets or [canon], eval_sets or [canon], data_dir)
    folder = _task_folder(task, data_dir)
    if folder is not None:
        return _from_folder(folder, train_sets, eval_sets)
    raise DataError(
        f"unknown task {task!r} and no folder of that name found; use a GLUE task ({', '.join(G.GLUE_TASKS)}), "
        "gsm8k, gsm8k_match, commonsense, math, an LLM-Adapters set name, or the path of a task folder"
    )


def describe(data: TaskData) -> str:
    """One line: task, kind, sizes and where the data came from."""
    evals = ", ".join(f"{k} {len(v)}" for k, v in data.evals.items())
    src = "; ".join(f"{k}: {v}" for k, v in data.sources.items())
    return f"{data.name} ({data.kind}): train {len(data.train)}, eval {evals} [{src}]"
