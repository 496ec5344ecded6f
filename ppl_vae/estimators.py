r"""Per-datapoint estimators of log p(x) for any Pyro model/guide pair.

Every function takes ``(model, guide, x)`` where ``model(x)`` and ``guide(x)`` follow the
conventions of :mod:`ppl_vae.model`: all sample sites inside ``pyro.plate("data", N)``, every
site with its event dims declared. Results are per datapoint, shape ``(N,)``, in nats, with
the sign of a log-density (an ELBO, not a loss). Sampling is vectorized over an outer plate
of particles placed left of the model's plates. Log-densities are *unscaled*: the data
plate's ``size / N`` factor and any ``poutine.scale`` (β) are ignored, so the numbers are
bounds on log p(x) of one datapoint (masks are ignored too).

With importance weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q(z | x):

* ELBO = E_q[log w] ≤ E[IWAE_K] = E[log (1/K) Σ_k w_k] ≤ log p(x), and E[IWAE_K] ↑ in K
  (Burda et al. 2016, Thm. 1); the ELBO gap is KL(q(z|x) ‖ p(z|x)).
* ``elbo(analytic_kl=True)`` replaces E_q[log p(z) − log q(z|x)] by −KL(q ‖ p) in closed
  form (``torch.distributions.kl_divergence``), leaving only E_q log p(x|z) to sample.
* ``psis_diagnostics`` fits a generalized Pareto to the largest weights (Vehtari et al.
  2024, via ``arviz.psislw``): k̂ > 0.7 means the weights are too heavy-tailed for the IWAE
  estimate of that datapoint to be trusted.

Reproducibility: with ``seed`` given, the K draws come in units of :data:`SAMPLE_UNIT`
particles, unit j drawn from the torch RNG seeded with ``derive_seed(seed, j)``. A pass over
the data draws whole units, so the estimates do not depend on ``chunk_size`` (up to float
rounding) and the caller's RNG stream is left untouched. A pass draws its units' latents for
the whole batch (the guide runs once per unit), then weighs them through the model in slices
of datapoints, so that the decoder sees about ``chunk_size`` particles × datapoints at a time.
The draws for datapoint i still depend on the whole batch ``x`` (the guide draws (u, N, ...) at once): fix the batches too
(as :mod:`ppl_vae.evaluate` does) when results must not depend on how work is split.

See ``docs/estimators.md`` for the bias, variance and standard errors of each estimator.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import kl_divergence

DATA_PLATE = "data"
# Particles × datapoints per decoder pass (``chunk_size=None``): bounds memory, not K. On a CPU a
# pass that stays near the caches is fastest (benchmarks/eval_speed.py: 2k–4k rows 5.0 s, 8k
# 7.5 s, 20k 8.8 s for K = 1000 on 1000 images); a GPU wants large passes.
DEFAULT_CHUNK = {"cpu": 4096, "cuda": 2_000_000}
SAMPLE_UNIT = 100  # particles per seeded draw; a pass holds whole units (memory ≥ SAMPLE_UNIT rows)
PSIS_MIN_SAMPLES = 21  # ArviZ's Pareto tail, ceil(min(0.2 K, 3 √K)), needs more than 4 weights


def default_chunk(device) -> int:
    """The ``chunk_size`` used when none is given, for tensors on ``device``."""
    return DEFAULT_CHUNK.get(torch.device(device).type, DEFAULT_CHUNK["cpu"])


@dataclass
class Estimate:
    """A per-datapoint estimate ``value (N,)`` with its Monte Carlo standard error ``stderr (N,)``
    (NaN where the draws give no error estimate, e.g. a single sample)."""

    value: torch.Tensor
    stderr: torch.Tensor

    def mean(self) -> float:
        """Average over datapoints (nats per datapoint)."""
        return self.value.mean().item()

    def mean_stderr(self) -> float:
        """Monte Carlo standard error of :meth:`mean`: √(Σ_i se_i²) / N (draws independent across
        i). It says how far more samples could move the number on *these* datapoints."""
        return (self.stderr.pow(2).sum().sqrt() / self.stderr.numel()).item()

    def across_datapoints_stderr(self) -> float:
        """std_i(value_i) / √N: the standard error of :meth:`mean` as an estimate of the
        population mean E_x[·] (the datapoints are a sample; Monte Carlo noise included)."""
        n = self.value.numel()
        return (self.value.std() / math.sqrt(n)).item() if n > 1 else math.nan


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for stream ``keys`` of ``seed`` (NumPy ``SeedSequence``): independent,
    reproducible streams for sample units and datapoint blocks."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


@contextmanager
def _rng_fork():
    """Restore the torch RNG (CPU and the current CUDA device) on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


