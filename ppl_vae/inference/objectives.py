"""Training objectives: the negative bound that SVI minimizes, as a differentiable scalar.

``--elbo trace``     Pyro's ``Trace_ELBO``: −E_q[log p(x, z) − log q(z|x)], KL by Monte Carlo.
``--elbo meanfield`` Pyro's ``TraceMeanField_ELBO``: −E_q[log p(x|z)] + KL(q ‖ p) in closed form.
``--elbo iwae``      −IWAE_K (Burda et al. 2016): :func:`iwae_loss`.

Every loss carries the data plate's scaling (full size / batch size), so it is an unbiased
estimate of the full-data negative bound; divide by the dataset size for nats per datapoint.

The two ELBO classes below are Pyro's, with one change for speed: the loss stays a device
tensor. Stock ``differentiable_loss`` reads each particle's value back to the host
(``torch_item``) and checks it for NaN there (``warn_if_nan``), one synchronization per step;
the training loop checks finiteness itself once per log interval instead. They assume a fully
reparameterized guide (checked once, on the first call), where Pyro's surrogate loss equals
the loss itself.

Why not Pyro's ``RenyiELBO(alpha=0)`` for IWAE: it builds each particle's log weight from the
*scaled* site log-probs, s · log w_k(x_i) with s = size / N the data plate's minibatch factor,
and takes the log-sum-exp of those, −Σ_i [LSE_k(s · log w_ik) − log K]. The IWAE bound of the
full dataset is s · Σ_i [LSE_k(log w_ik) − log K]: the scale belongs outside the log-sum-exp.
The two agree only when the batch is the whole dataset (s = 1); under subsampling Renyi's
value and gradient are those of a tempered bound (tests/test_objectives.py shows both). It
also has no ``differentiable_loss`` (its ``loss_and_grads`` reads the loss to the host).
"""

from __future__ import annotations

import math

import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer.util import is_validation_enabled
from pyro.poutine.subsample_messenger import _Subsample
from torch.distributions import kl_divergence

from .importance import iter_log_weights

OBJECTIVES = ("trace", "meanfield", "iwae")


def _check_reparameterized(guide_trace):
    for name, site in _sample_sites(guide_trace):
        if not site["fn"].has_rsample:
            raise ValueError(
                f"guide site {name!r} ({type(site['fn']).__name__}) is not reparameterizable; "
                f"ppl_vae's fast ELBOs need z = μ + σ·ε style sites (use pyro.infer.Trace_ELBO)"
            )


def _sample_sites(trace):
    """``(name, site)`` of the sample sites, without the plates' subsample sites."""
    return [
        (name, site)
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not isinstance(site["fn"], _Subsample)
    ]


def _log_prob_sum(site) -> torch.Tensor:
    """Σ log p of one site, scaled by its plates (minibatch size/N, β) and masked."""
    return scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"]).sum()


class _LeanTraces:
    """Replaces Pyro's ``get_importance_trace`` (log-probs and score parts of every site, the
    subsample sites pruned by copying the trace) with the two traces alone when Pyro's
    validation is off, as in ppl_vae's training loop; with validation on it is Pyro's, checks
    included. Particles (vectorized or not) are Pyro's own ``_get_traces``."""

    _checked = False

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():
            model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        else:
            guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if not self._checked:
            _check_reparameterized(guide_trace)
            self._checked = True
        return model_trace, guide_trace


