"""Experiments behind the ``optlora`` command line (not needed to use the library).

* :mod:`optlora.experiments.mf` -- the matrix-factorisation toy of RefLoRA Sec. 4.1 / Fig. 2
  (``optlora mf``), run through the library on a PEFT model;
* ``optlora.experiments.finetune`` -- real fine-tunes of any GLUE-format task, LLM-Adapters
  commonsense / math set or GSM8K with every method (``optlora finetune``), built from
  :mod:`~optlora.experiments.data` (loaders), :mod:`~optlora.experiments.baselines` (methods),
  :mod:`~optlora.experiments.harness` (one run on ``transformers.Trainer``),
  :mod:`~optlora.experiments.callbacks` (per-step records), :mod:`~optlora.experiments.metrics`
  and :mod:`~optlora.experiments.aggregate` (lr selection, paired tests, convergence); the sweep loop
  :mod:`~optlora.experiments.runner` with :mod:`~optlora.experiments.schedule` (run order, lr grid
  extension) and :mod:`~optlora.experiments.claims` (several processes sharing one ``--out``);
* :mod:`optlora.experiments.compact` -- compact run records for the repository;
* :mod:`optlora.experiments.results` -- result files shared by every experiment (JSON per run, CSV summary);
* :mod:`optlora.experiments.plots` -- figures from any result file (``optlora plot``);
* :mod:`optlora.experiments.demo` -- a short end-to-end comparison (``optlora demo``), offline on
  the GSM8K sample in ``optlora/experiments/sample``.

They need the ``experiments`` extra (``pip install optlora[experiments]``: matplotlib, tqdm, pyyaml,
scikit-learn, scipy, datasets, ...).
"""
