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
``discretized-logistic`` Logistic(μ, s) integrated over 256 bins of [0, 1], the   8-bit
                         edge bins taking the tails (PixelCNN++, IAF, VampPrior)  levels
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
from torch.autograd.function import once_differentiable
from torch.distributions import constraints


class Likelihood:
    """Base class. ``params_per_pixel`` decoder outputs per pixel; ``binary_data`` means the
    density is only valid for 0/1 data; ``discrete`` that log p(x|z) is a probability of discrete
    data (so bits/dim mean something); ``support`` is the closed interval data must lie in."""

    name = "base"
    params_per_pixel = 1
    binary_data = False
    discrete = False
    support = (-math.inf, math.inf)

    def dist(self, out: torch.Tensor) -> dist.TorchDistribution:
        """p(x|z) with batch shape ``out.shape[:-1]`` and event shape ``(D,)``."""
        raise NotImplementedError

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        """E[x|z], ``(..., D)``: what reconstructions and samples show."""
        raise NotImplementedError

    def config(self) -> dict:
        return {"likelihood": self.name}


class _BernoulliLogProb(torch.autograd.Function):
    """log Bernoulli(x | logits l) per element, x·l − softplus(l), with softplus(l) computed as
    max(l, 0) + log(1 + exp(−|l|)); gradients x − σ(l) (w.r.t. l) and l (w.r.t. x).

    Why not ``-F.binary_cross_entropy_with_logits(l, x, reduction="none")``, which Pyro's
    Bernoulli calls: on a CPU, PyTorch evaluates its log1p / log-sigmoid with scalar code, an order
    of magnitude slower than ``log`` (measured in docs/benchmarks.md, "What made (a) fast"). Here
    every op is a vectorized one, and the backward pass is one sigmoid. log(1 + e) instead of log1p(e) with
    e = exp(−|l|) ≤ 1 costs at most half an ulp of 1 per pixel (6e-8 nats in float32)."""

    @staticmethod
    def forward(ctx, logits, value):
        ctx.save_for_backward(logits, value)
        # exp(−min(|l|, 40)): 1 + exp(−40) is 1 in float32 and float64 alike, and the clamp keeps exp
        # out of denormal numbers (|l| > 87), which x86 CPUs compute about 10× slower
        e = logits.abs().neg_().clamp_min_(-40.0).exp_()  # (..., D)
        softplus = e.add_(1).log_().add_(logits.clamp_min(0))  # (..., D)
        return torch.addcmul(softplus.neg_(), value, logits)  # x·l − softplus(l), broadcast (..., D)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        logits, value = ctx.saved_tensors
        # sum_to_size: summed over the dims broadcasting added (e.g. K particles of one x)
        d_logits = (
            torch.sigmoid(logits).neg_().add_(value).mul_(grad).sum_to_size(logits.shape)
            if ctx.needs_input_grad[0]
            else None
        )
        d_value = (logits * grad).sum_to_size(value.shape) if ctx.needs_input_grad[1] else None
        return d_logits, d_value


class FastBernoulli(dist.Bernoulli):
    """Pyro's Bernoulli with the log-density of :class:`_BernoulliLogProb` (same values and
    gradients to float32 rounding; tested against binary cross-entropy).

    ``log_prob`` never validates ``value``: like every density here it is built with
    ``validate_args=False`` (the data are checked once, when loaded, by :mod:`ppl_vae.data.prepare`)."""

    def log_prob(self, value):
        return _BernoulliLogProb.apply(self.logits, value)


class Bernoulli(Likelihood):
    """Bernoulli(logits): log p(x|z) = Σ_d x_d·l_d − softplus(l_d) = −BCE-with-logits summed."""

    name = "bernoulli"
    binary_data = True
    discrete = True
    support = (0.0, 1.0)

    def dist(self, out):
        return FastBernoulli(logits=out, validate_args=False).to_event(1)

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


#: bins of the discretized logistic: pixel levels k/255 (or (k + 0.5)/256), k = 0..255
BINS = 256
#: log s below this is clamped (as PixelCNN++): a bin's mass is then at most σ(Δ/2s) − σ(−Δ/2s) < 1
LOG_SCALE_MIN = -7.0


