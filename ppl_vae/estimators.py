r"""Per-datapoint estimators of log p(x) for any Pyro model/guide pair.

Every function takes ``(model, guide, x)`` where ``model(x)`` and ``guide(x)`` follow the
conventions of :mod:`ppl_vae.model`: all sample sites inside ``pyro.plate("data", N)``, every
site with its event dims declared. Results are per datapoint, shape ``(N,)``, in nats, with
the sign of a log-density (an ELBO, not a loss). Sampling is vectorized over an outer plate
of particles placed left of the model's plates; pass ``seed`` for reproducible draws.

With importance weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q(z | x):

* ELBO   = E_q[log w]  ≤  IWAE_K = E[log (1/K) Σ_k w_k]  ≤  log p(x),  and IWAE_K ↑ in K
  (Burda et al. 2016, Thm. 1); the ELBO gap is KL(q(z|x) ‖ p(z|x)).
* ``elbo(analytic_kl=True)`` replaces E_q[log p(z) − log q(z|x)] by −KL(q ‖ p) in closed
  form (``torch.distributions.kl_divergence``), leaving only E_q log p(x|z) to sample.
* ``psis_diagnostics`` fits a generalized Pareto to the largest weights (Vehtari et al.
  2024, via ``arviz.psislw``): k̂ > 0.7 means the weights are too heavy-tailed for the IWAE
  estimate of that datapoint to be trusted.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import kl_divergence

DATA_PLATE = "data"
DEFAULT_CHUNK = 100_000  # samples × datapoints per vectorized pass: bounds memory, not K


@dataclass
class Estimate:
    """A per-datapoint estimate ``value (N,)`` with its Monte Carlo standard error ``stderr (N,)``
    (NaN where a single draw gives no error estimate)."""

    value: torch.Tensor
    stderr: torch.Tensor

    def mean(self) -> float:
        """Average over datapoints (nats per datapoint)."""
        return self.value.mean().item()

    def mean_stderr(self) -> float:
        """Monte Carlo standard error of :meth:`mean`: √(Σ_i se_i²) / N (draws independent across i)."""
        return (self.stderr.pow(2).sum().sqrt() / self.stderr.numel()).item()


@contextmanager
def seeded(seed: int | None):
    """Run a block with the global torch RNG seeded to ``seed`` (Pyro samples from it), leaving
    the caller's RNG stream untouched. ``None`` = no seeding."""
    if seed is None:
        yield
        return
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _data_dim(site) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    raise ValueError(f"site {site['name']!r} is not inside pyro.plate({DATA_PLATE!r}, ...): per-datapoint "
                     f"estimators need every sample site inside the data plate")


def max_plate_nesting(model, guide, x, **kwargs) -> int:
    """How many plate dims the model and guide use (traced once on a single datapoint)."""
    x1 = x[:1]
    with poutine.block():
        guide_tr = poutine.trace(guide).get_trace(x1, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x1, **kwargs)
    dims = [-f.dim for tr in (guide_tr, model_tr) for s in tr.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


def _traces(model, guide, x, num_samples: int, nesting: int, **kwargs):
    """Guide and model traces with ``num_samples`` particles in an outer plate at dim −nesting−1."""
    with poutine.block(), pyro.plate("_particles", num_samples, dim=-nesting - 1):
        guide_tr = poutine.trace(guide).get_trace(x, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, **kwargs)
    return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)


def _per_datapoint(site, log_prob: torch.Tensor, nesting: int) -> torch.Tensor:
    """Reduce a site's (unscaled) log-density to ``(K, N)``: keep the particle and data dims,
    sum every other plate dim."""
    lp = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + log_prob.shape)  # (K, ..., N, ...)
    data_dim = lp.dim() + _data_dim(site)
    other = [d for d in range(1, lp.dim()) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[data_dim])  # (K, N)


def _log_weight_chunk(model, guide, x, k, nesting, analytic_kl=False, **kwargs) -> torch.Tensor:
    """log p(x, z_k) − log q(z_k|x) ``(k, N)``; with ``analytic_kl`` the latent terms are −KL."""
    model_tr, guide_tr = _traces(model, guide, x, k, nesting, **kwargs)
    n = x.shape[0]
    total = x.new_zeros(k, n)  # (K, N)
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            total = total + _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
            continue
        g = guide_tr.nodes[name]
        if analytic_kl:
            try:
                kl = kl_divergence(g["fn"], site["fn"])
            except NotImplementedError:
                raise NotImplementedError(
                    f"no closed-form KL is registered for site {name!r}: KL({type(g['fn']).__name__} || "
                    f"{type(site['fn']).__name__}); use analytic_kl=False (Monte Carlo KL) or register one "
                    f"with torch.distributions.kl.register_kl") from None
            total = total - _per_datapoint(site, kl, nesting)
        else:
            total = (total + _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
                     - _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting))
    for name, g in guide_tr.nodes.items():  # auxiliary guide-only sites contribute −log q
        if g["type"] == "sample" and name not in model_tr.nodes:
            total = total - _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting)
    return total  # (K, N)


