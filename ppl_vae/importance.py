r"""Log importance weights of any Pyro model/guide pair, drawn in seeded, memory-bounded passes.

Like :mod:`pyro.infer.importance`, this module is generic over Pyro programs ``model(*args)``,
``guide(*args)``: ``x`` is a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint
arguments, sliced together; every sample site sits in ``pyro.plate("data", N)`` with its event
dims declared (:mod:`ppl_vae.checks`). For z_k ~ q(z | x) it returns the log importance weights

    log w_k(x_i) = log p(x_i, z_k) − log q(z_k | x_i),   shape ``(K, N)``, nats,

from which :mod:`ppl_vae.estimators` builds the ELBO and IWAE_K and :mod:`ppl_vae.psis` k̂.
The particles are an outer plate placed left of the model's plates. Log-densities are
*unscaled*: the data plate's ``size / N`` factor and any ``poutine.scale`` (β) are ignored,
and so are masks, so the weights belong to one datapoint each.

Every call first probes the program once on the caller's own arguments (:func:`inspect_program`).

Reproducibility: with ``seed`` given, the K draws come in units of :data:`SAMPLE_UNIT`
particles, unit j drawn from the torch RNG seeded with ``derive_seed(seed, j)``. A pass draws
whole units, so the weights do not depend on ``chunk_size`` (up to float rounding), and the
caller's RNG stream is left untouched. A pass draws its units' latents for the whole batch
(the guide runs once per unit), then weighs them through the model in slices of datapoints,
so that the decoder sees about ``chunk_size`` particles × datapoints at a time. A program
that is not :func:`slice_safe` (per-datapoint guide parameters read by plate index, ``(N, d)``
tensors in a closure, batch statistics) is weighed on all N rows in one model pass instead:
``max(chunk_size, SAMPLE_UNIT · N)`` rows when seeded. The draws for datapoint i still depend
on the whole batch (the guide draws (u, N, ...) at once): fix the batches too (as
:mod:`ppl_vae.evaluate` does) when results must not depend on how work is split.
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

from . import checks
from .checks import DATA_PLATE, check_num_samples  # noqa: F401 (importance.* for evaluate, latents, psis)
from .errors import UserError

# Particles × datapoints per decoder pass (``chunk_size=None``): bounds memory, not K. On a CPU a
# pass that stays near the caches is fastest (benchmarks/eval_speed.py: 2k–4k rows 5.0 s, 8k
# 7.5 s, 20k 8.8 s for K = 1000 on 1000 images); a GPU wants large passes.
DEFAULT_CHUNK = {"cpu": 4096, "cuda": 2_000_000}
SAMPLE_UNIT = 100  # particles per seeded draw; a pass holds whole units (memory ≥ SAMPLE_UNIT rows)


class Draws(NamedTuple):
    """One pass of draws: ``log_w (k, N)`` = log p(x, z_k) − log q(z_k|x), and, when asked for,
    ``elbo_analytic (k, N)`` = log p(x|z_k) − Σ_sites KL(q ‖ p), closed form at the sites of
    :attr:`Program.closed_form` and Monte Carlo at the others (per-draw terms of the
    analytic-KL ELBO), else ``None``."""

    log_w: torch.Tensor
    elbo_analytic: torch.Tensor | None


class Program(NamedTuple):
    """What one probe of model and guide on the caller's arguments found (:func:`inspect_program`):
    ``nesting``, the plate dims they use; ``closed_form``, the latent sites whose KL is taken in
    closed form (``None``: no analytic ELBO asked for); ``no_closed_form``, why a site that could
    have one has none; ``slice_safe``, whether weighing slices of the datapoints gives the
    whole batch's weights (:func:`slice_safe`)."""

    nesting: int
    closed_form: frozenset | None = None
    no_closed_form: str | None = None
    slice_safe: bool = True


def log_importance_weights(model, guide, x, num_samples: int, seed: int | None = None,
                           chunk_size: int | None = None, nesting: int | None = None,
                           **kwargs) -> torch.Tensor:
    """log w_k = log p(x, z_k) − log q(z_k | x) for z_k ~ q(z|x): shape ``(num_samples, N)``,
    nats. ``x``: a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint arguments
    (:mod:`ppl_vae.checks`). Differentiable, so it also serves the IWAE training objective."""
    return torch.cat([d.log_w for d in iter_log_weights(model, guide, x, num_samples, seed, chunk_size,
                                                        nesting=nesting, **kwargs)], 0)  # (K, N)