class _Bins(constraints.Constraint):
    """The 256 pixel levels as the data hold them, x = k/255 (or (k + 0.5)/256): discrete, so a
    model observing them gives a probability (bits/dim meaningful)."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        level, centre = value * (BINS - 1), value * BINS - 0.5  # integers at k/255, at (k + 0.5)/256
        on_grid = ((level - level.round()).abs() < 1e-3) | ((centre - centre.round()).abs() < 1e-3)
        return (value >= 0) & (value <= 1) & on_grid


class DiscretizedLogisticPixels(dist.TorchDistribution):
    """Independent pixels, each Logistic(μ, s) integrated over one of 256 bins of [0, 1]:
    bin k = [k/256, (k + 1)/256), the first bin extended to −∞ and the last to +∞ so that the
    256 probabilities sum to 1 (Salimans et al. 2017, PixelCNN++; Kingma et al. 2016, IAF;
    Tomczak & Welling 2018, VampPrior's ``log_Logistic_256``). A pixel value x falls in bin
    k = min(⌊256 x⌋, 255): the levels k/255 of 8-bit images and the centres (k + 0.5)/256 alike.

    With a = (k/256 − μ)/s and b = ((k + 1)/256 − μ)/s,
    P(k) = σ(b) − σ(a) = σ(b) σ(−a) (1 − e^{−(b − a)}), so

        log P(k) = log σ(b) + log σ(−a) + log(−expm1(−Δ/s)),   Δ = 1/256,

    every term finite and accurate in float32 however near the mean or far in a tail the bin is
    (no difference of two sigmoids close to each other is ever formed); the edge bins are
    log σ(b) (k = 0) and log σ(−a) (k = 255). Batch shape ``loc.shape``, event shape ``()``."""

    arg_constraints = {"loc": constraints.real, "log_scale": constraints.real}
    support = _Bins()

    def __init__(self, loc: torch.Tensor, log_scale: torch.Tensor, validate_args=False):
        self.loc, self.log_scale = torch.broadcast_tensors(loc, log_scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        return DiscretizedLogisticPixels(self.loc.expand(batch_shape), self.log_scale.expand(batch_shape))

    def log_prob(self, value):
        k = (value * BINS).floor().clamp(0, BINS - 1)  # (..., D) bin indices
        inv_s = torch.exp(-self.log_scale.clamp_min(LOG_SCALE_MIN))  # 1/s
        a = (k / BINS - self.loc) * inv_s  # (..., D) lower edge, standardized
        width = inv_s / BINS  # b − a = Δ/s
        b = a + width
        inner = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log(-torch.expm1(-width))
        return torch.where(k == 0, F.logsigmoid(b), torch.where(k == BINS - 1, F.logsigmoid(-a), inner))

    def sample(self, sample_shape=torch.Size()):
        """The level k/255 of the bin a Logistic(μ, s) draw falls in (inverse CDF: μ + s·logit(u))."""
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp_(1e-7, 1 - 1e-7)
            y = self.loc + self.log_scale.clamp_min(LOG_SCALE_MIN).exp() * torch.logit(u)
            return (y * BINS).floor().clamp(0, BINS - 1) / (BINS - 1)

    @property
    def mean(self):
        """E[x] over the levels k/255: Σ_k (k/255) P(k) = (1/255) Σ_{j=1}^{255} P(bin ≥ j), with
        P(bin ≥ j) = σ((μ − j/256)/s); summed one threshold at a time (memory of one ``(..., D)``)."""
        inv_s = torch.exp(-self.log_scale.clamp_min(LOG_SCALE_MIN))
        total = torch.zeros_like(self.loc)
        for j in range(1, BINS):
            total = total + torch.sigmoid((self.loc - j / BINS) * inv_s)
        return total / (BINS - 1)


class DiscretizedLogistic(Likelihood):
    """256-bin discretized logistic per pixel (:class:`DiscretizedLogisticPixels`): the decoder
    gives a location μ and a log-scale log s per pixel, ``out = cat(μ, log s)``, ``(..., 2D)``.
    log p(x|z) is a log-probability of 8-bit images (≤ 0), in nats; data must lie in [0, 1]."""

    name = "discretized-logistic"
    params_per_pixel = 2
    discrete = True
    support = (0.0, 1.0)

    def split(self, out):
        return out.chunk(2, dim=-1)  # (..., D) each: μ, log s

    def dist(self, out):
        return DiscretizedLogisticPixels(*self.split(out)).to_event(1)

    def mean(self, out):
        return DiscretizedLogisticPixels(*self.split(out)).mean


LIKELIHOODS = {
    cls.name: cls for cls in (Bernoulli, Gaussian, GaussianLearned, ContinuousBernoulli, DiscretizedLogistic)
}


def make_likelihood(name: str, sigma: float = 1.0, sigma_floor: float = 0.01) -> Likelihood:
    """The likelihood called ``name`` (see :data:`LIKELIHOODS`)."""
    if name == "gaussian":
        return Gaussian(sigma)
    if name == "gaussian-learned":
        return GaussianLearned(sigma_floor)
    if name not in LIKELIHOODS:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {', '.join(LIKELIHOODS)}")
    return LIKELIHOODS[name]()
