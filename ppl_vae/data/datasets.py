"""Datasets by name: :func:`load_dataset`, and where each kind of data set is made.

A dataset is a :class:`~ppl_vae.data.splits.Dataset` (:mod:`.splits`: ``train``/``valid``/``test``
splits of shape ``(N, D)`` and the seeded splits); :func:`load_dataset` loads one of
:data:`DATASETS` (:mod:`.mnist`: MNIST, Fashion-MNIST, KMNIST, binarized MNIST, mnist-t10k;
:mod:`.small`: Frey Faces, digits, circles) or a user's own file or folder (:mod:`.own_data`,
also :func:`~ppl_vae.data.own_data.dataset_from_array`), then binarizes, dequantizes and checks
it (:func:`~ppl_vae.data.prepare.prepare`). The names of those modules are importable from here
as well.

Data directory: ``--data-dir``, else ``$PPL_VAE_DATA``, else ``$XDG_CACHE_HOME/ppl_vae``
(``~/.cache/ppl_vae``). Downloads (torchvision datasets, binarized MNIST) go there; the files
themselves are found, fetched and read by :mod:`ppl_vae.data.readers`.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..core.errors import DataError
from .mnist import TORCHVISION_DATASETS, load_binarized_mnist, load_mnist_t10k, load_torchvision
from .own_data import dataset_from_array, load_array_file, load_image_folder
from .prepare import BINARIZE, BINARIZE_SEED, check_for_likelihood, check_values, dequantize_mode, prepare
from .readers import find, resolve_data_dir
from .small import load_circles, load_digits, load_frey_faces
from .splits import SPLIT_SEED, Dataset

__all__ = [
    "BINARIZE",
    "BINARIZE_SEED",
    "DATASETS",
    "SPLIT_SEED",
    "TORCHVISION_DATASETS",
    "Dataset",
    "check_for_likelihood",
    "check_values",
    "dataset_from_array",
    "dequantize_mode",
    "load_array_file",
    "load_binarized_mnist",
    "load_circles",
    "load_dataset",
    "load_digits",
    "load_frey_faces",
    "load_image_folder",
    "load_mnist_t10k",
    "load_torchvision",
    "prepare",
    "resolve_data_dir",
]

DATASETS = ("auto", *TORCHVISION_DATASETS, "binarized-mnist", "mnist-t10k", "frey-faces", "digits", "circles")


def load_dataset(
    name: str,
    data_dir=None,
    binarize: str = "auto",
    likelihood=None,
    download: bool = True,
    channels: int | None = None,
    image_size=None,
    dequantize: str = "auto",
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS`, a ``.npy``/``.npz`` file or a folder of
    image files), binarize it as asked, and check it suits ``likelihood`` (when given).
    ``channels`` (1 or 3) and ``image_size`` ``(H, W)``: users' data only (a folder's images are
    converted and resized to them; an array's channels converted). ``dequantize``: as :func:`prepare`.

    ``auto`` is MNIST when it is present or downloadable, else static binarized MNIST when its
    files are present, else scikit-learn's digits, with a warning saying what happened.
    ``PPL_VAE_OFFLINE=1`` in the environment: never download (as on a machine without internet).
    """
    download = download and os.environ.get("PPL_VAE_OFFLINE") != "1"
    if binarize not in BINARIZE:
        raise DataError(f"unknown --binarize {binarize!r}; choose one of {', '.join(BINARIZE)}")
    root = resolve_data_dir(data_dir)
    named = name in DATASETS
    if named and (channels is not None or image_size is not None):
        raise DataError(
            f"--channels and --image-size apply to your own images (a folder or a .npy/.npz), not to --dataset {name}"
        )
    if name == "auto":
        ds = _load_auto(root, download)
    elif name in TORCHVISION_DATASETS:
        ds = load_torchvision(name, root, download)
    elif name == "binarized-mnist":
        ds = load_binarized_mnist(root, download)
    elif name == "mnist-t10k":
        ds = load_mnist_t10k(root)
    elif name == "frey-faces":
        ds = load_frey_faces(root, download)
    elif name == "digits":
        ds = load_digits()
    elif name == "circles":
        ds = load_circles()
    elif name.endswith((".npy", ".npz")):
        if not Path(name).exists():
            raise DataError(f"data file {name} does not exist")
        ds = load_array_file(Path(name), channels, image_size)
    elif Path(name).is_dir():
        ds = load_image_folder(Path(name), channels, image_size)
    else:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}, or give a folder of "
            f"image files or a .npy/.npz file of images in [0, 1]"
            + (" (no such folder or file)" if any(c in name for c in "/\\.") else "")
        )
    return prepare(ds, binarize, likelihood, dequantize)


def _load_auto(root: Path, download: bool) -> Dataset:
    try:
        return load_torchvision("mnist", root, download)
    except DataError as mnist_error:
        if find(root / "binarized_mnist", ["binarized_mnist_train.amat"]):
            warnings.warn(
                f"MNIST is not available ({mnist_error}); using the static binarized MNIST found "
                f"in {root / 'binarized_mnist'} instead",
                stacklevel=3,
            )
            return load_binarized_mnist(root, download=False)
        warnings.warn(
            f"MNIST is not available offline and not in {root}; falling back to scikit-learn's "
            f"8x8 digits. To train on MNIST, run once with internet access or set --data-dir / "
            f"$PPL_VAE_DATA to a folder holding torchvision's MNIST/raw or binarized_mnist/",
            stacklevel=3,
        )
        return load_digits()
