"""The examples' figures (matplotlib), built on :mod:`ppl_vae.reports.plots` (``grid_image``, ``save_figure``).

Every function returns a ``matplotlib.figure.Figure``; pass ``path`` to also save it as PNG
(the figure is then closed). Images are flattened ``(N, D)`` with an ``image_shape``
``(C, H, W)`` and values in [0, 1]. Functions that need a model take a ``decode`` callable
``z (M, z_dim) → (M, D)``.

* images: :func:`image_panels` (labelled side-by-side grids), :func:`manifold_grid` (2-D
  latent), :func:`latent_traversal`;
* latents: :func:`latent_scatter` (coloured by label or by a true factor);
* numbers: :func:`iwae_convergence` (IWAE_K against K with error bands), :func:`khat_histogram`
  (PSIS k̂), :func:`histograms`, :func:`bar_comparison`.

The examples are scripts, so this module is imported as ``_figures`` from their folder.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from ppl_vae.reports.plots import grid_image, save_figure

KHAT_GOOD, KHAT_BAD = 0.5, 0.7  # PSIS k̂ thresholds (Vehtari et al. 2024): finite variance / unreliable


def image_panels(panels: dict, image_shape, nrow: int = 10, title: str = "", path=None):
    """Labelled image grids side by side: ``panels`` maps a column label to images ``(n, D)``, or a
    row label to such a dict (a table: rows × columns). Every panel shows ``nrow`` images per row."""
    rows = panels if isinstance(next(iter(panels.values())), dict) else {"": panels}
    cols = list(dict.fromkeys(c for r in rows.values() for c in r))
    n_img = max(len(x) for r in rows.values() for x in r.values())
    h = (n_img + nrow - 1) // nrow  # image rows per panel
    w_in, h_in = 0.32 * nrow + 0.4, 0.32 * h + 0.5
    fig, axes = plt.subplots(
        len(rows), len(cols), figsize=(w_in * len(cols) + 0.6, h_in * len(rows) + 0.6), squeeze=False
    )
    for i, (rlabel, row) in enumerate(rows.items()):
        for j, clabel in enumerate(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for sp in ax.spines.values():
                sp.set_visible(False)
            if clabel in row:
                ax.imshow(
                    grid_image(row[clabel], image_shape, nrow),
                    cmap="gray",
                    vmin=0,
                    vmax=1,
                    interpolation="nearest",
                )
            if i == 0:
                ax.set_title(clabel, fontsize=9)
            if j == 0 and rlabel:
                ax.set_ylabel(rlabel, fontsize=9)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _tile_ticks(ax, values, tile: int, axis: str, every: int = 1, fmt="{:.1f}"):
    """Ticks at the centres of the tiles of a ``make_grid`` image (``tile`` pixels incl. padding)."""
    pos = [1 + tile * i + (tile - 2) / 2 for i in range(len(values))][::every]  # padding 1, then H pixels
    labels = [fmt.format(v) for v in values][::every]
    (ax.set_xticks if axis == "x" else ax.set_yticks)(pos)
    (ax.set_xticklabels if axis == "x" else ax.set_yticklabels)(labels, fontsize=7)


@torch.no_grad()
def manifold_grid(decode, image_shape, n: int = 20, quantile: float = 0.95, title: str = "", path=None):
    """The decoded 2-D latent manifold: E[x|z] on an ``n × n`` grid of z = (Φ⁻¹(u₁), Φ⁻¹(u₂)), u
    evenly spaced in [(1 − q)/2, (1 + q)/2], so the grid covers the central ``quantile`` mass of
    each N(0, 1) coordinate (Kingma & Welling 2014, Fig. 4). z₂ increases upwards."""
    lo = (1 - quantile) / 2
    u = torch.linspace(lo, 1 - lo, n)
    vals = torch.distributions.Normal(0.0, 1.0).icdf(u)  # (n,)
    z2, z1 = torch.meshgrid(vals.flip(0), vals, indexing="ij")  # (n, n): row 0 = largest z₂
    z = torch.stack([z1.reshape(-1), z2.reshape(-1)], -1)  # (n², 2)
    x = decode(z)  # (n², D)
    # 28-pixel tiles at 110 dpi: about one figure pixel per image pixel
    fig, ax = plt.subplots(figsize=(0.26 * n + 1.2, 0.26 * n + 1.2))
    ax.imshow(grid_image(x, image_shape, n), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    tile = image_shape[-1] + 1
    every = max(1, n // 6)
    _tile_ticks(ax, vals.tolist(), tile, "x", every)
    _tile_ticks(ax, vals.flip(0).tolist(), image_shape[-2] + 1, "y", every)
    ax.set_xlabel("z₁ (latent coordinate, prior quantiles)")
    ax.set_ylabel("z₂")
    ax.set_title(title or "Decoded latent manifold E[x | z]")
    return save_figure(fig, path)


@torch.no_grad()
def latent_traversal(
    decode, z0: torch.Tensor, image_shape, values=None, dims=None, title: str = "", row_labels=None, path=None
):
    """Latent traversals: row i decodes ``z0`` with coordinate ``dims[i]`` replaced by each of
    ``values`` (default −3…3 in 9 steps), every other coordinate fixed at ``z0 (z_dim,)``."""
    values = torch.linspace(-3, 3, 9) if values is None else torch.as_tensor(values, dtype=torch.float32)
    dims = list(range(z0.shape[-1])) if dims is None else list(dims)
    z = z0.detach().reshape(1, 1, -1).repeat(len(dims), len(values), 1)  # (rows, cols, z_dim)
    for i, d in enumerate(dims):
        z[i, :, d] = values.to(z)
    x = decode(z.reshape(-1, z.shape[-1]))  # (rows·cols, D)
    fig, ax = plt.subplots(figsize=(0.45 * len(values) + 1.2, 0.45 * len(dims) + 1.0))
    ax.imshow(grid_image(x, image_shape, len(values)), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    _tile_ticks(ax, values.tolist(), image_shape[-1] + 1, "x")
    _tile_ticks(ax, row_labels or [f"z{d + 1}" for d in dims], image_shape[-2] + 1, "y", fmt="{}")
    ax.set_xlabel("value of the traversed latent coordinate")
    ax.set_title(title or "Latent traversals (others fixed)")
    return save_figure(fig, path)


def _prior_circles(ax):
    t = np.linspace(0, 2 * np.pi, 200)
    for r in (1, 2):
        ax.plot(r * np.cos(t), r * np.sin(t), "k--", lw=0.8, alpha=0.6)
    ax.plot([], [], "k--", lw=0.8, alpha=0.6, label="N(0, I): 1σ, 2σ")


def latent_scatter(
    z,
    c=None,
    dims=(0, 1),
    discrete: bool | None = None,
    c_label: str = "label",
    prior: bool = True,
    title: str = "",
    path=None,
):
    """Encoded means μ_φ(x) ``(N, z_dim)``, coordinates ``dims``, coloured by ``c (N,)``: a class
    label (``discrete``, one colour each, legend) or a true factor (colour bar). ``discrete``
    defaults to "integer-valued ``c``". ``prior`` draws the 1σ and 2σ circles of N(0, I)."""
    z = np.asarray(torch.as_tensor(z).detach().cpu())
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    if c is None:
        ax.scatter(z[:, dims[0]], z[:, dims[1]], s=3, alpha=0.5)
    else:
        c = np.asarray(torch.as_tensor(c).detach().cpu())
        if discrete is None:
            discrete = np.issubdtype(c.dtype, np.integer)
        if discrete:
            cmap = plt.get_cmap("tab10")
            for k in np.unique(c):
                m = c == k
                ax.scatter(
                    z[m, dims[0]], z[m, dims[1]], s=3, alpha=0.6, color=cmap(int(k) % 10), label=str(k)
                )
        else:
            sc = ax.scatter(z[:, dims[0]], z[:, dims[1]], s=3, alpha=0.6, c=c, cmap="viridis")
            fig.colorbar(sc, ax=ax, label=c_label)
    if prior:
        _prior_circles(ax)
    ax.set_xlabel(f"z{dims[0] + 1} (posterior mean μ)")
    ax.set_ylabel(f"z{dims[1] + 1} (posterior mean μ)")
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(title or "Encoded data in latent space")
    if c is not None and discrete:  # classes: a legend beside the axes
        ax.legend(
            fontsize=7,
            markerscale=3,
            loc="center left",
            bbox_to_anchor=(1.0, 0.5),
            title=c_label,
            title_fontsize=7,
        )
    elif prior:  # the colour bar is beside the axes: keep the legend inside
        ax.legend(fontsize=7, loc="upper left")
    return save_figure(fig, path)


# --------------------------------------------------------------------------- numbers


def _curve_dict(curves: dict) -> dict:
    """``{K: (value, stderr)}`` or ``{label: {K: (value, stderr)}}`` → the second form."""
    first = next(iter(curves.values()))
    return curves if isinstance(first, dict) else {"IWAE_K": curves}


def iwae_convergence(
    curves: dict, references: dict | None = None, title: str = "", ylabel: str = "", path=None
):
    """IWAE_K (nats per datapoint) against K on a log axis, with ±2 standard-error bands.

    :param curves: ``{K: (value, stderr)}``, or ``{label: {K: (value, stderr)}}`` for several models.
    :param references: optional ``{label: (value, stderr)}`` drawn as dashed horizontal lines with
        bands (e.g. the analytic-KL and Monte Carlo ELBOs, which do not depend on K); a reference
        whose label starts with a curve's label takes that curve's colour.
    """
    fig, ax = plt.subplots(figsize=(6.2, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curve_color = {}
    for i, (label, curve) in enumerate(_curve_dict(curves).items()):
        ks = sorted(curve)
        v = np.array([curve[k][0] for k in ks], dtype=float)
        se = np.nan_to_num(np.array([curve[k][1] for k in ks], dtype=float))
        curve_color[label] = col = colors[i % len(colors)]
        ax.plot(ks, v, "o-", ms=3, color=col, label=label)
        ax.fill_between(ks, v - 2 * se, v + 2 * se, color=col, alpha=0.25)
    spare = iter(colors[len(curve_color) :] + colors[: len(curve_color)])
    for label, (v, se) in (references or {}).items():
        col = next((c for name, c in curve_color.items() if label.startswith(name)), None) or next(spare)
        ax.axhline(v, ls="--", color=col, label=label)
        if se and np.isfinite(se):
            ax.axhspan(v - 2 * se, v + 2 * se, color=col, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("K (importance samples per datapoint)")
    ax.set_ylabel(ylabel or "bound on log p(x) (nats per datapoint)")
    ax.set_title(title or "IWAE_K → log p(x) as K grows (bands: ±2 s.e.)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def histograms(
    samples: dict, xlabel: str, title: str = "", bins: int = 40, vlines: dict | None = None, path=None
):
    """Overlaid histograms (densities) of ``{label: values (N,)}``; ``vlines`` = ``{label: x}``."""
    arrays = {
        k: np.asarray(torch.as_tensor(v).detach().cpu(), dtype=float).ravel() for k, v in samples.items()
    }
    finite = np.concatenate([a[np.isfinite(a)] for a in arrays.values()])
    edges = np.histogram_bin_edges(finite, bins=bins)
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for label, a in arrays.items():
        ax.hist(a[np.isfinite(a)], bins=edges, density=True, histtype="step", lw=1.6, label=label)
    for j, (label, x) in enumerate((vlines or {}).items()):
        ax.axvline(x, color=f"C{3 + j}", ls="--", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, path)


def khat_histogram(khat, title: str = "", path=None):
    """PSIS Pareto k̂ of the importance weights, one per datapoint: k̂ < 0.5 the weights have finite
    variance; 0.5–0.7 usable; > 0.7 the IWAE estimate of that datapoint is unreliable."""
    k = np.asarray(torch.as_tensor(khat).detach().cpu(), dtype=float)
    bad = float((k > KHAT_BAD).mean())
    fig = histograms(
        {f"{len(k)} datapoints ({100 * bad:.1f}% with k̂ > {KHAT_BAD})": k},
        "Pareto k̂ of the importance weights w = p(x, z) / q(z | x)",
        title or "PSIS diagnostic of the IWAE estimate",
        vlines={f"k̂ = {KHAT_GOOD}": KHAT_GOOD, f"k̂ = {KHAT_BAD}": KHAT_BAD},
    )
    return save_figure(fig, path)


def bar_comparison(
    values: dict, ylabel: str, title: str = "", hline: float | None = None, fmt: str = "{:.2f}", path=None
):
    """Grouped bars: ``values`` = ``{series: {category: number}}`` (e.g. ``{"β = 1": {"x": R², ...}}``),
    each bar labelled with its value; ``hline`` draws a target line."""
    series = list(values)
    cats = list(dict.fromkeys(c for s in values.values() for c in s))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(cats) * max(1, len(series) / 2), 3.6))
    for i, s in enumerate(series):
        xs = np.arange(len(cats)) + (i - (len(series) - 1) / 2) * width
        ys = [values[s].get(c, np.nan) for c in cats]
        bars = ax.bar(xs, ys, width, label=s)
        ax.bar_label(bars, labels=[fmt.format(y) for y in ys], fontsize=7)
    top = max([hline or 0.0] + [v for row in values.values() for v in row.values() if np.isfinite(v)])
    if top > 0:
        ax.set_ylim(top=1.12 * top)  # room for the value labels
    if hline is not None:
        ax.axhline(hline, color="k", ls=":", lw=1, label=f"{hline:g}")
    ax.set_xticks(np.arange(len(cats)))
    ax.set_xticklabels(cats)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1 or hline is not None:  # (one series: the y label says what the bars are)
        rows = max(label.count("\n") for label in map(str, cats)) + 1  # tick-label lines to clear
        ax.legend(
            fontsize=7,
            ncol=min(len(series) + (hline is not None), 4),
            loc="upper center",
            bbox_to_anchor=(0.5, -0.06 - 0.06 * rows),
        )
    return save_figure(fig, path)
