"""``best.pt``, verified: never claimed to hold what it does not.

Every checkpoint records which epoch ``best.pt`` should hold (``best_epoch``) and a digest of
that epoch's parameters (``best_digest``). A ``best.pt`` that is missing, damaged, or stale (its
save failed or was cut short, so it holds an earlier epoch) is then found by ``fit --resume``,
which rewrites it from ``checkpoint.pt`` when that file holds the recorded parameters and
otherwise says in one line that it cannot, by the end of a run (``summary.json``'s ``best_pt``
and the final line say what it really holds), and by ``evaluate`` and ``sample``, which refuse it.

``checkpoint.pt`` is written before ``best.pt`` (:func:`ppl_vae.training.checkpoint.write`), so
the record always names the newest best and ``best.pt`` can lag behind it but never run ahead.
The digest is over the parameters (names, dtypes, shapes, values), not the file's bytes, so
``best.pt`` carries its own record too and a rewritten ``best.pt`` checks out the same.
Checkpoints written before the record existed have no ``best_digest`` key: their ``best.pt`` is
taken as it is (and a resume records what it holds).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core import digests
from ..core.errors import CheckpointError
from . import checkpoint

NAME = "best.pt"


def digest(model_state: dict) -> str:
    """A digest of a model's ``state_dict`` (:func:`ppl_vae.core.digests.digest`): every entry's
    name, dtype, shape and values, in name order (a non-tensor entry: its name and ``repr``);
    the same numbers give the same digest on any device."""
    return digests.digest(_parts(model_state))


def _parts(model_state: dict):
    for name in sorted(model_state):
        t = model_state[name]
        if isinstance(t, torch.Tensor):
            yield f"{name}|{t.dtype}|{tuple(t.shape)};"
            yield t
        else:
            yield f"{name}={t!r};"


def record(ckpt: dict) -> dict:
    """The record fields of a checkpoint about to be written as the new best: its own epoch and
    the digest of its parameters (``model``: θ̄ under ``--ema``, what ``best.pt`` is for)."""
    return {"best_epoch": ckpt["epoch"], "best_digest": digest(ckpt["model"])}


@dataclass
class Found:
    """What ``best.pt`` holds against a record: ``problem`` (None when it holds the recorded
    best; else a few words: "is missing", "is damaged (...)", "holds epoch 2, not the best
    epoch 3"), the epoch it holds and the digest of its parameters (None when unreadable)."""

    problem: str | None = None
    holds: int | None = None
    digest: str | None = None

    def summary(self) -> dict:
        """``summary.json``'s ``best_pt``: the epoch it holds, whether that is the recorded best."""
        return {
            "epoch": self.holds,
            "verified": self.problem is None,
            **({"problem": self.problem} if self.problem else {}),
        }


def check(out: str | Path, rec: dict, device="cpu") -> Found:
    """``out/best.pt`` against the record ``rec`` (a checkpoint, or its ``best_epoch`` and
    ``best_digest``). No record yet (no epoch has finished): nothing to check. A record of an
    earlier version (no ``best_digest`` key): best.pt as it is, unless it is damaged."""
    path = Path(out) / NAME
    legacy, want = "best_digest" not in rec, rec.get("best_digest")
    if want is None and not legacy:
        return Found()
    if not path.exists():
        return Found() if legacy else Found("is missing")
    try:
        best = checkpoint.load(path, map_location=device)
    except (
        CheckpointError
    ) as e:  # "checkpoint PATH is truncated or corrupt (...); use ..." → "is truncated ..."
        why = str(e).split("; ")[0]
        for head in (f"checkpoint {path} ", f"{path} "):
            why = why[len(head) :] if why.startswith(head) else why
        return Found(why if why.startswith(("is ", "has ")) else f"cannot be loaded ({why})")
    found = Found(None, best["epoch"], digest(best["model"]))
    if not legacy and found.digest != want:
        found.problem = f"holds epoch {best['epoch']}, not the best epoch {rec['best_epoch']}"
    return found


def repair(out: str | Path, ckpt: dict, found: Found) -> str:
    """After :func:`check` found a problem on ``--resume``: rewrite ``best.pt`` from the
    checkpoint ``ckpt`` when it holds the recorded parameters (the run stopped right after its
    best epoch, e.g. when the save of best.pt failed), else leave it. Returns the one-line note."""
    path, epoch = Path(out) / NAME, ckpt.get("best_epoch")
    if "best_digest" not in ckpt:  # a run of an earlier version: nothing says which epoch best.pt held
        return (
            f"{path} {found.problem}; this run's checkpoint predates the record of best.pt's epoch, so it "
            f"cannot be rewritten; it is replaced at the next better epoch (--checkpoint checkpoint takes "
            f"the latest meanwhile)"
        )
    if digest(ckpt["model"]) == ckpt["best_digest"]:
        checkpoint.atomic_save(ckpt, path)
        return f"{path} {found.problem}; rewritten from checkpoint.pt, which holds epoch {epoch}"
    return (
        f"{path} {found.problem}, and no other file holds epoch {epoch}'s parameters, so it cannot "
        f"be rewritten; it is replaced at the next better epoch, and until then evaluate and sample "
        f"refuse it (--checkpoint checkpoint takes the latest)"
    )


def load_verified(run_dir: str | Path, device="cpu") -> tuple[Path, dict]:
    """The checkpoint ``evaluate`` and ``sample`` use for ``--checkpoint best``: ``best.pt`` when it
    holds what ``checkpoint.pt`` records; ``checkpoint.pt`` when ``best.pt`` is missing and
    ``checkpoint.pt`` itself holds the recorded parameters (or no epoch has finished yet).
    Otherwise one :class:`CheckpointError` line saying what ``best.pt`` holds and what to do.
    A ``checkpoint.pt`` that cannot be read leaves ``best.pt`` unchecked, with a warning."""
    run_dir = Path(run_dir)
    path, latest_path = run_dir / NAME, run_dir / "checkpoint.pt"
    best = checkpoint.load(path, map_location=device) if path.exists() else None
    try:
        latest = checkpoint.load(latest_path, map_location=device) if latest_path.exists() else None
    except CheckpointError as e:
        if best is None:
            raise
        warnings.warn(f"{path} is not checked against the record in {latest_path}: {e}")
        return path, best
    if latest is None or "best_digest" not in latest:  # no record (a run of an earlier version)
        if best is None:
            return latest_path, checkpoint.load(latest_path, map_location=device)  # (its own error)
        return path, best
    want, epoch = latest["best_digest"], latest["best_epoch"]
    if best is not None and digest(best["model"]) == want:
        return path, best
    latest_is_best = want is None or digest(latest["model"]) == want
    if best is None and latest_is_best:
        return latest_path, latest
    what = (
        "is missing"
        if best is None
        else f"holds epoch {best['epoch']}, but checkpoint.pt records "
        + ("no finished epoch" if want is None else f"epoch {epoch} as the best")
    )
    fix = (
        f"python -m ppl_vae.fit --out {run_dir} --resume rewrites it"
        if latest_is_best
        else f"no file holds epoch {epoch}'s parameters any more"
    )
    raise CheckpointError(
        f"{path} {what} (its last save failed or was cut short); {fix}; --checkpoint checkpoint "
        f"takes the latest parameters (epoch {latest['epoch']})"
    )
