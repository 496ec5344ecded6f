"""``--init-from RUN``: a new run that starts from another run's trained parameters.

Fine-tuning (e.g. importance-weighted training of an ELBO-trained model, or more epochs at a
lower learning rate) wants the parameters of a run's *best* epoch, which ``--resume`` cannot
give: it continues from the last checkpoint, with the run's own objective history, so a changed
objective is compared with the old rows when ``best.pt`` is chosen. ``--init-from`` instead makes
a new run directory whose parameters start as the source's, with everything else fresh:

* **parameters**: ``RUN/best.pt`` (checked against the record in ``RUN/checkpoint.pt``, as
  ``evaluate`` does), or the file named (``RUN/checkpoint.pt``: the latest epoch). Under ``--ema``
  a checkpoint's ``model`` is θ̄, the parameters the source is judged by; those are loaded, and
  this run's own average (if any) starts there too.
* **settings**: the program (the keys of :data:`~ppl_vae.training.config.MODEL_KEYS`, the
  number of classes of a conditional program and the likelihood's σ) and, unless ``--dataset``
  is given, the data settings come from the source's ``config.json``; a program flag given here
  must agree with it, and so must the data's image shape (one line otherwise). Inherited data
  that have changed since the source was trained are used with one warning. The
  training settings (objective, learning rate, epochs, averaging, ...) are this command's own,
  defaults included, except that ``--kl-warmup`` defaults to 0: a trained model needs no warm-up.
* **state**: a fresh optimizer and schedule, epoch 1, this run's own validation rows and
  ``best.pt``; ``config.json`` records ``init_from`` and ``init_record`` (resolved file, epoch,
  digest of the parameters loaded, and ``valid``: their validation terms under this run's
  objective, computed before the first step as an epoch's are), so the start can be checked
  later. ``best.pt`` holds this run's best epoch; when that is worse than the start,
  ``summary.json``'s ``init_valid`` shows it and the run ends with a warning saying that the
  source's parameters are the better model.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.errors import CheckpointError, UserError
from ..data.fingerprint import changes
from . import checkpoint
from .best import digest, load_verified
from .config import MODEL_KEYS, FitConfig

# what the new run takes from the source's config.json unless given: the program, then the data
PROGRAM_KEYS = tuple(k for k in MODEL_KEYS if k != "image_shape") + ("sigma", "sigma_floor")
DATA_KEYS = ("dataset", "data_dir", "binarize", "dequantize", "channels", "image_size")
FILES = ("best.pt", "checkpoint.pt")


def source(path: str | Path) -> tuple[Path, str]:
    """The run directory and the checkpoint (``best`` or ``checkpoint``) that ``--init-from PATH``
    names: a run directory (its ``best.pt``) or one of its two checkpoint files."""
    path = Path(path)
    run_dir, which = (path.parent, path.stem) if path.name in FILES else (path, "best")
    if not (run_dir / "config.json").is_file():
        raise UserError(
            f"--init-from {path}: not a ppl_vae run directory (no config.json); give the --out "
            f"of a fit, or its best.pt or checkpoint.pt"
        )
    return run_dir, which


def settings(path: str | Path, with_data: bool) -> FitConfig:
    """The defaults of a run started ``--init-from path``: :data:`PROGRAM_KEYS` (and, when
    ``with_data``, :data:`DATA_KEYS`) from the source's ``config.json``, every other field the
    package default (with ``init_from`` set, ``kl_warmup`` defaults to 0:
    :meth:`FitConfig.with_data_defaults`)."""
    run_dir, _ = source(path)
    saved = FitConfig.load(run_dir / "config.json")
    keys = PROGRAM_KEYS + (DATA_KEYS if with_data else ())
    return FitConfig(**{k: getattr(saved, k) for k in keys})


def check_out(out: Path, path: str | Path) -> None:
    """Refuse an ``--out`` that is the source run itself (``--overwrite`` would destroy it)."""
    run_dir, _ = source(path)
    if Path(out).resolve() == run_dir.resolve():
        raise UserError(
            f"--out {out} is the run --init-from reads; give a new --out (the source run is kept as it is)"
        )


def load_into(model: torch.nn.Module, cfg: FitConfig, device) -> dict:
    """Load the parameters ``cfg.init_from`` names into ``model`` (built from ``cfg``, whose
    ``image_shape`` and ``num_classes`` the data have fixed) and return the record written to
    ``config.json``: ``{"file", "epoch", "digest"}`` (fit's start adds ``valid``). A program that
    differs is one line naming each setting."""
    run_dir, which = source(cfg.init_from)
    if which == "best":
        file, ckpt = load_verified(run_dir, device)
    else:
        file, ckpt = run_dir / f"{which}.pt", checkpoint.load(run_dir / f"{which}.pt", map_location=device)
    theirs, ours = ckpt["config"], cfg.to_dict()
    differ = lambda k: k in theirs and theirs[k] != ours.get(k)  # noqa: E731
    if differ("image_shape"):
        raise UserError(
            f"--init-from {cfg.init_from}: the data have image shape {ours['image_shape']}, the source "
            f"was trained on {theirs['image_shape']}; its networks take only that shape"
        )
    diffs = [f"{k} {theirs[k]!r} there, {ours.get(k)!r} here" for k in PROGRAM_KEYS if differ(k)]
    if diffs:
        raise UserError(
            f"--init-from {cfg.init_from}: its program differs from this run's ({'; '.join(diffs)}); "
            f"drop those flags (the program comes from {run_dir / 'config.json'}) or start from scratch"
        )
    changed = changes(theirs.get("data_fingerprint"), cfg.data_fingerprint or {})
    if theirs.get("dataset") == cfg.dataset and changed:
        warnings.warn(
            f"--init-from: the data ({cfg.dataset}) differ from those the source was trained on "
            f"({changed}); training on them"
        )
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # e.g. a program passed in from Python that is not the config's
        raise CheckpointError(
            f"--init-from {file}: its parameters do not fit this model: {str(e).splitlines()[0]}"
        ) from None
    return {"file": str(Path(file).resolve()), "epoch": int(ckpt["epoch"]), "digest": digest(ckpt["model"])}
