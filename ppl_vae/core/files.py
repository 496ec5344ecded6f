"""Safe files: one atomic-write helper for every file ppl_vae writes, durable appends, stale
temporary files, and the one-writer lock of a run directory.

* :func:`atomic_write` writes through a temporary file beside the target
  (``.<name>.<pid>.<hex>.tmp``), flushes and fsyncs it, renames it over the target with
  ``os.replace`` (atomic on POSIX) and fsyncs the directory. A crash, a kill or a full disk
  leaves the previous version intact; any failure becomes one :class:`WriteError` line naming
  the file and the reason. torch's zip writer reports a full disk or a file-size limit as a
  ``RuntimeError`` ("unexpected pos ..."), which is converted too, its cause diagnosed from the
  process's file-size limit and the free space. Before it writes, it removes the temporary files
  of earlier writes to the same target whose writer is dead, so a killed ``evaluate --json FILE``
  leaves nothing behind for long, wherever FILE is.
* :func:`append_line` appends one line and fsyncs it (``metrics.jsonl``: an epoch on disk is
  an epoch that survives a power loss).
* :func:`remove_stale_temps` removes the temporary files of writers that died mid-write
  (kill -9): those whose PID, which is in the name, is not alive. A temporary file belongs to its
  writer: a live reader's (``sample`` writing into a run) stays, however old it is.
* :class:`RunLock` is an exclusive ``fcntl.flock`` on ``<run>/.lock``, held for a ``fit``'s
  whole life. The OS drops it when the process dies, so a killed run never blocks its own
  resume; a second writer is refused with the holder's PID and host. A start that fails can
  :meth:`RunLock.discard` the lock file it created, leaving nothing behind.

PIDs are one host's: the temporary files of a folder that several hosts write at once (a network
file system) are beyond this module.
"""

from __future__ import annotations

import errno
import os
import re
import resource
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


def reason(e: BaseException, partial: str | os.PathLike | None = None) -> str:
    """What went wrong, in a few words: the OS's reason (``file too large (a file-size limit)``
    for ``EFBIG``), or, for torch's zip writer, whose ``RuntimeError`` on a short write carries no
    errno, the cause found from the file-size limit (``partial``: the file cut short) and the
    free space of its folder."""
    if isinstance(e, OSError):
        if e.errno == errno.EFBIG:
            return "file too large (a file-size limit)"
        return (e.strerror or str(e)).lower()
    text = str(e)
    if "unexpected pos" in text or "file write failed" in text:  # torch's zip writer on a short write
        return _short_write(partial)
    return text.splitlines()[0][:160] if text else e.__class__.__name__


def _short_write(partial) -> str:
    """The likely cause of a write cut short (see :func:`reason`)."""
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    try:
        size = os.stat(partial).st_size if partial else None
    except OSError:
        size = None
    if limit != resource.RLIM_INFINITY and (size is None or size >= limit):
        return f"file too large (a file-size limit of {limit} bytes)"
    try:
        st = os.statvfs(Path(partial).parent if partial else ".")
        if st.f_bavail * st.f_frsize < 1 << 20:
            return "no space left on device"
    except OSError:
        pass
    return "the write was cut short (a full disk or a quota)"


def atomic_write(path: str | os.PathLike, write: Callable, binary: bool = True) -> None:
    """Write ``path`` atomically: ``write(f)`` fills an open temporary file (binary or text),
    which is fsynced and renamed over ``path``; the folder is fsynced after.

    :raises WriteError: on any ``OSError`` (or torch writer ``RuntimeError``), with one line
        "could not write PATH: REASON; the previous NAME is intact". The temporary file is removed.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    existed = path.exists()
    remove_stale_temps(path.parent, target=path.name)  # of earlier writes to this file killed midway
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
        why = reason(e, tmp) if isinstance(e, (OSError, RuntimeError)) else ""
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, (OSError, RuntimeError)):
            kept = f"the previous {path.name} is intact" if existed else f"no {path.name} was written"
            err = WriteError(f"could not write {path}: {why}; {kept}")
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
        err = WriteError(f"could not append to {path}: {reason(e)}; the lines before are intact")
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


def remove_stale_temps(folder: str | os.PathLike, target: str | None = None) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` (only those of the file
    named ``target``, when given) whose writer is dead: the PID in the name is not alive.

    A temporary file belongs to its writer, so neither its age nor whose lock is held decides:
    a live reader's temporary file (``sample`` writing into a run while a ``fit`` starts there)
    stays. (A dead writer's PID reused by a live process keeps its file until that process
    ends.) Returns the removed paths; a file that cannot be removed is left alone."""
    removed = []
    prefix = None if target is None else f".{target}."
    try:
        names = [e.name for e in os.scandir(folder)]
    except OSError:  # not a folder, or not readable: nothing to clean
        return removed
    for name in names:
        m = TEMP.match(name)
        if not m or (prefix and not name.startswith(prefix)) or int(m.group(1)) == os.getpid():
            continue
        if not _alive(int(m.group(1))):
            try:
                os.unlink(Path(folder) / name)
                removed.append(Path(folder) / name)
            except OSError:
                pass
    return removed


class RunLock:
    """An exclusive advisory lock (``fcntl.flock``) on ``<folder>/.lock`` for one writer.

    ``acquire()`` raises :class:`~ppl_vae.core.errors.UserError` naming the holder's PID and host when
    another process holds it, and one naming the folder and the reason when the lock file cannot
    be opened (a read-only file system, no permission). The lock file stays (it is harmless); the
    lock itself dies with the process. ``created``: this process made the lock file."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / LOCK_NAME
        self._fd: int | None = None
        self.created = False

    def acquire(self) -> "RunLock":
        import fcntl

        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                self.created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise UserError(
                f"could not take the run lock in {self.path.parent}: {reason(e)} (a fit writes its "
                f"run directory; choose a writable --out)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                os.close(fd)
                raise UserError(f"could not take the run lock in {self.path.parent}: {reason(e)}") from None
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "an unknown process"
            os.close(fd)
            raise UserError(
                f"{self.path.parent} is in use by another fit ({holder}); wait for it to finish, "
                f"stop it, or choose another --out"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        except OSError as e:
            self._fd = fd
            self.discard()
            raise UserError(f"could not write the run lock {self.path}: {reason(e)}") from None
        self._fd = fd
        return self

    def discard(self) -> None:
        """Release the lock, removing the lock file first when this process created it (a start
        that failed leaves nothing behind). Unlinked while still held, so no other fit can take
        the old file between the two steps."""
        if self._fd is not None and self.created:
            try:
                os.unlink(self.path)
            except OSError:
                pass
        self.release()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
