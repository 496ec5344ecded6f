"""Run directories: what a ``fit`` writes, how it is guarded, and how it is read back.

A run directory (``--out``) holds ``config.json`` (the resolved settings), ``checkpoint.pt``
(latest) and ``best.pt`` (best validation bound), ``metrics.jsonl`` (one JSON object per
epoch), ``summary.json`` and the figures. One ``fit`` at a time writes it (:class:`RunLock`);
``evaluate`` and ``sample`` only read it (:func:`load_run`), and every file is replaced
atomically, so a reader never sees a torn file.

Metric rows (nats per datapoint, the sign of a bound):

* ``train_objective``: the bound the optimizer maximized, averaged over the epoch's steps, and
  ``objective``, its name: ``elbo`` or ``iwae-K``, or ``beta-elbo`` / ``beta-iwae-K`` (β ≠ 1
  at some step, e.g. KL warm-up);
* ``valid_elbo`` (analytic KL where it has a closed form, fixed draws), split into ``valid_recon``
  = E_q[log p(x|z)] and ``valid_kl`` = valid_recon − valid_elbo (since 0.2), and ``valid_iwae_k``
  with ``iwae_k`` for IWAE runs;
* ``beta`` (at the epoch's last step), ``lr``, ``epoch_seconds``.

Rows of earlier versions (``train_elbo``, ``valid_iwae``) are read under the new names.
This module imports no training code: ``evaluate`` and ``sample`` use it.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..core import files
from ..core.errors import CheckpointError, UserError
from ..programs.conditional import make_vae
from ..programs.likelihoods import make_likelihood
from ..programs.model import VAE
from . import checkpoint
from .best import load_verified
from .config import MODEL_KEYS, FitConfig

if TYPE_CHECKING:
    from ..data.splits import Dataset

RUN_FILES = (
    "config.json",
    "checkpoint.pt",
    "best.pt",
    "metrics.jsonl",
    "summary.json",
    "reconstructions.png",
    "samples.png",
    "training_curve.png",
)
METRICS = "metrics.jsonl"
LEGACY_KEYS = {"train_elbo": "train_objective", "valid_iwae": "valid_iwae_k"}  # before 0.2


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA request without CUDA is a :class:`UserError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def build_model(cfg: FitConfig) -> VAE:
    """The program a config describes (its parameters freshly initialized from the global RNG):
    a :class:`~ppl_vae.programs.conditional.ConditionalVAE` under ``conditional``, else a :class:`~ppl_vae.programs.model.VAE`."""
    likelihood = make_likelihood(cfg.likelihood, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor)
    return make_vae(
        cfg.image_shape,
        cfg.z_dim,
        cfg.hidden,
        likelihood,
        cfg.arch,
        cfg.activation,
        prior=cfg.prior,
        posterior=cfg.guide,
        latent_layers=cfg.latent_layers,
        hierarchy=cfg.hierarchy,
        z2_dim=cfg.z2_dim,
        hidden2=cfg.hidden2,
        pseudo_inputs=cfg.pseudo_inputs,
        mixture_components=cfg.mixture_components,
        flow_steps=cfg.flow_steps,
        num_classes=cfg.num_classes if cfg.conditional else 0,
    )


def class_labels(data: "Dataset", cfg: FitConfig) -> dict | None:
    """One-hot labels ``{split: (N, C)}`` of a conditional run (None otherwise), made once on the
    data's device so that a step only indexes them; fills in ``cfg.num_classes``. A dataset
    without labels is refused."""
    if not cfg.conditional:
        return None
    if not all(s in data.labels for s in ("train", "valid")):
        raise UserError(
            f"--conditional needs class labels, and {data.name} has none; use a labelled dataset "
            f"(digits, mnist, mnist-t10k, fashion-mnist, kmnist, a folder with class subfolders, a .npz "
            f"with a labels array) or drop --conditional"
        )
    c = max(len(data.classes), *(int(y.max()) + 1 for y in data.labels.values() if y.numel()))
    if c < 2:
        raise UserError(f"--conditional needs at least 2 classes, and {data.name} has {c}")
    if cfg.num_classes is not None and c > cfg.num_classes:
        raise CheckpointError(f"the data have {c} classes but the run was trained on {cfg.num_classes}")
    cfg.num_classes = cfg.num_classes or c
    return {
        s: torch.nn.functional.one_hot(y.long(), cfg.num_classes).to(data.train.dtype)
        for s, y in data.labels.items()
    }


# --------------------------------------------------------------------------- the directory


def prepare(out: Path, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse to write over an earlier run unless ``resume`` or ``overwrite`` says so. With
    ``clear`` (not resuming): delete the earlier run's files under ``overwrite`` and create ``out``;
    ``clear=False`` only checks, so that bad input found later leaves an earlier run untouched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory; choose another --out")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise UserError(f"--resume: there is no checkpoint.pt in {out} to resume from")
        return
    if existing and not overwrite:
        raise UserError(
            f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
            f"--overwrite to replace it, or choose another --out"
        )
    if not clear:
        return
    try:
        for f in existing:
            (out / f).unlink()
    except OSError as e:
        raise UserError(
            f"could not remove the earlier run's {e.filename or 'files'} in {out}: {files.reason(e)}; "
            f"choose another --out"
        ) from None


def lock(out: Path) -> files.RunLock:
    """Create ``out`` if needed and take its one-writer lock (held until the process ends or
    :meth:`~ppl_vae.core.files.RunLock.release`); then remove the temporary files of writers that
    died (a live reader's stay: :func:`~ppl_vae.core.files.remove_stale_temps`)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"could not create the run directory {out}: {files.reason(e)}; choose another --out"
        ) from None
    held = files.RunLock(out).acquire()
    files.remove_stale_temps(out)
    return held


