"""The MNIST family: MNIST, Fashion-MNIST and KMNIST from their IDX files, static binarized
MNIST from its ``.amat`` files, and MNIST's test images alone (``mnist-t10k``).

The files are found, downloaded and checked by :mod:`ppl_vae.data.readers` (IDX files ``.gz``
or not, MNIST's content checked against its MD5); missing IDX files are downloaded by
torchvision into its layout ``root/<Class>/raw/``. Greyscale images become k/255 in [0, 1],
flattened to ``(N, 784)``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from . import readers as data_files
from .readers import find, read_amat, read_idx
from .splits import SPLIT_SEED, Dataset, _seeded_split, _split_three

TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}


def load_binarized_mnist(root: Path, download: bool = True) -> Dataset:
    """Static binarized MNIST (50k/10k/10k) from ``root/binarized_mnist/*.amat[.gz]``."""
    folder = root / "binarized_mnist"
    splits = {}
    for split in ("train", "valid", "test"):
        name = f"binarized_mnist_{split}.amat"
        path = find(folder, [name])
        fix = (
            "put the three binarized_mnist_{train,valid,test}.amat files there, or point --data-dir / "
            "$PPL_VAE_DATA at a folder holding binarized_mnist/"
        )
        if path is None and download:
            try:
                data_files.download(
                    data_files.BINARIZED_MNIST_URL.format(split),
                    folder / name,
                    data_files.BINARIZED_MNIST_MD5[split],
                )
                path = folder / name
            except data_files.DownloadFailed as why:
                raise DataError(
                    f"binarized MNIST file {name}(.gz) is not in {folder} and could not be "
                    f"downloaded ({why}); {fix}"
                ) from None
        if path is None:
            raise DataError(
                f"binarized MNIST file {name}(.gz) is not in {folder} (no download offline); {fix}"
            )
        splits[split] = read_amat(path)
    return Dataset("binarized-mnist", splits["train"], splits["valid"], splits["test"], (1, 28, 28), "none")


def _idx_files(name: str, root: Path, download: bool) -> dict:
    """The four IDX files of MNIST / Fashion-MNIST / KMNIST in torchvision's layout
    ``root/<Class>/raw/``, each ``.gz`` or not, read without torchvision (which needs them
    uncompressed) and, for MNIST, checked against the MD5 of their content. Missing files are
    downloaded by torchvision (``Class(root, download=True)``: its mirrors and checksums) unless
    ``download`` is off. Returns ``{(split, "images"|"labels"): array}``."""
    folder = root / TORCHVISION_DATASETS[name] / "raw"
    paths = {key: find(folder, [stem]) for key, stem in data_files.MNIST_FILES.items()}
    if any(p is None for p in paths.values()) and download:
        import torchvision

        cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
        try:
            with data_files._socket_timeout(30.0):
                cls(str(root), train=True, download=True)  # fetches all four files into folder
        except (RuntimeError, OSError) as e:
            missing = [data_files.MNIST_FILES[k] for k, p in paths.items() if p is None]
            raise DataError(
                f"{name}: {', '.join(missing)}(.gz) not in {folder} and could not be downloaded "
                f"({e.__class__.__name__}); copy torchvision's {folder.parent.name}/raw files there, or "
                f"point --data-dir / $PPL_VAE_DATA at a folder holding {folder.parent.name}/raw"
            ) from None
        paths = {key: find(folder, [stem]) for key, stem in data_files.MNIST_FILES.items()}
    missing = [data_files.MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataError(
            f"{name}: {', '.join(missing)}(.gz) not in {folder} (no download offline); copy "
            f"torchvision's {folder.parent.name}/raw files there, or point --data-dir / $PPL_VAE_DATA "
            f"at a folder holding {folder.parent.name}/raw"
            + (
                "; offline, --dataset binarized-mnist or mnist-t10k read local files"
                if name == "mnist"
                else ""
            )
        )
    md5 = data_files.MNIST_MD5 if name == "mnist" else {}
    return {key: read_idx(p, md5.get(p.name.removesuffix(".gz"))) for key, p in paths.items()}


def load_torchvision(name: str, root: Path, download: bool = True) -> Dataset:
    """MNIST / Fashion-MNIST / KMNIST from the IDX files of torchvision's layout (:func:`_idx_files`),
    greyscale in [0, 1]. MNIST: the first 50,000 training images train, the last 10,000 validate;
    Fashion-MNIST and KMNIST: 50,000 / 10,000 of the 60,000 by a seeded permutation; the official
    10,000 test images test."""
    arrays = _idx_files(name, root, download)
    images, targets = arrays[("train", "images")], arrays[("train", "labels")]
    if images.shape[1:] != (28, 28) or len(images) != len(targets) or len(images) <= 10000:
        raise DataError(f"{name}: the training files hold {images.shape} images and {targets.shape} labels")
    x_all = torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) / 255.0)  # (60000, 784)
    y_all = torch.from_numpy(targets.astype(np.int64))
    n_va = 10000
    if name == "mnist":
        tr, va = torch.arange(len(x_all) - n_va), torch.arange(len(x_all) - n_va, len(x_all))
        protocol = f"the first {len(tr):,} training images train, the last {n_va:,} validate"
    else:
        tr, va = _seeded_split(len(x_all), (len(x_all) - n_va, n_va))
        protocol = f"training images split by a permutation seeded {SPLIT_SEED}"
    test = arrays[("test", "images")]
    return Dataset(
        name,
        x_all[tr],
        x_all[va],
        torch.from_numpy(test.reshape(len(test), -1).astype(np.float32) / 255.0),  # (10000, 784)
        (1, 28, 28),
        labels={
            "train": y_all[tr],
            "valid": y_all[va],
            "test": torch.from_numpy(arrays[("test", "labels")].astype(np.int64)),
        },
        split_protocol=protocol,
    )


def load_mnist_t10k(root: Path) -> Dataset:
    """The greyscale MNIST *test* images alone (10k), split 8k/1k/1k by a seeded permutation:
    for machines that have only those files (``mnist_t10k/`` or torchvision's ``MNIST/raw/``)."""
    folders = [root / "mnist_t10k", root / "MNIST" / "raw"]
    for folder in folders:
        img = find(folder, ["t10k-images-idx3-ubyte"])
        lab = find(folder, ["t10k-labels-idx1-ubyte"])
        if img and lab:
            x = torch.from_numpy(read_idx(img).reshape(-1, 784).astype(np.float32) / 255.0)
            y = torch.from_numpy(read_idx(lab).astype(np.int64))
            (tr, va, te), labels, _ = _split_three(x, labels=y)
            return Dataset("mnist-t10k", tr, va, te, (1, 28, 28), labels=labels)
    raise DataError(
        f"MNIST test files t10k-images-idx3-ubyte(.gz) and t10k-labels-idx1-ubyte(.gz) are not "
        f"in {folders[0]} or {folders[1]}; point --data-dir / $PPL_VAE_DATA at a folder holding them"
    )
