"""Experiments behind the ``optlora`` command line (not needed to use the library).

A top-level package of the ``optlora`` distribution beside the library, off its import path: ``import optlora``
never imports it; ``optlora mf / finetune / plot / demo`` import it lazily, in one place
(``optlora.cli.SUBCOMMANDS``). It uses the library through its public API (``optlora``, ``optlora.hf``) and two
helpers (``optlora.cliutil``, ``optlora.testing.models``).

* :mod:`optlora_experiments.mf` -- the matrix-factorisation toy of RefLoRA Sec. 4.1 / Fig. 2
  (``optlora mf``), run through the library on a PEFT model;
* ``optlora_experiments.finetune`` -- real fine-tunes of any GLUE-format task, LLM-Adapters
  commonsense / math set or GSM8K with every method (``optlora finetune``), built from
  :mod:`~optlora_experiments.data` (loaders), :mod:`~optlora_experiments.baselines` (methods),
  :mod:`~optlora_experiments.harness` (one run on ``transformers.Trainer``),
  :mod:`~optlora_experiments.callbacks` (per-step records), :mod:`~optlora_experiments.metrics`
  and :mod:`~optlora_experiments.aggregate` (lr selection, paired tests, convergence); the sweep loop
  :mod:`~optlora_experiments.runner` with :mod:`~optlora_experiments.schedule` (run order, lr grid
  extension) and :mod:`~optlora_experiments.claims` (several processes sharing one ``--out``);
* :mod:`optlora_experiments.compact` -- compact run records for the repository;
  :mod:`optlora_experiments.report` -- the per-task sweep report (``bench/glue_report.py``);
* :mod:`optlora_experiments.results` -- result files shared by every experiment (JSON per run, CSV summary);
* :mod:`optlora_experiments.plots` -- figures from any result file (``optlora plot``);
* :mod:`optlora_experiments.demo` -- a short end-to-end comparison (``optlora demo``), offline on
  the GSM8K sample in ``optlora_experiments/sample``.

They need the ``experiments`` extra (``pip install optlora[experiments]``: matplotlib, tqdm, pyyaml,
scikit-learn, scipy, datasets, ...).
"""
