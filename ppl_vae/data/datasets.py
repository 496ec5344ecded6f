"""Datasets as in-memory tensors of flattened images, and where they come from.

Every dataset is a :class:`Dataset` with ``train``/``valid``/``test`` splits of shape
``(N, D)`` (float32, D = C·H·W) and its ``image_shape`` ``(C, H, W)``. Splits live on the
training device as plain tensors and are batched by index, with no DataLoader.

Data directory: ``--data-dir``, else ``$PPL_VAE_DATA``, else ``$XDG_CACHE_HOME/ppl_vae``
(``~/.cache/ppl_vae``). Downloads (torchvision datasets, binarized MNIST) go there; the files
themselves are found, fetched and read by :mod:`ppl_vae.data.readers`.

Binarization (``--binarize``): ``none`` keeps greyscale; ``dynamic`` draws x ~ Bernoulli(pixel)
afresh for every training batch and once, with a fixed seed, for valid/test;
``static`` draws once, with a fixed seed, for every split; ``auto`` is ``dynamic`` for
greyscale data under a likelihood that needs 0/1 data (``bernoulli``) and ``none`` otherwise.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from . import readers as data_files
from .circles import make_circles
from .readers import find, read_amat, read_array_file, read_idx, resolve_data_dir

TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
DATASETS = ("auto", *TORCHVISION_DATASETS, "binarized-mnist", "mnist-t10k", "digits", "circles")
BINARIZE = ("auto", "none", "dynamic", "static")
SPLIT_SEED = 1234  # seeds every split/binarization below, so a dataset is the same on every machine


@dataclass
class Dataset:
    """Splits ``(N, D)`` float32, their image shape ``(C, H, W)``, and side information.

    ``labels[split]`` holds class labels ``(N,)`` when known; ``factors[split]`` holds the
    true generative factors ``(N, F)`` (e.g. x, y, radius of the circles dataset).
    ``binarize`` is the resolved mode (``none``, ``dynamic`` or ``static``).
    """

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int, int]
    binarize: str = "none"
    labels: dict = field(default_factory=dict)
    factors: dict = field(default_factory=dict)
    factor_names: tuple = ()

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}; choose train, valid or test")
        return getattr(self, name)

    def to(self, device) -> "Dataset":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return Dataset(
            self.name,
            self.train.to(device),
            self.valid.to(device),
            self.test.to(device),
            self.image_shape,
            self.binarize,
            move(self.labels),
            move(self.factors),
            self.factor_names,
        )

    def train_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Training batch ``(B, D)`` at indices ``idx``; binarized afresh under ``dynamic``."""
        x = self.train[idx]
        return torch.bernoulli(x) if self.binarize == "dynamic" else x


# --------------------------------------------------------------------------- splitting


