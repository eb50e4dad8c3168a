"""Which runs a sweep needs, in which order, and the learning rate each method keeps -- from the finished runs alone.

Pure functions of the sweep's arguments and the held-out scores of the runs done so far, so every
process sharing one ``--out`` computes the same plan from the records on disk:

* **lr selection** (:func:`select`): per method, its grid on the first seed, each run scored on the part
  of train held out (``final["selection_score"]``). The best finite score wins (ties: the smaller lr); a
  diverged run (no finite score) never wins. With ``extend`` a best lr at an edge of the grid adds the next
  point of the 1-2-5 sequence beyond it (:func:`next_lr`), within ``[lr_min, lr_max]``, until the best is
  interior or at a cap; when every run diverged, the smaller side is tried. A grid of one lr selects it
  without scores (and is never extended).
* **order** (:func:`plan`): the first seed's grid of every method interleaved (by lr, then method), then
  the extension points, then each further seed across methods (seed 1 of every method before seed 2 of
  any), each at its method's selected lr (the first seed's run at that lr is reused).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

LR_MIN, LR_MAX = 1e-5, 1e-2
_MANTISSAS = (1, 2, 5)


def _ladder(lo_exp: int, hi_exp: int) -> list[float]:
    return [float(f"{m}e{e}") for e in range(lo_exp, hi_exp + 1) for m in _MANTISSAS]


def next_lr(lr: float, direction: int) -> float:
    """The next point of the 1-2-5 sequence (..., 1e-4, 2e-4, 5e-4, 1e-3, ...) below (-1) or above (+1) ``lr``."""
    if not lr > 0 or direction not in (-1, 1):
        raise ValueError(f"need lr > 0 and direction -1 or +1, got {lr} and {direction}")
    e = math.floor(math.log10(lr))
    points = _ladder(e - 2, e + 2)
    if direction > 0:
        return min(p for p in points if p > lr * (1 + 1e-9))
    return max(p for p in points if p < lr * (1 - 1e-9))


@dataclass(frozen=True)
class Run:
    """One run of the sweep: ``score_holdout`` when it takes part in an lr selection."""

    method: str
    lr: float
    seed: int
    score_holdout: bool
    phase: str  # "grid" | "extension" | "seed"


@dataclass
class Selection:
    """A method's lr selection so far: the lrs tried (sorted) with their held-out scores (None: not done or diverged)."""

    method: str
    grid: list[float]
    extended: list[float] = field(default_factory=list)
    scores: dict[float, float | None] = field(default_factory=dict)
    selected_lr: float | None = None  # None until final
    reason: str = ""

    @property
    def final(self) -> bool:
        return self.selected_lr is not None

    def lrs(self) -> list[float]:
        return sorted({*self.grid, *self.extended})

    def as_dict(self) -> dict:
        """What the run records keep of the selection (JSON-ready)."""
        return {
            "grid": list(self.grid),
            "extended": list(self.extended),
            "scores": [[lr, self.scores.get(lr)] for lr in self.lrs()],
            "selected_lr": self.selected_lr,
            "reason": self.reason,
        }


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def select(method: str, grid, done: dict, *, extend: bool, lr_min: float = LR_MIN, lr_max: float = LR_MAX) -> Selection:
    """The selection of ``method`` given ``done``: {lr: held-out score (None if diverged / not finite)} of its first seed.

    Returns the lrs needed so far (``grid`` plus extension points) and, once every needed run is done and
    no extension is due, the selected lr and why.
    """
    grid = sorted(set(grid))
    if not grid:
        raise ValueError(f"{method}: empty lr grid")
    sel = Selection(method, grid)
    if len(grid) == 1:
        sel.selected_lr, sel.reason = grid[0], "single lr"
        return sel
    while True:
        lrs = sel.lrs()
        sel.scores = {lr: (done[lr] if _finite(done.get(lr)) else None) for lr in lrs if lr in done}
        if any(lr not in done for lr in lrs):
            return sel  # waiting for runs
        scored = [lr for lr in lrs if sel.scores.get(lr) is not None]
        if scored:
            best = max(scored, key=lambda lr: sel.scores[lr])  # max keeps the first (smallest) lr on ties
            edge = -1 if best == lrs[0] else (1 if best == lrs[-1] else 0)
        else:
            best, edge = lrs[0], -1  # every lr diverged: try smaller ones
        if extend and edge:
            nxt = next_lr(lrs[0] if edge < 0 else lrs[-1], edge)
            if lr_min * (1 - 1e-9) <= nxt <= lr_max * (1 + 1e-9):
                sel.extended.append(nxt)
                continue
        sel.selected_lr = best
        side = "lower" if edge < 0 else "upper"
        if not scored:
            sel.reason = "every lr diverged; the smallest is kept"
        elif edge:
            sel.reason = f"best at the {side} " + ("cap" if extend else "edge (grid not extended)")
        else:
            sel.reason = "best held-out score, interior"
        return sel


@dataclass
class Plan:
    """Runs still to do that can start now (in order), how many wait on a selection, the selections, all runs."""

    todo: list[Run]
    waiting_methods: list[str]
    selections: dict[str, Selection]
    total: int  # runs known to be needed so far (done or not)
    done: int  # of those, finished

    @property
    def complete(self) -> bool:
        return not self.todo and not self.waiting_methods


def plan(methods, grids: dict, seeds, done: dict, *, extend: bool, lr_min=LR_MIN, lr_max=LR_MAX) -> Plan:
    """The sweep's next runs. ``grids``: method -> lr grid; ``done``: (method, lr, seed) -> held-out score or None."""
    seeds = list(seeds)
    first = seeds[0]
    sels = {}
    for m in methods:
        first_seed = {lr: s for (mm, lr, sd), s in done.items() if mm == m and sd == first}
        sels[m] = select(m, grids[m], first_seed, extend=extend, lr_min=lr_min, lr_max=lr_max)
    scoring = {m: len(sels[m].lrs()) > 1 for m in methods}
    needed: list[Run] = []
    width = max(len(sorted(set(grids[m]))) for m in methods)
    for i in range(width):  # the first seed's grids, by lr then method
        for m in methods:
            g = sorted(set(grids[m]))
            if i < len(g):
                needed.append(Run(m, g[i], first, scoring[m], "grid"))
    for m in methods:
        needed += [Run(m, lr, first, True, "extension") for lr in sels[m].extended]
    for seed in seeds[1:]:
        for m in methods:
            if sels[m].final and seed != first:
                needed.append(Run(m, sels[m].selected_lr, seed, False, "seed"))
    todo = [r for r in needed if (r.method, r.lr, r.seed) not in done]
    waiting = [m for m in methods if not sels[m].final]
    per_method_seeds = len([s for s in seeds[1:] if s != first])
    total = len(needed) + per_method_seeds * len(waiting)
    return Plan(todo, waiting, sels, total, len(needed) - len(todo))