def _chunks(num_samples: int, n: int, chunk_size: int):
    k = max(1, min(num_samples, chunk_size // max(n, 1)))
    done = 0
    while done < num_samples:
        yield min(k, num_samples - done)
        done += k


def log_importance_weights(model, guide, x, num_samples: int, seed: int | None = None,
                           chunk_size: int = DEFAULT_CHUNK, nesting: int | None = None,
                           **kwargs) -> torch.Tensor:
    """log w_k = log p(x, z_k) − log q(z_k | x) for z_k ~ q(z|x): shape ``(num_samples, N)``.

    Differentiable (no ``no_grad`` here) so it also serves the IWAE training objective; the
    samples are drawn in chunks of about ``chunk_size / N`` particles. ``nesting`` (the
    number of plate dims of model and guide) is found by a trace when not given.
    """
    _check_k(num_samples)
    if nesting is None:
        nesting = max_plate_nesting(model, guide, x, **kwargs)
    with seeded(seed):
        parts = [_log_weight_chunk(model, guide, x, k, nesting, False, **kwargs)
                 for k in _chunks(num_samples, x.shape[0], chunk_size)]
    return torch.cat(parts, 0)  # (K, N)


def _check_k(k):
    if not (isinstance(k, int) and k >= 1):
        raise ValueError(f"the number of samples K must be an integer >= 1, got {k!r}")


def _mean_and_stderr(samples: torch.Tensor) -> Estimate:
    k = samples.shape[0]
    se = samples.std(0, unbiased=True) / math.sqrt(k) if k > 1 else torch.full_like(samples[0], math.nan)
    return Estimate(samples.mean(0), se)


@torch.no_grad()
def elbo(model, guide, x, num_samples: int = 1, analytic_kl: bool = False, seed: int | None = None,
         chunk_size: int = DEFAULT_CHUNK, **kwargs) -> Estimate:
    """ELBO(x) = E_q[log p(x, z) − log q(z|x)] per datapoint, ``(N,)`` nats, from ``num_samples``
    draws; ``stderr`` = sample std / √K. With ``analytic_kl`` each latent site's
    E_q[log p(z) − log q(z|x)] is −KL(q ‖ p) in closed form (raises ``NotImplementedError``
    where none is registered: no silent fallback)."""
    _check_k(num_samples)
    nesting = max_plate_nesting(model, guide, x, **kwargs)
    with seeded(seed):
        parts = [_log_weight_chunk(model, guide, x, k, nesting, analytic_kl, **kwargs)
                 for k in _chunks(num_samples, x.shape[0], chunk_size)]
    return _mean_and_stderr(torch.cat(parts, 0))  # over (K, N)


class _GroupedLSE:
    """Streams log-weights through consecutive groups of ``k`` samples and collects
    IWAE_k = logsumexp(group) − log k for every completed group (per datapoint)."""

    def __init__(self, k: int, n: int, device, dtype):
        self.k, self.pos = k, 0
        self.carry = torch.full((n,), -math.inf, device=device, dtype=dtype)  # (N,) open group's lse
        self.count, self.sum, self.sumsq = 0, torch.zeros(n, device=device, dtype=dtype), \
            torch.zeros(n, device=device, dtype=dtype)

    def _close(self, lse):  # lse (G, N): finished groups
        vals = lse - math.log(self.k)
        self.count += vals.shape[0]
        self.sum += vals.sum(0)
        self.sumsq += vals.pow(2).sum(0)

    def update(self, lw: torch.Tensor):  # lw (c, N)
        c = lw.shape[0]
        first = min(c, self.k - self.pos)  # samples that complete the open group
        self.carry = torch.logaddexp(self.carry, torch.logsumexp(lw[:first], 0))
        self.pos += first
        if self.pos == self.k:
            self._close(self.carry[None])
            self.carry.fill_(-math.inf)
            self.pos = 0
        rest = lw[first:]
        full = (rest.shape[0] // self.k) * self.k
        if full:
            self._close(torch.logsumexp(rest[:full].reshape(-1, self.k, rest.shape[1]), 1))  # (G, N)
        tail = rest[full:]
        if tail.shape[0]:
            self.carry = torch.logsumexp(tail, 0)
            self.pos = tail.shape[0]

    def estimate(self) -> Estimate:
        g = self.count
        mean = self.sum / g
        if g < 2:
            return Estimate(mean, torch.full_like(mean, math.nan))
        var = (self.sumsq - g * mean.pow(2)).clamp_min(0) / (g - 1)
        return Estimate(mean, (var / g).sqrt())


@torch.no_grad()
def iwae(model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int = DEFAULT_CHUNK,
         ks=None, **kwargs):
    r"""IWAE_K(x) = log (1/K) Σ_k w_k per datapoint, ``(N,)`` nats: the importance-weighted
    estimate of log p(x) (a lower bound in expectation, tight as K → ∞).

    Memory is bounded by ``chunk_size`` (samples × datapoints per pass), independent of K:
    log Σ w and log Σ w² are accumulated by a streaming log-sum-exp.

    Standard error (delta method): with m̂ = (1/K) Σ w_k and v̂ the sample variance of the
    w_k, Var(log m̂) ≈ v̂ / (K m̂²), i.e. ``stderr = sqrt((K Σw² / (Σw)² − 1) / (K − 1))``.
    It is only as good as the weights' variance is finite: check :func:`psis_diagnostics`.

    :param ks: optional sample sizes k < K for the convergence curve. Each is estimated from
        the same K draws split into ⌊K/k⌋ consecutive groups: the mean of the groups' IWAE_k
        (unbiased for E[IWAE_k]), with stderr = std over groups / √groups. Then the return
        value is ``(estimate, {k: Estimate})``.
    """
    _check_k(num_samples)
    nesting = max_plate_nesting(model, guide, x, **kwargs)
    n = x.shape[0]
    lse = lse2 = None
    groups = {k: None for k in (ks or []) if k <= num_samples}
    with seeded(seed):
        for k in _chunks(num_samples, n, chunk_size):
            lw = _log_weight_chunk(model, guide, x, k, nesting, False, **kwargs)  # (k, N)
            c, c2 = torch.logsumexp(lw, 0), torch.logsumexp(2 * lw, 0)  # (N,)
            lse = c if lse is None else torch.logaddexp(lse, c)
            lse2 = c2 if lse2 is None else torch.logaddexp(lse2, c2)
            for kk in groups:
                if groups[kk] is None:
                    groups[kk] = _GroupedLSE(kk, n, lw.device, lw.dtype)
                groups[kk].update(lw)
    K = num_samples
    value = lse - math.log(K)
    if K > 1:
        ratio = torch.exp(lse2 - 2 * lse + math.log(K))  # K Σw² / (Σw)²  ∈ [1, K]
        se = ((ratio - 1).clamp_min(0) / (K - 1)).sqrt()
    else:
        se = torch.full_like(value, math.nan)
    est = Estimate(value, se)
    if ks is None:
        return est
    curve = {kk: g.estimate() for kk, g in groups.items()}
    if K in curve:
        curve[K] = est
    return est, curve


def iwae_loss(model, guide, x, num_particles: int, size: int | None = None, nesting: int | None = None,
              **kwargs) -> torch.Tensor:
    """Training objective: −(size / N) Σ_i IWAE_K(x_i), a scalar, differentiable through the
    reparameterized guide. ``size / N`` is the data plate's minibatch scaling, kept explicitly
    because the log-weights above are unscaled; the loss estimates −Σ over the full dataset."""
    n = x.shape[0]
    lw = log_importance_weights(model, guide, x, num_particles, chunk_size=num_particles * n, nesting=nesting,
                                size=size, **kwargs)  # (K, N)
    bound = torch.logsumexp(lw, 0) - math.log(num_particles)  # (N,)
    return -bound.sum() * ((size or n) / n)


def psis_diagnostics(model, guide, x, num_samples: int, seed: int | None = None,
                     chunk_size: int = DEFAULT_CHUNK, **kwargs):
    """Pareto k̂ ``(N,)`` and PSIS effective sample size ``(N,)`` of the importance weights.

    k̂ < 0.5: variance finite, IWAE reliable; 0.5–0.7: usable; > 0.7: the estimate of log p(x)
    for that datapoint is unreliable. ESS = 1 / Σ_k w̃_k² with w̃ the normalized smoothed weights.
    """
    import numpy as np
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

    with torch.no_grad():
        lw = log_importance_weights(model, guide, x, num_samples, seed=seed, chunk_size=chunk_size,
                                    **kwargs)  # (K, N)
    arr = lw.double().T.cpu().numpy()  # (N, K): arviz wants samples last
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        smoothed, khat = arviz.psislw(arr.copy(), reff=1.0)
    w = np.exp(smoothed)  # normalized: rows sum to 1
    ess = 1.0 / (w ** 2).sum(-1)
    return torch.as_tensor(np.asarray(khat), dtype=torch.float64), torch.as_tensor(ess, dtype=torch.float64)
