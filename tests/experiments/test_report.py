"""The per-task sweep report: lr grid, table at the chosen lr, sensitivity figure; partial sweeps marked, not fatal."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import matplotlib.image
import pytest

from optlora_experiments import compact, results
from optlora_experiments import report as rep

ROOT = Path(__file__).resolve().parents[2]
GRID = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3)


def rec(method, lr, seed, *, held=None, dev=0.3, loss=0.5, diverged=None, sel=None, n=40, cpu=400.0, maj=0.69,
        metric="matthews"):  # fmt: skip
    """A run record: losses fall to ``loss``; ``cpu`` ms per step; ``sel``: the sweep's final selection."""
    steps = [
        {"step": k, "loss": loss + 0.5 * (n - k) / n, "wall_time": 0.1 * k, "cpu_ms": cpu} for k in range(1, n + 1)
    ]
    final = {"score": dev, metric: dev, "train_loss_last10": loss, "diverged_at_step": diverged,
             "cpu_ms_per_step": cpu, "majority_baseline": maj, "holdout_majority": maj, "dev_examples": 10,
             "dev_total": 10}  # fmt: skip
    if diverged is not None:
        final.update(score=None, train_loss_last10=math.nan)
        steps[-1]["loss"] = math.nan
    if held is not None:
        final["selection_score"] = held
    cfg = {"task": "cola", "lr": lr, "primary_metric": metric}
    r = results.make_run(method, seed, cfg, steps, final, env={})
    if sel is not None:
        r["selection"] = sel
    return r


def partial_sweep():
    """LoRA complete (grid extended to 5e-5, 3 seeds); ScaLoRA: one diverged lr, provisional, 1 seed; DoRA: 2 runs."""
    sel = {"grid": list(GRID), "extended": [5e-5], "selected_lr": 1e-4, "reason": "best held-out score, interior"}
    recs = [rec("lora", lr, 0, held=0.2 - abs(math.log10(lr / 1e-4)) / 10, dev=0.25, sel=sel) for lr in (5e-5, *GRID)]
    recs += [rec("lora", 1e-4, s, dev=0.25 + 0.01 * s, sel=sel) for s in (1, 2)]
    recs += [rec("scalora", lr, 0, held=0.3, dev=0.35, loss=0.4, cpu=500.0) for lr in (1e-4, 2e-4, 5e-4)]
    recs += [rec("scalora", 2e-3, 0, diverged=17)]
    recs += [rec("dora", lr, 0, held=0.0, dev=0.0) for lr in (1e-4, 2e-4)]  # collapsed to the majority class
    return recs


def test_grid_marks_selected_provisional_diverged_missing_and_majority():
    expected = rep.Expected(("lora", "scalora", "dora", "balora"), (0, 1, 2), GRID)
    grids, first = rep.method_grids(partial_sweep(), expected)
    assert first == 0 and list(grids) == ["lora", "scalora", "dora", "balora"]  # LoRA first, then optlora, baselines
    assert grids["lora"].final and grids["lora"].lr == 1e-4 and grids["lora"].missing == []
    assert not grids["scalora"].final and grids["scalora"].lr == 1e-4  # ties: the smaller lr; diverged never wins
    assert grids["scalora"].missing == [1e-3] and grids["balora"].lr is None and grids["balora"].missing == list(GRID)
    table = rep.grid_table(grids)
    lines = table.splitlines()
    assert lines[0] == "| method | 5e-05 | 0.0001 | 0.0002 | 0.0005 | 0.001 | 0.002 | lr |"
    assert "| **0.200 / 0.250 / 0.500** |" in lines[2] and "(best held-out score, interior)" in lines[2]
    assert "| *0.300 / 0.350 / 0.400* |" in lines[3] and "| missing | diverged (step 17) |" in lines[3]
    assert lines[3].startswith("| scalora |  | ") and "provisional: 4 of 5 grid runs done" in lines[3]
    assert "*0.000† / 0.000 / 0.500*" in lines[4]  # Matthews 0: the majority class's score
    assert lines[5] == "| balora |  | missing | missing | missing | missing | missing | - (no runs yet) |"


