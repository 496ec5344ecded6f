"""Validation during training: the held-out bound that selects ``best.pt`` and stops early,
the ELBO's two terms per epoch, and how the final model uses its latent layers (active units,
each layer's KL, posterior collapse).

The numbers are the estimators' (:mod:`ppl_vae.inference.estimators`), computed with fixed draws
(:data:`VALID_SEED`) so that epochs compare fairly, in fixed blocks of datapoints so that a
distributed run gives exactly the single-process value.
"""

from __future__ import annotations

import torch

from ..core import distributed
from ..inference import estimators
from ..inference.inputs import num_datapoints, select, take
from ..inference.replay import as_args
from ..reports import collapse, latents

VALID_SEED = 271828  # validation draws are the same every epoch, so epochs compare fairly
ACTIVE_UNITS_N = 2000  # validation images (at most) for the active units of summary.json
ACTIVE_UNITS_SAMPLES = 100  # guide draws per E_q[z|x] where it needs Monte Carlo (IAF, lower layers)


@torch.no_grad()
def bound_on(
    vae,
    x: torch.Tensor,
    kind: str = "elbo",
    k: int = 1,
    batch: int | None = None,
    seed: int = VALID_SEED,
    ctx: distributed.Context | None = None,
) -> float:
    """Mean bound over ``x (N, D)`` (or a tuple ``(x, y)`` of per-datapoint arguments) in nats per
    datapoint: the ELBO (``kind="elbo"``; KL in closed form at every site that has a valid one,
    Monte Carlo at the others, e.g. a VampPrior or an IAF guide: ``analytic_kl="auto"``) or IWAE_k
    (``kind="iwae"``), with fixed draws (``seed``) per block of ``batch`` rows
    (default: 10,000 for the ELBO, 100,000 / k for IWAE_k).
    Distributed (``ctx``): rank r computes blocks r, r+P, ...; the block sums are gathered and
    added in block order, so every rank returns the single-process value exactly."""
    batch = batch or (max(1, 100_000 // k) if kind == "iwae" else 10_000)
    if kind == "elbo":

        def block(xb, i):
            return {
                "b": estimators.elbo(
                    vae.model, vae.guide, xb, num_samples=k, analytic_kl="auto", seed=seed + i
                ).value
            }
    else:

        def block(xb, i):
            return {"b": estimators.iwae(vae.model, vae.guide, xb, k, seed=seed + i).value}

    return _block_means(x, batch, ctx, block)["b"]


@torch.no_grad()
def elbo_terms_on(
    vae, x: torch.Tensor, batch: int = 10_000, seed: int = VALID_SEED, ctx: distributed.Context | None = None
) -> dict[str, float]:
    """The validation ELBO of :func:`bound_on` (the same draws, the same value) and its two
    terms from the same pass (:func:`ppl_vae.inference.estimators.elbo_terms`, ``analytic_kl="auto"``),
    nats per datapoint: ``valid_elbo``, ``valid_recon`` = E_q[log p(x|z)] and ``valid_kl`` =
    ``valid_recon − valid_elbo`` (closed-form KL where valid, Monte Carlo elsewhere)."""

    def block(xb, i):
        t = estimators.elbo_terms(vae.model, vae.guide, xb, num_samples=1, analytic_kl="auto", seed=seed + i)
        return {"valid_elbo": t["elbo"].value, "valid_recon": t["recon"].value}

    out = _block_means(x, batch, ctx, block)
    return {**out, "valid_kl": out["valid_recon"] - out["valid_elbo"]}


def row_terms(judged, x, cfg, ctx: distributed.Context | None = None) -> dict[str, float]:
    """The validation terms of an epoch's metrics row for the parameters a run is judged by
    (put in eval mode): :func:`elbo_terms_on`'s three and, for an IWAE run, ``valid_iwae_k``,
    the bound it selects on (``runs.selection_bound``). ``--init-from`` scores its start so too."""
    judged.eval()
    valid = elbo_terms_on(judged, x, ctx=ctx)
    if cfg.elbo == "iwae":
        valid["valid_iwae_k"] = bound_on(judged, x, "iwae", cfg.num_particles, ctx=ctx)
    return valid


def _block_means(x, batch: int, ctx, block) -> dict[str, float]:
    """Means over the datapoints of ``x`` of each per-datapoint number ``block(x_b, i)`` returns
    (``{name: (n_b,)}`` on rows ``i:i + batch``), summed block by block in block order. Distributed:
    rank r computes blocks r, r+P, ... and the block sums are gathered, so every rank gets the
    single-process value exactly."""
    args = as_args(x)
    n = args[0].shape[0]
    starts = range(0, n, batch)
    sums = {}
    for i in starts if ctx is None else distributed.strided(starts, ctx):
        values = block(take(args, i, i + batch), i)
        sums[i] = dict(zip(values, torch.stack([v.sum() for v in values.values()]).tolist()))  # one host sync
    if ctx is not None and ctx.enabled:
        sums = {i: v for part in distributed.all_gather_objects(sums, ctx) for i, v in part.items()}
    totals = {}
    for i in starts:
        for name, v in sums[i].items():
            totals[name] = totals.get(name, 0.0) + v
    return {name: v / n for name, v in totals.items()}


def latent_use_on(
    vae,
    x,
    max_n: int = ACTIVE_UNITS_N,
    num_samples: int = ACTIVE_UNITS_SAMPLES,
    seed: int = VALID_SEED,
    kl_warmup: float | None = None,
) -> dict:
    """How the final model uses its latent layers, on at most ``max_n`` datapoints of ``x`` (a
    tensor or ``(x, y)``, a subset drawn with ``seed``), as the keys of ``summary.json``: the
    active units (:func:`ppl_vae.reports.latents.active_units_of`; E_q[z|x] by ``num_samples`` draws where
    it needs Monte Carlo) ``active_units`` {site: count}, ``active_units_of`` {site: dims},
    ``active_units_n`` (datapoints) and ``active_units_samples``; each layer's KL
    (:func:`ppl_vae.reports.collapse.kl_per_site`) ``kl_per_site`` {site: nats per datapoint}; and
    ``collapse``, the lines of :func:`ppl_vae.reports.collapse.warnings_for` (empty: every layer in use;
    ``kl_warmup``: the run's, for their remedies). ``{}`` for fewer than 2 datapoints."""
    n = num_datapoints(x)
    if n < 2:
        return {}
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_n].sort().values
    sub = select(x, idx.to(as_args(x)[0].device))  # (≤ max_n, ...)
    units = latents.active_units_of(vae.model, vae.guide, sub, num_samples, seed=seed, block_size=500)
    kl = collapse.kl_per_site(vae.model, vae.guide, sub, seed=seed)
    return {
        "active_units": {s: u["active"] for s, u in units.items()},
        "active_units_of": {s: u["dims"] for s, u in units.items()},
        "active_units_n": min(n, max_n),
        "active_units_samples": num_samples,
        "kl_per_site": kl,
        "collapse": collapse.warnings_for(kl, units, getattr(vae.likelihood, "name", None), kl_warmup),
    }


def objective_name(cfg, first_beta: float) -> str:
    """What ``train_objective`` holds for an epoch whose first step has β = ``first_beta``:
    ``elbo`` or ``iwae-K``, prefixed ``beta-`` where β ≠ 1 at some step (a β-VAE, or KL warm-up)."""
    name = f"iwae-{cfg.num_particles}" if cfg.elbo == "iwae" else "elbo"
    return name if cfg.beta == 1 and first_beta == 1 else f"beta-{name}"
