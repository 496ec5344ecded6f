"""Shared plumbing of the command-line modules: one clear line and a meaningful exit code for
bad input (2), runtime faults (1) and interrupts (130/143), never a traceback for those."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import types
import warnings
from contextlib import contextmanager

from .errors import UserError, WriteError
from .files import reason


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error convention (``error: ...`` then exit 2, usage hint)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's ``KeyboardInterrupt`` so that ``finally`` blocks still run."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def user_errors(prog: str):
    """Report, on one line of stderr and without a traceback:

    * :class:`UserError` (bad input) → exit 2;
    * ``OSError`` (a full disk, a permission denied while writing) → exit 1; one the code did
      not word itself (not a :class:`WriteError`) still names its file and the reason;
    * Ctrl-C / SIGTERM arriving outside a training loop (which saves a checkpoint itself) →
      exit 130 / 143, also when code on its way up turned it into one of the errors above.
      SIGTERM is turned into :class:`Terminated` while the block runs (main thread only), so a
      killed job unwinds like an interrupted one.
    """
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    show = warnings.showwarning
    # warnings for the user (e.g. "MNIST not available, using digits") as one line, no source excerpt
    warnings.showwarning = lambda message, *a, **k: print(f"{prog}: warning: {message}", file=sys.stderr)
    try:
        yield
    except (KeyboardInterrupt, UserError, OSError) as e:
        if (interrupt := _interrupt_behind(e)) is not None:  # also a Ctrl-C reworded on its way up
            _exit_interrupted(prog, interrupt)
        _exit_error(prog, e)
    finally:
        warnings.showwarning = show
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def _exit_error(prog: str, e: UserError | OSError):
    """One line for bad input (exit 2) or a failed read or write (exit 1)."""
    if isinstance(e, UserError):
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    said = str(e)
    if not isinstance(e, WriteError) and getattr(e, "filename", None):
        said = f"could not read or write {e.filename}: {reason(e)}"  # not "[Errno 13] ..."
    print(f"{prog}: error: {said}", file=sys.stderr)
    sys.exit(1)


def _say_interrupted(prog: str, e: KeyboardInterrupt, when: str = "") -> int:
    """Print the one line of an interrupt and return its exit code (130 SIGINT, 143 SIGTERM)."""
    name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT", 130)
    print(f"{prog}: interrupted by {name}{when}", file=sys.stderr)
    _forget_unhandled_mark()
    return code


def _forget_unhandled_mark() -> None:
    """Clear CPython's mark of an unhandled Ctrl-C, so that ``python -m`` exits with our code.

    CPython (3.8 on) marks a ``KeyboardInterrupt`` that leaves code compiled from a string
    (``exec(str)``, ``eval(str)``) as unhandled, even when a caller catches it; ``python -m`` then
    ends by killing itself with SIGINT (exit -2) whatever ``sys.exit`` said. ``dataclasses`` and
    ``namedtuple`` build their methods that way, thousands of times in torch's lazy imports (the
    first optimizer imports ``torch._dynamo``), so a Ctrl-C there was caught, its line printed,
    and the exit still -2. Running a string that completes clears the mark
    (``run_eval_code_obj`` in CPython's Python/pythonrun.c)."""
    exec("")


def _interrupt_behind(e: BaseException) -> KeyboardInterrupt | None:
    """The ``KeyboardInterrupt`` that ``e`` is or that led to it (its ``__cause__`` /
    ``__context__`` chain), else None. Python 3.11 wraps one raised inside a class's
    ``__set_name__`` (a dataclass field, while torch imports) in a ``RuntimeError``."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _exit_interrupted(prog: str, e: KeyboardInterrupt, when: str = ""):
    sys.exit(_say_interrupted(prog, e, when))


@contextmanager
def startup(prog: str):
    """Around a command-line module's heavy imports (torch, Pyro: seconds): Ctrl-C or SIGTERM
    while they load exits 130 / 143 with one line instead of a traceback. Nothing has been
    written yet, so there is nothing to clean up."""
    main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _raise_terminated) if main else None
    try:
        yield
    except (KeyboardInterrupt, Exception) as e:  # re-raised unless it is, or has behind it, an interrupt
        if (interrupt := _interrupt_behind(e)) is None:
            raise
        _exit_interrupted(prog, interrupt, " while starting")
    finally:
        if main:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old is None else old)


def run_command(prog: str, main) -> None:
    """Run a command-line module's ``main()`` and exit with its code. From ``main``'s first
    statement to the process exit, Ctrl-C or SIGTERM gives exit 130 / 143 and one line, never a
    traceback, whatever is running or printing then: a signal raises a ``KeyboardInterrupt`` (or
    :class:`Terminated`), caught here. A repeat while that one unwinds (in the ``except`` and
    ``finally`` blocks it passes, so clean-up runs whole) is ignored, and so is every signal once
    the work is done (while the interpreter tears torch and matplotlib down). A repeat after
    library code swallowed the first raises again: a native module's import turns an interrupt
    into ``ImportError`` and an optional import catches that (torch's check for triton does).
    (Blocks inside ``main`` may take the signals over for a while, as the training loop does, and
    hand them back.)"""
    state = {"raised": False, "done": False}

    def once(signum, frame):
        if state["done"] or (state["raised"] and _interrupt_behind(sys.exc_info()[1]) is not None):
            return
        state["raised"] = True
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread:
        signal.signal(signal.SIGINT, once)
        signal.signal(signal.SIGTERM, once)
    try:
        code = main()
        state["done"] = True  # a signal before this line is still caught below
    except SystemExit as e:  # user_errors' one line was printed already
        state["done"] = True
        code = e.code
    except (KeyboardInterrupt, Exception) as e:  # re-raised unless it is, or has behind it, an interrupt
        state["done"] = True
        if (interrupt := _interrupt_behind(e)) is None:
            raise
        code = _say_interrupted(prog, interrupt)
    if main_thread:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


def callable_module(name: str, function: str) -> None:
    """Make module ``name`` callable as its ``function``: ``ppl_vae.fit`` stays the module of
    ``python -m ppl_vae.fit`` (``fit.main``, ``fit.build_parser``) and ``fit(...)`` calls
    ``fit.fit(...)``, so ``from ppl_vae import fit`` gives one object either way."""

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return getattr(self, function)(*args, **kwargs)

    sys.modules[name].__class__ = CallableModule
