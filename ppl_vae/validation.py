"""Validation during training: the held-out bound that selects ``best.pt`` and stops early.

The numbers are the estimators' (:mod:`ppl_vae.estimators`), computed with fixed draws
(:data:`VALID_SEED`) so that epochs compare fairly, in fixed blocks of datapoints so that a
distributed run gives exactly the single-process value.
"""
from __future__ import annotations

import torch

from . import distributed, estimators
from .checks import as_args, take

VALID_SEED = 271828  # validation draws are the same every epoch, so epochs compare fairly


@torch.no_grad()
def bound_on(vae, x: torch.Tensor, kind: str = "elbo", k: int = 1, batch: int | None = None,
             seed: int = VALID_SEED, ctx: distributed.Context | None = None) -> float:
    """Mean bound over ``x (N, D)`` (or a tuple ``(x, y)`` of per-datapoint arguments) in nats per
    datapoint: the ELBO (``kind="elbo"``; KL in closed form at every site that has a valid one,
    Monte Carlo at the others, e.g. a VampPrior or an IAF guide: ``analytic_kl="auto"``) or IWAE_k
    (``kind="iwae"``), with fixed draws (``seed``) per block of ``batch`` rows
    (default: 10,000 for the ELBO, 100,000 / k for IWAE_k).
    Distributed (``ctx``): rank r computes blocks r, r+P, ...; the block sums are gathered and
    added in block order, so every rank returns the single-process value exactly."""
    args = as_args(x)
    n = args[0].shape[0]
    batch = batch or (max(1, 100_000 // k) if kind == "iwae" else 10_000)
    starts = range(0, n, batch)
    sums = {}
    for i in starts if ctx is None else distributed.strided(starts, ctx):
        xb = take(args, i, i + batch)
        if kind == "elbo":
            est = estimators.elbo(vae.model, vae.guide, xb, num_samples=k, analytic_kl="auto", seed=seed + i)
        else:
            est = estimators.iwae(vae.model, vae.guide, xb, k, seed=seed + i)
        sums[i] = est.value.sum().item()
    if ctx is not None and ctx.enabled:
        sums = {i: v for part in distributed.all_gather_objects(sums, ctx) for i, v in part.items()}
    total = 0.0
    for i in starts:
        total += sums[i]
    return total / n


def objective_name(cfg, first_beta: float) -> str:
    """What ``train_objective`` holds for an epoch whose first step has β = ``first_beta``:
    ``iwae-K``, ``beta-elbo`` (β ≠ 1 at some step: a β-VAE or KL warm-up), or ``elbo``."""
    if cfg.elbo == "iwae":
        return f"iwae-{cfg.num_particles}"
    return "elbo" if cfg.beta == 1 and first_beta == 1 else "beta-elbo"
