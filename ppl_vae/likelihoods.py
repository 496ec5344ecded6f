"""Observation models p_θ(x|z) for flattened images ``x`` of shape ``(N, D)``.

A likelihood turns the decoder output ``(..., out_dim)`` into a Pyro distribution whose
batch shape is ``(...)`` and whose event shape is ``(D,)`` (pixels are conditionally
independent given z, hence ``.to_event(1)``), so ``log_prob(x)`` is one number per datapoint.

=======================  =====================================================  ============
name                     density per pixel                                     data
=======================  =====================================================  ============
``bernoulli``            Bernoulli(σ(logit)); log p = −BCE(logit, x)            0/1 only
``gaussian``             Normal(μ, σ) with fixed σ (``--sigma``, default 1):     any real
                         log p = −½(x−μ)²/σ² − log σ − ½ log 2π (σ=1: −½ MSE)
``gaussian-learned``     Normal(μ, σ_θ(z)), σ = floor + softplus(raw)          any real
``continuous-bernoulli`` ContinuousBernoulli(λ) [Loaiza-Ganem & Cunningham      [0, 1]
                         2019], a proper density on [0, 1]
=======================  =====================================================  ============

Adding a likelihood is one small subclass of :class:`Likelihood` registered in
:data:`LIKELIHOODS`.

.. warning:: A learned σ without a floor is unstable: on pixels that are always 0 (MNIST
   borders) the maximum-likelihood σ is 0 and the density → ∞, so the ELBO diverges. The
   floor (``--sigma-floor``, default 0.01 for data in [0, 1]) bounds it.
"""
from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F


class Likelihood:
    """Base class. ``params_per_pixel`` decoder outputs per pixel; ``binary_data`` means the
    density is only valid for 0/1 data; ``support`` is the closed interval data must lie in."""

    name = "base"
    params_per_pixel = 1
    binary_data = False
    support = (-math.inf, math.inf)

    def dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z) with batch shape ``out.shape[:-1]`` and event shape ``(D,)``."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x|z], ``(..., D)``: what reconstructions and samples show."""
        raise NotImplementedError

    def config(self) -> dict:
        return {"likelihood": self.name}


class Bernoulli(Likelihood):
    """Bernoulli(logits): log p(x|z) = Σ_d x_d·l_d − softplus(l_d) = −BCE-with-logits summed."""

    name = "bernoulli"
    binary_data = True
    support = (0.0, 1.0)

    def dist(self, out):
        return dist.Bernoulli(logits=out, validate_args=False).to_event(1)

    def mean(self, out):
        return torch.sigmoid(out)


class Gaussian(Likelihood):
    """Normal(μ, σ) with a fixed σ: with σ = 1 this is −½‖x−μ‖² − (D/2) log 2π, i.e. the MSE
    loss up to a factor ½ and a constant (which we keep, so log p(x) stays a density)."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        if not sigma > 0:
            raise ValueError(f"--sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)

    def dist(self, out):
        scale = out.new_full((), self.sigma)  # filled on the device: no host-to-device copy per step
        return dist.Normal(out, scale, validate_args=False).to_event(1)

    def mean(self, out):
        return out

    def config(self):
        return {"likelihood": self.name, "sigma": self.sigma}


class GaussianLearned(Likelihood):
    """Normal(μ_θ(z), σ_θ(z)) with a per-pixel σ from the decoder: σ = floor + softplus(raw)."""

    name = "gaussian-learned"
    params_per_pixel = 2

    def __init__(self, sigma_floor: float = 0.01):
        if not sigma_floor >= 0:
            raise ValueError(f"--sigma-floor must be >= 0, got {sigma_floor}")
        self.sigma_floor = float(sigma_floor)

    def split(self, out):
        loc, raw = out.chunk(2, dim=-1)  # (..., D) each
        return loc, self.sigma_floor + F.softplus(raw)

    def dist(self, out):
        loc, scale = self.split(out)
        return dist.Normal(loc, scale, validate_args=False).to_event(1)

    def mean(self, out):
        return self.split(out)[0]

    def config(self):
        return {"likelihood": self.name, "sigma_floor": self.sigma_floor}


class ContinuousBernoulli(Likelihood):
    """ContinuousBernoulli(logits): the normalized Bernoulli for x ∈ [0, 1]. Its mean is not
    σ(logit), so reconstructions show the distribution's true mean."""

    name = "continuous-bernoulli"
    support = (0.0, 1.0)

    def dist(self, out):
        return dist.ContinuousBernoulli(logits=out, validate_args=False).to_event(1)

    def mean(self, out):
        return torch.distributions.ContinuousBernoulli(logits=out, validate_args=False).mean


LIKELIHOODS = {cls.name: cls for cls in (Bernoulli, Gaussian, GaussianLearned, ContinuousBernoulli)}


def make_likelihood(name: str, sigma: float = 1.0, sigma_floor: float = 0.01) -> Likelihood:
    """The likelihood called ``name`` (see :data:`LIKELIHOODS`)."""
    if name == "gaussian":
        return Gaussian(sigma)
    if name == "gaussian-learned":
        return GaussianLearned(sigma_floor)
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
