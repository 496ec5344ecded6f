r"""Drawing latents from a guide, replaying them through model and guide, and weighing them.

The machinery behind :mod:`ppl_vae.inference.importance`: the guide runs under an outer plate of k
particles at dim ``−nesting − 1``, left of the program's own plates, so every latent site has
shape ``(k, ..., N, ...)``; the drawn values are replayed on all datapoints or on a slice of
them, and each site's log-density is reduced to one number per particle and datapoint, ``(k, N)``,
in nats. Masks (``poutine.mask``, a site's ``mask``) and scales (``poutine.scale``) apply as in
Pyro's ``Trace_ELBO`` (``scale_and_mask``), with one exception: the data plate's own minibatch
factor ``size / N`` is left out, so that each weight belongs to one datapoint.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.torch_distribution import MaskedDistribution
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import kl_divergence

from ..core.errors import UserError

DATA_PLATE = "data"


class Draws(NamedTuple):
    """One pass of draws: ``log_w (k, N)`` = log p(x, z_k) − log q(z_k|x), and, when asked for,
    ``elbo_analytic (k, N)`` = log p(x|z_k) − Σ_sites KL(q ‖ p), closed form at the sites of
    :attr:`ppl_vae.inference.checks.Program.closed_form` and Monte Carlo at the others (per-draw terms of the
    analytic-KL ELBO), else ``None``; ``log_lik (k, N)`` = log p(x|z_k), the sum over the observed
    sites (the reconstruction term; ``None`` where a caller built the tuple without it)."""

    log_w: torch.Tensor
    elbo_analytic: torch.Tensor | None
    log_lik: torch.Tensor | None = None

    @staticmethod
    def cat(parts) -> "Draws":
        """The draws of consecutive slices of datapoints joined along N: each field ``(k, N)``
        from the ``(k, rows)`` of each slice (``None`` stays ``None``)."""
        return Draws(*(None if f[0] is None else torch.cat(f, 1) for f in zip(*parts)))


@contextmanager
def rng_fork():
    """Restore the torch RNG (CPU and the current CUDA device) on exit."""
    devices = (
        [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    )
    with torch.random.fork_rng(devices=devices):
        yield


def guide_trace(guide, x, k: int | None, nesting: int, kwargs: dict) -> poutine.Trace:
    """The trace of ``guide(*args, **kwargs)`` (``x``: a tensor or a tuple of arguments) under an
    outer plate of ``k`` particles at dim ``−nesting − 1`` (each latent site ``(k, ..., N, ...)``;
    no particle plate for ``k=None``), blocked from enclosing handlers."""
    with poutine.block(), _particles(k, nesting):
        return poutine.trace(guide).get_trace(*as_args(x), **kwargs)


def _particles(k: int | None, nesting: int):
    return nullcontext() if k is None else pyro.plate("_particles", k, dim=-nesting - 1)


def as_args(x) -> tuple[torch.Tensor, ...]:
    """The positional per-datapoint arguments: ``(x,)`` for a tensor, the tuple itself otherwise."""
    return (x,) if torch.is_tensor(x) else tuple(x)


def data_dim(site) -> int:
    """The (negative) dim of the data plate in a site's batch shape."""
    return next(f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE)


def draw_units(guide, args, units, nesting, kwargs) -> tuple[poutine.Trace, poutine.Trace | None]:
    """The latent values of one pass over ``units`` = [(size, seed or None)], each unit drawn by
    its own (seeded) guide run on all of ``args``, joined along the particle dim (a trace to replay);
    and, for a single unit, its guide trace itself, which weighs the whole batch without a
    second guide run (the IWAE training step)."""
    traces = []
    for size, seed in units:
        if seed is not None:
            torch.manual_seed(seed)
        traces.append(guide_trace(guide, args, size, nesting, kwargs))
    return cat_units(traces, nesting), (traces[0] if len(traces) == 1 else None)


def cat_units(traces, nesting) -> poutine.Trace:
    """The latent values of several guide traces joined along the particle dim, for replay."""
    out = poutine.Trace()
    for name, site in traces[0].nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        dim = site["value"].dim() - site["fn"].event_dim - nesting - 1  # the particle dim
        value = (
            site["value"] if len(traces) == 1 else torch.cat([t.nodes[name]["value"] for t in traces], dim)
        )
        out.add_node(
            name,
            type="sample",
            is_observed=False,
            infer=site["infer"],
            event_dim=site["fn"].event_dim,
            data_dim=data_dim(site),
            value=value,
        )  # (k, ..., N, ...)
    return out


