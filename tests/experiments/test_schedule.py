"""The sweep plan from finished runs alone: 1-2-5 grid extension, diverged runs never win, run order."""

from __future__ import annotations

import math

import pytest

from optlora_experiments import schedule as S

GRID = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]


def test_next_lr_walks_the_1_2_5_sequence():
    assert S.next_lr(1e-4, -1) == 5e-5 and S.next_lr(5e-5, -1) == 2e-5 and S.next_lr(2e-5, -1) == 1e-5
    assert S.next_lr(2e-3, 1) == 5e-3 and S.next_lr(5e-3, 1) == 1e-2 and S.next_lr(1e-2, 1) == 2e-2
    assert S.next_lr(3e-3, 1) == 5e-3 and S.next_lr(3e-3, -1) == 2e-3  # off the sequence: the nearest points
    with pytest.raises(ValueError):
        S.next_lr(0.0, 1)


def test_an_interior_best_is_selected_without_extension():
    sel = S.select("lora", GRID, {1e-4: 0.5, 2e-4: 0.6, 5e-4: 0.8, 1e-3: 0.7, 2e-3: 0.1}, extend=True)
    assert sel.final and sel.selected_lr == 5e-4 and sel.extended == [] and "interior" in sel.reason


def test_a_best_at_the_edge_extends_until_interior():
    peak = 5e-5  # the score falls with the distance from 5e-5 in log space

    def score(lr):
        return -abs(math.log(lr / peak))

    done = {lr: score(lr) for lr in GRID}
    sel = S.select("lora", GRID, done, extend=True)
    assert not sel.final and sel.extended == [5e-5]  # waits for the new point
    done[5e-5] = score(5e-5)
    sel = S.select("lora", GRID, done, extend=True)
    assert not sel.final and sel.extended == [5e-5, 2e-5]  # 5e-5 is the new lower edge
    done[2e-5] = score(2e-5)
    sel = S.select("lora", GRID, done, extend=True)
    assert sel.final and sel.selected_lr == 5e-5 and sel.extended == [5e-5, 2e-5]
    assert sel.as_dict()["scores"][0] == [2e-5, done[2e-5]] and sel.as_dict()["selected_lr"] == 5e-5
    # without extension the edge is kept and said to be one
    plain = S.select("lora", GRID, done, extend=False)
    assert plain.selected_lr == 1e-4 and "edge (grid not extended)" in plain.reason


def test_extension_stops_at_the_caps():
    up = {lr: lr for lr in GRID}  # higher is better
    for lr in (5e-3, 1e-2):
        assert S.select("lora", GRID, up, extend=True).extended[-1] == lr
        up[lr] = lr
    sel = S.select("lora", GRID, up, extend=True)
    assert sel.final and sel.selected_lr == 1e-2 and "upper cap" in sel.reason
    assert S.select("lora", GRID, {lr: lr for lr in GRID}, extend=True, lr_max=2e-3).selected_lr == 2e-3


def test_a_diverged_run_never_wins_and_all_diverged_tries_smaller_lrs():
    done = {1e-4: 0.5, 2e-4: 0.6, 5e-4: math.nan, 1e-3: None, 2e-3: math.inf}
    sel = S.select("lora", GRID, done, extend=True)
    assert sel.final and sel.selected_lr == 2e-4 and sel.scores[5e-4] is None
    sel = S.select("lora", GRID, dict.fromkeys(GRID), extend=True)
    assert sel.extended == [5e-5]
    sel = S.select("lora", [1e-5, 2e-5], dict.fromkeys([1e-5, 2e-5]), extend=True)
    assert sel.final and sel.selected_lr == 1e-5 and "diverged" in sel.reason


def test_ties_keep_the_smaller_lr_and_one_lr_needs_no_score():
    assert S.select("lora", [1e-3, 1e-4], {1e-3: 0.5, 1e-4: 0.5}, extend=False).selected_lr == 1e-4
    one = S.select("lora", [1e-3], {}, extend=True)
    assert one.final and one.selected_lr == 1e-3 and one.extended == []


def test_plan_order_grid_by_lr_then_method_then_extension_then_seeds_interleaved():
    methods, grids = ["lora", "reflora"], {"lora": [1e-3, 1e-4], "reflora": [1e-4, 1e-3]}
    p = S.plan(methods, grids, [0, 1, 2], {}, extend=True)
    assert [(r.method, r.lr, r.phase) for r in p.todo] == [
        ("lora", 1e-4, "grid"), ("reflora", 1e-4, "grid"), ("lora", 1e-3, "grid"), ("reflora", 1e-3, "grid"),
    ]  # fmt: skip
    assert all(r.score_holdout for r in p.todo) and p.waiting_methods == methods and p.total == 8 and p.done == 0
    # lora's best is at the upper edge (-> 2e-3), reflora's at the lower one (-> 5e-5)
    done = {("lora", 1e-4, 0): 0.1, ("lora", 1e-3, 0): 0.9, ("reflora", 1e-4, 0): 0.5, ("reflora", 1e-3, 0): 0.4}
    p = S.plan(methods, grids, [0, 1, 2], done, extend=True)
    assert [(r.method, r.lr, r.seed, r.phase) for r in p.todo] == [
        ("lora", 2e-3, 0, "extension"), ("reflora", 5e-5, 0, "extension"),
    ]  # fmt: skip
    done.update({("lora", 2e-3, 0): 0.2, ("reflora", 5e-5, 0): 0.3})
    p = S.plan(methods, grids, [0, 1, 2], done, extend=True)
    assert [(r.method, r.lr, r.seed, r.phase) for r in p.todo] == [
        ("lora", 1e-3, 1, "seed"),
        ("reflora", 1e-4, 1, "seed"),
        ("lora", 1e-3, 2, "seed"),
        ("reflora", 1e-4, 2, "seed"),
    ]  # fmt: skip  seed 1 of every method before seed 2 of any
    assert not any(r.score_holdout for r in p.todo) and p.total == 10 and p.done == 6
    done.update({(r.method, r.lr, r.seed): None for r in p.todo})
    assert S.plan(methods, grids, [0, 1, 2], done, extend=True).complete


def test_seeds_of_a_selected_method_do_not_wait_for_the_others():
    grids = {"lora": [1e-4, 1e-3], "reflora": [1e-4, 1e-3]}
    done = {("lora", 1e-4, 0): 0.5, ("lora", 1e-3, 0): 0.6, ("reflora", 1e-4, 0): 0.5}  # reflora 1e-3 running
    p = S.plan(["lora", "reflora"], grids, [0, 1], done, extend=False)
    assert [(r.method, r.lr, r.seed) for r in p.todo] == [("reflora", 1e-3, 0), ("lora", 1e-3, 1)]
    assert p.waiting_methods == ["reflora"]
