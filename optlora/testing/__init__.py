"""Testing utilities shipped with optlora (like ``torch.testing``): they need numpy and, for models, transformers.

* :mod:`.reference` -- an independent float64 numpy implementation of every formula, written
  from the papers without importing optlora: the oracle of the test-suite and the benchmarks;
* :mod:`.parity` -- one optimizer step of a method on a real PEFT model against that reference;
* :mod:`.models` -- the one builder of small models and tokenizers from configs (nothing downloaded).
* :mod:`.faults` and :mod:`.fault_cases` -- fault injection: run a fault against a method and classify
  the outcome (clear error, reported skip, correct step, or silent corruption); docs/RELIABILITY.md.
"""
