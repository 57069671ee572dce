"""How every command's ``--help`` shows defaults (a module of its own: ``sim.certs`` uses it without
importing torch)."""

from __future__ import annotations

import argparse


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's "(default: X)" after every option's help, unless the help already says its default in
    words (where the value alone would mislead, e.g. None for "search the usual places")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text else super()._get_help_string(action)
