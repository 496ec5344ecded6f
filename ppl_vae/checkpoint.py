"""Checkpoints: written atomically, loaded safely, restoring every RNG for exact resume.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists, saved with
``torch.save`` and loaded with ``torch.load(..., weights_only=True)``: PyTorch's restricted
unpickler, which refuses any object other than tensors and primitive containers, so a
crafted file cannot run code. Fields: ``format_version``, ``package_version``, ``config``,
``model``, ``optimizer``, ``epoch`` (epochs completed), ``step`` (steps into the next epoch,
for a mid-epoch save), ``perm`` (that epoch's permutation), ``best_valid_elbo``, ``rng``.

Writes go to a temporary file in the same directory, are flushed and fsynced, then renamed
over the old file with ``os.replace`` (atomic on POSIX): a crash or a full disk leaves the
previous checkpoint intact.
"""
from __future__ import annotations

import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

from .errors import CheckpointError

FORMAT_VERSION = 1


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


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
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
            raise CheckpointError(f"could not write {path} ({e.strerror or e}); the previous checkpoint "
                                  f"there is intact") from None
        raise


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint safely; one clear :class:`CheckpointError` for every way it can be bad."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it contains objects other than tensors and plain values, which "
            f"could run code when unpickled ({str(e).splitlines()[0][:120]}); only load checkpoints "
            f"written by ppl_vae from people you trust") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({e.__class__.__name__}); "
                              f"use an intact copy (e.g. best.pt) or retrain") from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a ppl_vae checkpoint (no format_version field)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']}, this ppl_vae reads format "
                              f"{FORMAT_VERSION}; use the ppl_vae version that wrote it "
                              f"({ckpt.get('package_version', 'unknown')})")
    return ckpt


def check_config_matches(saved: dict, requested: dict, keys) -> None:
    """Refuse to resume/load when a model-defining setting differs."""
    diffs = [f"{k}: checkpoint has {saved.get(k)!r}, requested {requested.get(k)!r}"
             for k in keys if saved.get(k) != requested.get(k)]
    if diffs:
        raise CheckpointError("checkpoint does not match the requested model (" + "; ".join(diffs) +
                              "); use the run's own settings or start a new --out")
