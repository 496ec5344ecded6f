"""Checkpoints: written atomically, loaded safely, checked before a resume, and every RNG restored.

What a checkpoint holds is the :class:`~ppl_vae.training.train.Trainer`'s ``state_dict()``
(which it takes back with ``load_state_dict()``); this module only writes, reads and validates.

A checkpoint is a plain dict of tensors and Python scalars/strings/lists, saved with
``torch.save`` (a zip archive whose members carry CRC-32 checksums) and loaded with
``torch.load(..., weights_only=True)``: PyTorch's restricted unpickler, which refuses any
object other than tensors and primitive containers, so a crafted file cannot run code.
Fields (:data:`FIELDS`): ``format_version``, ``package_version``, ``config``, ``model``,
``optimizer``, ``scheduler``, ``epoch`` (epochs completed), ``step`` (steps into the next
epoch, for a mid-epoch save), ``perm`` (that epoch's permutation), ``loss_sum`` (Σ loss of
those steps), ``best_valid_elbo`` (the best validation bound the run selects on: the ELBO,
or IWAE_K for IWAE runs; the name is kept for older files), ``bad_epochs``, ``rng`` (torch,
CUDA, NumPy, Python), and ``metrics``: the metric rows of epochs 1..``epoch``, the source of
truth from which ``metrics.jsonl`` is healed on resume (absent in files of version 0.1), and
``best_epoch`` / ``best_digest``: which epoch ``best.pt`` holds and a digest of its parameters
(:mod:`ppl_vae.training.best`; absent before 0.4). Under
``--ema`` ``model`` holds the averaged parameters θ̄ (what is evaluated) and ``train_model`` the
trained θ (what ``--resume`` continues from); :mod:`ppl_vae.training.averaging`.

Writes go through :func:`ppl_vae.core.files.atomic_write` (temporary file, fsync, ``os.replace``,
fsync of the directory): a crash or a full disk leaves the previous checkpoint intact. See
``docs/reliability.md``.
"""

from __future__ import annotations

import math
import os
import pickle
import random
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyro
import torch

from .. import __version__
from ..core import distributed, files
from ..core.errors import CheckpointError, UserError
from .config import MODEL_KEYS

FORMAT_VERSION = 1
FIELDS = (
    "format_version",
    "package_version",
    "config",
    "model",
    "optimizer",
    "scheduler",
    "epoch",
    "step",
    "perm",
    "loss_sum",
    "best_valid_elbo",
    "bad_epochs",
    "rng",
)


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
    """Restore :func:`rng_state`'s states; they may have been loaded onto a GPU (``map_location``),
    and torch takes RNG states as CPU byte tensors only."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def atomic_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` through :func:`ppl_vae.core.files.atomic_write`: on any failure (a full disk
    included, which torch's zip writer reports as a ``RuntimeError``) ``path`` keeps its previous
    content and one :class:`~ppl_vae.core.errors.WriteError` line says which file and why."""
    files.atomic_write(path, lambda f: torch.save(obj, f))


def _fix(path: Path) -> str:
    """What to do about a damaged checkpoint: another copy, but never "e.g. best.pt" for best.pt."""
    if path.name == "best.pt":
        return (
            f"python -m ppl_vae.fit --out {path.parent} --resume rewrites it when checkpoint.pt holds "
            f"the best epoch; or use --checkpoint checkpoint"
        )
    return "use an intact copy (e.g. best.pt) or retrain"


