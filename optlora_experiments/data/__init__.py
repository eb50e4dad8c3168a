"""Data for ``optlora finetune`` / ``optlora demo``: GLUE-format folders, LLM-Adapters sets, GSM8K.

* :func:`load_task` -- any task by name or folder (:mod:`.tasks`), from ``--data-dir``,
  ``../shared/data``, the hub or the embedded sample (:mod:`.sources`);
* :mod:`.glue` -- GLUE TSV files with header detection, ``nyu-mll/glue``;
* :mod:`.adapters` -- LLM-Adapters JSON (commonsense, math), GSM8K JSON lines, ``openai/gsm8k``;
* :mod:`.encode` -- rows to ``datasets.Dataset`` and the matching data collator.
"""

from .sources import SAMPLE_ROOT, DataError, hub_offline
from .tasks import KINDS, TaskData, describe, gsm8k_records, load_task

__all__ = ["KINDS", "SAMPLE_ROOT", "DataError", "TaskData", "describe", "gsm8k_records", "hub_offline", "load_task"]