def iter_log_weights(model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None,
                     analytic_kl=False, nesting: int | None = None, program: Program | None = None, **kwargs):
    """Yield :class:`Draws` pass by pass, ``num_samples`` particles in all, about ``chunk_size``
    particles × datapoints per pass (see the module docstring for ``seed``). Differentiable
    (no ``no_grad`` here). ``x`` and ``kwargs`` as :func:`log_importance_weights`. The program
    is probed once (:func:`inspect_program`) unless ``program`` is given, or ``nesting`` is
    given without ``analytic_kl`` (the training step's trusted fast path: no checks, no
    slicing). ``analytic_kl``: ``True`` adds the analytic-KL ELBO (:class:`~ppl_vae.checks.NoClosedFormKL`
    where a valid closed form is not registered), ``"auto"`` the same with Monte Carlo there."""
    check_num_samples(num_samples)
    if program is None:
        program = (Program(nesting) if nesting is not None and not analytic_kl else
                   inspect_program(model, guide, x, kwargs, analytic_kl))
    args = checks.as_args(x)
    n, chunk_size = args[0].shape[0], chunk_size or default_chunk(args[0].device)
    for units in _plan(num_samples, n, chunk_size, seed):
        k = sum(size for size, _ in units)
        # datapoints per model pass: k × rows ≈ chunk_size; all of them for a program that is not slice-safe
        rows = max(1, chunk_size // k) if program.slice_safe else n
        with rng_fork() if seed is not None else nullcontext():  # restored before each yield
            values, drawn = _draw(guide, args, units, program.nesting, kwargs)  # (k, N, ...): one guide run per unit
            whole = drawn if rows >= n else None  # one slice, the whole batch: its guide trace is drawn's
            parts = [_pass_terms(*_replay(model, guide, _rows(values, i, min(i + rows, n)),
                                          checks.take(args, i, i + rows), k, program.nesting, kwargs, whole),
                                 program.nesting, program.closed_form) for i in range(0, n, rows)]
        if len(parts) == 1:
            yield parts[0]
        else:  # (k, N) from the (k, rows) of each slice
            yield Draws(torch.cat([d.log_w for d in parts], 1),
                        None if program.closed_form is None else torch.cat([d.elbo_analytic for d in parts], 1))


def inspect_program(model, guide, x, kwargs: dict, analytic_kl=False) -> Program:
    """Probe ``guide(*args, **kwargs)`` and the model replayed on it once, on the caller's own
    arguments (one draw, no particle plate), without touching the caller's RNG: the data, the
    plates, the log weights and the analytic-KL sites are checked (:mod:`ppl_vae.checks`; a
    one-line ``UserError`` on bad input), and :func:`slice_safe`. Costs one guide and one model
    run on all N datapoints and one on the last two."""
    args = checks.check_data(x, kwargs)
    checks.check_program_inputs(model, guide, args)
    with rng_fork(), poutine.block(), torch.no_grad():
        try:
            guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
            checks.check_plates(model_tr, guide_tr, args[0].shape[0])
            nesting = checks.plate_nesting(model_tr, guide_tr)
            log_w = _pass_terms(prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr), nesting).log_w
        except torch.cuda.OutOfMemoryError:
            raise
        except checks.PROGRAM_ERRORS as e:
            raise checks.program_failed(model, guide, args, e) from e
        closed, missing = checks.closed_form_sites(model_tr, guide_tr, analytic_kl) if analytic_kl else (None, None)
        safe = _same_on_a_slice(model, guide, args, kwargs, nesting, guide_tr, log_w)
    return Program(nesting, closed, missing, safe)


def max_plate_nesting(model, guide, x, **kwargs) -> int:
    """How many plate dims the model and guide use, traced on the caller's own ``x`` (tensor or
    tuple of per-datapoint arguments) without touching the caller's RNG."""
    return inspect_program(model, guide, x, kwargs).nesting


def slice_safe(model, guide, x, **kwargs) -> bool:
    """Whether datapoint i gets the same weight from a run on a slice of ``x`` as from one on all
    of it: not so for a guide reading per-datapoint parameters by plate index (``loc[idx]``,
    idx = 0..rows−1 on a slice), holding ``(N, d)`` tensors or using batch statistics. Tested on
    the last two datapoints (one draw of the whole batch replayed on ``x[N−2:]``; agreement to
    1000 float eps, relative)."""
    return inspect_program(model, guide, x, kwargs).slice_safe


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for stream ``keys`` of ``seed`` (NumPy ``SeedSequence``): independent,
    reproducible streams for sample units and datapoint blocks."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)


def default_chunk(device) -> int:
    """The ``chunk_size`` used when none is given, for tensors on ``device``."""
    return DEFAULT_CHUNK.get(torch.device(device).type, DEFAULT_CHUNK["cpu"])


