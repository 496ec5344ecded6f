"""Figures (matplotlib, with ``torchvision.utils.make_grid`` for image grids).

Every function takes plain tensors/arrays and returns a ``matplotlib.figure.Figure``; pass
``path`` to also save it as PNG. Images are flattened ``(N, D)`` with an ``image_shape``
``(C, H, W)``.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402


def _save(fig, path):
    if path is not None:
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
    return fig


def _grid(x: torch.Tensor, image_shape, nrow: int) -> torch.Tensor:
    imgs = x.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape)  # (N, C, H, W)
    return make_grid(imgs, nrow=nrow, padding=1, pad_value=0.5)[0]  # (H', W') first channel


def image_grid(x: torch.Tensor, image_shape, nrow: int = 10, title: str = "", path=None):
    """A grid of images ``x (N, D)``, ``nrow`` per row."""
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.5, 0.5 * ((len(x) + nrow - 1) // nrow) + 0.8))
    ax.imshow(_grid(x, image_shape, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return _save(fig, path)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, image_shape, title: str = "", path=None):
    """Inputs ``x (n, D)`` in the top row(s), their reconstructions ``(n, D)`` below."""
    n = len(x)
    fig, axes = plt.subplots(2, 1, figsize=(0.5 * min(n, 10) + 0.5, 0.5 * 2 * ((n + 9) // 10) + 1.2))
    for ax, imgs, label in zip(axes, (x, recon), ("data x", "reconstruction E[x | z = μ(x)]")):
        ax.imshow(_grid(imgs, image_shape, min(n, 10)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def training_curve(metrics: list[dict], title: str = "Training curve", path=None):
    """Train and validation ELBO (nats per datapoint) against epoch."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ep = [m["epoch"] for m in metrics]
    ax.plot(ep, [m["train_elbo"] for m in metrics], "o-", label="train (objective, running)")
    ax.plot(ep, [m["valid_elbo"] for m in metrics], "s-", label="validation ELBO (analytic KL)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("ELBO (nats per datapoint)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


@torch.no_grad()
def run_figures(vae, data, metrics, out: Path, n: int = 10, seed: int = 0) -> None:
    """The figures every ``fit`` writes: reconstructions, prior samples, training curve."""
    out = Path(out)
    vae.eval()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.valid.shape[0], generator=g)[:n].to(data.valid.device)
    x = data.valid[idx]
    reconstruction_grid(x, vae.reconstruct(x), data.image_shape, "Validation images and reconstructions",
                        out / "reconstructions.png")
    torch.manual_seed(seed)
    image_grid(vae.sample(100), data.image_shape, 10, "Samples: E[x | z], z ~ N(0, I)", out / "samples.png")
    if metrics:
        training_curve(metrics, path=out / "training_curve.png")
