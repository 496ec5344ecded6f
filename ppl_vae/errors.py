"""Errors that mean "the user asked for something we cannot do", as opposed to bugs.

The command-line modules print their message on one line and exit with code 2; library
callers can catch :class:`UserError` (a ``ValueError``).
"""


class UserError(ValueError):
    """Bad input: a flag value, a data file, a run directory. The message says what to do."""


class DataError(UserError):
    """Data that are missing, malformed or do not suit the chosen likelihood."""


class CheckpointError(UserError):
    """A checkpoint that is unsafe, corrupt, of another format, or of another model."""
