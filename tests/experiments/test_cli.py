"""The ``optlora`` command line: help for every subcommand, config files (YAML/TOML) and presets."""

from __future__ import annotations

import argparse
import sys
import types

import pytest

from optlora import cli
from optlora_experiments import demo, mf
from optlora_experiments import results as res


def _subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def test_top_level_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for _, name in cli.SUBCOMMANDS:
        assert name in out


@pytest.mark.parametrize("name", [name for _, name in cli.SUBCOMMANDS])
def test_subcommand_help_explains_every_option(name, capsys):
    parser = cli.build_parser()
    sub = _subparsers(parser).choices[name]
    assert cli.main([name, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        assert action.help and action.help.strip(), f"{name}: option {action.option_strings or action.dest} has no help"
        for opt in action.option_strings:
            assert opt in out


@pytest.mark.parametrize("name", ["mf", "plot", "demo"])
def test_own_subcommands_are_available(name):
    sub = _subparsers(cli.build_parser()).choices[name]
    assert "unavailable" not in (sub.description or "")
    assert sub.get_default("func").__module__ == f"optlora_experiments.{'plots' if name == 'plot' else name}"


@pytest.fixture
def fake_module(monkeypatch):
    """A stand-in subcommand module that records the namespace its ``run`` receives."""
    seen = {}
    mod = types.ModuleType("optlora_fake_cmd")

    def add_parser(subparsers):
        p = subparsers.add_parser("fake", help="fake", description="fake")
        p.add_argument("--alpha", type=float, default=1.0, help="a number")
        p.add_argument("--names", nargs="+", default=["a"], choices=["a", "b", "c"], help="names")
        p.add_argument("--flag", action="store_true", help="a flag")
        p.add_argument("--mode", choices=["x", "y"], default="x", help="mode")
        p.set_defaults(func=lambda args: seen.update(vars(args)) or 0)

    mod.add_parser = add_parser
    monkeypatch.setitem(sys.modules, "optlora_fake_cmd", mod)
    broken = ("optlora_missing_module_xyz", "broken")
    monkeypatch.setattr(cli, "SUBCOMMANDS", (*cli.SUBCOMMANDS, ("optlora_fake_cmd", "fake"), broken))
    return seen


def test_broken_module_only_disables_its_subcommand(fake_module, capsys):
    assert cli.main(["broken"]) == 2
    err = capsys.readouterr().err
    assert "optlora_missing_module_xyz" in err and "unavailable" in err
    assert cli.main(["fake", "--alpha", "2"]) == 0
    assert fake_module["alpha"] == 2.0


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
@pytest.mark.parametrize("position", ["after", "before"])
def test_config_file_defaults_and_cli_precedence(fake_module, tmp_path, suffix, position):
    path = tmp_path / f"c{suffix}"
    if suffix == ".yaml":
        path.write_text("alpha: 3\nnames: [b, c]\nflag: true\nmode: y\n")
    else:
        path.write_text('alpha = 3\nnames = ["b", "c"]\nflag = true\nmode = "y"\n')
    argv = ["fake", "--config", str(path), "--mode", "x"] if position == "after" else ["--config", str(path), "fake"]
    assert cli.main(argv) == 0
    assert fake_module["alpha"] == 3.0 and isinstance(fake_module["alpha"], float)  # int in the file -> option type
    assert fake_module["names"] == ["b", "c"]
    assert fake_module["flag"] is True
    assert fake_module["mode"] == ("x" if position == "after" else "y")  # an explicit flag wins
    assert "config" not in fake_module and "global_config" not in fake_module  # run() sees only its options


def test_config_section_named_after_the_subcommand(fake_module, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[fake]\nalpha = 5.5\n")
    assert cli.main(["fake", "--config", str(path), "--alpha", "7"]) == 0
    assert fake_module["alpha"] == 7.0
    assert cli.main(["fake", "--config", str(path)]) == 0
    assert fake_module["alpha"] == 5.5


@pytest.mark.parametrize(
    "text, message",
    [
        ("alpha: 1\nbogus_key: 2\n", "unknown option(s) for `optlora fake`: bogus_key"),
        ("mode: z\n", "'mode' must be one of"),
        ("names: [a, q]\n", "'names' must be one of"),
        ("flag: 1\n", "'flag' is a flag"),
        ("alpha: [1, 2]\n", "takes one value"),
        ("alpha: abc\n", "bad value 'abc'"),
        ("- just\n- a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_is_a_clear_error(fake_module, tmp_path, capsys, text, message):
    path = tmp_path / "c.yml"
    path.write_text(text)
    assert cli.main(["fake", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err
    assert not fake_module  # run() never called


def test_missing_or_unsupported_config_file(fake_module, tmp_path, capsys):
    assert cli.main(["fake", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    (tmp_path / "c.json").write_text("{}")
    assert cli.main(["fake", "--config", str(tmp_path / "c.json")]) == 2
    assert ".yaml, .yml or .toml" in capsys.readouterr().err


def test_mf_quick_preset_precedence(tmp_path):
    args = cli.parse_args(["mf", "--quick"])
    assert mf.config_from_args(args).steps == mf.QUICK_STEPS
    assert mf.config_from_args(cli.parse_args(["mf"])).steps == mf.FULL_STEPS
    assert mf.config_from_args(cli.parse_args(["mf", "--quick", "--steps", "7"])).steps == 7
    path = tmp_path / "mf.yaml"
    path.write_text("steps: 9\nlrs: [0.02, 0.05]\nmethods: [lora, reflora]\nwarmup_steps: 2\n")
    cfg = mf.config_from_args(cli.parse_args(["mf", "--quick", "--config", str(path), "--lrs", "0.1"]))
    assert (cfg.steps, cfg.lrs, cfg.methods, cfg.warmup_steps) == (9, (0.1,), ("lora", "reflora"), 2)


def test_mf_rejects_bad_values(capsys):
    assert cli.main(["mf", "--rank", "0", "--no-plots"]) == 2
    assert "rank must be a positive int" in capsys.readouterr().err
    assert cli.main(["mf", "--methods", "nope"]) == 2


def test_demo_runs_mf_and_skips_a_missing_finetune(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "optlora_experiments.finetune", None)  # import now fails
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--mf-steps", "4", "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped: optlora_experiments.finetune is not importable" in printed
    assert "reflora" in printed and "diverged" not in printed  # 4 steps: nobody has diverged yet
    for name in ("results.json", "lr_0.01/results.json", "lr_0.03/results.json", "summary.csv", "loss.png"):
        assert (out / "mf" / name).stat().st_size > 0
    assert not (out / "gsm8k_match").exists()
    assert cli.main(["demo", "--mf-steps", "0"]) == 2


@pytest.mark.parametrize("source", ["sample", "data-dir"])
def test_demo_fine_tunes_offline_on_the_sample_or_a_data_dir(source, no_shared, data_root, tmp_path, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--quick", "--mf-steps", "2", "--ft-steps", "2", "--eval-samples", "4", "--model", "tiny"]
    argv += ["--out", str(out), "--no-progress", "--threads", "1"]
    argv += ["--no-plots"] if source == "data-dir" else []
    argv += ["--data-dir", str(data_root)] if source == "data-dir" else []
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    where = "sample/gsm8k/train.jsonl.gz" if source == "sample" else str(data_root / "gsm8k" / "train.jsonl")
    assert where in printed and "majority baseline" in printed
    rec = res.read_json(out / "gsm8k_match" / "gsm8k_match_scalora_lr0.002_seed0.json")
    assert rec["final"]["test_examples"] == 4  # 2 steps x 16 examples; the fixture has only 24
    assert rec["config"]["data"]["train_examples"] == (32 if source == "sample" else 24)
    assert (out / "gsm8k_match" / "plots" / "loss_vs_step.png").is_file() == (source == "sample")


def test_quick_demo_says_when_a_method_stayed_at_the_majority_baseline():
    rows = [{"method": "lora", "below_majority": True, "majority_score": 0.5}, {"method": "scalora"}]
    note = demo.quick_note(rows, 16)
    assert note.startswith("With --quick (16 steps) lora scored at or below the majority baseline (0.5000)")
    assert "\n" not in note and note.endswith("without --quick for the full preset.")  # one sentence
    assert demo.quick_note(rows[1:], 16) == ""  # nothing when no method is at or below the baseline


def test_demo_without_data_is_a_clear_error(no_shared, tmp_path, capsys):
    code = cli.main(
        ["demo", "--mf-steps", "2", "--task", "sst2", "--model", "tiny", "--out", str(tmp_path), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("optlora demo: error: no GLUE-format data") and "Traceback" not in err