def _seeded_split(n: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(n, generator=g)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def _split_three(x: torch.Tensor, labels=None, factors=None, frac=(0.8, 0.1)):
    n = x.shape[0]
    if n < 3:
        raise DataError(f"need at least 3 datapoints to make train/valid/test splits, got {n}")
    n_tr = max(1, int(round(frac[0] * n)))
    n_va = max(1, int(round(frac[1] * n)))
    n_tr = min(n_tr, n - n_va - 1)
    idx = _seeded_split(n, (n_tr, n_va, n - n_tr - n_va))
    pick = lambda t: None if t is None else dict(zip(("train", "valid", "test"), (t[i] for i in idx)))  # noqa: E731
    return [x[i] for i in idx], pick(labels), pick(factors)


# --------------------------------------------------------------------------- loaders


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


def load_torchvision(name: str, root: Path, download: bool = True) -> Dataset:
    """MNIST / Fashion-MNIST / KMNIST through torchvision (train 60k → 50k train + 10k valid by a
    seeded split; the official 10k test set), greyscale in [0, 1]."""
    import torchvision

    cls = getattr(torchvision.datasets, TORCHVISION_DATASETS[name])
    try:
        train = cls(str(root), train=True, download=download)
        test = cls(str(root), train=False, download=download)
    except (RuntimeError, OSError) as e:
        raise DataError(
            f"{name} is not in {root / cls.__name__ / 'raw'} and could not be downloaded ({e.__class__.__name__}); "
            f"run once with internet access, copy torchvision's {cls.__name__}/raw files there, or use "
            f"--data-dir / $PPL_VAE_DATA"
            + (
                "; offline, --dataset binarized-mnist or mnist-t10k read local files"
                if name == "mnist"
                else ""
            )
        ) from None
    x_all = train.data.reshape(len(train.data), -1).float() / 255.0  # (60000, 784)
    tr, va = _seeded_split(len(x_all), (len(x_all) - 10000, 10000))
    return Dataset(
        name,
        x_all[tr],
        x_all[va],
        test.data.reshape(len(test.data), -1).float() / 255.0,
        (1, 28, 28),
        labels={"train": train.targets[tr], "valid": train.targets[va], "test": test.targets},
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


def load_array_file(path: Path) -> Dataset:
    """A user's ``.npy`` / ``.npz`` of images (see :func:`ppl_vae.data.readers.read_array_file`),
    split 80/10/10 by a seeded permutation."""
    return dataset_from_array(read_array_file(path), name=str(path))


def dataset_from_array(arr, name: str = "array") -> Dataset:
    """Validate an image array and split it (see :func:`load_array_file`)."""
    arr = np.asarray(arr)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{name}: images must be numeric, got dtype {arr.dtype}")
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 3:
        image_shape = (1, arr.shape[1], arr.shape[2])
    elif arr.ndim == 2:
        side = math.isqrt(arr.shape[1])
        image_shape = (1, side, side) if side * side == arr.shape[1] else (1, 1, arr.shape[1])
    else:
        raise DataError(f"{name}: images must have shape (N, H, W) or (N, D), got {arr.shape}")
    if arr.shape[0] == 0 or math.prod(image_shape) == 0:
        raise DataError(f"{name}: the dataset is empty (shape {arr.shape})")
    if arr.shape[0] < 3:
        raise DataError(f"{name}: need at least 3 images to make train/valid/test splits, got {arr.shape[0]}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(arr.shape[0], -1)
    check_values(x, name, (0.0, 1.0))
    (tr, va, te), _, _ = _split_three(x)
    return Dataset(name, tr, va, te, image_shape)


# --------------------------------------------------------------------------- validation


def check_values(x: torch.Tensor, name: str, support=(0.0, 1.0)) -> None:
    """Refuse empty data, NaN/inf and values outside ``support``, naming how to fix it."""
    if x.numel() == 0:
        raise DataError(f"{name}: the dataset is empty")
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise DataError(f"{name}: {bad} pixel values are NaN or infinite; clean the data first")
    lo, hi = x.min().item(), x.max().item()
    if lo < support[0] or hi > support[1]:
        hint = " (images in 0..255? divide by 255)" if hi > 1 and hi <= 255 and support == (0.0, 1.0) else ""
        raise DataError(
            f"{name}: pixel values must lie in [{support[0]}, {support[1]}], found [{lo:g}, {hi:g}]{hint}"
        )


def check_for_likelihood(ds: Dataset, likelihood) -> None:
    """Data must lie in the likelihood's support, and be 0/1 for a Bernoulli unless binarized."""
    for split in ("train", "valid", "test"):
        x = ds.split(split)
        check_values(x, f"{ds.name} ({split} split)", likelihood.support)
        if likelihood.binary_data and ds.binarize != "dynamic" and not ((x == 0) | (x == 1)).all():
            raise DataError(
                f"{ds.name} is greyscale (values strictly between 0 and 1) but --likelihood {likelihood.name} "
                f"needs 0/1 data: pass --binarize dynamic (or static), or use --likelihood continuous-bernoulli"
            )


def _binarize(ds: Dataset, mode: str) -> Dataset:
    """Apply ``static`` (all splits) or ``dynamic`` (valid/test now, train per batch) binarization."""
    g = torch.Generator().manual_seed(SPLIT_SEED)
    draw = lambda x: torch.bernoulli(x, generator=g)  # noqa: E731
    ds.binarize = mode
    if mode == "static":
        ds.train = draw(ds.train)
    if mode in ("static", "dynamic"):
        ds.valid, ds.test = draw(ds.valid), draw(ds.test)
    return ds


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


def load_dataset(
    name: str, data_dir=None, binarize: str = "auto", likelihood=None, download: bool = True
) -> Dataset:
    """Load dataset ``name`` (one of :data:`DATASETS` or a path to a ``.npy``/``.npz``),
    binarize it as asked, and check it suits ``likelihood`` (when given).

    ``auto`` is MNIST when it is present or downloadable, else static binarized MNIST when its
    files are present, else scikit-learn's digits, with a warning saying what happened.
    ``PPL_VAE_OFFLINE=1`` in the environment: never download (as on a machine without internet).
    """
    download = download and os.environ.get("PPL_VAE_OFFLINE") != "1"
    if binarize not in BINARIZE:
        raise DataError(f"unknown --binarize {binarize!r}; choose one of {', '.join(BINARIZE)}")
    root = resolve_data_dir(data_dir)
    if name == "auto":
        ds = _load_auto(root, download)
    elif name in TORCHVISION_DATASETS:
        ds = load_torchvision(name, root, download)
    elif name == "binarized-mnist":
        ds = load_binarized_mnist(root, download)
    elif name == "mnist-t10k":
        ds = load_mnist_t10k(root)
    elif name == "digits":
        ds = load_digits()
    elif name == "circles":
        ds = load_circles()
    elif name.endswith((".npy", ".npz")):
        if not Path(name).exists():
            raise DataError(f"data file {name} does not exist")
        ds = load_array_file(Path(name))
    else:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
            f"or give a path to a .npy/.npz file of images in [0, 1]"
        )
    return prepare(ds, binarize, likelihood)


def prepare(ds: Dataset, binarize: str = "auto", likelihood=None) -> Dataset:
    """Binarize ``ds`` as asked (``auto``: dynamically for a likelihood of binary data when the
    images are greyscale, else not) and check it suits ``likelihood``: what :func:`load_dataset`
    does last, also for a :class:`Dataset` made elsewhere (``fit(dataset=...)``). Changes ``ds``."""
    binary = _is_binary(ds.train)
    if binarize == "auto":
        binarize = "dynamic" if (likelihood is not None and likelihood.binary_data and not binary) else "none"
    if binarize != "none":
        if binary:
            binarize = "none"  # already 0/1: nothing to draw
        _binarize(ds, binarize)
    if likelihood is not None:
        check_for_likelihood(ds, likelihood)
    return ds


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
