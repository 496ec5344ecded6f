"""Checkpoints: written atomically, loaded safely, restoring every RNG for exact resume.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists, saved with
``torch.save`` (a zip archive whose members carry CRC-32 checksums) and loaded with
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which refuses any
object other than tensors and primitive containers, so a crafted file cannot run code.
Fields (:data:`FIELDS`): ``format_version``, ``package_version``, ``config``, ``model``,
``optimizer``, ``scheduler``, ``epoch`` (epochs completed), ``step`` (steps into the next
epoch, for a mid-epoch save), ``perm`` (that epoch's permutation), ``loss_sum`` (Σ loss of
those steps), ``best_valid_elbo``, ``bad_epochs``, ``rng`` (torch, CUDA, NumPy, Python).

Writes go to a temporary file in the same directory, are flushed and fsynced, then renamed
over the old file with ``os.replace`` (atomic on POSIX) and the directory is fsynced: a crash
or a full disk leaves the previous checkpoint intact. See ``docs/reliability.md``.
"""
from __future__ import annotations

import os
import pickle
import random
import secrets
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError, CheckpointWriteError

FORMAT_VERSION = 1
FIELDS = ("format_version", "package_version", "config", "model", "optimizer", "scheduler", "epoch", "step",
          "perm", "loss_sum", "best_valid_elbo", "bad_epochs", "rng")


def rng_state() -> dict:
    """The torch (CPU and CUDA), NumPy and Python RNG states as tensors/lists (weights_only-safe)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(float, np_state[2:])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, ``os.replace``, fsync the folder.

    On any failure the temporary file is removed and ``path`` keeps its previous content; an
    ``OSError`` (disk full, permissions) becomes one :class:`CheckpointWriteError` line.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # os.open rather than mkstemp: mode 0o666 minus the umask, like any other file the run writes
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            err = CheckpointWriteError(f"could not write {path} ({e.strerror or e}); any previous {path.name} "
                                       f"there is intact")
            err.errno = e.errno
            raise err from None
        raise
    _fsync_dir(path.parent)


def _check_archive(path: Path) -> None:
    """Refuse files that are not intact zip archives: truncation breaks the central directory,
    a flipped byte breaks a member's CRC-32 (``torch.load`` checks neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, OSError, EOFError, ...: every way the bytes can be wrong
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt (not a readable PyTorch archive: "
                              f"{e.__class__.__name__}); use an intact copy (e.g. best.pt) or retrain") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (member {bad} fails its CRC-32 check); use an "
                              f"intact copy (e.g. best.pt) or retrain")


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint safely; one clear :class:`CheckpointError` for every way it can be bad:
    missing, truncated/corrupt, holding non-tensor objects (refused unread), another format
    version, or lacking a field of :data:`FIELDS`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} " + ("is a directory, not a checkpoint file" if path.is_dir()
                                                       else "does not exist"))
    _check_archive(path)
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols; the error below says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        why = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain values, which could run "
            f"code when unpickled{f' ({why[0][:160]})' if why else ''}; only load checkpoints written by "
            f"ppl_vae, from people you trust") from None
    except Exception as e:  # the archive is intact, so its content is malformed
        raise CheckpointError(f"checkpoint {path} is corrupt ({e.__class__.__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else ''}); use an intact copy "
                              f"(e.g. best.pt) or retrain") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a ppl_vae checkpoint (no format_version field)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']!r}, this ppl_vae reads "
                              f"format {FORMAT_VERSION}; use the ppl_vae version that wrote it "
                              f"({ckpt.get('package_version', 'unknown')})")
    missing = [k for k in FIELDS if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(f"{path} is an incomplete ppl_vae checkpoint (missing or malformed: "
                              f"{', '.join(missing) or 'config/model'}); use an intact copy or retrain")
    return ckpt


def check_config_matches(saved: dict, requested: dict, keys) -> None:
    """Refuse to resume/load when a model-defining setting differs."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, requested {requested.get(k)!r}"
             for k in keys if saved.get(k) != requested.get(k)]
    if diffs:
        raise CheckpointError("checkpoint does not match the requested model (" + "; ".join(diffs) +
                              "); use the run's own settings or start a new --out")
