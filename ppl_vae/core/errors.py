"""Errors that mean "the user asked for something we cannot do", as opposed to bugs, and the
runtime faults that the command-line modules report on one line.

Exit codes of every command-line module (``ppl_vae.core.cli.user_errors``):

* 2: :class:`UserError`: a bad flag value, data file, run directory or checkpoint;
* 1: a runtime fault: :class:`WriteError` (or any ``OSError``, e.g. a full disk), a
  non-finite loss;
* 130 / 143: interrupted by SIGINT (Ctrl-C) / SIGTERM (128 + signal number).

Library callers can catch :class:`UserError` (a ``ValueError``).
"""


class UserError(ValueError):
    """Bad input: a flag value, a data file, a run directory. The message says what to do."""


class DataError(UserError):
    """Data that are missing, malformed or do not suit the chosen likelihood."""


class CheckpointError(UserError):
    """A checkpoint that is unsafe, corrupt, of another format, or of another model."""


class WriteError(OSError):
    """A file could not be written (e.g. the disk is full); its previous version is intact."""
