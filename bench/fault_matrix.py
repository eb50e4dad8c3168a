"""The fault matrix of docs/RELIABILITY.md: every catalogued fault, how it ended, by class (CPU, ~20 s).

    python bench/fault_matrix.py                 # the table
    python bench/fault_matrix.py --list          # one line per case with its outcome
    python bench/fault_matrix.py --json out.json

Cases come from :mod:`optlora.testing.fault_cases`; each is classified by
:mod:`optlora.testing.faults` as a clear error before any change, a reported safe skip, a correct
step, a plain (not due) step that the method left alone, or a silent corruption. The last column must be 0.
``tests/test_faults.py`` asserts the same on every CI run, plus randomised cases (hypothesis).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter

import torch

from optlora.testing import fault_cases
from optlora.testing.faults import Outcome

COLUMNS = [
    ("error", "clear error, nothing changed"),
    ("skip", "reported safe skip"),
    ("applied", "correct method step"),
    ("plain", "plain step, untouched"),
    ("corrupt", "silent corruption"),
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print every case with its outcome")
    ap.add_argument("--json", help="write every case's outcome to this file")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, counts = [], {}
    for case in fault_cases.cases():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                outcome = case.run()
            except Exception as e:  # noqa: BLE001 - a harness failure is reported as a corruption
                outcome = Outcome("corrupt", f"harness: {type(e).__name__}: {e}")
        counts.setdefault(case.cls, Counter())[outcome.kind] += 1
        rows.append({"class": case.cls, "case": case.name, "outcome": outcome.kind, "detail": outcome.detail})
        if args.list or outcome.kind == "corrupt":
            print(f"{case.cls:18s} | {outcome.kind:7s} | {case.name} | {outcome.detail[:160]}")
    total = Counter()
    for c in counts.values():
        total.update(c)
    print(f"\n| class | cases | {' | '.join(label for _, label in COLUMNS)} |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for cls, c in [*counts.items(), ("**all**", total)]:
        print(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[k]) for k, _ in COLUMNS) + " |")
    print(f"\n{sum(total.values())} cases in {time.perf_counter() - start:.1f} s, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 1 if total["corrupt"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