def row_dim(site) -> int:
    """The data dim of a site's value in a :func:`cat_units` trace, counted from the left."""
    return site["value"].dim() - site["event_dim"] + site["data_dim"]


def take_rows(values: poutine.Trace, start: int, stop: int) -> poutine.Trace:
    """``values`` restricted to datapoints ``start:stop`` (along each site's data-plate dim)."""
    out = poutine.Trace()
    for name, site in values.nodes.items():
        out.add_node(
            name,
            type="sample",
            is_observed=False,
            infer=site["infer"],
            value=site["value"].narrow(row_dim(site), start, stop - start),
        )
    return out


def flow_guide(guide_tr) -> bool:
    """Whether a latent site of the guide trace draws from a flow (:func:`is_flow`): replaying
    such a guide on other values than it drew needs the flow's inverse, for an autoregressive
    flow one network pass per dimension."""
    return any(
        is_flow(site["fn"])
        for site in guide_tr.nodes.values()
        if site["type"] == "sample" and not site["is_observed"]
    )


def is_flow(fn) -> bool:
    """Whether ``fn`` (under any ``Independent`` / mask wrappers) is a flow, z = F(z₀) with z₀ its
    base draw and F bijective: a ``TransformedDistribution`` whose every transform says it is
    (torch's ``Transform.bijective``: Pyro's flows, ``ExpTransform``, ``AffineTransform``, ...).
    ``HalfNormal``, ``HalfCauchy`` and Pyro's ``FoldedDistribution`` are built on |·|
    (``AbsTransform``, not bijective, no Jacobian): not flows, their own ``log_prob`` is the density."""
    fn = unwrap(fn)
    return isinstance(fn, torch.distributions.TransformedDistribution) and all(
        t.bijective for t in fn.transforms
    )


def unwrap(fn):
    """The distribution under any ``Independent`` / mask wrappers."""
    while isinstance(fn, (torch.distributions.Independent, MaskedDistribution)):
        fn = fn.base_dist
    return fn


def replay(model, guide, values, args, k, nesting, kwargs, guide_tr=None, enumerate=False):
    """Guide and model traces with the latents ``values`` (k particles) replayed on ``args``
    (``guide_tr``: the guide's trace of exactly these, when there is one already). ``enumerate``:
    the model's sites marked ``infer={"enumerate": "parallel"}`` take every value of their
    support, each on its own dim left of the particle dim (``−nesting − 2``, ``−nesting − 3``, ...)."""
    if guide_tr is None:
        guide_tr = guide_trace(poutine.replay(guide, trace=values), args, k, nesting, kwargs)
    if enumerate:
        model = poutine.enum(model, first_available_dim=-nesting - 2)
    with poutine.block(), _particles(k, nesting):
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr)


def weigh(model_tr, guide_tr, nesting, closed_form: frozenset | None = None) -> Draws:
    """The per-draw terms ``(k, N)`` of one pass: log w, log p(x|z) (the observed sites), and the
    analytic-KL ELBO's when ``closed_form`` is a set of sites (−KL(q ‖ p) at those, log p − log q
    at the other latent sites)."""
    obs = latent_mc = latent_an = 0.0  # each becomes (k, N)
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            obs = obs + log_density(site, nesting)
        elif name in guide_tr.nodes:  # a model-only latent is drawn from its prior: p/q cancel
            g = guide_tr.nodes[name]
            log_p, log_q = log_density(site, nesting), log_density(g, nesting)
            latent_mc = latent_mc + log_p - log_q
            if closed_form is None:
                continue
            if name in closed_form:  # KL(q ‖ p) in closed form, masked and scaled as the guide site
                kl = kl_divergence(g["fn"], site["fn"])  # as TraceMeanField_ELBO does
                latent_an = latent_an - per_datapoint(
                    g, scale_and_mask(kl, site_scale(g), g["mask"]), nesting
                )
            else:
                latent_an = latent_an + log_p - log_q
    aux = 0.0
    for name, g in guide_tr.nodes.items():  # auxiliary guide-only sites contribute −log q
        if g["type"] == "sample" and not g["is_observed"] and name not in model_tr.nodes:
            aux = aux - log_density(g, nesting)
    log_w = obs + latent_mc + aux
    if not torch.is_tensor(log_w):
        raise UserError("the model and guide have no sample sites to weigh")
    # + zeros: terms constant over particles broadcast to (k, N)
    analytic = None if closed_form is None else obs + latent_an + aux + torch.zeros_like(log_w)
    log_lik = torch.broadcast_to(
        torch.as_tensor(obs, dtype=log_w.dtype, device=log_w.device), log_w.shape
    )  # a view
    return Draws(log_w, analytic, log_lik)


