"""The VAE as a Pyro program: ``model`` = p(z) p_θ(x|z), ``guide`` = q_φ(z|x).

Conventions (the estimators in :mod:`ppl_vae.estimators` rely on them, and any other
Pyro model/guide pair that follows them can be evaluated the same way):

* ``model(x)`` and ``guide(x)`` take a batch ``x`` of shape ``(N, D)`` (flattened images);
* every sample site sits inside ``pyro.plate("data", size, subsample=..., dim=-1)``;
* the latent site is ``"z"``: prior Normal(0, I) with ``.to_event(1)``, guide
  Normal(μ_φ(x), σ_φ(x)) with σ = exp(½ log σ²) from a log-variance head, reparameterized
  (z = μ + σ·ε, ε ~ N(0, I)) so gradients reach the encoder;
* the observed site is ``"x"``; every site declares its event dims, so its ``log_prob`` has
  shape ``(N,)``, or ``(K, N)`` under an outer particle plate;
* minibatch scaling: ``size`` is the full dataset size and the batch is a subsample of it,
  so the plate scales every log-density by ``size / N``. The SVI loss is then an unbiased
  estimate of the full-data negative ELBO −Σ_i ELBO_i. Hand-written VAEs carry this
  bookkeeping by hand, often as a ``kld_weight = M / N_total``; that weight is right only on a
  term outside the data plate (a global KL), and on the per-datapoint KL it is a β-VAE with
  β = M/N (docs/math.md). Here both terms sit in the plate and keep their 1 : 1 ratio. We
  report numbers per datapoint, in nats (loss / size).
* β-VAE: ``beta`` scales both z sites (``poutine.scale``), so the objective is
  E_q[log p(x|z)] − β·KL(q(z|x) ‖ p(z)) for ``Trace_ELBO`` (KL by Monte Carlo) and
  ``TraceMeanField_ELBO`` (KL in closed form) alike.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .likelihoods import Likelihood, make_likelihood
from .nets import build_networks


def _kl_weight(beta):
    """β-VAE: scale the z sites of model and guide by β (nothing to do for a plain float 1)."""
    if isinstance(beta, (int, float)) and beta == 1:
        return nullcontext()
    return poutine.scale(scale=beta)


class VAE(nn.Module):
    """A VAE with a diagonal Gaussian guide and a pluggable likelihood.

    :param image_shape: ``(C, H, W)`` of one datapoint (D = C·H·W).
    :param z_dim: latent dimension.
    :param hidden: hidden layer widths of the MLP encoder (the decoder mirrors them).
    :param likelihood: a :class:`~ppl_vae.likelihoods.Likelihood` or its name.
    :param arch: ``"mlp"`` or ``"conv"``.
    """

    def __init__(self, image_shape: Sequence[int], z_dim: int = 20, hidden: Sequence[int] = (400,),
                 likelihood: Likelihood | str = "bernoulli", arch: str = "mlp", activation: str = "relu"):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.x_dim = 1
        for s in self.image_shape:
            self.x_dim *= s
        self.z_dim = int(z_dim)
        self.likelihood = make_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        self.encoder, self.decoder = build_networks(
            arch, self.image_shape, self.z_dim, hidden, self.likelihood.params_per_pixel * self.x_dim,
            activation)
        # Prior parameters as buffers: created once on the module's device, no host copies per step.
        self.register_buffer("prior_loc", torch.zeros(self.z_dim))
        self.register_buffer("prior_scale", torch.ones(self.z_dim))
        self._aranges: dict = {}

    def _subsample(self, n: int, device) -> torch.Tensor:
        """Indices ``0..n-1`` on ``device``, cached: the batch *is* the subsample, the plate only
        needs their number to scale by size/n (and drawing them itself would sync with the host)."""
        key = (n, str(device))
        idx = self._aranges.get(key)
        if idx is None:
            idx = self._aranges[key] = torch.arange(n, device=device)
        return idx

    #: Register the networks in Pyro's param store at every call (``pyro.module``), as SVI with a
    #: ``pyro.optim`` optimizer needs. ppl_vae's Trainer optimizes ``vae.parameters()`` with one
    #: torch optimizer and switches this off: it is per-step bookkeeping it does not use.
    register_params = True

    def model(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """p(z) p_θ(x|z) for a batch ``x (N, D)`` out of ``size`` datapoints (default N)."""
        if self.register_params:
            pyro.module("decoder", self.decoder)
        n = x.shape[0]
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            with _kl_weight(beta):
                z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))  # (N, z_dim)
            out = self.decoder(z)  # (..., N, out_dim); (K, N, out_dim) under a particle plate
            return pyro.sample("x", self.likelihood.dist(out), obs=x)

    def guide(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """q_φ(z|x) = Normal(μ_φ(x), exp(½ log σ²_φ(x))), reparameterized."""
        if self.register_params:
            pyro.module("encoder", self.encoder)
        n = x.shape[0]
        z_loc, z_logvar = self.encoder(x)  # (N, z_dim) each
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            with _kl_weight(beta):
                return pyro.sample("z", dist.Normal(z_loc, torch.exp(0.5 * z_logvar)).to_event(1))

    # ---- plain tensor helpers (no Pyro machinery) for plots and examples ----

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_loc, z_scale)`` of q(z|x), each ``(N, z_dim)``."""
        z_loc, z_logvar = self.encoder(x)
        return z_loc, torch.exp(0.5 * z_logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] ``(..., D)`` for latents ``(..., z_dim)``."""
        return self.likelihood.mean(self.decoder(z))

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """E[x|z = μ_φ(x)], ``(N, D)``."""
        return self.decode(self.encode(x)[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Decoded means of ``n`` draws z ~ N(0, I): ``(n, D)``."""
        z = torch.randn(n, self.z_dim, generator=generator, device=self.prior_loc.device)
        return self.decode(z)
