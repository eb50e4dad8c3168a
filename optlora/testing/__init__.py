"""Testing utilities shipped with optlora (like ``torch.testing``): they need numpy and, for models, transformers.

* :mod:`.reference` -- an independent float64 numpy implementation of every formula, written
  from the papers without importing optlora: the oracle of the test-suite and the benchmarks;
* :mod:`.parity` -- one optimizer step of a method on a real PEFT model against that reference;
* :mod:`.models` -- the one builder of small models and tokenizers from configs (nothing downloaded).
* :mod:`.faults`, :mod:`.fault_cases` and :mod:`.fault_cases_misuse` -- fault injection: run a fault against a
  method and classify the outcome (clear error, reported skip, correct step, or silent corruption);
  docs/RELIABILITY.md;
* :mod:`.oracle`, :mod:`.judge` and :mod:`.reference_step` -- the whole-state oracle: every tensor, counter and
  RNG state after ``optimizer.step()`` against the float64 reference step (numpy, from the papers) within a
  tolerance from measured rounding, or against the untouched snapshot;
* :mod:`.mutations` -- deliberate breakages of the library, patched in at runtime, that the oracle must flag.
"""