def test_chosen_table_one_seed_no_test_lora_not_against_itself_cpu_time(tmp_path):
    recs = partial_sweep()
    expected = rep.Expected(("lora", "scalora", "dora", "balora"), (0, 1, 2), GRID)
    grids, _ = rep.method_grids(recs, expected)
    lines = rep.chosen_table(recs, grids, (0, 1, 2)).splitlines()
    assert "steps (CPU s) to LoRA's final loss" in lines[0] and "ms/step" in lines[0] and "wall" not in lines[0]
    lora, scalora, dora, balora = lines[2:6]
    assert lora.startswith("| lora | 0.0001 | 3 | 0.2600 ± 0.0100 | - | - | 400 |")
    # one seed: no spread, no p-value; the convergence is in steps and CPU seconds (500 ms per step)
    assert scalora.startswith("| scalora | 0.0001 (provisional) | 1 (seeds 1, 2 missing) | 0.3500 (1 seed) |")
    assert "+0.1000 (1 seed: no test)" in scalora and "n/a" not in scalora
    step = next(int(c.split()[0]) for c in scalora.split("|") if "CPU s)" in c)
    assert f"{step} ({step * 500 / 1000:.0f} CPU s), 1/1" in scalora and "| 500 |" in scalora
    assert "0.0000 (1 seed) ≤ majority†" in dora and balora.startswith("| balora | - | 0 | no runs yet |")
    assert lines[-1].startswith("† dora: not above the majority-class baseline") and "0.0000" in lines[-1]


def test_task_markdown_and_figures_on_a_partial_sweep(tmp_path):
    img, md = tmp_path / "docs" / "img", tmp_path / "docs" / "results"
    expected = rep.Expected(("lora", "scalora", "dora", "balora"), (0, 1, 2), GRID)
    text = rep.task_markdown(partial_sweep(), expected, img=img, link_base=md)
    assert text.startswith("### cola (14 runs; score = matthews on dev 10 of 10 examples; majority baseline 0.0000")
    assert (
        "**Partial sweep**: missing 9 grid run(s) (scalora, dora, balora) and 6 seed run(s) (scalora, dora, balora)"
        in text
    )
    assert "† held-out score not above the majority class's" in text
    assert "![cola lr sensitivity](../img/glue_cola/sensitivity.png)" in text
    assert "![cola training loss against CPU time](../img/glue_cola/loss_vs_cpu.png)" in text
    for name in ("sensitivity", "loss_vs_step", "loss_vs_cpu", "final_metrics"):
        im = matplotlib.image.imread(img / "glue_cola" / f"{name}.png")
        assert im.ndim == 3 and min(im.shape[:2]) > 100 and im.std() > 0, name


def test_sensitivity_axes_are_log_lr_and_start_at_zero(tmp_path, monkeypatch):
    from optlora_experiments import plots

    saved = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.append(fig) or path)
    grids, _ = rep.method_grids(partial_sweep())
    rep.plot_sensitivity(grids, tmp_path / "s.png", "matthews")
    score, loss = saved[0].axes[:2]
    assert score.get_xscale() == loss.get_xscale() == "log"
    assert -0.05 < score.get_ylim()[0] <= 0.0 < 0.3 < score.get_ylim()[1]  # 0 in view (DoRA's 0 is a point on it)
    assert loss.get_ylim()[0] == 0.0  # positive losses: the axis starts at 0, not at the smallest loss
    labels = [t.get_text() for t in saved[0].legends[0].get_texts()]
    assert labels == ["lora", "scalora", "dora"]  # one line per method with runs, in table order


def _glue_report():
    spec = importlib.util.spec_from_file_location("glue_report", ROOT / "bench" / "glue_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_glue_report_from_a_plan_lists_missing_tasks_and_writes_markdown(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for r in partial_sweep():
        name = f"cola_{r['method']}_lr{r['config']['lr']:g}_seed{r['seed']}.json"
        results.write_json(tmp_path / "records" / "cola" / name, compact.compact_record(r))
    plan = tmp_path / "plan.toml"
    plan.write_text('[sweep]\nout = "runs"\nrecords = "records"\n[defaults]\nmethods = ["lora", "scalora", "dora"]\n'
                    'lrs = [1e-4, 2e-4, 5e-4, 1e-3, 2e-3]\nseeds = [0, 1, 2]\n'
                    '[[task]]\nname = "cola"\ntask = "cola"\n[[task]]\nname = "mrpc"\ntask = "mrpc"\n')  # fmt: skip
    md = tmp_path / "docs" / "glue.md"
    assert _glue_report().main(["--plan", str(plan), "--img", "docs/img", "--md", str(md)]) == 0
    text = md.read_text()
    assert "### cola (14 runs;" in text and "### mrpc\n\nNo finished runs yet in records/mrpc." in text
    assert "balora" not in text and "(img/glue_cola/sensitivity.png)" in text
    assert (tmp_path / "docs" / "img" / "glue_cola" / "sensitivity.png").is_file()
    with pytest.raises(SystemExit):
        _glue_report().main([])  # nothing to report on
