"""The mutation check (issue #16, class 7): the oracle must flag every deliberate breakage of the library.

Each mutation of :mod:`optlora.testing.mutations` is patched in at runtime (no file is edited) and run on its
representative subset of fault-matrix setups: the oracle must report a problem that is not a known issue in
every one. The same setups on the unbroken library must pass (a known issue only where the setup injects
NaN/Inf under ``on_nonfinite="skip"``: issue #16 class 6). ``bench/fault_matrix.py --mutations`` runs the
whole catalogue under each mutation (docs/RELIABILITY.md).
"""

from __future__ import annotations

import pytest

from optlora.testing import mutations
from optlora.testing.oracle import CLASS6

SUBSETS = [(m, entry) for m in mutations.MUTATIONS for entry in m.setups]


def test_every_breakage_of_issue_16_has_a_mutation_with_a_subset():
    names = {m.name for m in mutations.MUTATIONS}
    assert names == {
        "moment transfer switched off",
        "second moments scaled by the first power",
        "gradient chain rule dropped",
        "RefLoRA's preconditioned gradient x7",
        "RefLoRA's preconditioned gradient dropped",
        "skip counters frozen",
        "merge of 1.05x the increment",
    }
    assert all(len(m.setups) >= 3 for m in mutations.MUTATIONS)


@pytest.mark.parametrize("mutation,entry", SUBSETS, ids=[f"{m.name}: {e[0]}" for m, e in SUBSETS])
def test_the_oracle_flags_the_mutation(mutation, entry):
    with mutations.applied(mutation):
        outcome = mutations.run_setup(entry)
    assert mutations.flagged(outcome), f"{mutation.name} not flagged in {entry[0]}: {outcome}"


UNBROKEN = list({e[0]: e for _, e in SUBSETS}.values())


@pytest.mark.parametrize("entry", UNBROKEN, ids=[e[0] for e in UNBROKEN])
def test_the_unbroken_library_passes_the_same_setups(entry):
    outcome = mutations.run_setup(entry)
    if "NaN" in entry[0]:  # on_nonfinite="skip": the skipped layer still moves (known, and nothing else)
        assert outcome.kind == "corrupt" and outcome.known == CLASS6, outcome.detail
    else:
        assert outcome.kind in ("applied", "skip"), outcome.detail


def test_a_mutation_is_undone_after_its_block():
    m = mutations.MUTATIONS[-1]
    original = getattr(m.owner, m.attribute)
    with mutations.applied(m):
        assert getattr(m.owner, m.attribute) is not original
    assert getattr(m.owner, m.attribute) is original
