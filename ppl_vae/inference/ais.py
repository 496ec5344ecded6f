r"""Annealed importance sampling (AIS) for log p(x) of any Pyro program, per datapoint, in nats.

**AIS** (Neal 2001): from z_0 ~ f_0 = r(z), the base density (the guide q(z|x), or the prior
p(z) as Wu et al. 2017 do), along the geometric path

    f_t(z) = r(z)^(1 − β_t) p(x, z)^(β_t),   0 = β_0 < β_1 < … < β_T = 1,

    log w = Σ_{t=1..T} (β_t − β_{t−1}) ℓ(z_{t−1}),   ℓ(z) = log p(x, z) − log r(z),

with z_t drawn from an HMC transition that leaves f_t invariant (:mod:`ppl_vae.inference.hmc`)
at each intermediate β_1 … β_{T−1} (the last transition would not change w). E[w] = p(x), so
log of the mean of C chains' weights is a stochastic lower bound: E[log ŵ] ≤ log p(x), tight as
T grows. With T = 1 it is IWAE_C of the same draws. Schedule: ``"sigmoid"`` (default; Grosse,
Ghahramani & Adams 2015, Wu et al. 2017: β̃_t = σ(4 (2t/T − 1)), rescaled to [0, 1]: small
steps at both ends, where f_t changes fastest) or ``"linear"``.

**Step size.** Each datapoint has its own ε, adapted after every transition toward an acceptance
probability of 0.65: ε ← ε · exp(κ (ā − 0.65)), ā the mean acceptance probability of P extra
*pilot* chains of that datapoint, whose weights are never used. The C estimating chains follow
the pilots' ε, which depends only on the pilots' past: for any fixed realisation of the pilots,
each estimating chain is plain AIS with fixed kernels, so E[w] = p(x) holds exactly (an ε
adapted from the chains' own acceptances would make each kernel depend on the chain's past,
and the telescoping proof of unbiasedness no longer applies). ``pilot_chains=0``: a fixed ε.

**Reverse AIS** (Grosse et al. 2015; :mod:`ppl_vae.inference.bdmc`): for x simulated with its
latents z*, chains started at z* ~ p(z | x) exactly and annealed from β = 1 to 0 accumulate
log w_rev = Σ_t (β_{t−1} − β_t) ℓ(z) along the reversed schedule, with E[w_rev] = 1 / p(x):
−log of the mean of the C chains' w_rev is a stochastic *upper* bound (``_run`` with ``latents``).

Memory is O(batch × chains × latent size), never O(T); the loop over t makes no host
synchronisation. Randomness: datapoint i (its row in ``x``) draws from ``derive_seed(seed, i)``
alone (its initial draws, then counter-based noise), so its numbers do not depend on
``chunk_size`` nor on the other datapoints of ``x`` (up to float rounding), except for a
program that is not slice-safe (weighed on all of ``x`` at once, its initial draws made together).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from ..core.errors import UserError
from ..core.seeding import derive_seed
from .checks import Program, describe, inspect_program
from .hmc import CounterNoise, Latent, Point, Target, transition, unconstrained
from .importance import SAMPLE_UNIT, default_chunk
from .inputs import check_data, take
from .replay import data_dim, draw_units, is_flow, rng_fork, row_dim, unwrap
from .running import Estimate, delta_method

TARGET_ACCEPT, ADAPT_RATE = 0.65, 0.5  # ε ← ε · exp(ADAPT_RATE · (ā − TARGET_ACCEPT))
MIN_ESS_FRACTION = 0.5  # a datapoint's stderr is flagged when its C weights' ESS < this × C
PILOT_UNIT = 1 << 20  # the pilot chains' unit number in derive_seed (after the estimating chains' units)
SCHEDULES = ("sigmoid", "linear")


@dataclass
class AISEstimate(Estimate):
    """An :class:`Estimate` ``(N,)`` with AIS's diagnostics: ``accept (N,)`` the mean acceptance
    probability of the estimating chains' transitions, ``ess (N,)`` the effective sample size
    (Σw)²/Σw² of their C final weights, ``step_size (N,)`` the final ε and ``log_weights (C, N)``.
    ``trusted`` ``(N,)``: ESS ≥ :data:`MIN_ESS_FRACTION` × C, where the delta-method stderr means something."""

    accept: torch.Tensor
    ess: torch.Tensor
    step_size: torch.Tensor
    log_weights: torch.Tensor

    @property
    def trusted(self) -> torch.Tensor:
        return self.ess >= MIN_ESS_FRACTION * self.log_weights.shape[0]


def schedule(num_steps: int, kind: str = "sigmoid") -> list[float]:
    """β_0 = 0 < … < β_T = 1 (T + 1 floats)."""
    if kind == "linear":
        return [t / num_steps for t in range(num_steps + 1)]
    s = [1 / (1 + math.exp(-4.0 * (2 * t / num_steps - 1))) for t in range(num_steps + 1)]
    return [0.0] + [(b - s[0]) / (s[-1] - s[0]) for b in s[1:-1]] + [1.0]


def _check_settings(num_steps, num_chains, leapfrog, step_size, pilot_chains, init, sched):
    for name, v, low in (
        ("num_steps", num_steps, 1),
        ("num_chains", num_chains, 1),
        ("leapfrog", leapfrog, 1),
        ("pilot_chains", pilot_chains, 0),
    ):
        if not (isinstance(v, int) and not isinstance(v, bool) and v >= low):
            raise UserError(f"ais: {name} must be an integer >= {low}, got {v!r}")
    if not (isinstance(step_size, (int, float)) and step_size > 0 and math.isfinite(step_size)):
        raise UserError(f"ais: step_size must be a number > 0, got {step_size!r}")
    if init not in ("guide", "prior"):
        raise UserError(f"ais: init must be 'guide' or 'prior', got {init!r}")
    if sched not in SCHEDULES:
        raise UserError(f"ais: schedule must be one of {', '.join(SCHEDULES)}, got {sched!r}")


def _refuse(model_tr, guide_tr, init: str, grads: bool = False) -> None:
    """One line per refusal (which site, why): a discrete latent, one of model or guide alone
    (``init="guide"``), or, with ``grads`` (traces of values that require grad), one whose
    log-density has no gradient."""
    sites = [("model", model_tr)] + ([("guide", guide_tr)] if init == "guide" else [])
    for role, tr in sites:
        for name, s in tr.nodes.items():
            if s["type"] != "sample" or s["is_observed"] or site_is_subsample(s):
                continue
            if grads and not s["fn"].log_prob(s["value"]).requires_grad:
                raise UserError(
                    f"AIS needs the gradient of every latent's log-density: {role} site {name!r} "
                    f"({describe(s['fn'])}) is not reparameterizable (its log_prob is not differentiable in z)"
                )
            if grads:
                continue
            if s["fn"].support.is_discrete:
                raise UserError(
                    f"AIS needs continuous latents: {role} site {name!r} is discrete ({describe(s['fn'])}), "
                    f"and HMC cannot move it; sum it out of the program or use iwae"
                )
            if init == "guide" and name not in (guide_tr.nodes if role == "model" else model_tr.nodes):
                other = "guide" if role == "model" else "model"
                raise UserError(
                    f"AIS with init='guide' anneals q(z|x) into p(z|x) over the model's latents: {role} site "
                    f"{name!r} has no {other} site; use init='prior' (--ais-init prior), or draw every model "
                    f"latent in the guide"
                )


class _Chains(NamedTuple):
    target: Target
    u: dict  # {site: (K, ..., N, ...)} unconstrained
    point: Point
    noise: dict  # {site or "accept": int64 keys}


def _start(model, guide, args, kwargs, k, nesting, init, z0: dict, keys) -> _Chains:
    """Chains at the constrained latents ``z0`` {site: (K, ..., N, ...)}: their sites, unconstrained
    state, first :class:`Point` (with the refusals) and noise streams."""
    target = Target(model, guide, args, kwargs, k, nesting, init)
    values = poutine.Trace()
    for name, z in z0.items():
        values.add_node(name, type="sample", is_observed=False, infer={}, value=z)
    with torch.no_grad():
        model_tr, guide_tr = target.traces(values)
    _refuse(model_tr, guide_tr, init)
    for name in z0:
        s, g = model_tr.nodes.get(name), guide_tr.nodes.get(name)
        if s is None:
            raise UserError(f"latent site {name!r} is not a site of the model")
        ev, flow = s["fn"].event_dim, g is not None and is_flow(g["fn"])
        on = unwrap(g["fn"]).base_dist if flow else s["fn"]  # a flow site moves its base draw (hmc)
        target.latents.append(
            Latent(name, unconstrained(name, on), ev, z0[name].dim() - ev + data_dim(s), flow)
        )
    u = {
        s.name: s.transform.inv(
            _base_draw(s.name, guide_tr.nodes[s.name]["fn"], z0[s.name]) if s.flow else z0[s.name]
        )
        for s in target.latents
    }  # (K, ..., N, ...)
    point = target.point(u, check=lambda m, g: _refuse(m, g, init, grads=True))
    rng = CounterNoise(keys)
    noise = {s.name: rng.stream(i + 1, u[s.name].shape, s.lead) for i, s in enumerate(target.latents)}
    noise["accept"] = rng.stream(0, point.ell.shape, 1)  # (K, N)
    return _Chains(target, u, point, noise)


def _base_draw(name: str, fn, z: torch.Tensor) -> torch.Tensor:
    """z₀ = F⁻¹(z) at a flow site of the guide ``fn`` (once per pass: the chains' start), or one
    line where the flow has no inverse (Pyro's ``Planar``, ``Radial``, ``Sylvester``, ...)."""
    for t in reversed(unwrap(fn).transforms):
        try:
            z = t.inv(z)
        except (KeyError, NotImplementedError):
            raise UserError(
                f"AIS with init='guide' starts each chain at the base draw of guide site {name!r}'s flow, "
                f"which needs the flow's inverse, and its {type(t).__name__} transform has none; use init='prior' "
                f"(--ais-init prior)"
            ) from None
    return z


def _anneal(ch: _Chains, betas, eps, leapfrog, pilots, progress=None):
    """The loop over t: log w ``(K, N)`` accumulated along ``betas``, with a transition at each
    intermediate β; ``eps (N,)`` adapted from the last ``pilots`` chains. Returns log w, the sum of
    acceptance probabilities ``(K, N)`` and the final ε. No host synchronisation in here."""
    u, pt = ch.u, ch.point
    log_w = torch.zeros_like(pt.ell)  # (K, N)
    accepted = torch.zeros_like(pt.ell)
    n = pt.ell.shape[1]
    for t in range(1, len(betas)):
        log_w = log_w + (betas[t] - betas[t - 1]) * pt.ell
        if t < len(betas) - 1:
            step = eps.expand(pt.ell.shape)  # (K, N): the chains of a datapoint share its ε
            u, pt, a = transition(ch.target, u, pt, betas[t], step, leapfrog, ch.noise, t)
            accepted = accepted + a
            if pilots:
                eps = eps * torch.exp(ADAPT_RATE * (a[-pilots:].mean(0) - TARGET_ACCEPT))  # (N,)
        if progress is not None:
            progress(n)
    return log_w, accepted, eps


def _units(num_chains: int, pilots: int, seed: int) -> list[tuple[int, int]]:
    """(size, seed) of each seeded run: the C estimating chains in the units of
    :func:`~ppl_vae.inference.importance.iter_log_weights` (so T = 1 sees IWAE_C's draws), then the pilots."""
    starts = range(0, num_chains, SAMPLE_UNIT)
    units = [(min(SAMPLE_UNIT, num_chains - s), derive_seed(seed, j)) for j, s in enumerate(starts)]
    return units + ([(pilots, derive_seed(seed, PILOT_UNIT))] if pilots else [])


def _initial(model, guide, args, lo, hi, kwargs, nesting, slice_safe, init, units, seed, latents):
    """z_0 {site: (K, ..., hi − lo, ...)} of datapoints lo:hi: the exact ``latents`` (reverse),
    or draws from the base density, datapoint i's from ``derive_seed(seed, i)``."""
    if latents is not None:  # {site: (value (1, ..., N, ...), data dim)}: every chain starts there
        k = sum(size for size, _ in units(0))
        rows = {name: v.narrow(d, lo, hi - lo) for name, (v, d) in latents.items()}  # (1, ..., hi − lo, ...)
        return {name: v.expand(k, *v.shape[1:]) for name, v in rows.items()}
    fn = guide if init == "guide" else model  # a seeded run of fn per unit, the units joined along the chains
    if not slice_safe:  # weighed on all of x: its draws too
        return {
            name: s["value"]
            for name, s in draw_units(fn, args, units(seed), nesting, kwargs)[0].nodes.items()
        }
    draws = [
        draw_units(fn, take(args, i - lo, i - lo + 1), units(derive_seed(seed, i)), nesting, kwargs)[0].nodes
        for i in range(lo, hi)
    ]  # per datapoint {site: value (K, ..., 1, ...)}
    return {name: torch.cat([d[name]["value"] for d in draws], row_dim(s)) for name, s in draws[0].items()}


def _plain_latents(model, args, kwargs, nesting, latents: dict) -> dict:
    """The exact latents {site: (N, ...)} of :func:`simulate` as {site: (value (1, ..., N, ...), data dim)}."""
    values = poutine.Trace()
    for name, v in latents.items():
        values.add_node(name, type="sample", is_observed=False, infer={}, value=v)
    with rng_fork(), poutine.block(), torch.no_grad():
        tr = poutine.trace(poutine.replay(model, trace=values)).get_trace(*args, **kwargs)
    out = {}
    for name, v in latents.items():
        s = tr.nodes.get(name)
        if s is None or s["type"] != "sample" or s["is_observed"]:
            raise UserError(f"reverse_ais: {name!r} is not a latent site of the model")
        batch = v.dim() - s["fn"].event_dim
        out[name] = (v.reshape((1,) * (nesting + 1 - batch) + tuple(v.shape)), nesting + 1 + data_dim(s))
    return out


def _run(model, guide, x, kwargs, num_steps, num_chains, leapfrog, init, sched, seed, chunk_size,
         step_size, pilots, progress, latents=None, program=None) -> AISEstimate:  # fmt: skip
    """Forward AIS, or reverse AIS from ``latents``: the work of :func:`ais` and :func:`reverse_ais`.
    ``program``: the caller's probe of model and guide, else one is made here."""
    _check_settings(num_steps, num_chains, leapfrog, step_size, pilots, init, sched)
    args = check_data(x, kwargs)
    program = inspect_program(model, guide, x, kwargs) if program is None else program
    seed = int(torch.randint(2**62, ())) if seed is None else seed
    progress = getattr(progress, "update", progress)  # a tqdm bar, or any callable
    n, k, device = args[0].shape[0], num_chains + pilots, args[0].device
    betas = schedule(num_steps, sched)[:: -1 if latents is not None else 1]
    if latents is not None:
        latents = _plain_latents(model, args, kwargs, program.nesting, latents)
    keys = torch.tensor([derive_seed(seed, i) for i in range(n)], dtype=torch.int64, device=device)
    rows = n if not program.slice_safe else max(1, (chunk_size or default_chunk(device)) // k)
    parts = []
    for lo in range(0, n, rows):  # passes of datapoints; datapoint i's numbers do not depend on them
        hi, a = min(lo + rows, n), take(args, lo, min(lo + rows, n))
        with rng_fork(), pyro.validation_enabled(False), torch.no_grad():
            z0 = _initial(model, guide, a, lo, hi, kwargs, program.nesting, program.slice_safe, init,
                          lambda s: _units(num_chains, pilots, s), seed, latents)  # fmt: skip
            ch = _start(model, guide, a, kwargs, k, program.nesting, init, z0, keys[lo:hi])
            eps = torch.full((hi - lo,), float(step_size), dtype=ch.point.ell.dtype, device=device)
            log_w, accepted, eps = _anneal(ch, betas, eps, leapfrog, pilots, progress)
        parts.append((log_w[:num_chains], accepted[:num_chains], eps))  # (C, n), (C, n), (n,)
    log_w, accepted = (torch.cat([p[i] for p in parts], 1) for i in (0, 1))  # (C, N) each
    mean_accept = accepted.mean(0) / (num_steps - 1) if num_steps > 1 else torch.full((n,), math.nan)
    return _estimate(
        log_w, mean_accept, torch.cat([p[2] for p in parts]), sign=-1 if latents is not None else 1
    )


def _estimate(log_w, accept, eps, sign) -> AISEstimate:
    """sign · log (1/C) Σ_c w_c ``(N,)`` from log-weights ``(C, N)``, with the delta-method stderr
    sqrt((C Σw² / (Σw)² − 1) / (C − 1)) (as :func:`~ppl_vae.inference.estimators.iwae`'s) and the ESS."""
    c = log_w.shape[0]
    lse = torch.logsumexp(log_w, 0)  # (N,)
    var, ratio = delta_method(lse, torch.logsumexp(2 * log_w, 0), c)  # ratio C Σw² / (Σw)² ∈ [1, C]
    return AISEstimate(sign * (lse - math.log(c)), var.sqrt(), accept, c / ratio, eps, log_w)


def ais(model, guide, x, *, num_steps: int, num_chains: int = 16, leapfrog: int = 10, init: str = "guide",
        schedule: str = "sigmoid", seed: int | None = None, chunk_size: int | None = None, step_size: float = 0.1,
        pilot_chains: int = 4, progress=None, program: Program | None = None, **kwargs) -> AISEstimate:  # fmt: skip
    r"""log p(x) per datapoint by annealed importance sampling (module docstring): an
    :class:`AISEstimate` ``(N,)`` in nats, log (1/C) Σ_c w_c of ``num_chains`` C chains, a
    stochastic lower bound, with its delta-method stderr, acceptance rate and ESS.

    ``x``: a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint arguments, as for
    :func:`~ppl_vae.inference.estimators.iwae`. ``num_steps`` T: increments of β (T − 1 HMC
    transitions of ``leapfrog`` steps each); ``init``: ``"guide"`` (f_0 = q(z|x)) or ``"prior"``
    (f_0 = p(z)); ``schedule``: ``"sigmoid"`` or ``"linear"``; ``step_size``: the initial ε,
    adapted per datapoint by ``pilot_chains`` extra chains (0: fixed); ``chunk_size``: chains ×
    datapoints per pass (memory only); ``progress``: called with the number of datapoints of the
    pass after every step, or a tqdm bar (its ``update``); ``program``: the caller's probe of model
    and guide (:func:`~ppl_vae.inference.checks.inspect_program`), else one is made. A flow guide
    site (a TransformedDistribution of bijective transforms, e.g. an IAF; not ``HalfNormal``)
    moves its base draw (:mod:`~ppl_vae.inference.hmc`). Refused in one line: a discrete
    latent site, one whose log-density has no gradient, and with ``init="guide"`` a latent site of
    model or guide alone, or a flow without an inverse."""
    return _run(model, guide, x, kwargs, num_steps, num_chains, leapfrog, init, schedule, seed, chunk_size,
                step_size, pilot_chains, progress, program=program)  # fmt: skip
