"""The circles world: binary images of one filled circle each, with the factors that made them.

A toy dataset whose true generative factors (x, y, radius) are known, so that a VAE's latents
can be compared with them (``examples/circles.py``: β-VAE traversals and read-outs);
``python -m ppl_vae.fit --dataset circles`` loads it through :func:`ppl_vae.data.datasets.load_dataset`.
"""

from __future__ import annotations

import torch


def make_circles(n: int, size: int = 28, r_min: float = 3.0, r_max: float = 8.0, seed: int = 0):
    """``n`` binary images ``(n, size·size)`` of one filled circle each, and their factors
    ``(n, 3)`` = (x, y, radius) in pixels, drawn uniformly (the centre keeps the whole circle
    inside the image). A pixel is 1 when its centre lies within the circle."""
    g = torch.Generator().manual_seed(seed)
    r = r_min + (r_max - r_min) * torch.rand(n, generator=g)  # (n,)
    cx = r + (size - 2 * r) * torch.rand(n, generator=g)  # (n,)
    cy = r + (size - 2 * r) * torch.rand(n, generator=g)  # (n,)
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx2 = (grid[None, None, :] - cx[:, None, None]) ** 2  # (n, 1, W)
    dy2 = (grid[None, :, None] - cy[:, None, None]) ** 2  # (n, H, 1)
    img = (dx2 + dy2 <= r[:, None, None] ** 2).float()  # (n, H, W)
    return img.reshape(n, size * size), torch.stack([cx, cy, r], dim=-1)