def _check_archive(path: Path) -> None:
    """Refuse files that are not intact zip archives: truncation breaks the central directory,
    a flipped byte breaks a member's CRC-32 (``torch.load`` checks neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:  # BadZipFile, OSError, EOFError, ...: every way the bytes can be wrong
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a readable PyTorch archive: "
            f"{e.__class__.__name__}); {_fix(path)}"
        ) from None
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (member {bad} fails its CRC-32 check); {_fix(path)}"
        )


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a checkpoint safely; one clear :class:`CheckpointError` for every way it can be bad:
    missing, truncated/corrupt, holding non-tensor objects (refused unread), another format
    version, or lacking a field of :data:`FIELDS`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} "
            + ("is a directory, not a checkpoint file" if path.is_dir() else "does not exist")
        )
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
            f"ppl_vae, from people you trust"
        ) from None
    except Exception as e:  # the archive is intact, so its content is malformed
        raise CheckpointError(
            f"checkpoint {path} is corrupt ({e.__class__.__name__}: "
            f"{str(e).splitlines()[0][:160] if str(e) else ''}); {_fix(path)}"
        ) from None
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(f"{path} is not a ppl_vae checkpoint (no format_version field)")
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {ckpt['format_version']!r}, this ppl_vae reads "
            f"format {FORMAT_VERSION}; use the ppl_vae version that wrote it "
            f"({ckpt.get('package_version', 'unknown')})"
        )
    missing = [k for k in FIELDS if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict) or not isinstance(ckpt["model"], dict):
        raise CheckpointError(
            f"{path} is an incomplete ppl_vae checkpoint (missing or malformed: "
            f"{', '.join(missing) or 'config/model'}); use an intact copy or retrain"
        )
    return ckpt


def check_config_matches(saved: dict, requested: dict, keys) -> None:
    """Refuse to resume/load when a model-defining setting differs (a key that an older
    ``config.json`` lacks counts as its default: the program of version 0.1 is the default one)."""
    from .config import FitConfig

    default = FitConfig().to_dict()
    diffs = [
        f"{k}: checkpoint has {saved.get(k, default.get(k))!r}, requested {requested.get(k, default.get(k))!r}"
        for k in keys
        if saved.get(k, default.get(k)) != requested.get(k, default.get(k))
    ]
    if diffs:
        raise CheckpointError(
            "checkpoint does not match the requested model ("
            + "; ".join(diffs)
            + "); use the run's own settings or start a new --out"
        )


# --------------------------------------------------------------------------- training state

# Fixed for a run's life, compared before the data are loaded (ema: which parameters are judged;
# a switch would compare θ with θ̄'s best). seed: a resumed run draws from the RNG states its
# checkpoint holds (restore_rng), not from --seed, so another seed would change no draw and only
# make config.json claim a seed the run did not start from: refused, as any other change.
# (--optimizer: Adam's moments hold gradients of one scale, raw or unit-norm, so a switch would
# shrink or blow up the steps for thousands of steps)
RESUME_KEYS = tuple(k for k in MODEL_KEYS if k != "image_shape") + ("dataset", "ema", "seed", "optimizer")
# How the data are prepared, fixed for a run's life too: its later epochs train on data made as
# its first epochs' were, and select the best epoch on the same fixed draws of the validation
# images (--binarize, --dequantize and the seeds of those draws). Compared once the data are
# loaded, as resolved (binarize auto → dynamic or none, dequantize auto → uniform or none),
# because config.json records resolved values: a resume asking for auto passes where auto gives
# the run's value. A value config.json lacks (a run of an earlier version) is not compared.
PREPARATION_MODES = {"binarize": "binarize_seed", "dequantize": "dequantize_seed"}  # mode: its seed


def check_preparation_matches(saved: dict, resolved: dict, requested: dict) -> None:
    """Refuse to resume on data prepared otherwise than the run's, in one line naming each
    setting, the run's value and the requested one: ``saved``, the run's ``config.json``
    (binarize/dequantize resolved; ``auto`` and a missing seed are runs of earlier versions, not
    compared); ``resolved``, the values of the data loaded now (``Dataset.binarize``, ...);
    ``requested``, the settings asked for (``auto`` included). A seed is compared where its mode
    matches (else the mode's difference says it all)."""
    diffs = []
    for mode, seed in PREPARATION_MODES.items():
        then, now, asked = saved.get(mode), resolved.get(mode), requested.get(mode)
        if then not in (None, "auto") and then != now:
            here = "" if asked == now else f" (for these data: {now!r})"
            diffs.append(f"{mode}: the run has {then!r}, requested {asked!r}{here}")
        elif saved.get(seed) is not None and saved.get(seed) != resolved.get(seed):
            diffs.append(f"{seed}: the run has {saved.get(seed)!r}, these data {resolved.get(seed)!r}")
    if diffs:
        raise CheckpointError(
            "--resume: the data would be prepared otherwise than the run's ("
            + "; ".join(diffs)
            + "); resume with the run's own settings (drop the flag) or start a new --out"
        )


@dataclass
class TrainState:
    """Where training stands: ``epoch`` epochs done, ``step`` steps into the next (a mid-epoch
    save) over permutation ``perm``, ``loss_sum`` of those steps, the best validation bound and
    the epochs since it improved, the metric rows so far, ``saved_at`` = (epoch, step) of
    the checkpoint on disk, and the record of ``best.pt`` (``best_epoch``, ``best_digest``:
    :mod:`ppl_vae.training.best`)."""

    epoch: int = 0
    step: int = 0
    perm: torch.Tensor | None = None
    loss_sum: float = 0.0
    best: float = -math.inf
    bad_epochs: int = 0
    rows: list | None = field(default_factory=list)
    saved_at: tuple[int, int] | None = None
    best_epoch: int | None = None
    best_digest: str | None = None

    def fields(self) -> dict:
        """This state as checkpoint fields (``best`` is stored as ``best_valid_elbo``)."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "perm": self.perm,
            "loss_sum": self.loss_sum,
            "best_valid_elbo": self.best,
            "bad_epochs": self.bad_epochs,
            "metrics": list(self.rows),
            "best_epoch": self.best_epoch,
            "best_digest": self.best_digest,
        }

    @classmethod
    def from_fields(cls, ckpt: dict, device) -> TrainState:
        """The state a checkpoint holds, its permutation on ``device`` (``rows`` is None for
        files of version 0.1, which kept no metric rows)."""
        perm, rows = ckpt["perm"], ckpt.get("metrics")
        return cls(
            ckpt["epoch"],
            ckpt["step"],
            None if perm is None else perm.to(device),
            ckpt["loss_sum"],
            ckpt["best_valid_elbo"],
            ckpt["bad_epochs"],
            None if rows is None else list(rows),
            (ckpt["epoch"], ckpt["step"]),
            ckpt.get("best_epoch"),
            ckpt.get("best_digest"),
        )


def write(state: dict, out: Path, best: bool = False, rng_ranks=None) -> dict:
    """Write a trainer's ``state`` (:meth:`~ppl_vae.training.train.Trainer.state_dict`) with the
    format fields as ``out/checkpoint.pt`` and, for a new ``best``, as ``out/best.pt`` too, with
    the record of the new best (:func:`ppl_vae.training.best.record`), in that order: the record
    in ``checkpoint.pt`` always names the newest best, and a failed save of ``best.pt`` is found
    on resume. ``rng_ranks``: every rank's RNG state under torchrun. After a successful save,
    temp files of dead writers are removed. Returns the record ``best.pt`` now holds."""
    from .best import record

    ckpt = {"format_version": FORMAT_VERSION, "package_version": __version__, **state}
    if best:
        ckpt.update(record(ckpt))
    if rng_ranks is not None:
        ckpt["rng_ranks"] = rng_ranks
    atomic_save(ckpt, out / "checkpoint.pt")
    if best:
        atomic_save(ckpt, out / "best.pt")
    files.remove_stale_temps(out)
    return {k: ckpt.get(k) for k in ("best_epoch", "best_digest")}


def check_resumable(ckpt: dict, requested: dict, batch_size: int, n: int) -> None:
    """Refuse a checkpoint this run cannot continue: another model (:func:`check_config_matches`),
    or a mid-epoch permutation over another number of training points ``n`` or batch size."""
    saved, perm = ckpt["config"], ckpt["perm"]
    check_config_matches(saved, requested, MODEL_KEYS)
    if perm is not None and perm.numel() != n:
        raise CheckpointError(
            f"the checkpoint is {ckpt['step']} steps into an epoch over {perm.numel()} "
            f"training points, but the data now have {n}; the data changed since the run started"
        )
    if perm is not None and saved.get("batch_size") != batch_size:
        raise UserError(
            f"the checkpoint is {ckpt['step']} steps into an epoch of batches of "
            f"{saved.get('batch_size')}; resume with that --batch-size (change it at an epoch end)"
        )


def restore_rng(ckpt: dict, ctx, seed: int) -> None:
    """Rank r's own saved RNG state when the checkpoint was written by as many ranks
    (``rng_ranks``); else rank 0 takes ``rng`` and rank r > 0 a fresh stream for this point."""
    ranks = ckpt.get("rng_ranks")
    if ranks is not None and len(ranks) == ctx.world_size:
        set_rng_state(ranks[ctx.rank])
    elif ctx.is_main:
        set_rng_state(ckpt["rng"])
    else:
        pyro.set_rng_seed(distributed.rank_seed(seed, ctx.rank, ckpt["epoch"], ckpt["step"]))