@contextmanager
def seeded(seed: int | None):
    """Run a block with the global torch RNG seeded to ``seed`` (Pyro samples from it), leaving
    the caller's RNG stream untouched. ``None`` = no seeding."""
    if seed is None:
        yield
        return
    with _rng_fork():
        torch.manual_seed(seed)
        yield


def _data_dim(site) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    raise ValueError(f"site {site['name']!r} is not inside pyro.plate({DATA_PLATE!r}, ...): per-datapoint "
                     f"estimators need every sample site inside the data plate")


def max_plate_nesting(model, guide, x, **kwargs) -> int:
    """How many plate dims the model and guide use (traced once on a single datapoint, without
    touching the caller's RNG)."""
    x1 = x[:1]
    with _rng_fork(), poutine.block():
        guide_tr = poutine.trace(guide).get_trace(x1, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x1, **kwargs)
    dims = [-f.dim for tr in (guide_tr, model_tr) for s in tr.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


def _check_k(k):
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"the number of samples K must be an integer >= 1, got {k!r}")


# --------------------------------------------------------------------------- drawing

def _guide_trace(guide, x, k, nesting, kwargs):
    with poutine.block(), pyro.plate("_particles", k, dim=-nesting - 1):
        return poutine.trace(guide).get_trace(x, **kwargs)


def _cat_units(traces, nesting) -> poutine.Trace:
    """The latent values of several guide traces joined along the particle dim, for replay."""
    out = poutine.Trace()
    for name, site in traces[0].nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        dim = site["value"].dim() - site["fn"].event_dim - nesting - 1  # the particle dim
        out.add_node(name, type="sample", is_observed=False, infer=site["infer"],
                     event_dim=site["fn"].event_dim, data_dim=_data_dim(site),
                     value=torch.cat([t.nodes[name]["value"] for t in traces], dim))  # (k, ..., N, ...)
    return out


def _draw(guide, x, units, nesting, kwargs) -> tuple[poutine.Trace, poutine.Trace | None]:
    """The latent values of one pass over ``units`` = [(size, seed or None)], each unit drawn by
    its own (seeded) guide run on all of ``x``, joined along the particle dim (a trace to replay);
    and, for a single unit, its guide trace itself, which weighs the whole batch without a
    second guide run (the IWAE training step)."""
    traces = []
    for size, seed in units:
        if seed is not None:
            torch.manual_seed(seed)
        traces.append(_guide_trace(guide, x, size, nesting, kwargs))
    return _cat_units(traces, nesting), (traces[0] if len(traces) == 1 else None)


def _rows(values: poutine.Trace, start: int, stop: int) -> poutine.Trace:
    """``values`` restricted to datapoints ``start:stop`` (along each site's data-plate dim)."""
    out = poutine.Trace()
    for name, site in values.nodes.items():
        v = site["value"]
        dim = v.dim() - site["event_dim"] + site["data_dim"]  # the data dim, counted from the left
        out.add_node(name, type="sample", is_observed=False, infer=site["infer"],
                     value=v.narrow(dim, start, stop - start))
    return out


def _replay(model, guide, values, x, k, nesting, kwargs, guide_tr=None):
    """Guide and model traces with the latents ``values`` (k particles) replayed on ``x``
    (``guide_tr``: the guide's trace of exactly these, when there is one already)."""
    if guide_tr is None:
        guide_tr = _guide_trace(poutine.replay(guide, trace=values), x, k, nesting, kwargs)
    with poutine.block(), pyro.plate("_particles", k, dim=-nesting - 1):
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


def _describe(fn) -> str:
    """``Independent(StudentT)``: a distribution's class with those it wraps."""
    base = getattr(fn, "base_dist", None)
    return type(fn).__name__ + (f"({_describe(base)})" if base is not None else "")


def _kl(guide_site, model_site) -> torch.Tensor:
    try:
        return kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        raise NotImplementedError(
            f"no closed-form KL is registered for site {model_site['name']!r}: "
            f"KL({_describe(guide_site['fn'])} || {_describe(model_site['fn'])}); use analytic_kl=False "
            f"(Monte Carlo KL) or register one with torch.distributions.kl.register_kl") from None


class Draws(NamedTuple):
    """One pass of draws: ``log_w (k, N)`` = log p(x, z_k) − log q(z_k|x), and, when asked for,
    ``elbo_analytic (k, N)`` = log p(x|z_k) − Σ_sites KL(q ‖ p) (per-draw terms of the
    analytic-KL ELBO), else ``None``."""

    log_w: torch.Tensor
    elbo_analytic: torch.Tensor | None


