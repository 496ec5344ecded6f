"""Safe files: one atomic-write helper for every file ppl_vae writes, durable appends, stale
temporary files, and the one-writer lock of a run directory.

* :func:`atomic_write` writes through a temporary file beside the target
  (``.<name>.<pid>.<hex>.tmp``), flushes and fsyncs it, renames it over the target with
  ``os.replace`` (atomic on POSIX) and fsyncs the directory. A crash, a kill or a full disk
  leaves the previous version intact; any failure becomes one :class:`WriteError` line naming
  the file and the reason. torch's zip writer reports a full disk as a ``RuntimeError``
  ("unexpected pos ..."), which is converted too.
* :func:`append_line` appends one line and fsyncs it (``metrics.jsonl``: an epoch on disk is
  an epoch that survives a power loss).
* :func:`remove_stale_temps` removes the temporary files of writers that died mid-write
  (kill -9): those whose PID is not alive, or that are older than the run's lock.
* :class:`RunLock` is an exclusive ``fcntl.flock`` on ``<run>/.lock``, held for a ``fit``'s
  whole life. The OS drops it when the process dies, so a killed run never blocks its own
  resume; a second writer is refused with the holder's PID and host.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import socket
from pathlib import Path
from typing import Callable

from .errors import UserError, WriteError

TEMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}\.tmp$")  # .<name>.<pid>.<hex>.tmp
LOCK_NAME = ".lock"


#: a test hook: called with the temporary path after it is written, before the rename
_before_replace: Callable[[Path], None] | None = None


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError):
        return (e.strerror or str(e)).lower()
    text = str(e)
    if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer on a short write
        return "the write was cut short (most likely no space left on device)"
    return text.splitlines()[0][:160] if text else e.__class__.__name__


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills an open temporary file (binary or text),
    which is fsynced and renamed over ``path``; the folder is fsynced after.

    :raises WriteError: on any ``OSError`` (or torch writer ``RuntimeError``), with one line
        "could not write PATH (REASON); the previous NAME is intact". The temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    existed = path.exists()
    try:
        # os.open rather than mkstemp: mode 0o666 minus the umask, like any other file a run writes
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb" if binary else "w", encoding=None if binary else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if _before_replace is not None:
            _before_replace(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
            err = WriteError(f"could not write {path} ({_reason(e)}); {kept}")
            err.errno = getattr(e, "errno", None) or errno.EIO
            raise err from None
        raise
    _fsync_dir(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write` of a text file (UTF-8)."""
    atomic_write(path, lambda f: f.write(text), binary=False)


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append ``line`` and a newline to ``path``, flushed and fsynced (one :class:`WriteError` line
    on failure; the lines before are untouched)."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        err = WriteError(f"could not append to {path} ({_reason(e)}); the lines before are intact")
        err.errno = e.errno
        raise err from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(folder: str | os.PathLike, older_than: float | None = None) -> list[Path]:
    """Remove temporary files of :func:`atomic_write` left in ``folder`` by writers that died.

    A temp file is stale when its writer PID is not alive, or when it was last written before
    ``older_than`` (a time stamp: the holder of the folder's :class:`RunLock` passes the time it
    took the lock, so a temp file of a writer that died before then goes even if its PID has been
    reused, while a live reader's temp file, e.g. ``sample`` writing into the run, stays).
    Returns the removed paths."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        m = TEMP.match(p.name)
        if not m or int(m.group(1)) == os.getpid():
            continue
        try:
            old = older_than is not None and p.stat().st_mtime < older_than
            if old or not _alive(int(m.group(1))):
                p.unlink()
                removed.append(p)
        except OSError:
            pass
    return removed


class RunLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``<folder>/.lock`` for one writer.

    ``acquire()`` raises :class:`~ppl_vae.core.errors.UserError` naming the holder's PID and host when
    another process holds it. The lock file stays (it is harmless); the lock itself dies with the
    process."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.acquired_at: float | None = None  # when this process took the lock (the lock file's mtime)

    def acquire(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another fit ({holder}); wait for it to finish, "
                f"stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        self._fd = fd
        self.acquired_at = os.fstat(
            fd
        ).st_mtime  # the file system's clock, the one temp files are stamped with
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
