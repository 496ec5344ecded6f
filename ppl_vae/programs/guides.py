r"""Posterior families q_φ(z | x) of the guide (``--guide``), built from an encoder's outputs.

An encoder (:class:`ppl_vae.programs.nets.Encoder`) emits ``(z_loc, z_logvar, *extra)``, each of
shape ``(..., z_dim)`` and ``extra (..., family.extra_outputs)``; a family turns them into
the distribution of the latent site, with batch shape ``(...)`` and event shape ``(z_dim,)``:

=============  ============================================================  ==================
name           q_φ(z | x)                                                    extra outputs
=============  ============================================================  ==================
``diagonal``   N(μ, diag σ²), σ = exp(½ log σ²)                               0
``full-rank``  N(μ, L Lᵀ): L lower triangular, diagonal σ, free entries       d(d−1)/2
               below it (Pyro's ``MultivariateNormal(loc, scale_tril=L)``)
``iaf``        z = f_T ∘ … ∘ f_1(z₀), z₀ ~ N(μ, diag σ²), each f_t an affine   ``context_dim``
               inverse-autoregressive transform conditioned on a context
               h(x) (Kingma et al. 2016)
=============  ============================================================  ==================

Every family is reparameterized (z = μ + σ·ε, then the flow), so gradients reach the encoder.
Each also has ``gaussian(...)``, its Gaussian part (the family itself, or the IAF's base
N(μ, diag σ²)): what a VampPrior uses as its components and :meth:`ppl_vae.programs.model.VAE.encode`
reports.

Initialisation: the full-rank family's off-diagonal outputs and the IAF's autoregressive
output layers start at zero (:attr:`zero_extra`, :meth:`InverseAutoregressiveFlow.__init__`),
so an untrained full-rank or IAF guide *is* the diagonal guide with the same μ and σ: the same
draws from the same seed and the same log q. What the richer family buys is then learned.

References: D. P. Kingma, T. Salimans, R. Jozefowicz, X. Chen, I. Sutskever, M. Welling,
"Improving variational inference with inverse autoregressive flow", NeurIPS 2016.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn

from ..core.errors import UserError


class DiagonalGaussian(nn.Module):
    """q(z|x) = N(μ, diag σ²) with σ = exp(½ log σ²) from the encoder's log-variance head."""

    name = "diagonal"
    full_covariance = False  # the model writes its Gaussians as Independent Normals
    zero_extra = False

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.extra_outputs = 0

    def forward(self, z_loc: torch.Tensor, z_logvar: torch.Tensor) -> dist.Distribution:
        return dist.Normal(z_loc, torch.exp(0.5 * z_logvar)).to_event(1)

    def gaussian(self, z_loc, z_logvar, *extra) -> dist.Distribution:
        return self.forward(z_loc, z_logvar)

    def loc_scale(self, z_loc, z_logvar, *extra) -> tuple[torch.Tensor, torch.Tensor]:
        """Marginal means and standard deviations of the Gaussian part, ``(..., z_dim)`` each."""
        return z_loc, torch.exp(0.5 * z_logvar)