def _pass_terms(model_tr, guide_tr, nesting, analytic_kl) -> Draws:
    obs = latent_mc = latent_kl = 0.0  # each becomes (k, N)
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            obs = obs + _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
        elif name in guide_tr.nodes:  # a model-only latent is drawn from its prior: p/q cancel
            g = guide_tr.nodes[name]
            latent_mc = (latent_mc + _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
                         - _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting))
            if analytic_kl:
                latent_kl = latent_kl - _per_datapoint(site, _kl(g, site), nesting)
    aux = 0.0
    for name, g in guide_tr.nodes.items():  # auxiliary guide-only sites contribute −log q
        if g["type"] == "sample" and not g["is_observed"] and name not in model_tr.nodes:
            aux = aux - _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting)
    log_w = obs + latent_mc + aux
    if not torch.is_tensor(log_w):
        raise ValueError("the model and guide have no sample sites to weigh")
    # + zeros: terms constant over particles broadcast to (k, N)
    analytic = obs + latent_kl + aux + torch.zeros_like(log_w) if analytic_kl else None
    return Draws(log_w, analytic)


def _plan(num_samples: int, n: int, chunk_size: int, seed: int | None):
    """Passes, each a list of units (size, seed). Unseeded: one unit per pass of about
    ``chunk_size / n`` particles. Seeded: fixed units of SAMPLE_UNIT particles (the last may be
    smaller), as many whole units per pass as ``chunk_size`` allows (at least one)."""
    per_pass = max(1, min(num_samples, chunk_size // max(n, 1)))
    if seed is None:
        for start in range(0, num_samples, per_pass):
            yield [(min(per_pass, num_samples - start), None)]
        return
    units = [(min(SAMPLE_UNIT, num_samples - start), derive_seed(seed, j))
             for j, start in enumerate(range(0, num_samples, SAMPLE_UNIT))]
    step = max(1, per_pass // SAMPLE_UNIT)
    for i in range(0, len(units), step):
        yield units[i:i + step]


def iter_log_weights(model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None,
                     analytic_kl: bool = False, nesting: int | None = None, **kwargs):
    """Yield :class:`Draws` pass by pass, ``num_samples`` particles in all, about ``chunk_size``
    particles × datapoints per pass (see the module docstring for ``seed``). Differentiable
    (no ``no_grad`` here). ``nesting`` (plate dims of model and guide) is traced when not given;
    ``kwargs`` go to model and guide."""
    _check_k(num_samples)
    if nesting is None:
        nesting = max_plate_nesting(model, guide, x, **kwargs)
    n, chunk_size = x.shape[0], chunk_size or default_chunk(x.device)
    for units in _plan(num_samples, n, chunk_size, seed):
        k = sum(size for size, _ in units)
        rows = max(1, chunk_size // k)  # datapoints per model pass: k × rows ≈ chunk_size
        with _rng_fork() if seed is not None else nullcontext():  # restored before each yield
            values, drawn = _draw(guide, x, units, nesting, kwargs)  # (k, N, ...): the guide runs once per unit
            whole = drawn if rows >= n else None  # one slice, the whole batch: its guide trace is drawn's
            parts = [_pass_terms(*_replay(model, guide, _rows(values, i, min(i + rows, n)), x[i:i + rows], k,
                                          nesting, kwargs, whole), nesting, analytic_kl) for i in range(0, n, rows)]
        if len(parts) == 1:
            yield parts[0]
        else:  # (k, N) from the (k, rows) of each slice
            yield Draws(torch.cat([d.log_w for d in parts], 1),
                        torch.cat([d.elbo_analytic for d in parts], 1) if analytic_kl else None)


def log_importance_weights(model, guide, x, num_samples: int, seed: int | None = None,
                           chunk_size: int | None = None, nesting: int | None = None,
                           **kwargs) -> torch.Tensor:
    """log w_k = log p(x, z_k) − log q(z_k | x) for z_k ~ q(z|x): shape ``(num_samples, N)``,
    nats. Differentiable, so it also serves the IWAE training objective."""
    return torch.cat([d.log_w for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size,
                                                        nesting=nesting, **kwargs)], 0)  # (K, N)


# --------------------------------------------------------------------------- streaming summaries

class _Moments:
    """Running per-datapoint mean and sum of squared deviations over rows of ``(c, N)`` chunks
    (Chan et al.'s pairwise merge: no cancellation when the spread is tiny next to the mean)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, v: torch.Tensor):  # v (c, N)
        c = v.shape[0]
        mean = v.mean(0)  # (N,)
        m2 = (v - mean).pow(2).sum(0)  # (N,)
        if self.count == 0:
            self.count, self.mean, self.m2 = c, mean, m2
            return
        total = self.count + c
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * c / total)
        self.mean = self.mean + delta * (c / total)
        self.count = total

    def estimate(self) -> Estimate:
        """Mean ``(N,)`` with stderr = sample std / √count (NaN for a single row)."""
        if self.count < 2:
            return Estimate(self.mean, torch.full_like(self.mean, math.nan))
        return Estimate(self.mean, (self.m2 / (self.count - 1) / self.count).sqrt())


class _GroupedLSE:
    """IWAE_k over consecutive groups of ``k`` samples, streamed chunk by chunk: per finished
    group g, IWAE_k^(g) = logsumexp(log w in g) − log k and its delta-method variance (see
    :func:`iwae`). Memory ``O(N)`` whatever k and the number of samples."""

    def __init__(self, k: int):
        self.k, self.pos = k, 0
        self.lse = self.lse2 = None  # the open group's log Σw, log Σw²: (N,) once pos > 0
        self.values = _Moments()
        self.delta_var = 0.0  # Σ over groups of the delta-method variance (becomes (N,))

    def _close(self, lse, lse2):  # (G, N) each: finished groups
        self.values.update(lse - math.log(self.k))
        if self.k > 1:
            ratio = torch.exp(lse2 - 2 * lse + math.log(self.k))  # k Σw² / (Σw)² ∈ [1, k]
            self.delta_var = self.delta_var + ((ratio - 1).clamp_min(0) / (self.k - 1)).sum(0)

    def update(self, lw: torch.Tensor):  # lw (c, N)
        while lw.shape[0]:
            if self.pos == 0 and lw.shape[0] >= self.k:  # whole groups at once
                g = lw.shape[0] // self.k
                full = lw[:g * self.k].reshape(g, self.k, lw.shape[1])  # (G, k, N)
                self._close(torch.logsumexp(full, 1), torch.logsumexp(2 * full, 1))  # (G, N)
                lw = lw[g * self.k:]
                continue
            part = lw[:self.k - self.pos]  # (≤ k − pos, N)
            lse, lse2 = torch.logsumexp(part, 0), torch.logsumexp(2 * part, 0)  # (N,)
            if self.pos:
                lse, lse2 = torch.logaddexp(self.lse, lse), torch.logaddexp(self.lse2, lse2)
            self.lse, self.lse2 = lse, lse2
            self.pos += part.shape[0]
            lw = lw[part.shape[0]:]
            if self.pos == self.k:
                self._close(self.lse[None], self.lse2[None])
                self.pos = 0

    def estimate(self) -> Estimate:
        """Mean of the groups' IWAE_k. stderr: std over groups / √groups with ≥ 2 groups; with
        one group, its delta-method standard error (NaN for k = 1)."""
        g = self.values.count
        if g >= 2 or self.k == 1:
            return self.values.estimate()
        return Estimate(self.values.mean, torch.as_tensor(self.delta_var).sqrt())


def _check_ks(ks, num_samples) -> list[int]:
    _check_k(num_samples)
    ks = sorted(set(ks or []))
    for k in ks:
        _check_k(k)
        if k > num_samples:
            raise ValueError(f"ks: every k must be <= num_samples = {num_samples}, got {k}")
    return ks


@torch.no_grad()
def elbo(model, guide, x, num_samples: int = 1, analytic_kl: bool = False, seed: int | None = None,
         chunk_size: int | None = None, **kwargs) -> Estimate:
    """ELBO(x) = E_q[log p(x, z) − log q(z|x)] per datapoint, ``(N,)`` nats, from ``num_samples``
    draws; ``stderr`` = sample std / √K. With ``analytic_kl`` each latent site's
    E_q[log p(z) − log q(z|x)] is −KL(q ‖ p) in closed form (raises ``NotImplementedError``
    where none is registered: no silent fallback)."""
    moments = _Moments()
    for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size, analytic_kl, **kwargs):
        moments.update(d.elbo_analytic if analytic_kl else d.log_w)  # (k, N)
    return moments.estimate()


@torch.no_grad()
def iwae(model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None,
         ks=None, **kwargs):
    r"""IWAE_K(x) = log (1/K) Σ_k w_k per datapoint, ``(N,)`` nats: the importance-weighted
    estimate of log p(x) (a lower bound in expectation, tight as K → ∞).

    Memory is bounded by ``chunk_size`` (particles × datapoints per pass; at least one unit of
    :data:`SAMPLE_UNIT` particles when seeded), independent of K: log Σw and log Σw² are
    accumulated by a streaming log-sum-exp.

    Standard error (delta method): with m̂ = (1/K) Σ w_k and v̂ the sample variance of the
    w_k, Var(log m̂) ≈ v̂ / (K m̂²), i.e. ``stderr = sqrt((K Σw² / (Σw)² − 1) / (K − 1))``.
    It is only as good as the weights' variance is finite: check :func:`psis_diagnostics`.

    :param ks: optional sample sizes 1 ≤ k ≤ K for the convergence curve. Each is estimated
        from the same K draws split into ⌊K/k⌋ consecutive groups: the mean of the groups'
        IWAE_k (unbiased for E[IWAE_k]), with stderr = std over groups / √groups (the
        delta-method stderr when there is one group). Then the return value is
        ``(estimate, {k: Estimate})``.
    """
    curve = _check_ks(ks, num_samples)
    groups = {k: _GroupedLSE(k) for k in {*curve, num_samples}}
    for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size, **kwargs):
        for g in groups.values():
            g.update(d.log_w)  # (k, N)
    est = groups[num_samples].estimate()
    if ks is None:
        return est
    return est, {k: groups[k].estimate() for k in curve}


@torch.no_grad()
def estimate_all(model, guide, x, num_samples: int, ks=(), seed: int | None = None,
                 chunk_size: int | None = None, analytic_kl: bool = True, psis: bool = True, **kwargs) -> dict:
    """Every estimate from one set of K draws per datapoint (what ``evaluate`` reports):
    ``elbo_mc``, ``elbo_analytic`` (when ``analytic_kl``), ``iwae`` (IWAE_K) as
    :class:`Estimate` ``(N,)``; ``iwae_by_k`` {k: Estimate}; and, when ``psis``, ``khat`` and
    ``ess`` ``(N,)`` float64 (this keeps the K × N log-weights, not the decoder outputs)."""
    curve = _check_ks(ks, num_samples)
    groups = {k: _GroupedLSE(k) for k in {*curve, num_samples}}
    mc, analytic, kept = _Moments(), _Moments(), []
    for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size, analytic_kl, **kwargs):
        mc.update(d.log_w)  # (k, N)
        if analytic_kl:
            analytic.update(d.elbo_analytic)
        for g in groups.values():
            g.update(d.log_w)
        if psis:
            kept.append(d.log_w)
    out = {"elbo_mc": mc.estimate(), "iwae": groups[num_samples].estimate(),
           "iwae_by_k": {k: groups[k].estimate() for k in curve}}
    if analytic_kl:
        out["elbo_analytic"] = analytic.estimate()
    if psis:
        out["khat"], out["ess"] = psis_from_log_weights(torch.cat(kept, 0))  # from (K, N)
    return out


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


def psis_from_log_weights(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pareto k̂ ``(N,)`` and PSIS effective sample size ``(N,)`` (float64) of log-weights
    ``(K, N)``. ESS = 1 / Σ_k w̃_k² with w̃ the normalized Pareto-smoothed weights.

    k̂ needs K ≥ :data:`PSIS_MIN_SAMPLES` (a tail of at least 5 weights): below that it is NaN
    and the ESS uses the raw weights. k̂ = inf where ArviZ could not fit the tail (e.g. tied
    weights)."""
    if log_w.shape[0] < PSIS_MIN_SAMPLES:
        w = torch.softmax(log_w.detach().double(), 0)  # (K, N) normalized raw weights
        return torch.full((log_w.shape[1],), math.nan, dtype=torch.float64), (1.0 / w.pow(2).sum(0)).cpu()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import arviz

        arr = log_w.detach().double().T.cpu().numpy().copy()  # (N, K): arviz wants samples last
        smoothed, khat = arviz.psislw(arr, reff=1.0)  # reff = 1: the draws are independent
    w = np.exp(smoothed)  # normalized: rows sum to 1
    ess = 1.0 / (w ** 2).sum(-1)
    return torch.as_tensor(np.asarray(khat, dtype=np.float64)), torch.as_tensor(ess, dtype=torch.float64)


def psis_diagnostics(model, guide, x, num_samples: int, seed: int | None = None,
                     chunk_size: int | None = None, **kwargs):
    """Pareto k̂ ``(N,)`` and PSIS effective sample size ``(N,)`` of the importance weights.

    k̂ < 0.5: variance finite, IWAE reliable; 0.5–0.7: usable; > 0.7: the estimate of log p(x)
    for that datapoint is unreliable (Vehtari et al. 2024, §3).
    """
    with torch.no_grad():
        lw = log_importance_weights(model, guide, x, num_samples, seed=seed, chunk_size=chunk_size,
                                    **kwargs)  # (K, N)
    return psis_from_log_weights(lw)
