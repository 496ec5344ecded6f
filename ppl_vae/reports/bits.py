r"""Bits per dimension, and what each number is: of which data, and through which bound.

A log-likelihood in nats is a code length only where it is the log-probability of discrete data:
then −log P(x) / (D ln 2) is bits per dimension. On one data set the likelihoods of a swap give
numbers of three kinds, and :func:`scale_for` says which a run's number is:

* a probability of the data themselves: the discretized logistic on 8-bit images (``bits/dim of
  the 8-bit images``), a Bernoulli on binarized images (``bits/dim of the binarized images``:
  other data, never one column with the 8-bit numbers);
* a density of uniformly dequantized 8-bit images y = (x + u)/256 (``--dequantize uniform``,
  :mod:`ppl_vae.data.dequantize`): by Jensen, E_u[log p(y)] − D log 256 ≤ log P(x), so
  −(log p(y) − D log 256)/(D ln 2) is an upper bound on the bits/dim of the 8-bit images, the
  same quantity as the discretized logistic's (``bits/dim of the 8-bit images, a bound through
  uniform dequantization``). It is estimated at the one draw of u per image that the data
  recorded (``dequantize_seed``), an unbiased estimate of the mean over u;
* a density at the 8-bit levels themselves, or of data that are not discrete: no bits/dim,
  and the report says why.

Every log p(x) here is itself an IWAE (or AIS) lower bound, so every bits/dim is an upper bound
in expectation on its quantity, like the nats it comes from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..data.dequantize import LEVELS, is_8bit

NO_BITS = (
    "not shown: p(x|z) is a density of continuous data, not a probability; bits/dim would be "
    "meaningless without dequantization"
)
UNDEQUANTIZED = (
    "not shown: p(x|z) is a density fitted to the 8-bit levels themselves (--dequantize none), not "
    "a bound on their probability; fit with --dequantize uniform for bits/dim of the 8-bit images"
)


@dataclass(frozen=True)
class BitsScale:
    """How nats per datapoint become bits per dimension, and what the number bounds: of the
    ``data`` (``"8-bit images"``, ``"binarized images"``, ...), directly or, ``dequantized``,
    through uniform dequantization with u drawn from ``seed``."""

    data: str
    dequantized: bool = False
    seed: int | None = None

    @property
    def shift(self) -> float:
        """Nats per dimension added before the conversion: −log 256 under dequantization."""
        return -math.log(LEVELS) if self.dequantized else 0.0

    def bits(self, nats: float, dim: int) -> float:
        """−(nats + D·shift) / (D ln 2): a log-likelihood per datapoint in nats → bits per dimension."""
        return -(nats + dim * self.shift) / (dim * math.log(2))

    @property
    def label(self) -> str:
        """What a printed bits/dim is, in words (the JSON's ``bits_per_dim_label``)."""
        return f"bits/dim of the {self.data}" + (
            ", a bound through uniform dequantization" if self.dequantized else ""
        )

    @property
    def formula(self) -> str:
        """bits/dim from nats per datapoint, in words."""
        return f"-(nats - D log {LEVELS}) / (D ln 2)" if self.dequantized else "-nats / (D ln 2)"

    @property
    def bound(self) -> str:
        """The inequality behind the number (the JSON's ``bits_per_dim_bound``)."""
        if self.dequantized:
            return (
                f"log P(x) >= E_u log p((x + u)/{LEVELS}) - D log {LEVELS} (Jensen), u ~ U[0, 1)^D drawn "
                f"once per image with seed {self.seed}; bits/dim = {self.formula}"
            )
        return f"log P(x), a probability of the data; bits/dim = {self.formula}"


def scale_for(ds, likelihood, split: str = "test") -> BitsScale | str:
    """The :class:`BitsScale` of a run with ``likelihood`` on ``split`` of the prepared data set
    ``ds`` (a :class:`~ppl_vae.data.splits.Dataset`), or why there is none (a sentence)."""
    if getattr(ds, "dequantize", "none") == "uniform":
        return BitsScale("8-bit images", dequantized=True, seed=ds.fixed_seed("dequantize", split))
    if not likelihood.discrete:
        grid = ds.binarize == "none" and all(is_8bit(ds.split(s)) for s in ("valid", "test"))
        return UNDEQUANTIZED if grid else NO_BITS
    if ds.binarize != "none" or ds.name == "binarized-mnist":
        return BitsScale("binarized images")
    test = ds.test
    if bool(((test == 0) | (test == 1)).all()):
        return BitsScale("binary images")
    if is_8bit(test):
        return BitsScale("8-bit images")
    binned = likelihood.name == "discretized-logistic"  # its bins: the data quantized to 256 levels
    return BitsScale(f"images quantized to {LEVELS} levels" if binned else "discrete data")
