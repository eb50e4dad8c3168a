"""Command-line helpers shared by every ``optlora`` subcommand (a leaf: it imports nothing of optlora).

The subcommands (:mod:`optlora_experiments` modules, :mod:`optlora.export_cli`) import this
module, and :mod:`optlora.cli` imports the subcommands, so there is no import cycle.
"""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` unless the default is None/False or the help text already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