class FullRankGaussian(nn.Module):
    r"""q(z|x) = N(μ, Σ), Σ = L Lᵀ with L lower triangular: diagonal σ = exp(½ log σ²) (the same
    head as the diagonal family, so L is a valid Cholesky factor), and the d(d−1)/2 entries below
    it read row by row from the encoder's extra outputs. The model writes its Gaussians as
    ``MultivariateNormal`` too, so that ``torch.distributions.kl_divergence`` has the closed form
    KL(q ‖ N(0, I)) = ½ (tr Σ + μᵀμ − d − log det Σ)."""

    name = "full-rank"
    full_covariance = True
    zero_extra = True  # start as the diagonal guide (L diagonal)

    def __init__(self, z_dim: int):
        super().__init__()
        self.z_dim = z_dim
        self.extra_outputs = z_dim * (z_dim - 1) // 2

    def scale_tril(self, z_logvar: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
        """L ``(..., z_dim, z_dim)``: σ on the diagonal, ``lower (..., d(d−1)/2)`` below it, row by
        row (the order of ``torch.distributions.utils.vec_to_tril_matrix(lower, diag=-1)``, which
        writes through a boolean mask: a host synchronization that breaks CUDA-graph capture;
        integer indices do not)."""
        rows, cols = torch.tril_indices(
            self.z_dim, self.z_dim, offset=-1, device=lower.device
        )  # [2, d(d−1)/2]
        strict = lower.new_zeros(*lower.shape[:-1], self.z_dim, self.z_dim)  # [..., d, d]
        strict[..., rows, cols] = lower
        return strict + torch.diag_embed(torch.exp(0.5 * z_logvar))

    def forward(self, z_loc, z_logvar, lower) -> dist.Distribution:
        return dist.MultivariateNormal(z_loc, scale_tril=self.scale_tril(z_logvar, lower))

    def gaussian(self, z_loc, z_logvar, lower) -> dist.Distribution:
        return self.forward(z_loc, z_logvar, lower)

    def loc_scale(self, z_loc, z_logvar, lower):
        """μ and the marginal standard deviations √Σ_ii = ‖L_i‖ (row norms), ``(..., z_dim)`` each."""
        return z_loc, self.scale_tril(z_logvar, lower).norm(dim=-1)


class InverseAutoregressiveFlow(nn.Module):
    r"""q(z|x): z₀ ~ N(μ, diag σ²), then ``steps`` transforms z_t = μ_t + exp(s_t) ⊙ z_{t−1}, where
    (μ_t, s_t) come from a MADE network of (z_{t−1}, h) whose i-th outputs see only the inputs
    before i in the step's order (Eq. 10 of Kingma et al. 2016; Pyro's
    ``ConditionalAffineAutoregressive``, log s clipped to [−5, 3]). log q(z|x) = log N(z₀; μ, σ²)
    − Σ_t Σ_i s_{t,i}: the Jacobian is triangular.

    * context h(x): the encoder's ``context_dim`` extra outputs (default z_dim);
    * orders: the identity on even steps, reversed on odd ones, as in the paper (Pyro's default
      is a random permutation);
    * each MADE network: two hidden layers of ``hidden`` units (default 4·z_dim; MADE needs at
      least z_dim), ReLU, output layer zero-initialised, so every transform starts as the identity
      (μ_t = 0, s_t = 0) and the untrained guide equals the diagonal guide.

    The transforms are submodules: their parameters are in ``vae.parameters()``."""

    name = "iaf"
    full_covariance = False
    zero_extra = False

    def __init__(self, z_dim: int, steps: int = 2, context_dim: int | None = None, hidden: int | None = None):
        super().__init__()
        if steps < 1:
            raise UserError(f"--flow-steps must be >= 1, got {steps}")
        if z_dim < 2:
            raise UserError(
                f"--guide iaf needs --z-dim >= 2 (an autoregressive flow on one dimension is affine), "
                f"got {z_dim}"
            )
        self.z_dim = z_dim
        self.extra_outputs = context_dim or z_dim
        hidden = hidden or 4 * z_dim
        order = torch.arange(z_dim)
        self.transforms = nn.ModuleList()
        for t in range(steps):
            made = ConditionalAutoRegressiveNN(
                z_dim,
                self.extra_outputs,
                [hidden, hidden],
                permutation=order if t % 2 == 0 else order.flip(0),
            )
            with torch.no_grad():  # identity at initialisation: μ_t = 0, log s_t = 0
                made.layers[-1].weight.zero_()
                made.layers[-1].bias.zero_()
            self.transforms.append(ConditionalAffineAutoregressive(made))

    def gaussian(self, z_loc, z_logvar, context=None) -> dist.Distribution:
        """The base N(μ, diag σ²) before the flow."""
        return dist.Normal(z_loc, torch.exp(0.5 * z_logvar)).to_event(1)

    def forward(self, z_loc, z_logvar, context) -> dist.Distribution:
        # context (..., context_dim) broadcasts against draws (K, ..., z_dim) inside the MADE network
        return dist.TransformedDistribution(
            self.gaussian(z_loc, z_logvar), [t.condition(context) for t in self.transforms]
        )

    def loc_scale(self, z_loc, z_logvar, context=None):
        """μ and σ of the base Gaussian (the flow's moments have no closed form)."""
        return z_loc, torch.exp(0.5 * z_logvar)


POSTERIORS = {"diagonal": DiagonalGaussian, "full-rank": FullRankGaussian, "iaf": InverseAutoregressiveFlow}


def make_posterior(name: str, z_dim: int, flow_steps: int = 2) -> nn.Module:
    """The posterior family called ``name`` (see :data:`POSTERIORS`) for a ``z_dim`` latent."""
    if name not in POSTERIORS:
        raise UserError(f"--guide must be one of {', '.join(POSTERIORS)}, got {name!r}")
    if name == "iaf":
        return InverseAutoregressiveFlow(z_dim, flow_steps)
    return POSTERIORS[name](z_dim)
