r"""Log importance weights of any Pyro model/guide pair, drawn in seeded, memory-bounded passes.

Like :mod:`pyro.infer.importance`, this module is generic over Pyro programs: ``model(x)``
and ``guide(x)`` with every sample site inside ``pyro.plate("data", N)`` and its event dims
declared (:mod:`ppl_vae.model`'s conventions). For z_k ~ q(z | x) it returns the per-datapoint
log importance weights

    log w_k(x_i) = log p(x_i, z_k) − log q(z_k | x_i),   shape ``(K, N)``, nats,

from which :mod:`ppl_vae.estimators` builds the ELBO and IWAE_K and :mod:`ppl_vae.psis` k̂.
The particles are an outer plate placed left of the model's plates. Log-densities are
*unscaled*: the data plate's ``size / N`` factor and any ``poutine.scale`` (β) are ignored,
and so are masks, so the weights belong to one datapoint each.

Reproducibility: with ``seed`` given, the K draws come in units of :data:`SAMPLE_UNIT`
particles, unit j drawn from the torch RNG seeded with ``derive_seed(seed, j)``. A pass draws
whole units, so the weights do not depend on ``chunk_size`` (up to float rounding), and the
caller's RNG stream is left untouched. A pass draws its units' latents for the whole batch
(the guide runs once per unit), then weighs them through the model in slices of datapoints,
so that the decoder sees about ``chunk_size`` particles × datapoints at a time. The draws for
datapoint i still depend on the whole batch ``x`` (the guide draws (u, N, ...) at once): fix
the batches too (as :mod:`ppl_vae.evaluate` does) when results must not depend on how work is
split.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
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


class Draws(NamedTuple):
    """One pass of draws: ``log_w (k, N)`` = log p(x, z_k) − log q(z_k|x), and, when asked for,
    ``elbo_analytic (k, N)`` = log p(x|z_k) − Σ_sites KL(q ‖ p) (per-draw terms of the
    analytic-KL ELBO), else ``None``."""

    log_w: torch.Tensor
    elbo_analytic: torch.Tensor | None


def log_importance_weights(model, guide, x, num_samples: int, seed: int | None = None,
                           chunk_size: int | None = None, nesting: int | None = None,
                           **kwargs) -> torch.Tensor:
    """log w_k = log p(x, z_k) − log q(z_k | x) for z_k ~ q(z|x): shape ``(num_samples, N)``,
    nats. Differentiable, so it also serves the IWAE training objective."""
    return torch.cat([d.log_w for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size,
                                                        nesting=nesting, **kwargs)], 0)  # (K, N)


def iter_log_weights(model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None,
                     analytic_kl: bool = False, nesting: int | None = None, **kwargs):
    """Yield :class:`Draws` pass by pass, ``num_samples`` particles in all, about ``chunk_size``
    particles × datapoints per pass (see the module docstring for ``seed``). Differentiable
    (no ``no_grad`` here). ``nesting`` (plate dims of model and guide) is traced when not given;
    ``kwargs`` go to model and guide. With ``analytic_kl`` each latent site's
    E_q[log p(z) − log q(z|x)] is −KL(q ‖ p) in closed form (``NotImplementedError`` where
    ``torch.distributions`` registers none: no silent fallback)."""
    check_num_samples(num_samples)
    if nesting is None:
        nesting = max_plate_nesting(model, guide, x, **kwargs)
    n, chunk_size = x.shape[0], chunk_size or default_chunk(x.device)
    for units in _plan(num_samples, n, chunk_size, seed):
        k = sum(size for size, _ in units)
        rows = max(1, chunk_size // k)  # datapoints per model pass: k × rows ≈ chunk_size
        with rng_fork() if seed is not None else nullcontext():  # restored before each yield
            values, drawn = _draw(guide, x, units, nesting, kwargs)  # (k, N, ...): the guide runs once per unit
            whole = drawn if rows >= n else None  # one slice, the whole batch: its guide trace is drawn's
            parts = [_pass_terms(*_replay(model, guide, _rows(values, i, min(i + rows, n)), x[i:i + rows], k,
                                          nesting, kwargs, whole), nesting, analytic_kl) for i in range(0, n, rows)]
        if len(parts) == 1:
            yield parts[0]
        else:  # (k, N) from the (k, rows) of each slice
            yield Draws(torch.cat([d.log_w for d in parts], 1),
                        torch.cat([d.elbo_analytic for d in parts], 1) if analytic_kl else None)


def max_plate_nesting(model, guide, x, **kwargs) -> int:
    """How many plate dims the model and guide use (traced once on a single datapoint, without
    touching the caller's RNG)."""
    x1 = x[:1]
    with rng_fork(), poutine.block():
        guide_tr = poutine.trace(guide).get_trace(x1, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x1, **kwargs)
    dims = [-f.dim for tr in (guide_tr, model_tr) for s in tr.nodes.values() if s["type"] == "sample"
            for f in s["cond_indep_stack"] if f.vectorized]
    return max(dims, default=0)


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for stream ``keys`` of ``seed`` (NumPy ``SeedSequence``): independent,
    reproducible streams for sample units and datapoint blocks."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


def default_chunk(device) -> int:
    """The ``chunk_size`` used when none is given, for tensors on ``device``."""
    return DEFAULT_CHUNK.get(torch.device(device).type, DEFAULT_CHUNK["cpu"])


def check_num_samples(k) -> None:
    """Refuse a number of samples K that is not an integer >= 1."""
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"the number of samples K must be an integer >= 1, got {k!r}")


