"""Datasets as in-memory tensors of flattened images, and where they come from.

Every dataset is a :class:`Dataset` with ``train``/``valid``/``test`` splits of shape
``(N, D)`` (float32, D = C·H·W) and its ``image_shape`` ``(C, H, W)``. Splits live on the
training device as plain tensors and are batched by index, with no DataLoader.

Data directory: ``--data-dir``, else ``$PPL_VAE_DATA``, else ``$XDG_CACHE_HOME/ppl_vae``
(``~/.cache/ppl_vae``). Downloads (torchvision datasets, binarized MNIST) go there; the files
themselves are found, fetched and read by :mod:`ppl_vae.data.readers`.

Binarization (``--binarize``): ``none`` keeps greyscale; ``dynamic`` draws x ~ Bernoulli(pixel)
afresh for every training batch (on the training device, from the run's seeded torch generator:
a new binarization of every image at every epoch, and a resumed run draws what the uninterrupted
one would have) and once, with the fixed seed :data:`BINARIZE_SEED` recorded in the run, for
valid/test; ``static`` draws once, with that seed, for every split; ``auto`` is ``dynamic`` for
greyscale data under a likelihood that needs 0/1 data (``bernoulli``) and ``none`` otherwise.

Dequantization (``--dequantize``, :mod:`ppl_vae.data.dequantize`): ``uniform`` trains a density
of continuous data on y = (x + u)/256, u ~ U[0, 1)^D drawn afresh for every training batch as
dynamic binarization draws, and scores validation and test images at one fixed draw (seed
:data:`~ppl_vae.data.dequantize.DEQUANTIZE_SEED`, recorded); ``auto`` is ``uniform`` for 8-bit images under
a continuous likelihood, ``none`` otherwise.

Splits: MNIST, the first 50,000 training images train and the last 10,000 validate (the usual
protocol), its 10,000 test images test; Frey Faces and users' data, a permutation seeded with
:data:`SPLIT_SEED` (Frey Faces 1,565 / 200 / 200 as in the VampPrior paper; users' 80 / 10 / 10 %).
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..core.errors import DataError
from . import dequantize as dq
from . import readers as data_files
from .circles import make_circles
from .images import read_image_folder
from .readers import find, read_amat, read_arrays, read_idx, resolve_data_dir

TORCHVISION_DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
DATASETS = ("auto", *TORCHVISION_DATASETS, "binarized-mnist", "mnist-t10k", "frey-faces", "digits", "circles")
BINARIZE = ("auto", "none", "dynamic", "static")
SPLIT_SEED = 1234  # seeds every split below, so a dataset is the same on every machine
# seeds the one binarization of the test split (and, with + 1, of the validation split) under
# dynamic binarization, and of every split under static; recorded in config.json and evaluate's JSON
BINARIZE_SEED = 1234


@dataclass
class Dataset:
    """Splits ``(N, D)`` float32, their image shape ``(C, H, W)``, and side information.

    ``labels[split]`` holds class labels ``(N,)`` when known; ``factors[split]`` holds the
    true generative factors ``(N, F)`` (e.g. x, y, radius of the circles dataset).
    ``binarize`` is the resolved mode (``none``, ``dynamic`` or ``static``) and ``binarize_seed``
    the seed of its fixed draws (None when nothing was drawn); ``dequantize`` (``none`` or
    ``uniform``) and ``dequantize_seed`` likewise; ``split`` says how the splits were made,
    ``classes`` names the labels (a folder's class subfolders).
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
    binarize_seed: int | None = None
    split_protocol: str = ""
    classes: tuple = ()
    dequantize: str = "none"
    dequantize_seed: int | None = None

    def describe(self) -> str:
        """One line: the split sizes, the image shape and how the splits were made."""
        c, h, w = self.image_shape
        return (
            f"{self.name}: {self.train.shape[0]:,} train / {self.valid.shape[0]:,} validation / "
            f"{self.test.shape[0]:,} test images of {c}×{h}×{w}"
            + (f" ({self.split_protocol})" if self.split_protocol else "")
        )

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}; choose train, valid or test")
        return getattr(self, name)

    def fixed_seed(self, kind: str, split: str) -> int | None:
        """The seed of ``split``'s fixed draw for ``kind`` (``"binarize"`` or ``"dequantize"``): the
        recorded seed for test, + 1 for valid, + 2 for train under static binarization (:func:`_binarize`,
        :func:`ppl_vae.data.dequantize.fixed`); None where the split has no fixed draw (dynamic
        binarization and dequantization draw the training images afresh per batch)."""
        base = self.binarize_seed if kind == "binarize" else self.dequantize_seed
        if base is None:
            return None
        if split == "train":
            return base + 2 if kind == "binarize" and self.binarize == "static" else None
        return base + (split == "valid")

    def to(self, device) -> "Dataset":
        move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
        return dataclasses.replace(
            self,
            train=self.train.to(device),
            valid=self.valid.to(device),
            test=self.test.to(device),
            labels=move(self.labels),
            factors=move(self.factors),
        )

    def train_batch(self, idx: torch.Tensor) -> torch.Tensor:
        """Training batch ``(B, D)`` at indices ``idx``; under ``dynamic``, x ~ Bernoulli(grey level),
        under ``uniform`` dequantization y = (255 x + u)/256 with u ~ U[0, 1)^D, drawn afresh on
        the batch's device from torch's global generator (seeded by the run, saved in its
        checkpoint), with no host synchronization."""
        x = self.train[idx]  # (B, D)
        if self.binarize == "dynamic":
            return torch.bernoulli(x)
        return dq.uniform(x, torch.rand_like(x)) if self.dequantize == "uniform" else x


