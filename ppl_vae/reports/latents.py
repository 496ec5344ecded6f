r"""Posterior means and active units of any Pyro guide, site by site.

A latent dimension u of a site is *active* (Burda et al. 2016, §5.2) when the encoder's
posterior mean moves with the data:

.. math:: A_u = \operatorname{Cov}_x\big(\mathbb{E}_{q(z|x)}[z_u]\big) > 10^{-2}.

An inactive unit is one the model has switched off: q(z_u|x) ≈ p(z_u) for every x, so it
costs no KL and carries no information about x (posterior collapse, unit by unit).

Generic over programs: every latent sample site of ``guide(x)`` inside ``pyro.plate("data")``
is counted, by its name (``"z"``, ``"latent"``, ``"z1"`` and ``"z2"``...). A site's units are
all its per-datapoint elements: event dims and any plates nested inside the data plate,
flattened to ``(N, d)``.

E_q[z|x] is computed the Rao-Blackwellized way: the guide runs under a particle plate and each
draw contributes its site distribution's ``.mean`` (the draw itself where the distribution has
no ``.mean``, e.g. a flow). Where that mean does not change across draws (the site depends on
x alone: a diagonal, full-rank or mixture guide layer), one pass gives E_q[z|x] exactly.
Otherwise (a layer below another latent, q(z2|z1); a flow) it is a Monte Carlo mean over
``num_samples`` draws, each entry with a standard error se. That error biases each unit's
variance up by about E_x[se²] (reported as ``mc_inflation``: keep it well below the 10⁻²
threshold) and scatters it by about 2·sd_x·se/√N (tested on a two-layer linear guide).

.. warning:: Cov_x here is the variance over the datapoints evaluated (``ddof = 1``); units
   near the threshold can flip between test sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pyro.poutine.util import site_is_subsample

from ..inference import importance, inputs

ACTIVE_THRESHOLD = 1e-2  # Burda et al. 2016: Cov_x(E_q[z_u|x]) > 10⁻²
MEAN_SAMPLES = 1000  # guide draws when E_q[z|x] needs Monte Carlo (see the module docstring)
_STREAM = 0xAC7  # seed stream of these draws, apart from the estimators' units derive_seed(seed, j)


@dataclass
class PosteriorMean:
    """E_q[z|x] of one site, ``mean (N, d)``; ``mc_var (N, d)`` the Monte Carlo variance of each
    entry (zeros when ``exact``); ``samples`` the guide draws it averages."""

    mean: torch.Tensor
    mc_var: torch.Tensor
    exact: bool
    samples: int


def _data_dim(site) -> int | None:
    return next((f.dim for f in site["cond_indep_stack"] if f.name == importance.DATA_PLATE), None)


def _site_mean(site, nesting: int) -> torch.Tensor:
    """The draw-wise E[z | parents] of a site as ``(k, N, d)``: its distribution's ``.mean``
    (else its value), the data-plate dim second, every other per-datapoint dim flattened."""
    fn, value = site["fn"], site["value"]
    try:  # (a guide may set a value without the particle dim: both broadcast)
        m = torch.broadcast_to(fn.mean, torch.broadcast_shapes(fn.mean.shape, value.shape))
    except (NotImplementedError, AttributeError):
        m = value
    batch = m.dim() - fn.event_dim
    m = m.reshape((1,) * (nesting + 1 - batch) + m.shape)  # (k, ..., N, ..., *event)
    data_dim = nesting + 1 + _data_dim(site)  # counted from the left
    m = m.movedim(data_dim, 1)  # (k, N, ...)
    return m.reshape(m.shape[0], m.shape[1], -1)  # (k, N, d)


def _latent_sites(trace):
    return [
        (name, s)
        for name, s in trace.nodes.items()
        if s["type"] == "sample"
        and not s["is_observed"]
        and not site_is_subsample(s)
        and _data_dim(s) is not None
    ]


@torch.no_grad()
def posterior_means(
    model,
    guide,
    x,
    num_samples: int = MEAN_SAMPLES,
    seed: int | None = None,
    nesting: int | None = None,
    **kwargs,
) -> dict[str, PosteriorMean]:
    """E_q[z_s | x] for every latent site s of ``guide(*x, **kwargs)`` in the data plate, by name,
    each ``(N, d_s)`` (``x``: a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint
    arguments). The guide runs on all of ``x`` once per unit of up to
    :data:`~ppl_vae.inference.importance.SAMPLE_UNIT` particles (at least 2); after the first unit it stops
    if every site's mean was the same in all draws (exact), else it draws ``num_samples`` in all.
    ``seed`` fixes the draws (unit j: ``derive_seed(seed, _STREAM, j)``) and leaves the caller's
    RNG untouched. ``model`` is traced only to find the plate nesting, unless ``nesting`` (the
    caller's probe, e.g. ``Program.nesting``) is given."""
    inputs.check_num_samples(num_samples)
    if nesting is None:
        nesting = importance.max_plate_nesting(model, guide, x, **kwargs)
    sums, squares, exact, drawn, unit = {}, {}, {}, 0, 0
    while drawn < num_samples:
        k = min(importance.SAMPLE_UNIT, max(2, num_samples - drawn))
        with importance.rng_fork():
            if seed is not None:
                torch.manual_seed(importance.derive_seed(seed, _STREAM, unit))
            trace = importance.guide_trace(guide, x, k, nesting, kwargs)  # sites (k, ..., N, ...)
        for name, site in _latent_sites(trace):
            m = _site_mean(site, nesting).double()  # (k, N, d)
            if not drawn:
                exact[name] = bool((m == m[:1]).all())
            sums[name] = sums.get(name, 0) + m.sum(0)  # (N, d)
            squares[name] = squares.get(name, 0) + m.pow(2).sum(0)
        drawn, unit = drawn + k, unit + 1
        if all(exact.values()):
            break
    out = {}
    for name in sums:
        mean = sums[name] / drawn  # (N, d)
        var = (squares[name] / drawn - mean.pow(2)).clamp_min(0) * drawn / max(drawn - 1, 1)
        mc_var = torch.zeros_like(mean) if exact[name] else var / drawn  # se² of each mean
        out[name] = PosteriorMean(mean, mc_var, exact[name], 1 if exact[name] else drawn)
    return out


def active_units(means: dict[str, PosteriorMean], threshold: float = ACTIVE_THRESHOLD) -> dict[str, dict]:
    """Per site: ``active`` (the number of units u with Cov_x(E_q[z_u|x]) > ``threshold``),
    ``dims``, ``variance`` (Cov_x of each unit, a list of d floats), ``mc_inflation`` (the
    largest E_x[se²] over units: the expected upward bias of a variance from the Monte Carlo
    mean; 0 when exact) and ``mc_samples`` (1 when exact). ``means`` over N ≥ 2 datapoints, from
    :func:`posterior_means` (blocks may be concatenated along N first)."""
    out = {}
    for name, pm in means.items():
        if pm.mean.shape[0] < 2:
            raise ValueError(f"active units need at least 2 datapoints, got {pm.mean.shape[0]}")
        variance = pm.mean.var(0)  # (d,): Cov_x diagonal, ddof = 1
        out[name] = {
            "active": int((variance > threshold).sum()),
            "dims": int(variance.numel()),
            "variance": [float(v) for v in variance],
            "mc_inflation": float(pm.mc_var.mean(0).max()) if pm.mc_var.numel() else 0.0,
            "mc_samples": pm.samples,
        }
    return out


def active_units_of(
    model, guide, x, num_samples: int = MEAN_SAMPLES, seed: int = 0, block_size: int = 100, **kwargs
) -> dict[str, dict]:
    """:func:`active_units` of ``guide`` over ``x`` (as :func:`posterior_means`), E_q[z|x] in blocks of
    ``block_size`` rows, block b with ``seed = derive_seed(seed, b)``: the numbers
    ``python -m ppl_vae.evaluate`` reports for the same ``--seed`` and ``--batch-size`` (e.g. for
    a run's ``summary.json``)."""
    blocks = [
        posterior_means(
            model,
            guide,
            inputs.select(x, slice(i, i + block_size)),
            num_samples,
            importance.derive_seed(seed, b),
            **kwargs,
        )
        for b, i in enumerate(range(0, inputs.num_datapoints(x), block_size))
    ]
    means = {
        name: PosteriorMean(
            torch.cat([m[name].mean for m in blocks]),
            torch.cat([m[name].mc_var for m in blocks]),
            all(m[name].exact for m in blocks),
            max(m[name].samples for m in blocks),
        )
        for name in blocks[0]
    }  # (N, d) per site
    return active_units(means)


def describe(units: dict[str, dict]) -> str:
    """``z 12 of 20`` per site, with the Monte Carlo draws where the mean is not exact."""
    parts = []
    for name, u in units.items():
        mc = (
            ""
            if u["mc_samples"] == 1
            else f" (Monte Carlo mean over {u['mc_samples']} draws, inflation ≤ {u['mc_inflation']:.1e})"
        )
        parts.append(f"{name} {u['active']} of {u['dims']}{mc}")
    return ", ".join(parts) if parts else "none (no latent site in the data plate)"
