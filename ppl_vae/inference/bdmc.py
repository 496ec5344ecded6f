r"""Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015): a bracket on log p(x) for data
simulated from the program itself.

For x simulated with its latents z* (:func:`simulate`, Pyro's ``poutine.uncondition``), z* is an
exact draw from p(z | x). Reverse AIS (:func:`reverse_ais`) starts its chains there, at β = 1, and
anneals to the base density r(z) at β = 0 along the path of :mod:`ppl_vae.inference.ais`; its
weights w_rev = Π_t f_{t−1}(z_t) / f_t(z_t) have E[w_rev] = 1 / p(x), so −log (1/C) Σ_c w_rev,c is
a stochastic *upper* bound (Jensen), where forward AIS gives a stochastic lower bound. On such
data :func:`bdmc` returns both: the gap between them bounds the error of AIS itself (in
expectation), which a lower bound alone cannot show. The chains of one datapoint share their
start z*, so reverse AIS's standard error (which assumes independent chains) is optimistic.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..core.errors import UserError
from ..core.seeding import derive_seed
from .ais import AISEstimate, _run, ais
from .inputs import check_data
from .replay import rng_fork


def simulate(model, x_like, seed: int = 0, **kwargs):
    """``(x, latents)``: one draw of every latent and observed site of ``model`` run on ``x_like``
    (``poutine.uncondition``), so ``x`` has the shape of ``x_like`` (a tuple ``(x, y, ...)`` keeps
    its other arguments, e.g. labels); ``latents`` {site: (N, ...)}, the values that generated x."""
    args = check_data(x_like, kwargs)
    with rng_fork(), poutine.block(), torch.no_grad():
        torch.manual_seed(seed)
        tr = poutine.trace(poutine.uncondition(model)).get_trace(*args, **kwargs)
    out, latents = list(args), {}
    for name, s in tr.nodes.items():
        if s["type"] != "sample" or site_is_subsample(s):
            continue
        if not s["infer"].get("was_observed"):
            latents[name] = s["value"]
            continue
        i = next((j for j, a in enumerate(args) if s["infer"]["obs"] is a), None)
        if i is None or s["value"].shape != args[i].shape:
            raise UserError(
                f"simulate: observed site {name!r} does not observe an argument of the model as given "
                f"(obs=x), so its draw cannot stand in for the data"
            )
        out[i] = s["value"].to(args[i].dtype)
    return (out[0] if torch.is_tensor(x_like) else tuple(out)), latents


def reverse_ais(model, guide, x, latents: dict, *, num_steps: int, num_chains: int = 16, leapfrog: int = 10,
                init: str = "guide", schedule: str = "sigmoid", seed: int | None = None,
                chunk_size: int | None = None, step_size: float = 0.1, pilot_chains: int = 4, progress=None,
                program=None, **kwargs) -> AISEstimate:  # fmt: skip
    """A stochastic *upper* bound on log p(x) for x simulated with the exact ``latents`` {site: value
    as in a plain run of the model, (N, ...)} (:func:`simulate`): every chain starts at them
    (β = 1) and anneals to β = 0; the value is −log (1/C) Σ_c w_rev,c with E[w_rev] = 1/p(x).
    Arguments as :func:`ais`; ``log_weights`` holds log w_rev."""
    return _run(model, guide, x, kwargs, num_steps, num_chains, leapfrog, init, schedule, seed, chunk_size,
                step_size, pilot_chains, progress, latents, program)  # fmt: skip


class Bracket(NamedTuple):
    """BDMC's bracket per datapoint: ``lower`` (forward AIS) ≤ log p(x) ≤ ``upper`` (reverse AIS), each
    an :class:`AISEstimate` ``(N,)``, ``gap (N,)`` = upper − lower, and the simulated data ``x``."""

    lower: AISEstimate
    upper: AISEstimate
    gap: torch.Tensor
    x: object


def bdmc(model, guide, x_like, *, num_steps: int, num_chains: int = 16, seed: int = 0, **kwargs) -> Bracket:
    """Bidirectional Monte Carlo (Grosse et al. 2015): x simulated from ``model`` like ``x_like``
    (:func:`simulate`, seed ``derive_seed(seed, 0)``), then :func:`ais` (seed 1) and
    :func:`reverse_ais` (seed 2) from its exact latents; ``kwargs`` as :func:`ais` (``leapfrog``,
    ``init``, ``chunk_size``, ``program``, ...). The gap bounds the error of AIS on data like these."""
    ais_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _AIS_ARGS}
    x, latents = simulate(model, x_like, derive_seed(seed, 0), **kwargs)
    lo = ais(
        model,
        guide,
        x,
        num_steps=num_steps,
        num_chains=num_chains,
        seed=derive_seed(seed, 1),
        **ais_kw,
        **kwargs,
    )
    up = reverse_ais(model, guide, x, latents, num_steps=num_steps, num_chains=num_chains, seed=derive_seed(seed, 2),
                     **ais_kw, **kwargs)  # fmt: skip
    return Bracket(lo, up, up.value - lo.value, x)


_AIS_ARGS = ("leapfrog", "init", "schedule", "chunk_size", "step_size", "pilot_chains", "progress", "program")
