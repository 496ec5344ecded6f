"""The small named data sets: Frey Faces (downloaded once), scikit-learn's 8x8 digits (bundled)
and the circles (generated, with known factors; :mod:`ppl_vae.data.circles`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from . import readers as data_files
from .circles import make_circles
from .splits import SPLIT_SEED, Dataset, _split_three


def load_frey_faces(root: Path, download: bool = True) -> Dataset:
    """Frey Faces: 1,965 greyscale frames of one face, 28 × 20, in [0, 1] (k/255); a permutation
    seeded with :data:`SPLIT_SEED` gives 1,565 train / 200 valid / 200 test frames (the VampPrior
    paper's sizes). Read from ``root/frey_faces/frey_faces.npy`` (one frame per row) or the
    original ``frey_rawface.mat``; online, that file is downloaded from S. Roweis' page, its
    decoded frames checked (:data:`~ppl_vae.data.readers.FREY_FACES_MD5`) before it is kept."""
    folder = root / "frey_faces"
    npy, mat = folder / "frey_faces.npy", folder / "frey_rawface.mat"
    if npy.exists():
        frames = data_files.read_frey_faces(npy)
    elif mat.exists():
        frames = data_files.read_frey_faces(mat)
    elif download:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            data_files.download(data_files.FREY_FACES_URL, mat, None, check=data_files.read_frey_faces)
        except (data_files.DownloadFailed, OSError) as why:
            raise DataError(
                f"Frey Faces are not in {folder} and could not be downloaded ({why}); put frey_faces.npy "
                f"or frey_rawface.mat there, or point --data-dir / $PPL_VAE_DATA at a folder holding frey_faces/"
            ) from None
        frames = data_files.read_frey_faces(mat)
    else:
        raise DataError(
            f"Frey Faces are not in {folder} (frey_faces.npy or frey_rawface.mat; no download offline); "
            f"point --data-dir / $PPL_VAE_DATA at a folder holding frey_faces/"
        )
    x = torch.from_numpy(frames.reshape(len(frames), -1).astype(np.float32) / 255.0)  # (1965, 560)
    (tr, va, te), _, _ = _split_three(x, sizes=(1565, 200, 200))
    return Dataset("frey-faces", tr, va, te, (1, 28, 20), split_protocol=f"a permutation seeded {SPLIT_SEED}")


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, no download), greyscale in [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0  # (1797, 64)
    (tr, va, te), labels, _ = _split_three(x, labels=torch.tensor(d.target))
    return Dataset("digits", tr, va, te, (1, 8, 8), labels=labels)


def load_circles(n_train: int = 20000, n_valid: int = 2000, n_test: int = 2000) -> Dataset:
    """The toy world of circle images with known factors (x, y, radius)."""
    parts = [make_circles(n, seed=SPLIT_SEED + i) for i, n in enumerate((n_train, n_valid, n_test))]
    return Dataset(
        "circles",
        parts[0][0],
        parts[1][0],
        parts[2][0],
        (1, 28, 28),
        factors={s: p[1] for s, p in zip(("train", "valid", "test"), parts)},
        factor_names=("x", "y", "radius"),
    )
