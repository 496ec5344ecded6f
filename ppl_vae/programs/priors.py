r"""Priors p(z) of the top latent (``--prior``) and the Gaussian layer p(z1 | z2) of a hierarchy.

A prior is a module whose call returns the distribution of the top latent site: batch shape
``()`` (the model's data plate expands it to ``(N,)``, or ``(K, N)`` under a particle plate)
and event shape ``(z_dim,)``. It is the site's distribution, not a term of a loss, so every
estimator scores it like any other site.

=============  ===================================================================  ===========
name           p(z)                                                                 learned
=============  ===================================================================  ===========
``normal``     N(0, I) (:meth:`ppl_vae.programs.model.VAE.standard_normal`)                   nothing
``mog``        Σ_m π_m N(z; μ_m, diag σ_m²), M components                            π, μ_m, σ_m
``vampprior``  (1/K) Σ_k q_φ(z | u_k), K pseudo-inputs u_k (Tomczak & Welling 2018)  u_k (and φ)
=============  ===================================================================  ===========

Both mixtures are Pyro's ``MixtureSameFamily(Categorical(logits), components)``, whose
``log_prob`` is log Σ_m π_m p_m(z) by ``logsumexp``. With diagonal Gaussian components (a
diagonal guide's VampPrior, the MoG) it is :class:`DiagonalNormalMixture`, which scores z
``(..., d)`` by two matrix products instead of the ``(..., M, d)`` tensor of component terms.

References: J. M. Tomczak, M. Welling, "VAE with a VampPrior", AISTATS 2018.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn

from .nets import Encoder, mlp

# Pseudo-inputs at initialisation: N(0.05, 0.01²) per pixel, the setting of Tomczak & Welling's
# MNIST code (their ``pseudoinputs_mean``/``pseudoinputs_std``), clamped to the data's support.
PSEUDO_INPUT_MEAN, PSEUDO_INPUT_STD = 0.05, 0.01


class DiagonalNormalMixture(dist.MixtureSameFamily):
    r"""``MixtureSameFamily`` of M diagonal Gaussians ``Normal(loc (M, d), scale (M, d)).to_event(1)``
    with a faster, equal ``log_prob``: expanding the square,

        Σ_d (z_d − μ_md)² / σ_md² = z² · (1/σ_m²) − 2 z · (μ_m/σ_m²) + Σ_d μ_md²/σ_md²,

    two matrix products ``(..., d) × (d, M)`` give every component's log-density ``(..., M)``;
    ``MixtureSameFamily.log_prob`` builds the ``(..., M, d)`` tensor of elementwise terms
    instead. Measured on 2 CPU cores, VampPrior with K = 500, d = 40, batch 250: the training
    step took 5.4x the normal-prior step with ``MixtureSameFamily``'s log_prob (docs/models.md).
    The expansion loses float32 digits when |z| ≫ σ: tests/test_priors.py bounds the error
    against the float64 ``MixtureSameFamily`` value at 2e-3 nats for realistic scales.
    Sampling, mean and variance are ``MixtureSameFamily``'s."""

    def expand(self, batch_shape, _instance=None):
        new = super().expand(batch_shape, _instance)
        new._params = self._mixture_params()  # the (M, d) tensors, not the plate's stride-0 views
        return new

    def _mixture_params(self):
        """``logits (M,)``, ``loc (M, d)``, ``scale (M, d)`` of the unexpanded mixture."""
        if hasattr(self, "_params"):
            return self._params
        comp = self.component_distribution.base_dist
        return self.mixture_distribution.logits, comp.loc, comp.scale

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        logits, loc, scale = self._mixture_params()  # (M,), (M, d), (M, d)
        prec = scale.pow(-2)  # (M, d)
        quad = (
            value.pow(2) @ prec.T - 2 * value @ (loc * prec).T + (loc.pow(2) * prec).sum(-1)
        )  # (..., M): Σ_d (z − μ_m)² / σ_m²
        log_norm = scale.log().sum(-1) + 0.5 * loc.shape[-1] * math.log(2 * math.pi)  # (M,)
        log_mix = torch.log_softmax(logits, -1)  # (M,)
        return torch.logsumexp(log_mix - log_norm - 0.5 * quad, -1)  # (...,)


def mixture(logits: torch.Tensor, components: dist.Distribution) -> dist.MixtureSameFamily:
    """The mixture Σ_m softmax(logits)_m p_m: a :class:`DiagonalNormalMixture` when the
    components are diagonal Gaussians, else Pyro's ``MixtureSameFamily``."""
    diagonal = (
        isinstance(components, dist.Independent)
        and components.reinterpreted_batch_ndims == 1
        and isinstance(components.base_dist, torch.distributions.Normal)
        and len(components.batch_shape) == 1
    )
    return (DiagonalNormalMixture if diagonal else dist.MixtureSameFamily)(
        dist.Categorical(logits=logits), components
    )


class MixturePrior(nn.Module):
    r"""p(z) = Σ_m π_m N(z; μ_m, diag σ_m²), π = softmax(logits), σ_m = exp(log σ_m), all learned.

    Initialisation: π uniform, σ_m = 1, μ_m ~ N(0, I) (distinct means break the symmetry
    between components; drawn from the global torch RNG, like the networks' weights)."""

    def __init__(self, z_dim: int, components: int = 10):
        super().__init__()
        if components < 1:
            raise ValueError(f"--mixture-components must be >= 1, got {components}")
        self.logits = nn.Parameter(torch.zeros(components))  # (M,)
        self.locs = nn.Parameter(torch.randn(components, z_dim))  # (M, d)
        self.log_scales = nn.Parameter(torch.zeros(components, z_dim))  # (M, d)

    def forward(self) -> dist.Distribution:
        return mixture(self.logits, dist.Normal(self.locs, self.log_scales.exp()).to_event(1))


