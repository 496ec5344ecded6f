"""Figures (matplotlib, with ``torchvision.utils.make_grid`` for image grids).

Every function returns a ``matplotlib.figure.Figure``; pass ``path`` to also save it as PNG
(the figure is then closed). Images are flattened ``(N, D)`` with an ``image_shape``
``(C, H, W)`` and values in [0, 1] (decoded means E[x|z]). Functions that need a model take
either the :class:`~ppl_vae.programs.model.VAE` or a ``decode`` callable ``z (M, z_dim) → (M, D)``.

These are the package's own figures, the ones ``fit`` and ``sample`` write:
:func:`image_grid`, :func:`reconstruction_grid`, :func:`prior_sample_grid`, :func:`training_curve`
(:func:`run_figures` draws a run's set). The examples' figures (manifolds, traversals, latent
scatters, IWAE_K curves, k̂ histograms, bar charts) are in ``examples/_figures.py``, built on
:func:`grid_image` and :func:`save_figure`.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from ..core import files  # noqa: E402


def save_figure(fig, path):
    """Write ``fig`` as PNG through the atomic-write helper (a full disk leaves the previous
    figure intact and is one line), then close it."""
    if path is not None:
        try:
            files.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
        finally:
            plt.close(fig)
    return fig


def grid_tensor(x: torch.Tensor, image_shape, nrow: int) -> torch.Tensor:
    """Images ``x (N, D)`` as one ``(3, H', W')`` grid in [0, 1], ``nrow`` per row, 1-pixel grey
    padding (``torchvision.utils.make_grid``; a single channel is repeated three times)."""
    imgs = x.detach().float().cpu().clamp(0, 1).reshape(-1, *image_shape)  # (N, C, H, W)
    return make_grid(imgs, nrow=nrow, padding=1, pad_value=0.5)  # (3, H', W')


def grid_image(x: torch.Tensor, image_shape, nrow: int) -> np.ndarray:
    """:func:`grid_tensor` for ``imshow``: ``(H', W')`` for grey images (its first channel; ``imshow``
    applies the colour map), ``(H', W', 3)`` for RGB images (``imshow`` ignores the colour map)."""
    grid = grid_tensor(x, image_shape, nrow)  # (3, H', W')
    return grid[0].numpy() if image_shape[0] == 1 else grid.permute(1, 2, 0).numpy()


def image_grid(x: torch.Tensor, image_shape, nrow: int = 10, title: str = "", path=None):
    """A grid of images ``x (N, D)``, ``nrow`` per row."""
    fig, ax = plt.subplots(figsize=(0.5 * nrow + 0.5, 0.5 * ((len(x) + nrow - 1) // nrow) + 0.8))
    ax.imshow(grid_image(x, image_shape, nrow), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title)
    ax.axis("off")
    return save_figure(fig, path)


def reconstruction_grid(x: torch.Tensor, recon: torch.Tensor, image_shape, title: str = "", path=None):
    """Inputs ``x (n, D)`` in the top row(s), their reconstructions ``(n, D)`` below."""
    n = len(x)
    fig, axes = plt.subplots(2, 1, figsize=(0.5 * min(n, 10) + 0.5, 0.5 * 2 * ((n + 9) // 10) + 1.2))
    for ax, imgs, label in zip(axes, (x, recon), ("data x", "reconstruction E[x | z = μ(x)]")):
        ax.imshow(
            grid_image(imgs, image_shape, min(n, 10)), cmap="gray", vmin=0, vmax=1, interpolation="nearest"
        )
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title)
    return save_figure(fig, path)


def training_curve(metrics, title: str = "Training curve", path=None):
    """Train and validation ELBO (nats per datapoint) against epoch, from ``metrics.jsonl`` rows.
    ``metrics`` is one run's rows, or ``{label: rows}`` to compare runs (solid: validation
    ELBO, dashed: the training objective). Rows with ``valid_recon`` and ``valid_kl`` add a second
    panel: the validation reconstruction NLL −E_q[log p(x|z)] and KL term (older rows have none)."""
    runs = metrics if isinstance(metrics, dict) else {"": metrics}
    terms = {
        label: [m for m in rows if "valid_kl" in m and "valid_recon" in m] for label, rows in runs.items()
    }
    two = any(terms.values())
    fig, axes = plt.subplots(1, 1 + two, figsize=(10 if two else 5, 3.5), squeeze=False)
    ax = axes[0, 0]
    for i, (label, rows) in enumerate(runs.items()):
        ep = [m["epoch"] for m in rows]
        name = f"{label}: " if label else ""
        train = [m.get("train_objective", m.get("train_elbo")) for m in rows]  # (train_elbo: runs before 0.2)
        what = rows[-1].get("objective", "objective") if rows else "objective"
        ax.plot(
            ep,
            train,
            "o--" if label else "o-",
            ms=3,
            color=f"C{i}" if label else "C0",
            label=f"{name}train ({what}, running mean)",
        )
        ax.plot(
            ep,
            [m["valid_elbo"] for m in rows],
            "s-",
            ms=3,
            color=f"C{i}" if label else "C1",
            label=f"{name}validation ELBO (analytic KL)",
        )
        for key, sign, style, what in _TERMS if terms[label] else ():
            axes[0, 1].plot(
                [m["epoch"] for m in terms[label]],
                [sign * m[key] for m in terms[label]],
                style,
                ms=3,
                color=f"C{i}" if label else None,
                label=f"{name}{what}",
            )
    for ax, ylabel, head in zip(
        axes[0],
        ("ELBO (nats per datapoint)", "nats per datapoint"),
        (title, "Validation ELBO = −(reconstruction NLL + KL)"),
    ):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_title(head)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8 if len(runs) > 1 else None)
    return save_figure(fig, path)


# the second panel of training_curve: (row key, sign, line style, legend)
_TERMS = (("valid_recon", -1, "o-", "reconstruction NLL −E_q[log p(x|z)]"), ("valid_kl", 1, "s--", "KL term"))


@torch.no_grad()
def validation_reconstructions(vae, data, n: int = 10, seed: int = 0, valid_labels=None):
    """The ``n`` validation images a run's figures show (a choice seeded by ``seed``), ``(n, D)``,
    and their reconstructions E[x | z = μ(x)], ``(n, D)`` (``valid_labels (N, C)``: a conditional
    program's labels of the validation images). ``vae`` in eval mode."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(data.valid.shape[0], generator=g)[:n].to(data.valid.device)
    x = data.valid[idx]
    return x, (vae.reconstruct(x) if valid_labels is None else vae.reconstruct(x, valid_labels[idx]))


@torch.no_grad()
def run_figures(vae, data, metrics, out: Path, n: int = 10, seed: int = 0, valid_labels=None) -> None:
    """The figures every ``fit`` writes: reconstructions, prior samples, training curve
    (``valid_labels (N, C)``: the labels of a conditional program's validation images)."""
    out = Path(out)
    vae.eval()
    x, recon = validation_reconstructions(vae, data, n, seed, valid_labels)
    reconstruction_grid(
        x, recon, data.image_shape, "Validation images and reconstructions", out / "reconstructions.png"
    )
    prior_sample_grid(vae, 100, nrow=10, seed=seed, path=out / "samples.png")
    if metrics:
        training_curve(metrics, path=out / "training_curve.png")


# --------------------------------------------------------------------------- generated images


def prior_draws(n: int, z_dim: int, seed: int = 0, temperature: float = 1.0, device="cpu") -> torch.Tensor:
    """``n`` latents z ~ N(0, τ² I), ``(n, z_dim)``, from their own seeded generator (drawn on
    the CPU, so the same seed gives the same z on every device; the global RNG is untouched)."""
    g = torch.Generator().manual_seed(seed)
    return (temperature * torch.randn(n, z_dim, generator=g)).to(device)


@torch.no_grad()
def prior_sample_grid(
    vae,
    n: int = 100,
    nrow: int | None = None,
    seed: int = 0,
    temperature: float = 1.0,
    title: str | None = None,
    path=None,
    label: int | None = None,
):
    """Decoded means E[x|z] of ``n`` draws from the model's prior (``vae.sample``: two layers draw
    z2, then z1 | z2; a conditional program draws class ``label``, or each class in turn): what the
    generative model produces. ``temperature`` τ ≠ 1 draws z ~ N(0, τ² I) and needs the N(0, I)
    prior of one latent layer. ``nrow`` defaults to ⌈√n⌉."""
    nrow = nrow or math.ceil(math.sqrt(n))
    if temperature == 1:
        x = vae.sample(n, torch.Generator().manual_seed(seed), label=label)  # (n, D); same z as prior_draws
    else:
        if not hasattr(vae, "prior_loc") or getattr(vae, "layer", None) is not None:
            raise ValueError("a temperature needs the N(0, I) prior of one latent layer")
        y = None if label is None else torch.full((n,), int(label), device=vae.prior_loc.device)
        z = prior_draws(n, vae.z_dim, seed, temperature, vae.prior_loc.device)  # (n, z_dim)
        x = vae.decode(z) if y is None else vae.decode(z, y)
    tau = "" if temperature == 1 else f"{temperature:g}² "
    prior = f"N(0, {tau}I)" if hasattr(vae, "prior_loc") and getattr(vae, "layer", None) is None else "p(z)"
    return image_grid(x, vae.image_shape, nrow, title or f"Samples: E[x | z], z ~ {prior}", path)
