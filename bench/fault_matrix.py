"""The fault matrix of docs/RELIABILITY.md: every catalogued fault, how it ended, by class (CPU, ~1 min).

    python bench/fault_matrix.py                 # the table
    python bench/fault_matrix.py --list          # one line per case with its outcome
    python bench/fault_matrix.py --json out.json
    python bench/fault_matrix.py --mutations     # and the mutation check: every case under each breakage

Cases come from :mod:`optlora.testing.fault_cases`; each is judged by the whole-state oracle
(:mod:`optlora.testing.oracle`) as a clear error before any change, a reported safe skip, a correct step,
a plain (not due) step, a known issue (every problem it shows belongs to an open issue: #16 class 6), or a
silent corruption. The last column must be 0. ``tests/test_faults.py`` asserts the same on every CI run, plus
randomised cases (hypothesis); ``tests/test_oracle_mutations.py`` runs the mutation check's subsets.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections import Counter

import torch

from optlora.testing import fault_cases, mutations
from optlora.testing.faults import Outcome

COLUMNS = [
    ("error", "clear error, nothing changed"),
    ("skip", "reported safe skip"),
    ("applied", "correct method step"),
    ("plain", "plain step, as the reference"),
    ("known", "known issue (#16 class 6)"),
    ("corrupt", "silent corruption"),
]


def run(case) -> Outcome:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return case.run()
        except Exception as e:  # noqa: BLE001 - a harness failure is reported as a corruption
            return Outcome("corrupt", f"harness: {type(e).__name__}: {e}")


def column(outcome: Outcome) -> str:
    return "known" if outcome.kind == "corrupt" and outcome.known else outcome.kind


def matrix(cases, show: bool) -> tuple[list[dict], dict, list[Outcome]]:
    rows, counts, outcomes = [], {}, []
    for case in cases:
        outcome = run(case)
        outcomes.append(outcome)
        col = column(outcome)
        counts.setdefault(case.cls, Counter())[col] += 1
        rows.append(
            {
                "class": case.cls,
                "case": case.name,
                "outcome": col,
                "known": outcome.known,
                "ratio": outcome.ratio,
                "detail": outcome.detail,
            }
        )
        if show or col == "corrupt":
            print(f"{case.cls:18s} | {col:7s} | {case.name} | {outcome.detail[:160]}")
    return rows, counts, outcomes


def print_table(counts: dict) -> Counter:
    total = Counter()
    for c in counts.values():
        total.update(c)
    print(f"\n| class | cases | {' | '.join(label for _, label in COLUMNS)} |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for cls, c in [*counts.items(), ("**all**", total)]:
        print(f"| {cls} | {sum(c.values())} | " + " | ".join(str(c[k]) for k, _ in COLUMNS) + " |")
    return total


def changed_in_the_step(mutated: Outcome, unbroken: Outcome) -> bool:
    """The observed step started from the same whole state and ended in another (``Outcome.fingerprint``)."""
    if not (mutated.fingerprint and unbroken.fingerprint):
        return False
    (b1, a1), (b0, a0) = mutated.fingerprint.split(":"), unbroken.fingerprint.split(":")
    return b1 == b0 and a1 != a0


def mutation_check(cases, unbroken: list[Outcome]) -> list[dict]:
    """Every case under each mutation. A case *changes* when its observed step starts from the unbroken library's
    state and ends in another (a mutation that acts only in the steps before it changes the start instead, and
    the case judges a step the mutation did not touch); every case that changes must flag the mutation."""
    out = []
    print("\n| mutation | cases whose observed step it changes | of those, flagged | its CI subset flagged |")
    print("|---|---|---|---|")
    for m in mutations.MUTATIONS:
        with mutations.applied(m):
            outcomes = [run(c) for c in cases]
            subset = [mutations.run_setup(s) for s in m.setups]
        changed = [o for o, u in zip(outcomes, unbroken) if changed_in_the_step(o, u)]
        caught = sum(mutations.flagged(o) for o in changed)
        row = {"mutation": m.name, "changed": len(changed), "flagged": caught}
        row["flagged_total"] = sum(mutations.flagged(o) for o in outcomes)
        row.update(subset=len(subset), subset_flagged=sum(mutations.flagged(o) for o in subset))
        out.append(row)
        print(f"| {m.name} | {len(changed)} | {caught} | {row['subset_flagged']} of {len(subset)} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--list", action="store_true", help="print every case with its outcome")
    ap.add_argument("--json", help="write every case's outcome to this file")
    ap.add_argument("--mutations", action="store_true", help="run the catalogue under every mutation as well")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    cases = fault_cases.cases()
    rows, counts, outcomes = matrix(cases, args.list)
    total = print_table(counts)
    ratios = [r["ratio"] for r in rows if r["outcome"] in ("applied", "skip", "plain")]
    print(f"\nlargest error / tolerance of a passing case: {max(ratios):.2f}")
    print(f"{sum(total.values())} cases in {time.perf_counter() - start:.1f} s, torch {torch.__version__}")
    report = {"cases": rows}
    if args.mutations:
        report["mutations"] = mutation_check(cases, outcomes)
        print(f"with the mutation check: {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
    checks = report.get("mutations", [])
    missed = any(m["flagged"] < m["changed"] or m["subset_flagged"] < m["subset"] for m in checks)
    return 1 if total["corrupt"] or missed else 0


if __name__ == "__main__":
    raise SystemExit(main())
