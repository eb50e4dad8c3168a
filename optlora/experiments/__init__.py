"""Experiments behind the ``optlora`` command line (not needed to use the library).

* :mod:`optlora.experiments.mf` -- the matrix-factorisation toy of RefLoRA Sec. 4.1 / Fig. 2
  (``optlora mf``), run through the library on a PEFT model;
* :mod:`optlora.experiments.results` -- result files shared by every experiment (JSON per run, CSV summary);
* :mod:`optlora.experiments.plots` -- figures from any result file (``optlora plot``);
* :mod:`optlora.experiments.demo` -- a short end-to-end comparison (``optlora demo``);
* ``optlora.experiments.finetune`` -- real fine-tunes (SST-2, GSM8K; ``optlora finetune``).

They need the ``experiments`` extra (``pip install optlora[experiments]``: matplotlib, tqdm, pyyaml).
"""
