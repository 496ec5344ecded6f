r"""Pareto-smoothed importance sampling diagnostics of the IWAE weights, through ArviZ.

For each datapoint, the K importance weights w_k = p(x, z_k) / q(z_k | x) (:mod:`ppl_vae.inference.importance`)
are fitted with a generalized Pareto distribution in their upper tail (``arviz.psislw``,
Vehtari et al. 2024 [1]). Its shape k̂ estimates how heavy the tail is: the weights have
finite variance for k < 1/2, and, at sample size K, the Pareto-smoothed estimate is reliable
for k̂ below :func:`khat_threshold` (K) = min(1 − 1/log10 K, 0.7). Above it, IWAE_K is still a
lower bound on log p(x) in expectation, but neither its value nor its delta-method standard
error can be trusted.

[1] Vehtari, Simpson, Gelman, Yao, Gabry (2024), *Pareto smoothed importance sampling*,
    JMLR 25(72):1–58 (the sample-size dependent threshold; ArviZ's ``loo`` uses it as ``good_k``).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .importance import log_importance_weights
from .inputs import check_num_samples

PSIS_MIN_SAMPLES = 21  # ArviZ's Pareto tail, ceil(min(0.2 K, 3 √K)), needs more than 4 weights


def khat_threshold(num_samples: int) -> float:
    """min(1 − 1/log10 K, 0.7): the largest k̂ for which the Pareto-smoothed estimate from K
    draws is reliable (Vehtari et al. 2024 [1]; ArviZ computes the same ``good_k`` inside ``loo``).
    K = 100 → 0.5, K = 1000 → 2/3, K ≥ 10^(10/3) ≈ 2154 → 0.7. NaN for K < :data:`PSIS_MIN_SAMPLES`,
    where k̂ itself is not computed."""
    check_num_samples(num_samples)
    if num_samples < PSIS_MIN_SAMPLES:
        return math.nan
    return min(1.0 - 1.0 / math.log10(num_samples), 0.7)


def psis_diagnostics(
    model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None, **kwargs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto k̂ ``(N,)`` and PSIS effective sample size ``(N,)`` of the K importance weights of
    each datapoint (arguments as :func:`ppl_vae.inference.importance.log_importance_weights`). k̂ above
    ``khat_threshold(num_samples)`` flags a datapoint whose IWAE estimate is unreliable."""
    with torch.no_grad():
        lw = log_importance_weights(
            model, guide, x, num_samples, seed=seed, chunk_size=chunk_size, **kwargs
        )  # (K, N)
    return psis_from_log_weights(lw)


def psis_from_log_weights(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto k̂ ``(N,)`` and PSIS effective sample size ``(N,)`` (float64) of log-weights
    ``(K, N)``. ESS = 1 / Σ_k w̃_k² with w̃ the normalized Pareto-smoothed weights.

    k̂ needs K ≥ :data:`PSIS_MIN_SAMPLES` (a tail of at least 5 weights): below that it is NaN
    and the ESS uses the raw weights. Tied weights (all K equal to within 64 float eps of the
    input's dtype, relative: e.g. the exact posterior as guide) have no tail to fit; ArviZ
    returns k̂ = inf or a meaningless negative value for them, so their k̂ is −inf ("n/a: tied",
    an exact estimate) and their ESS is K. k̂ = inf where ArviZ could not fit a real tail."""
    if log_w.shape[0] < PSIS_MIN_SAMPLES:
        w = torch.softmax(log_w.detach().double(), 0)  # (K, N) normalized raw weights
        return torch.full((log_w.shape[1],), math.nan, dtype=torch.float64), (1.0 / w.pow(2).sum(0)).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz  # here, not at the top: importing it takes seconds

        arr = log_w.detach().double().T.cpu().numpy().copy()  # (N, K): arviz wants samples last
        smoothed, khat = arviz.psislw(arr, reff=1.0)  # reff = 1: the draws are independent
    w = np.exp(smoothed)  # normalized: rows sum to 1
    ess = 1.0 / (w**2).sum(-1)
    khat = np.array(khat, dtype=np.float64).reshape(-1)  # (N,)
    lw = log_w.detach()
    spread = lw.max(0).values - lw.min(0).values  # (N,)
    tied = (spread <= 64 * torch.finfo(lw.dtype).eps * lw.abs().max(0).values.clamp_min(1)).cpu().numpy()
    khat[tied], ess[tied] = -math.inf, log_w.shape[0]
    return torch.as_tensor(khat), torch.as_tensor(ess, dtype=torch.float64)
