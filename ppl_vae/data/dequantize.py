"""Uniform dequantization of 8-bit images (``--dequantize``): a continuous density fitted to
y = (x + u)/256 bounds the probability of the discrete images (Theis, van den Oord & Bethge
2016; the derivation is in docs/likelihoods.md).

8-bit images are loaded as the levels x = k/255, k ∈ {0, ..., 255}. Under ``uniform``:

* training: every batch is y = (k + u)/256 with u ~ U[0, 1)^D drawn afresh (:func:`uniform` in
  :meth:`~ppl_vae.data.splits.Dataset.train_batch`, inside the training step, on the training
  device, from torch's global generator, which the run seeds and its checkpoint saves): no host
  synchronization, and a resumed run draws what the uninterrupted one would have, as under
  dynamic binarization;
* validation and test: one fixed draw, each split from its own generator (the test images with
  :data:`DEQUANTIZE_SEED`, the validation images with + 1), recorded as ``dequantize_seed`` in
  the run's ``config.json`` and in ``evaluate``'s JSON: a function of the images and the seed only.

Why it bounds: the unit cubes k + [0, 1)^D tile [0, 256)^D, so
P(k) = ∫_{[0,1)^D} p_Y((k + u)/256) 256^{−D} du is a probability of the 256^D images for any
density p_Y on [0, 1]^D, and by Jensen log P(k) ≥ E_u[log p_Y((k + u)/256)] − D log 256.

``auto`` (the default) is ``uniform`` for 8-bit data under a likelihood that is a density of
continuous data (``gaussian``, ``gaussian-learned``, ``continuous-bernoulli``) and ``none``
otherwise: binary or binarized data, the discretized logistic (already a probability of the 256
levels), data that are not 8-bit (e.g. scikit-learn's digits, 17 levels).
"""

from __future__ import annotations

import torch

DEQUANTIZE = ("auto", "uniform", "none")
LEVELS = 256  # the levels of an 8-bit pixel
# seeds the one draw of u for the test split (and, with + 1, the validation split); recorded
DEQUANTIZE_SEED = 1234


def is_8bit(x: torch.Tensor) -> bool:
    """Whether every value of ``x`` is a level k/255 in [0, 1] and not all are 0 or 1 (binary
    data are not 8-bit images: a Bernoulli models them, and their bits/dim are of other data)."""
    if x.numel() == 0 or not bool(((x >= 0) & (x <= 1)).all()):
        return False
    level = x * (LEVELS - 1)
    on_grid = bool(((level - level.round()).abs() < 1e-3).all())  # float32 k/255 · 255 is k ± 2e-5
    return on_grid and not bool(((x == 0) | (x == 1)).all())


def uniform(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """y = (k + u)/256 with k = round(255 x): each level k/255 moved to a point of its cube
    [k, k + 1)/256 (where the discretized logistic's bin k lies). ``x``, ``u`` ``(..., D)``, u ∈ [0, 1)."""
    return (x * (LEVELS - 1)).round_().add_(u).div_(LEVELS)


def fixed(x: torch.Tensor, seed: int) -> torch.Tensor:
    """:func:`uniform` with one draw u ~ U[0, 1)^D per image from a CPU generator seeded ``seed``:
    the same u on every device. ``x (N, D)``."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed), dtype=x.dtype)  # (N, D)
    return uniform(x, u.to(x.device))