class VampPrior(nn.Module):
    r"""p(z) = (1/K) Σ_k q_φ(z | u_k): the guide's Gaussian at K learned pseudo-inputs u_k.

    ``components(u)`` maps pseudo-inputs ``(K, D [+ C])`` to the guide's Gaussian with batch
    shape ``(K,)`` (the model passes its encoder; see :meth:`ppl_vae.programs.model.VAE.pseudo_posterior`
    for IAF guides and hierarchies), so the prior is learned through u and shares φ with the
    guide. The mixture weights are fixed at 1/K, as in the paper.

    Pseudo-inputs: the parameter ``pseudo_inputs (K, D)`` starts at N(0.05, 0.01²) per pixel and
    u = hardtanh(parameter) clamps it to the data's support ``[low, high]`` when both bounds are
    finite ([0, 1] for Bernoulli data), as the paper's code does; unbounded data are not clamped.
    Why not random training images (the paper's other option): the model is then built without
    the data, and a checkpoint loads without them. A conditional program pairs u_k with the fixed
    label k mod C (one-hot), K/C pseudo-inputs per class."""

    def __init__(
        self,
        num_pseudo: int,
        x_dim: int,
        components: Callable[[torch.Tensor], dist.Distribution],
        support: Sequence[float] = (0.0, 1.0),
        num_classes: int = 0,
    ):
        super().__init__()
        if num_pseudo < 1:
            raise ValueError(f"--pseudo-inputs must be >= 1, got {num_pseudo}")
        self.pseudo_inputs = nn.Parameter(
            torch.empty(num_pseudo, x_dim).normal_(PSEUDO_INPUT_MEAN, PSEUDO_INPUT_STD)
        )
        low, high = support
        self.bounds = (float(low), float(high)) if math.isfinite(low) and math.isfinite(high) else None
        self.register_buffer("mixture_logits", torch.zeros(num_pseudo), persistent=False)  # (K,): weights 1/K
        labels = None
        if num_classes:
            labels = F.one_hot(torch.arange(num_pseudo) % num_classes, num_classes).to(
                torch.get_default_dtype()
            )
        self.register_buffer("pseudo_labels", labels, persistent=False)  # (K, C) or None
        self.components = components

    def inputs(self) -> torch.Tensor:
        """The pseudo-inputs u ``(K, D)``, clamped to the support, with their labels ``(K, D + C)``."""
        u = self.pseudo_inputs if self.bounds is None else F.hardtanh(self.pseudo_inputs, *self.bounds)
        return u if self.pseudo_labels is None else torch.cat([u, self.pseudo_labels], -1)

    def forward(self) -> dist.Distribution:
        return mixture(self.mixture_logits, self.components(self.inputs()))


class GaussianLayer(nn.Module):
    r"""p(z_below | z_above) = N(μ_θ(z_above), diag σ_θ(z_above)²), from an MLP
    ``z_above (..., d_above) → (μ, log σ²) (..., d_below)``: the middle layer of a hierarchy.
    With ``full_covariance`` it is written as a ``MultivariateNormal`` with a diagonal
    ``scale_tril`` (the same density), so a full-rank guide has a closed-form KL to it."""

    def __init__(
        self,
        above: int,
        below: int,
        hidden: Sequence[int],
        activation: str = "relu",
        full_covariance: bool = False,
    ):
        super().__init__()
        self.net = Encoder(mlp([above, *hidden, 2 * below], activation), below)
        self.full_covariance = full_covariance

    def forward(self, z_above: torch.Tensor) -> dist.Distribution:
        loc, logvar = self.net(z_above)  # (..., d_below) each
        scale = torch.exp(0.5 * logvar)
        if self.full_covariance:
            return dist.MultivariateNormal(loc, scale_tril=torch.diag_embed(scale))  # (..., d, d)
        return dist.Normal(loc, scale).to_event(1)


PRIORS = ("normal", "mog", "vampprior")


def draw(
    d: dist.Distribution, generator: torch.Generator | None = None, n: int | None = None
) -> torch.Tensor:
    """A reparameterized draw from a Gaussian ``d`` (Normal ``.to_event(1)`` or MultivariateNormal)
    or from a ``MixtureSameFamily`` of them with batch shape ``()``, with its random numbers from
    ``generator`` (drawn on its device, the global RNG untouched): shape ``(n, *batch, d)``, or
    ``(*batch, d)`` without ``n``. Used to sample images, not in any objective."""
    device = generator.device if generator is not None else d.mean.device
    if isinstance(d, torch.distributions.MixtureSameFamily):  # pick a component per draw, then draw it
        probs = d.mixture_distribution.probs.to(device)  # (M,)
        k = torch.multinomial(probs, n, replacement=True, generator=generator)  # (n,)
        z = draw(d.component_distribution, generator, n)  # (n, M, d): a draw of every component
        return z[torch.arange(n, device=z.device), k.to(z.device)]  # (n, d)
    shape = ((n,) if n is not None else ()) + d.batch_shape + d.event_shape
    eps = torch.randn(shape, generator=generator, device=device, dtype=d.mean.dtype).to(d.mean.device)
    if isinstance(d, torch.distributions.MultivariateNormal):
        return d.loc + (d.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)  # μ + L ε
    return d.base_dist.loc + d.base_dist.scale * eps  # μ + σ ε
