"""Callbacks of the experiments' Trainer runs: a run without a progress bar is never silent for long."""

from __future__ import annotations

from types import SimpleNamespace

from optlora_experiments.callbacks import HEARTBEAT_S, Heartbeat


def test_heartbeat_prints_when_the_interval_has_passed_and_only_then(capsys):
    now = [0.0]
    beat = Heartbeat(clock=lambda: now[0])
    state = SimpleNamespace(global_step=0, max_steps=10, log_history=[])
    beat.on_train_begin(None, state, None)
    for step, dt in enumerate([5.0, 5.0, HEARTBEAT_S, 1.0, HEARTBEAT_S], start=1):
        now[0] += dt
        state.global_step = step
        state.log_history.append({"loss": 1.0 / step, "step": step})
        beat.on_step_end(None, state, None)
    now[0] += HEARTBEAT_S
    beat.on_prediction_step(None, state, None)
    beat.on_prediction_step(None, state, None)
    assert capsys.readouterr().out.splitlines() == [
        "  step 3/10, loss 0.3333",
        "  step 5/10, loss 0.2000",
        "  evaluating ...",
    ]