@contextmanager
def rng_fork():
    """Restore the torch RNG (CPU and the current CUDA device) on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def guide_trace(guide, x, k: int, nesting: int, kwargs: dict) -> poutine.Trace:
    """The trace of ``guide(x, **kwargs)`` under an outer plate of ``k`` particles at dim
    ``−nesting − 1`` (each latent site ``(k, ..., N, ...)``), blocked from enclosing handlers."""
    with poutine.block(), pyro.plate("_particles", k, dim=-nesting - 1):
        return poutine.trace(guide).get_trace(x, **kwargs)


# --------------------------------------------------------------------------- the pass plan

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


# --------------------------------------------------------------------------- drawing and replaying

def _draw(guide, x, units, nesting, kwargs) -> tuple[poutine.Trace, poutine.Trace | None]:
    """The latent values of one pass over ``units`` = [(size, seed or None)], each unit drawn by
    its own (seeded) guide run on all of ``x``, joined along the particle dim (a trace to replay);
    and, for a single unit, its guide trace itself, which weighs the whole batch without a
    second guide run (the IWAE training step)."""
    traces = []
    for size, seed in units:
        if seed is not None:
            torch.manual_seed(seed)
        traces.append(guide_trace(guide, x, size, nesting, kwargs))
    return _cat_units(traces, nesting), (traces[0] if len(traces) == 1 else None)


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
        guide_tr = guide_trace(poutine.replay(guide, trace=values), x, k, nesting, kwargs)
    with poutine.block(), pyro.plate("_particles", k, dim=-nesting - 1):
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(x, **kwargs)
    return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)


# --------------------------------------------------------------------------- weighing

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


def _per_datapoint(site, log_prob: torch.Tensor, nesting: int) -> torch.Tensor:
    """Reduce a site's (unscaled) log-density to ``(K, N)``: keep the particle and data dims,
    sum every other plate dim."""
    lp = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + log_prob.shape)  # (K, ..., N, ...)
    data_dim = lp.dim() + _data_dim(site)
    other = [d for d in range(1, lp.dim()) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[data_dim])  # (K, N)


def _data_dim(site) -> int:
    for frame in site["cond_indep_stack"]:
        if frame.name == DATA_PLATE:
            return frame.dim
    raise ValueError(f"site {site['name']!r} is not inside pyro.plate({DATA_PLATE!r}, ...): per-datapoint "
                     f"estimators need every sample site inside the data plate")


def _kl(guide_site, model_site) -> torch.Tensor:
    """KL(q ‖ p) of one latent site in closed form (``torch.distributions.kl_divergence``)."""
    try:
        return kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        raise NotImplementedError(
            f"no closed-form KL is registered for site {model_site['name']!r}: "
            f"KL({_describe(guide_site['fn'])} || {_describe(model_site['fn'])}); use analytic_kl=False "
            f"(Monte Carlo KL) or register one with torch.distributions.kl.register_kl") from None


def _describe(fn) -> str:
    """``Independent(StudentT)``: a distribution's class with those it wraps."""
    base = getattr(fn, "base_dist", None)
    return type(fn).__name__ + (f"({_describe(base)})" if base is not None else "")