# --------------------------------------------------------------------------- metrics


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("epoch"), int):
        return None
    return {LEGACY_KEYS.get(k, k): v for k, v in row.items()}


def selection_bound(row: dict) -> float:
    """The validation bound of a metric row that ``best.pt`` and early stopping follow: the bound
    being trained, IWAE_K for an IWAE run (IWAE training lowers the ELBO while it raises IWAE_K),
    else the ELBO."""
    return row.get("valid_iwae_k", row["valid_elbo"])


def best_epoch(rows: list[dict]) -> int | None:
    """The epoch ``best.pt`` holds: the first with the highest :func:`selection_bound` (the trainer
    keeps a new best only on strict improvement); None before the first epoch."""
    return max(rows, key=selection_bound)["epoch"] if rows else None


def read_metrics(out: str | os.PathLike) -> list[dict]:
    """The rows of ``metrics.jsonl`` (damaged lines skipped, legacy keys renamed)."""
    path = Path(out) / METRICS
    if not path.exists():
        return []
    return [r for r in map(_row, path.read_text(errors="replace").splitlines()) if r is not None]


def append_metrics(out: Path, row: dict) -> None:
    """One epoch's row, appended and fsynced."""
    files.append_line(out / METRICS, json.dumps(row))


def heal_metrics(out: Path, rows: list[dict]) -> str | None:
    """Make ``metrics.jsonl`` hold exactly ``rows`` (the checkpoint's, epochs 1..E), rewritten
    atomically when it differs. Returns a one-line note of what was repaired, or ``None``."""
    path = out / METRICS
    want = [json.dumps(r) for r in rows]
    have = path.read_text(errors="replace").splitlines() if path.exists() else []
    if have == want:
        return None
    files.write_text(path, "".join(ln + "\n" for ln in want))
    parsed = [r for r in map(_row, have) if r is not None]
    if parsed == rows and len(parsed) == len(have):  # intact, written by an earlier version: keys renamed
        return None
    kept = [r["epoch"] for r in parsed]
    if not rows:
        return None if not have else f"{METRICS}: dropped {len(have)} line(s) of epochs not in the checkpoint"
    last = rows[-1]["epoch"]
    if kept[: len(rows)] == [r["epoch"] for r in rows] and len(have) > len(rows):
        return f"{METRICS}: dropped the line(s) after epoch {last}, which the checkpoint does not hold (redone now)"
    return f"{METRICS} was damaged or incomplete ({len(have)} line(s)); rewritten from the checkpoint (epochs 1-{last})"


def resume_metrics(out: Path, rows: list[dict] | None, epoch: int) -> list[dict]:
    """The metric rows of a resumed run: the checkpoint's ``rows`` (else, for checkpoints of
    earlier versions, the file's rows up to ``epoch``), with ``metrics.jsonl`` made to hold
    exactly them (:func:`heal_metrics`; a repair is warned about in one line)."""
    if rows is None:
        rows = [r for r in read_metrics(out) if r["epoch"] <= epoch]
    note = heal_metrics(out, rows)
    if note:
        warnings.warn(note)  # (the CLIs print it as one "warning:" line)
    return rows


# --------------------------------------------------------------------------- reading a run


def load_run_data(cfg: FitConfig, likelihood, data_dir: str | os.PathLike | None = None) -> "Dataset":
    """The run's data set prepared as it was fitted (name, binarization, channels, image size,
    dequantization); ``data_dir`` replaces the folder the run recorded."""
    from ..data.datasets import load_dataset

    own = dict(channels=cfg.channels, image_size=cfg.image_size, dequantize=cfg.dequantize)
    return load_dataset(cfg.dataset, data_dir or cfg.data_dir, cfg.binarize, likelihood, **own)


def check_image_shape(ds: "Dataset", cfg: FitConfig) -> None:
    """Refuse data whose image shape is not the one the run was fitted on (one line)."""
    if cfg.image_shape is not None and list(ds.image_shape) != list(cfg.image_shape):
        raise CheckpointError(
            f"the data have image shape {list(ds.image_shape)} but the run was trained on {cfg.image_shape}"
        )


def load_run(run_dir: str | Path, which: str = "best", device="cpu") -> tuple[VAE, FitConfig]:
    """The trained model of a run directory in eval mode, and its config: ``which`` = ``best``:
    ``best.pt`` checked against the record in ``checkpoint.pt`` (a stale or missing one is
    refused in one line; :func:`ppl_vae.training.best.load_verified`), ``checkpoint``: the latest."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} is not a ppl_vae run directory (no config.json); pass the --out of a fit")
    cfg = FitConfig.load(run_dir / "config.json")
    if which == "best":
        path, ckpt = load_verified(run_dir, device)
    else:
        path = run_dir / f"{which}.pt"
        ckpt = checkpoint.load(path, map_location=device)
    checkpoint.check_config_matches(ckpt["config"], cfg.to_dict(), MODEL_KEYS)
    vae = build_model(cfg)
    try:
        vae.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(
            f"{path} does not fit the model of {run_dir / 'config.json'}: {str(e).splitlines()[0]}"
        ) from None
    return vae.to(device).eval(), cfg


def remove_if_empty(out: Path, parents=()) -> None:
    """Remove a run directory that holds nothing but its lock file (a start-up that failed), and
    then the empty ``parents`` (innermost first) that the same start-up created for it."""
    try:
        if {p.name for p in out.iterdir()} <= {files.LOCK_NAME}:
            (out / files.LOCK_NAME).unlink(missing_ok=True)
            out.rmdir()
        for folder in parents:
            folder.rmdir()  # (fails, and stops, at the first that is not empty)
    except OSError:
        pass