@contextmanager
def rng_fork():
    """Restore the torch RNG (CPU and the current CUDA device) on exit."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


def guide_trace(guide, x, k: int | None, nesting: int, kwargs: dict) -> poutine.Trace:
    """The trace of ``guide(*args, **kwargs)`` (``x``: a tensor or a tuple of arguments) under an
    outer plate of ``k`` particles at dim ``−nesting − 1`` (each latent site ``(k, ..., N, ...)``;
    no particle plate for ``k=None``), blocked from enclosing handlers."""
    with poutine.block(), _particles(k, nesting):
        return poutine.trace(guide).get_trace(*checks.as_args(x), **kwargs)


def _particles(k: int | None, nesting: int):
    return nullcontext() if k is None else pyro.plate("_particles", k, dim=-nesting - 1)


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

def _draw(guide, args, units, nesting, kwargs) -> tuple[poutine.Trace, poutine.Trace | None]:
    """The latent values of one pass over ``units`` = [(size, seed or None)], each unit drawn by
    its own (seeded) guide run on all of ``x``, joined along the particle dim (a trace to replay);
    and, for a single unit, its guide trace itself, which weighs the whole batch without a
    second guide run (the IWAE training step)."""
    traces = []
    for size, seed in units:
        if seed is not None:
            torch.manual_seed(seed)
        traces.append(guide_trace(guide, args, size, nesting, kwargs))
    return _cat_units(traces, nesting), (traces[0] if len(traces) == 1 else None)


def _cat_units(traces, nesting) -> poutine.Trace:
    """The latent values of several guide traces joined along the particle dim, for replay."""
    out = poutine.Trace()
    for name, site in traces[0].nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        dim = site["value"].dim() - site["fn"].event_dim - nesting - 1  # the particle dim
        value = site["value"] if len(traces) == 1 else torch.cat([t.nodes[name]["value"] for t in traces], dim)
        out.add_node(name, type="sample", is_observed=False, infer=site["infer"], event_dim=site["fn"].event_dim,
                     data_dim=checks.data_dim(site), value=value)  # (k, ..., N, ...)
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


def _replay(model, guide, values, args, k, nesting, kwargs, guide_tr=None):
    """Guide and model traces with the latents ``values`` (k particles) replayed on ``args``
    (``guide_tr``: the guide's trace of exactly these, when there is one already)."""
    if guide_tr is None:
        guide_tr = guide_trace(poutine.replay(guide, trace=values), args, k, nesting, kwargs)
    with poutine.block(), _particles(k, nesting):
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)


def _same_on_a_slice(model, guide, args, kwargs, nesting, guide_tr, log_w) -> bool:
    """:func:`slice_safe` from the probe: its guide trace and log weights ``(1, N)`` of the whole batch."""
    n = args[0].shape[0]
    if n == 1:
        return True
    try:
        part = _pass_terms(*_replay(model, guide, _rows(_cat_units([guide_tr], nesting), n - 2, n),
                                    checks.take(args, n - 2, n), None, nesting, kwargs), nesting).log_w  # (1, 2)
    except torch.cuda.OutOfMemoryError:
        raise
    except checks.PROGRAM_ERRORS:  # e.g. a guide holding (N, d) tensors: a slice does not fit its plate
        return False
    whole, tol = log_w[:, n - 2:], 1000 * torch.finfo(log_w.dtype).eps
    return bool(((part - whole).abs() <= tol * (1 + whole.abs())).all())


# --------------------------------------------------------------------------- weighing

def _pass_terms(model_tr, guide_tr, nesting, closed_form: frozenset | None = None) -> Draws:
    """The per-draw terms ``(k, N)`` of one pass; the analytic-KL ELBO's when ``closed_form`` is a
    set of sites (−KL(q ‖ p) at those, log p − log q at the other latent sites)."""
    obs = latent_mc = latent_an = 0.0  # each becomes (k, N)
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            obs = obs + _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
        elif name in guide_tr.nodes:  # a model-only latent is drawn from its prior: p/q cancel
            g = guide_tr.nodes[name]
            log_p = _per_datapoint(site, site["fn"].log_prob(site["value"]), nesting)
            log_q = _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting)
            latent_mc = latent_mc + log_p - log_q
            if closed_form is None:
                continue
            if name in closed_form:  # KL(q ‖ p) in closed form: torch.distributions.kl_divergence
                latent_an = latent_an - _per_datapoint(site, kl_divergence(g["fn"], site["fn"]), nesting)
            else:
                latent_an = latent_an + log_p - log_q
    aux = 0.0
    for name, g in guide_tr.nodes.items():  # auxiliary guide-only sites contribute −log q
        if g["type"] == "sample" and not g["is_observed"] and name not in model_tr.nodes:
            aux = aux - _per_datapoint(g, g["fn"].log_prob(g["value"]), nesting)
    log_w = obs + latent_mc + aux
    if not torch.is_tensor(log_w):
        raise UserError("the model and guide have no sample sites to weigh")
    # + zeros: terms constant over particles broadcast to (k, N)
    analytic = None if closed_form is None else obs + latent_an + aux + torch.zeros_like(log_w)
    return Draws(log_w, analytic)


def _per_datapoint(site, log_prob: torch.Tensor, nesting: int) -> torch.Tensor:
    """Reduce a site's (unscaled) log-density to ``(K, N)``: keep the particle and data dims,
    sum every other plate dim (a trace without particle plate gives K = 1)."""
    lp = log_prob.reshape((1,) * (nesting + 1 - log_prob.dim()) + log_prob.shape)  # (K, ..., N, ...)
    data_dim = lp.dim() + checks.data_dim(site)
    other = [d for d in range(1, lp.dim()) if d != data_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(lp.shape[0], lp.shape[data_dim])  # (K, N)
