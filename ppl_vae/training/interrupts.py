"""How a training loop stops early: a signal (SIGINT/SIGTERM), or a loss that is no longer finite.

While the loop runs, a signal only sets a flag (:func:`signals_to_flag`); the loop saves a
checkpoint at the next step boundary and raises :class:`Interrupted`, whose ``exit_code``
(128 + the signal number) the CLI returns. A NaN/inf loss raises :class:`NonFiniteLoss` and
keeps the last good checkpoint.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from pathlib import Path


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` = 128 + signal number."""

    def __init__(self, signum: int, path: Path):
        super().__init__(
            f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {path}; "
            f"continue with --resume"
        )
        self.exit_code = 128 + signum


@contextmanager
def signals_to_flag(flag: dict):
    """While training, SIGINT/SIGTERM only set ``flag['signum']``; the loop saves and stops at
    the next step boundary. Handlers are installed only in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, frame: flag.__setitem__("signum", signum))
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
