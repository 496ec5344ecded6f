"""A loaded data set made ready for a likelihood: binarized, dequantized, and checked.

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

Checks: every split's values lie in the likelihood's support, and are 0/1 for a likelihood of
binary data unless binarized dynamically (:func:`check_for_likelihood`).
"""

from __future__ import annotations

import torch

from ..core.errors import DataError
from . import dequantize as dq
from .splits import Dataset

BINARIZE = ("auto", "none", "dynamic", "static")
# seeds the one binarization of the test split (and, with + 1, of the validation split) under
# dynamic binarization, and of every split under static; recorded in config.json and evaluate's JSON
BINARIZE_SEED = 1234


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


def prepare(ds: Dataset, binarize: str = "auto", likelihood=None, dequantize: str = "auto") -> Dataset:
    """Binarize ``ds`` as asked (``auto``: dynamically for a likelihood of binary data when the
    images are greyscale, else not), dequantize it as asked (``auto``: :func:`dequantize_mode`),
    and check it suits ``likelihood``: what :func:`~ppl_vae.data.datasets.load_dataset` does
    last, also for a :class:`Dataset` made elsewhere (``fit(dataset=...)``). Changes ``ds``."""
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
