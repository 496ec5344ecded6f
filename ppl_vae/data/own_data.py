"""Users' own data: a ``.npy``/``.npz`` file of images, a folder of image files, or an array
or tensor from Python (:func:`dataset_from_array`), split 80/10/10 % by a permutation seeded
with :data:`~ppl_vae.data.splits.SPLIT_SEED`. The files are read by
:func:`ppl_vae.data.readers.read_arrays` and :func:`ppl_vae.data.images.read_image_folder`; a
folder's data set carries a digest of its decoded images and labels (``content_digest``), a
file's the digest of its bytes (:func:`ppl_vae.data.fingerprint.file_digest`): its fingerprint,
also where the data set is passed to ``fit`` from Python."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.digests import digest
from ..core.errors import DataError
from .fingerprint import file_digest
from .images import read_image_folder
from .prepare import check_values
from .readers import read_arrays
from .splits import SPLIT_SEED, Dataset, _split_three


def load_array_file(path: Path, channels: int | None = None, image_size=None) -> Dataset:
    """A user's ``.npy`` / ``.npz`` of images (see :func:`ppl_vae.data.readers.read_arrays`; a
    ``.npz``'s ``labels`` array gives labels), split 80/10/10 by a seeded permutation; its
    ``content_digest`` is the file's digest, the one a run's fingerprint records for it."""
    if image_size is not None:
        raise DataError(f"{path}: --image-size resizes the images of a folder; an array has one size already")
    arr, labels = read_arrays(path)
    ds = dataset_from_array(arr, labels, name=str(path), channels=channels)
    ds.content_digest = file_digest(path)
    return ds


def load_image_folder(path: Path, channels: int | None = None, image_size=None) -> Dataset:
    """A folder of image files (:func:`ppl_vae.data.images.read_image_folder`: class subfolders
    give labels, as torchvision's ``ImageFolder``), 8-bit levels k/255, split 80/10/10 by a seeded
    permutation."""
    size = None if image_size is None else tuple(int(v) for v in image_size)
    arr, labels, classes = read_image_folder(path, channels, size)  # (N, C, H, W) uint8
    ds = dataset_from_array(arr.astype(np.float32) / 255.0, labels, name=str(path))
    ds.classes = tuple(classes)
    ds.content_digest = content_digest(arr, labels)
    return ds


def content_digest(images: np.ndarray, labels: np.ndarray | None) -> str:
    """The digest of a folder's decoded images ``(N, C, H, W)`` uint8 and labels ``(N,)`` (or None),
    in file order (:func:`ppl_vae.core.digests.digest`): the content the fingerprint records. One
    byte per pixel, hashed once per load (a fraction of the decoding's cost)."""
    parts = [f"{images.dtype}|{tuple(images.shape)};", images]
    if labels is not None:
        parts += [f"labels|{labels.dtype}|{labels.shape[0]};", labels]
    return digest(parts)


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