# --------------------------------------------------------------------------- splitting


def _seeded_split(n: int, sizes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    perm = torch.randperm(n, generator=g)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def _split_three(x: torch.Tensor, labels=None, factors=None, frac=(0.8, 0.1), sizes=None):
    """``x`` (and its labels, factors) split by a permutation seeded with :data:`SPLIT_SEED`:
    ``sizes`` (train, valid, test), else fractions ``frac`` of train and valid, the rest test."""
    n = x.shape[0]
    if n < 3:
        raise DataError(f"need at least 3 datapoints to make train/valid/test splits, got {n}")
    if sizes is None:
        n_tr = max(1, int(round(frac[0] * n)))
        n_va = max(1, int(round(frac[1] * n)))
        n_tr = min(n_tr, n - n_va - 1)
        sizes = (n_tr, n_va, n - n_tr - n_va)
    idx = _seeded_split(n, sizes)
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


def load_array_file(path: Path, channels: int | None = None, image_size=None) -> Dataset:
    """A user's ``.npy`` / ``.npz`` of images (see :func:`ppl_vae.data.readers.read_arrays`; a
    ``.npz``'s ``labels`` array gives labels), split 80/10/10 by a seeded permutation."""
    if image_size is not None:
        raise DataError(f"{path}: --image-size resizes the images of a folder; an array has one size already")
    arr, labels = read_arrays(path)
    return dataset_from_array(arr, labels, name=str(path), channels=channels)


def load_image_folder(path: Path, channels: int | None = None, image_size=None) -> Dataset:
    """A folder of image files (:func:`ppl_vae.data.images.read_image_folder`: class subfolders
    give labels, as torchvision's ``ImageFolder``), 8-bit levels k/255, split 80/10/10 by a seeded
    permutation."""
    size = None if image_size is None else tuple(int(v) for v in image_size)
    arr, labels, classes = read_image_folder(path, channels, size)  # (N, C, H, W) uint8
    ds = dataset_from_array(arr.astype(np.float32) / 255.0, labels, name=str(path))
    ds.classes = tuple(classes)
    return ds


def _image_array(arr: np.ndarray, name: str) -> tuple[np.ndarray, tuple[int, int, int]]:
    """``arr`` as ``(N, C, H, W)`` with its image shape: ``(N, H, W)`` and ``(N, D)`` are greyscale
    (D = H·W square, else one row of D pixels), ``(N, C, H, W)`` and ``(N, H, W, C)`` have C = 1
    or 3 channels (channels first when both readings are possible)."""
    if arr.ndim == 2:
        side = math.isqrt(arr.shape[1])
        shape = (1, side, side) if side * side == arr.shape[1] else (1, 1, arr.shape[1])
        return arr.reshape(arr.shape[0], *shape), shape
    if arr.ndim == 3:
        return arr[:, None], (1, arr.shape[1], arr.shape[2])
    if arr.ndim == 4 and arr.shape[1] in (1, 3):
        return arr, tuple(arr.shape[1:])
    if arr.ndim == 4 and arr.shape[3] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)  # (N, H, W, C) → (N, C, H, W)
        return arr, tuple(arr.shape[1:])
    raise DataError(
        f"{name}: images must have shape (N, H, W), (N, D), or (N, C, H, W) / (N, H, W, C) with C = 1 "
        f"or 3 channels, got {arr.shape}"
    )


