"""The :class:`Dataset` type, and the seeded permutations that split a data set.

Every dataset is a :class:`Dataset` with ``train``/``valid``/``test`` splits of shape
``(N, D)`` (float32, D = C·H·W) and its ``image_shape`` ``(C, H, W)``. Splits live on the
training device as plain tensors and are batched by index, with no DataLoader.

Splits: MNIST, the first 50,000 training images train and the last 10,000 validate (the usual
protocol), its 10,000 test images test; Frey Faces and users' data, a permutation seeded with
:data:`SPLIT_SEED` (Frey Faces 1,565 / 200 / 200 as in the VampPrior paper; users' 80 / 10 / 10 %).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from ..core.errors import DataError
from . import dequantize as dq

SPLIT_SEED = 1234  # seeds every split (here and in the loaders), so a dataset is the same on every machine


@dataclass
class Dataset:
    """Splits ``(N, D)`` float32, their image shape ``(C, H, W)``, and side information.

    ``labels[split]`` holds class labels ``(N,)`` when known; ``factors[split]`` holds the
    true generative factors ``(N, F)`` (e.g. x, y, radius of the circles dataset).
    ``binarize`` is the resolved mode (``none``, ``dynamic`` or ``static``) and ``binarize_seed``
    the seed of its fixed draws (None when nothing was drawn); ``dequantize`` (``none`` or
    ``uniform``) and ``dequantize_seed`` likewise; ``split`` says how the splits were made,
    ``classes`` names the labels (a folder's class subfolders); ``content_digest``, where the
    loader made one, is a digest of the data as read (a folder's decoded images and labels, a
    ``.npy``/``.npz`` file's bytes), before any split or preparation: the data's fingerprint
    (:mod:`ppl_vae.data.fingerprint`), recorded also when the data set is passed from Python.
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
    content_digest: str | None = None

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
        recorded seed for test, + 1 for valid, + 2 for train under static binarization
        (:func:`ppl_vae.data.prepare._binarize`, :func:`ppl_vae.data.dequantize.fixed`); None where
        the split has no fixed draw (dynamic binarization and dequantization draw the training
        images afresh per batch)."""
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