def weigh_enumerated(model_tr, guide_tr, nesting, enumerated) -> Draws:
    """:func:`weigh` for a model whose sites ``enumerated`` took every value of their support
    (:func:`replay` with ``enumerate``): each is summed out inside the weight, as
    ``TraceEnum_ELBO`` sums it,

        log w_k = log Σ_y p(x, y, z_k) − log q(z_k | x),    ``(k, N)``,

    and ``log_lik`` = log Σ_y p(y) p(x | y, z_k), the reconstruction term with y under its prior.
    No analytic-KL terms (``elbo_analytic`` is ``None``)."""
    e = len(enumerated)
    joint = lik = 0.0  # each (C_1, .., C_E, k, N) after broadcasting
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample":
            continue
        if site["is_observed"] or name in enumerated:
            term = log_density(site, nesting, e)
            joint, lik = joint + term, lik + term
        elif name in guide_tr.nodes:  # a model-only latent is drawn from its prior: p/q cancel
            joint = joint + log_density(site, nesting, e) - log_density(guide_tr.nodes[name], nesting, e)
    aux = 0.0
    for name, g in guide_tr.nodes.items():  # auxiliary guide-only sites contribute −log q
        if g["type"] == "sample" and not g["is_observed"] and name not in model_tr.nodes:
            aux = aux - log_density(g, nesting)
    log_w = torch.logsumexp(joint.flatten(0, e - 1), 0) + aux  # (k, N): Σ over the C_1 ⋯ C_E values
    log_lik = torch.logsumexp(lik.flatten(0, e - 1), 0).expand_as(log_w)  # (k, N)
    return Draws(log_w, None, log_lik)


def log_density(site, nesting: int, enum_dims: int = 0) -> torch.Tensor:
    """A sample site's log-density of its value, scaled and masked as ``Trace_ELBO`` does
    (:func:`site_scale`), reduced to ``(K, N)`` (``(E.., K, N)``) by :func:`per_datapoint`."""
    log_prob = site["fn"].log_prob(site["value"])  # (E?.., K?, ..., N, ...) batch shape
    return per_datapoint(site, scale_and_mask(log_prob, site_scale(site), site["mask"]), nesting, enum_dims)


def site_scale(site):
    """The site's scale (``poutine.scale`` factors × plates' minibatch factors) without the data
    plate's ``size / subsample_size``: per-datapoint terms, not an estimate of the full-data sum."""
    frame = next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)
    scale = site["scale"]
    if frame is None or frame.full_size is None or frame.full_size == frame.size:
        return scale
    factor = frame.full_size / frame.size  # what pyro.plate multiplied in
    if not torch.is_tensor(scale) and scale == factor:  # the usual case: exactly 1, no multiply
        return 1.0
    return scale / factor


def per_datapoint(site, log_prob: torch.Tensor, nesting: int, enum_dims: int = 0) -> torch.Tensor:
    """Reduce a site's log-density to ``(K, N)``: keep the particle and data dims, sum every other
    plate dim (a trace without particle plate gives K = 1). With ``enum_dims`` E enumeration dims
    left of the particle dim: ``(C_1, ..., C_E, K, N)``, sizes 1 where the site does not depend on
    that enumerated value."""
    lp = log_prob.reshape(
        (1,) * (enum_dims + nesting + 1 - log_prob.dim()) + log_prob.shape
    )  # (E.., K, .., N, ..)
    n_dim = lp.dim() + data_dim(site)  # the data dim, counted from the left
    other = [d for d in range(enum_dims + 1, lp.dim()) if d != n_dim]
    if other:
        lp = lp.sum(other, keepdim=True)
    return lp.reshape(*lp.shape[: enum_dims + 1], lp.shape[n_dim])  # (E.., K, N)
