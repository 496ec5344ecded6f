"""Shared plumbing of the command-line modules: one clear line and exit code 2 for bad input."""
from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager

from .errors import UserError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error convention (``error: ...`` then exit 2, usage hint)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


@contextmanager
def user_errors(prog: str):
    """Turn :class:`UserError` into one line on stderr and exit code 2 (no traceback)."""
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