class DeviceTrace_ELBO(_LeanTraces, pyro.infer.Trace_ELBO):
    """``Trace_ELBO`` without host synchronization: loss = −(log p(x,z) − log q(z|x)), scaled by the
    plates, averaged over particles (vectorized when ``vectorize_particles=True``)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = sum(_log_prob_sum(site) for _, site in _sample_sites(model_trace)) - sum(
                _log_prob_sum(site) for _, site in _sample_sites(guide_trace)
            )
            loss = loss - elbo / self.num_particles
        return loss


class DeviceTraceMeanField_ELBO(_LeanTraces, pyro.infer.TraceMeanField_ELBO):
    """``TraceMeanField_ELBO`` without host synchronization: loss = −Σ log p(x|z) + Σ KL(q ‖ p), each
    KL in closed form (scaled like its site), Monte Carlo where none is registered; guide-only
    (auxiliary) sites add −log q, as in Pyro's."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo = 0.0
            for name, site in _sample_sites(model_trace):
                if site["is_observed"]:
                    elbo = elbo + _log_prob_sum(site)
                    continue
                g = guide_trace.nodes[name]
                try:
                    kl = scale_and_mask(kl_divergence(g["fn"], site["fn"]), scale=g["scale"], mask=g["mask"])
                    elbo = elbo - kl.sum()
                except NotImplementedError:
                    elbo = elbo + _log_prob_sum(site) - _log_prob_sum(g)
            for name, g in _sample_sites(guide_trace):  # auxiliary guide-only sites contribute −log q
                if name not in model_trace.nodes:
                    elbo = elbo - _log_prob_sum(g)
            loss = loss - elbo / self.num_particles
        return loss


def make_objective(name: str, num_particles: int = 1):
    """``loss_fn(model, guide, x, size=..., beta=...) → scalar tensor`` for ``--elbo name``."""
    if name == "trace":
        return DeviceTrace_ELBO(
            num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
        ).differentiable_loss
    if name == "meanfield":
        return DeviceTraceMeanField_ELBO(
            num_particles=num_particles, vectorize_particles=num_particles > 1, max_plate_nesting=1
        ).differentiable_loss
    if name == "iwae":

        def loss_fn(model, guide, *args, size=None, beta=1.0):  # args: (x,) or (x, y, ...)
            return iwae_loss(
                model,
                guide,
                args if len(args) > 1 else args[0],
                num_particles,
                size=size,
                beta=beta,
                nesting=1,
            )

        return loss_fn
    raise ValueError(f"unknown --elbo {name!r}; choose one of {', '.join(OBJECTIVES)}")


def iwae_loss(
    model,
    guide,
    x,
    num_particles: int,
    size: int | None = None,
    beta=1.0,
    nesting: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """−(size / N) Σ_i IWAE_K(x_i), a scalar, with IWAE_K(x_i) = log (1/K) Σ_k w_k(x_i) for the
    batch ``x (N, ...)`` out of ``size`` datapoints, differentiable through the reparameterized
    guide (the gradient is Σ_k w̃_k ∇ log w_k with w̃ the normalized weights). ``size / N`` is the
    data plate's minibatch scaling, applied outside the log-sum-exp because the log-weights are
    unscaled; the loss estimates −Σ over the full dataset. ``kwargs`` go to model and guide.

    ``beta`` < 1 is KL warm-up for IWAE (the "WU" with importance samples of Sønderby et al.
    2016): each log-weight's prior-to-guide ratio is tempered,
    log w_k^β = log p(x|z_k) + β (log p(z_k) − log q(z_k|x)), z_k ~ q(z|x).
    With K = 1 that is the β-ELBO's single-draw estimate; at β = 1 it is IWAE. For β < 1 it is
    not a bound on log p(x), so ``--kl-warmup`` may ramp β to 1 but ``--beta`` stays 1
    (:class:`~ppl_vae.training.config.FitConfig`). A tensor ``beta`` (the CUDA-graph step's device copy)
    is used as a tensor, never read on the host."""
    n = (x if torch.is_tensor(x) else x[0]).shape[
        0
    ]  # x: a batch, or a tuple (x, y, ...) of per-datapoint args
    draws = list(
        iter_log_weights(
            model, guide, x, num_particles, chunk_size=num_particles * n, nesting=nesting, size=size, **kwargs
        )
    )  # one pass: chunk = K × N
    lw = torch.cat([d.log_w for d in draws], 0)  # (K, N): log p(x, z_k) − log q(z_k|x)
    if torch.is_tensor(beta) or beta != 1:
        log_lik = torch.cat([d.log_lik for d in draws], 0)  # (K, N): log p(x|z_k)
        lw = log_lik + beta * (lw - log_lik)
    bound = torch.logsumexp(lw, 0) - math.log(num_particles)  # (N,)
    return -bound.sum() * ((size or n) / n)