def dataset_from_array(array, labels=None, name: str = "array", channels: int | None = None) -> Dataset:
    """A :class:`Dataset` from images in [0, 1], a NumPy array or a tensor of shape ``(N, H, W)``,
    ``(N, D)``, ``(N, C, H, W)`` or ``(N, H, W, C)`` (C = 1 or 3), with class ``labels`` ``(N,)``
    (integers ≥ 0) when given; split 80/10/10 by a permutation seeded with :data:`SPLIT_SEED`.
    ``channels``: 1 or 3 to convert to (RGB → grey by ITU-R 601-2 luma, as Pillow's ``L``; grey →
    RGB by copying). Bad input is one :class:`DataError` line naming ``name``."""
    arr = array.detach().cpu().numpy() if isinstance(array, torch.Tensor) else np.asarray(array)
    if arr.dtype.kind not in "fiub":
        raise DataError(f"{name}: images must be numeric, got dtype {arr.dtype}")
    if arr.shape[:1] == (0,) or arr.size == 0:
        raise DataError(f"{name}: the dataset is empty (shape {arr.shape})")
    arr, image_shape = _image_array(arr, name)  # (N, C, H, W)
    if arr.shape[0] < 3:
        raise DataError(f"{name}: need at least 3 images to make train/valid/test splits, got {arr.shape[0]}")
    x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))  # (N, C, H, W)
    if channels not in (None, image_shape[0]):
        if channels == 1:  # (N, 3, H, W) → (N, 1, H, W)
            x = (x * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        elif channels == 3:
            x = x.expand(-1, 3, -1, -1)  # (N, 3, H, W)
        else:
            raise DataError(f"--channels must be 1 or 3, got {channels}")
        image_shape = (channels, *image_shape[1:])
    x = x.reshape(x.shape[0], -1).contiguous()  # (N, C·H·W)
    check_values(x, name, (0.0, 1.0))
    y = None
    if labels is not None:
        y_arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
        if y_arr.shape != (x.shape[0],) or y_arr.dtype.kind not in "iub" or (y_arr < 0).any():
            raise DataError(
                f"{name}: labels must be {x.shape[0]} integers >= 0, one per image, got shape "
                f"{y_arr.shape} of {y_arr.dtype}"
            )
        y = torch.from_numpy(y_arr.astype(np.int64))
    (tr, va, te), split_labels, _ = _split_three(x, labels=y)
    return Dataset(
        name,
        tr,
        va,
        te,
        image_shape,
        labels=split_labels or {},
        split_protocol=f"80/10/10 % by a permutation seeded {SPLIT_SEED}",
    )


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


def _binarize(ds: Dataset, mode: str, seed: int = BINARIZE_SEED) -> Dataset:
    """Apply ``static`` (all splits) or ``dynamic`` (valid/test now, train per batch) binarization:
    each fixed draw x ~ Bernoulli(pixel) from its own generator, seeded ``seed`` for the test split,
    ``seed + 1`` for the validation split and ``seed + 2`` for the training split (``static``), so
    that the test images' binarization depends on nothing but them and the seed."""
    draw = lambda x, k: torch.bernoulli(x, generator=torch.Generator().manual_seed(seed + k))  # noqa: E731
    ds.binarize = mode
    if mode == "static":
        ds.train = draw(ds.train, 2)
    if mode in ("static", "dynamic"):
        ds.test, ds.valid = draw(ds.test, 0), draw(ds.valid, 1)
        ds.binarize_seed = seed
    return ds


def _is_binary(x: torch.Tensor) -> bool:
    return bool(((x == 0) | (x == 1)).all())


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


def prepare(ds: Dataset, binarize: str = "auto", likelihood=None, dequantize: str = "auto") -> Dataset:
    """Binarize ``ds`` as asked (``auto``: dynamically for a likelihood of binary data when the
    images are greyscale, else not), dequantize it as asked (``auto``: :func:`dequantize_mode`),
    and check it suits ``likelihood``: what :func:`load_dataset` does last, also for a
    :class:`Dataset` made elsewhere (``fit(dataset=...)``). Changes ``ds``."""
    if dequantize not in dq.DEQUANTIZE:
        raise DataError(f"unknown --dequantize {dequantize!r}; choose one of {', '.join(dq.DEQUANTIZE)}")
    binary = _is_binary(ds.train)
    if binarize == "auto":
        binarize = "dynamic" if (likelihood is not None and likelihood.binary_data and not binary) else "none"
    if binarize != "none":
        if binary:
            binarize = "none"  # already 0/1: nothing to draw
        _binarize(ds, binarize)
    if ds.dequantize == "none" and dequantize_mode(ds, dequantize, likelihood) == "uniform":
        ds.dequantize, ds.dequantize_seed = "uniform", dq.DEQUANTIZE_SEED
        ds.test, ds.valid = dq.fixed(ds.test, dq.DEQUANTIZE_SEED), dq.fixed(ds.valid, dq.DEQUANTIZE_SEED + 1)
    if likelihood is not None:
        check_for_likelihood(ds, likelihood)
    return ds


def dequantize_mode(ds: Dataset, asked: str, likelihood=None) -> str:
    """``uniform`` or ``none`` for ``ds`` (binarized already, or not) under ``likelihood``: ``auto``
    is ``uniform`` for 8-bit images under a density of continuous data; ``uniform`` asked where
    it has no meaning (binarized or non-8-bit data, a likelihood that is a probability) is one line."""
    if asked == "none":
        return "none"
    continuous = likelihood is not None and not likelihood.discrete and not likelihood.binary_data

    def eight_bit() -> bool:  # (checked only where it matters: it reads every pixel)
        return ds.binarize == "none" and all(dq.is_8bit(ds.split(s)) for s in ("train", "valid", "test"))

    if asked == "auto":
        return "uniform" if continuous and eight_bit() else "none"
    if ds.binarize != "none":
        raise DataError(
            f"--dequantize uniform is for 8-bit greyscale images, but {ds.name} is binarized "
            f"({ds.binarize}); pass --binarize none with a continuous likelihood, or drop --dequantize"
        )
    if likelihood is not None and likelihood.discrete:
        raise DataError(
            f"--likelihood {likelihood.name} is already a probability of discrete data: it needs no "
            f"dequantization; drop --dequantize uniform"
        )
    if not eight_bit():
        raise DataError(
            f"{ds.name}: --dequantize uniform needs 8-bit images (every value a level k/255, not all 0 "
            f"or 1), and these are not; pass --dequantize none"
        )
    return "uniform"


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
