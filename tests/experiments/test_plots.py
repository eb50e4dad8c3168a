"""Figures (``optlora plot``) and the shared result writers (JSON per run, CSV summary)."""

from __future__ import annotations

import csv
import json
import math
import os

import matplotlib.image
import pytest

from optlora import cli
from optlora_experiments import plots
from optlora_experiments import results as res

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path):
    raw = open(path, "rb").read()
    assert raw[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and min(img.shape[:2]) > 100 and img.std() > 0, path  # not a blank canvas


def mf_result(lr=0.01, steps=12):
    decay = {"lora": 0.9, "reflora": 0.3, "scaledgd": 0.8}
    methods = {}
    for name, q in decay.items():
        loss = [100.0 * q**t for t in range(steps)]
        methods[name] = {
            "loss": loss,
            "norm_A": [3.0 + 0.1 * t for t in range(steps)],
            "norm_B": [0.0] + [1.0 + 0.1 * t for t in range(1, steps)],  # B = 0 at the init: not drawable on log axes
            "grad_norm_A": [0.0] + loss[1:],
            "grad_norm_B": loss,
            "wall_time": [0.01 * (t + 1) for t in range(steps)],
        }
    methods["lora"]["loss"][5:] = [math.inf] + [math.nan] * (steps - 6)  # a diverged run
    return {"methods": methods, "config": {"lr": lr, "steps": steps}}


def run_record(method, seed, steps=20, telemetry=True):
    log = []
    for t in range(1, steps + 1):
        entry = {"step": t, "loss": 0.7 / (1 + 0.1 * t * (1 + seed)), "wall_time": 0.05 * t, "cpu_ms": 40.0}
        if method.startswith("scalora"):
            entry["column_fraction"] = 0.8
            if telemetry and t % 5 == 0:  # logged every 5 steps only
                entry["rank_mean"] = 8.0 + t
        log.append(entry)
    final = {"accuracy": 0.8 + 0.01 * seed + (0.05 if method != "lora" else 0.0), "ms_per_step": 30.0,
             "cpu_ms_per_step": 25.0}  # fmt: skip
    env = {"python": "3", "torch": "x"}
    return res.make_run(method, seed, {"lr": 1e-3, "task": "sst2"}, log, final, env)


def test_plot_mf_writes_valid_pngs(tmp_path):
    written = plots.plot_mf(mf_result(), tmp_path)
    assert sorted(p.name for p in written) == ["balance.png", "loss.png"]
    for p in written:
        assert_png(p)


def test_plot_mf_comparison_one_panel_per_lr(tmp_path):
    written = plots.plot_mf_comparison({0.01: mf_result(0.01), 0.03: mf_result(0.03)}, tmp_path)
    for p in written:
        assert_png(p)
    one = matplotlib.image.imread(plots.plot_mf(mf_result(), tmp_path / "one")[0])
    two = matplotlib.image.imread(tmp_path / "loss.png")
    assert two.shape[1] > 1.5 * one.shape[1]  # two panels side by side


def test_plot_runs_groups_seeds(tmp_path):
    records = [run_record(m, s) for m in ("lora", "reflora", "scalora") for s in (0, 1)]
    written = plots.plot_runs(records, tmp_path, smooth=0.5)
    names = sorted(p.name for p in written)
    assert names == ["final_metrics.png", "loss_vs_cpu.png", "loss_vs_step.png", "scalora.png"]
    for p in written:
        assert_png(p)
    # without ScaLoRA telemetry there is no scalora.png; without per-step CPU time no loss_vs_cpu.png (never wall)
    lone = run_record("lora", 0)
    for s in lone["steps"]:
        del s["cpu_ms"]
    written = plots.plot_runs([lone], tmp_path / "lora_only")
    assert {p.name for p in written} == {"loss_vs_step.png", "final_metrics.png"}


def test_loss_against_cpu_time_and_honest_bars(tmp_path, monkeypatch):
    saved = {}
    monkeypatch.setattr(plots, "_save", lambda fig, path: saved.setdefault(path.name, fig) and path)
    records = [run_record("lora", 0), run_record("scalora", 0), run_record("scalora", 1)]
    for r in records:
        r["final"]["majority_baseline"] = 0.7
    plots.plot_runs(records, tmp_path)
    (cpu,) = saved["loss_vs_cpu.png"].axes
    assert cpu.get_xlabel() == "process CPU time (s)" and cpu.lines[0].get_xdata()[-1] == pytest.approx(20 * 0.04)
    acc, ms = saved["final_metrics.png"].axes
    assert acc.get_ylim()[0] == 0.0 and ms.get_title() == "cpu_ms_per_step"  # bars from 0; CPU, not wall ms_per_step
    assert [t.get_text() for t in acc.get_xticklabels()] == ["lora\n(1 seed)", "scalora\n(2 seeds)"]
    bars = [c for c in acc.containers if hasattr(c, "has_yerr") and c.has_yerr][0]
    segments = bars.lines[2][0].get_segments()  # error bars: drawn for the 2 seeds of ScaLoRA only
    assert [len(seg) for seg in segments] == [0, 2]  # LoRA's bar (1 seed) has none
    assert [line.get_ydata()[0] for line in acc.lines if line.get_linestyle() == "--"] == [0.7]  # majority class


def test_plot_cli_on_a_folder_of_mixed_results(tmp_path, capsys):
    res.write_json(tmp_path / "mf" / "lr_0.01" / "results.json", mf_result())
    for m in ("lora", "reflora"):
        res.write_run(tmp_path / "ft" / f"sst2_{m}_seed0.json", run_record(m, 0))
    (tmp_path / "ft" / "notes.json").write_text('{"something": "else"}')
    assert cli.main(["plot", str(tmp_path), "--out", str(tmp_path / "figs")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 2 + 2 + 3  # mf per lr, mf comparison, runs (loss vs step and CPU time, bars)
    for p in printed:
        assert_png(p)
    assert cli.main(["plot", str(tmp_path / "mf" / "lr_0.01" / "results.json")]) == 0  # next to the file
    assert_png(tmp_path / "mf" / "lr_0.01" / "loss.png")


def test_plot_cli_errors(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path / "missing")]) == 2
    assert "no such results file" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path)]) == 2  # empty folder
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "is an optlora result file" in capsys.readouterr().err
    assert cli.main(["plot", str(tmp_path), "--smooth", "1.5"]) == 2


# ----------------------------------------------------------------------------- result writers
def test_environment_records_versions_and_device():
    env = res.environment()
    for key in ("python", "torch", "peft", "transformers", "platform", "device", "git_commit"):
        assert key in env
    assert env["torch"] and env["peft"] and env["transformers"]
    assert env["device"] == "cpu" or env["device"].startswith("cuda")
    json.dumps(env)


def test_write_json_is_atomic_and_round_trips(tmp_path):
    import torch

    path = tmp_path / "sub" / "r.json"
    obj = {"a": [1.0, math.inf, math.nan], "t": torch.tensor([1.5, 2.5]), "d": torch.float32, "p": tmp_path}
    res.write_json(path, obj)
    back = res.read_json(path)
    assert back["a"][:2] == [1.0, math.inf] and math.isnan(back["a"][2])
    assert back["t"] == [1.5, 2.5] and back["d"] == "torch.float32" and back["p"] == str(tmp_path)
    assert os.listdir(path.parent) == ["r.json"]  # no temporary file left behind

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        res.write_json(path, {"x": Boom()})
    assert res.read_json(path)["t"] == [1.5, 2.5]  # the old file is intact
    assert os.listdir(path.parent) == ["r.json"]


def test_run_records_validate_and_summarise(tmp_path):
    records = [run_record("lora", 0), run_record("scalora", 1)]
    for i, r in enumerate(records):
        res.write_run(tmp_path / f"{i}.json", r)
        assert res.read_json(tmp_path / f"{i}.json") == json.loads(json.dumps(r))
    res.write_summary_csv(tmp_path / "summary.csv", records)
    rows = list(csv.DictReader((tmp_path / "summary.csv").open()))
    assert [r["method"] for r in rows] == ["lora", "scalora"]
    assert float(rows[1]["accuracy"]) == pytest.approx(records[1]["final"]["accuracy"])
    assert int(rows[0]["steps"]) == 20 and float(rows[0]["final_loss"]) == pytest.approx(
        records[0]["steps"][-1]["loss"]
    )
    assert res.kind(records[0]) == "run" and res.kind({"methods": {}, "config": {}}) == "mf"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r.pop("final"), "lacks key"),
        (lambda r: r.update(seed="0"), "'seed' must be an int"),
        (lambda r: r["steps"].append({"step": 3}), "steps[20]"),
        (lambda r: r["final"].update(accuracy="high"), "final['accuracy']"),
    ],
)
def test_bad_run_records_are_rejected(mutate, message):
    r = run_record("lora", 0)
    mutate(r)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        res.validate_run(r)


def test_validate_mf_results_rejects_wrong_shapes():
    good = mf_result()
    res.validate_mf_results(good)
    with pytest.raises(ValueError, match="exactly the keys"):
        res.validate_mf_results({**good, "extra": 1})
    bad = mf_result()
    bad["methods"]["reflora"]["norm_A"] = bad["methods"]["reflora"]["norm_A"][:-1]
    with pytest.raises(ValueError, match="one common length"):
        res.validate_mf_results(bad)


def test_write_csv_columns_and_cells(tmp_path):
    res.write_csv(tmp_path / "t.csv", [{"a": 1, "b": math.inf}, {"a": None, "c": [1, 2]}])
    rows = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert rows == [{"a": "1", "b": "inf", "c": ""}, {"a": "", "b": "", "c": "[1, 2]"}]


def test_plot_cli_on_an_mf_output_folder_rebuilds_the_comparison(tmp_path, capsys):
    for lr in (0.01, 0.03):
        res.write_json(tmp_path / f"lr_{lr:g}" / "results.json", mf_result(lr))
    res.write_json(tmp_path / "results.json", mf_result(0.01))  # the primary-lr copy
    assert cli.main(["plot", str(tmp_path)]) == 0
    printed = sorted(capsys.readouterr().out.split())
    expected = ["balance.png", "loss.png", "lr_0.01/balance.png", "lr_0.01/loss.png"]
    expected += ["lr_0.03/balance.png", "lr_0.03/loss.png"]
    assert printed == sorted(str(tmp_path / e) for e in expected)
    both = matplotlib.image.imread(tmp_path / "loss.png")
    one = matplotlib.image.imread(tmp_path / "lr_0.01" / "loss.png")
    assert both.shape[1] > 1.5 * one.shape[1]  # the two-lr comparison was not overwritten by the copy
