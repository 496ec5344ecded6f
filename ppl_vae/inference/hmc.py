r"""Hamiltonian Monte Carlo on the latents of any Pyro program, batched over chains × datapoints:
the transitions of annealed importance sampling (:mod:`ppl_vae.inference.ais`).

The state is one tensor per latent site in its unconstrained space, u = T⁻¹(z) with
T = ``biject_to(site["fn"].support)`` (as Pyro's ``initialize_model`` does), each of the site's
value shape ``(K, ..., N, ...)``: K chains along dim 0 (the particle plate at dim −nesting − 1,
left of the program's plates), the N datapoints along the data plate's dim. The target of a
transition is the geometric path at β,

    log f_β(u) = log r(z) + β ℓ(z) + log |det ∂T(u)/∂u|,   ℓ(z) = log p(x, z) − log r(z),

per chain and datapoint ``(K, N)``, with r(z) the base density: q(z|x) (the guide replayed on z)
or p(z) (the model's latent sites); ℓ is :func:`~ppl_vae.inference.replay.weigh`'s log weight
of the replayed traces. A :class:`Point` keeps log r, ℓ and their gradients *separately*, so a
change of β needs no new pass: ∇ log f_β = ∇ log r + β ∇ℓ.

**Flow guides** (a guide site drawn from a flow, :func:`~ppl_vae.inference.replay.is_flow`: a
``TransformedDistribution`` whose transforms are all bijective, e.g. an IAF; not ``HalfNormal``,
``HalfCauchy`` or ``FoldedDistribution``, built on the non-bijective |·|, whose sites move in the
model support's space): log q(z|x) at a z the flow did not output needs its inverse (an
autoregressive flow: one network pass per dimension). With q as base, such a site's state is the
flow's base draw, u = S⁻¹(z₀) (S = ``biject_to`` of the base's support), and z = F(S(u)) with F
the site's flow in that guide run: u → z is triangular over the sites, log |det ∂z/∂u| sums each
step's, and F caches its input, so log q(z|x) needs no inverse ("NeuTra", Hoffman et al. 2019).
ℓ is unchanged; only the kernels differ. The chains' start inverts the flow once (a flow with no
inverse, e.g. Pyro's ``Planar``, bijective but inverting only from its cache, is refused).

A transition (Neal 2011, "MCMC using Hamiltonian dynamics", §5.3.3): momentum ρ ~ N(0, I), L
leapfrog steps of size ε (one per chain and datapoint, ``(K, N)``), accepted with probability
min(1, exp(−ΔH)) per chain and datapoint (a proposal with a non-finite energy is rejected).
No device value is read on the host: the acceptance is a ``torch.where``, and the noise is
counter-based (:class:`CounterNoise`), a function of (seed of datapoint i, transition, site,
element), so a datapoint's numbers do not depend on which datapoints share its pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import sum_rightmost
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from torch.distributions import biject_to, constraints
from torch.distributions.transforms import ComposeTransform, IndependentTransform

from ..core.errors import UserError
from .replay import guide_trace, log_density, unwrap, weigh


class Latent(NamedTuple):
    """A latent site as HMC sees it: ``transform`` maps unconstrained u to z (``biject_to`` of
    the model site's support), ``event_dim`` is z's, ``lead`` the data plate's dim of the value
    counted from the left (dim 0 holds the chains). ``flow``: a flow site of the guide (module
    docstring), whose ``transform`` maps u to the flow's base draw z₀ (``biject_to`` of its support)."""

    name: str
    transform: torch.distributions.Transform
    event_dim: int
    lead: int
    flow: bool = False


class Point(NamedTuple):
    """log r ``(K, N)``, ℓ ``(K, N)`` and their gradients {site: tensor shaped like u} at one state."""

    log_r: torch.Tensor
    ell: torch.Tensor
    grad_r: dict
    grad_ell: dict


def unconstrained(name: str, fn) -> torch.distributions.Transform:
    """``biject_to`` of a site's support (a mixture's: of its components'), or one line saying there is none."""
    support = fn.support
    while isinstance(support, constraints.MixtureSameFamilyConstraint):
        support = support.base_constraint
    try:
        return biject_to(support)
    except NotImplementedError:
        raise UserError(
            f"AIS moves latents in an unconstrained space: site {name!r} has support {support}, which "
            f"torch.distributions.biject_to cannot map from the reals"
        ) from None


def is_identity(t) -> bool:
    while isinstance(t, IndependentTransform):
        t = t.base_transform
    return isinstance(t, ComposeTransform) and not t.parts


def rows(t: torch.Tensor, lead: int) -> torch.Tensor:
    """Sum every dim of ``t (K, ..., N, ...)`` but the chains' and the datapoints' (``lead``): ``(K, N)``."""
    t = t.movedim(lead, 1)  # (K, N, ...)
    return t.reshape(t.shape[0], t.shape[1], -1).sum(-1)


def at(v: torch.Tensor, like: torch.Tensor, lead: int) -> torch.Tensor:
    """A ``(K, N)`` tensor as a view that broadcasts against ``like (K, ..., N, ...)``."""
    shape = [1] * like.dim()
    shape[0], shape[lead] = v.shape
    return v.reshape(shape)


class Target:
    """log f_β of a program on fixed arguments ``args`` with ``k`` chains per datapoint; ``init``
    names the base density r: ``"guide"`` (q(z|x)) or ``"prior"`` (p(z))."""

    def __init__(self, model, guide, args, kwargs, k, nesting, init, latents=()):
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.k, self.nesting, self.init, self.latents = k, nesting, init, list(latents)

    @property
    def flow(self) -> bool:
        """Whether the guide, as base density, has a flow site (the chains move its base draw)."""
        return self.init == "guide" and any(s.flow for s in self.latents)

    def traces(self, values: poutine.Trace, guide_values=None) -> tuple[poutine.Trace, poutine.Trace]:
        """The model's trace with ``values`` replayed and the guide's with ``guide_values`` (default:
        the same; an empty trace for ``init="prior"``)."""
        model_tr = self._model_trace(values)
        if self.init != "guide":
            return model_tr, poutine.Trace()
        guide = poutine.replay(self.guide, trace=values if guide_values is None else guide_values)
        return model_tr, prune_subsample_sites(
            guide_trace(guide, self.args, self.k, self.nesting, self.kwargs)
        )

    def _model_trace(self, values: poutine.Trace) -> poutine.Trace:
        with poutine.block(), pyro.plate("_particles", self.k, dim=-self.nesting - 1):
            tr = poutine.trace(poutine.replay(self.model, trace=values)).get_trace(*self.args, **self.kwargs)
        return prune_subsample_sites(tr)

    def _pushed(self, leaves: dict) -> tuple[poutine.Trace, poutine.Trace, list]:
        """A flow guide first, every latent set from ``leaves`` (:class:`_Push`), then the model on
        its draws: the two traces and the log |det ∂z/∂u| terms ``(K, N)``."""
        push = _Push(self.latents, leaves)
        guide_tr = guide_trace(push(self.guide), self.args, self.k, self.nesting, self.kwargs)
        return self._model_trace(guide_tr), prune_subsample_sites(guide_tr), push.log_det

    def log_densities(self, model_tr, guide_tr) -> tuple[torch.Tensor, torch.Tensor]:
        """log r(z) and ℓ(z) = log p(x, z) − log r(z), each ``(K, N)``, of replayed traces."""
        ell = weigh(model_tr, guide_tr, self.nesting).log_w  # (K, N)
        base = guide_tr if self.init == "guide" else model_tr
        log_r = sum(
            log_density(s, self.nesting)  # scaled and masked as weigh's terms
            for s in base.nodes.values()
            if s["type"] == "sample" and not s["is_observed"]
        )  # (K, N)
        return log_r, ell

    def _values(self, leaves: dict) -> tuple[poutine.Trace, list]:
        """A trace of z = T(u) per site, for replay, and the log |det ∂z/∂u| terms ``(K, N)``."""
        values, log_det = poutine.Trace(), []
        for s in self.latents:
            z = s.transform(leaves[s.name])
            values.add_node(s.name, type="sample", is_observed=False, infer={}, value=z)
            if not is_identity(s.transform):  # summed over the site's event dims
                ladj = s.transform.log_abs_det_jacobian(leaves[s.name], z)
                log_det.append(
                    rows(sum_rightmost(ladj, s.event_dim - s.transform.codomain.event_dim), s.lead)
                )
        return values, log_det

    def point(self, u: dict, check=None) -> Point:
        """log r (with the log-det of T), ℓ and their gradients at ``u`` {site: (K, ..., N, ...)}.
        ``check(model_tr, guide_tr)``: called on the traces before the gradients (refusals).

        With the guide as base, one backward pass gives both gradients: model, guide and log-det
        read three copies u_p, u_q, u_d of u, and S = ℓ + 2 log q + log det has ∂S/∂u_p = ∇log p,
        ∂S/∂u_q = ∇log q, ∂S/∂u_d = ∇log det. A flow guide's z are made in the guide run, which
        the model then reads: one copy and two backward passes, as with the prior."""
        split = self.init == "guide" and not self.flow
        with torch.enable_grad():
            copies = [
                {s.name: u[s.name].detach().requires_grad_() for s in self.latents}
                for _ in range(3 if split else 1)
            ]
            if self.flow:
                model_tr, guide_tr, log_det = self._pushed(copies[0])
            else:
                values, _ = self._values(copies[0])  # the model's z (all of them without a guide)
                log_det = self._values(copies[-1])[1]  # the log-det's
                model_tr, guide_tr = self.traces(values, self._values(copies[1])[0] if split else None)
            if check is not None:
                check(model_tr, guide_tr)
            log_r, ell = self.log_densities(model_tr, guide_tr)  # (K, N) each
            log_det = sum(log_det) if log_det else torch.zeros_like(ell)
            xs = [x for c in copies for x in c.values()]
            if split:
                g = torch.autograd.grad((ell + 2 * log_r + log_det).sum(), xs, allow_unused=True)
            else:
                g = torch.autograd.grad((log_r + log_det).sum(), xs, retain_graph=True, allow_unused=True)
                g = g + torch.autograd.grad(ell.sum(), xs, allow_unused=True)
        m = len(self.latents)
        g = [torch.zeros_like(x) if gi is None else gi for gi, x in zip(g, xs + xs)]  # unread: 0
        if split:  # ∇log r = ∇log q + ∇log det; ∇ℓ = ∇log p − ∇log q
            grad_r = [g[m + i] + g[2 * m + i] for i in range(m)]
            grad_ell = [g[i] - g[m + i] for i in range(m)]
        else:
            grad_r, grad_ell = g[:m], g[m:]
        names = [s.name for s in self.latents]
        return Point(
            (log_r + log_det).detach(), ell.detach(), dict(zip(names, grad_r)), dict(zip(names, grad_ell))
        )


class _Push(Messenger):
    """Sets every latent site of a guide run from the chains' state ``leaves`` {site: u}: z = T(u),
    and at a flow site z = F(T(u)) through that site's own transforms, which cache their input
    (module docstring); ``log_det`` collects the log |det ∂z/∂u| terms ``(K, N)``."""

    def __init__(self, latents, leaves: dict):
        super().__init__()
        self.latents, self.leaves, self.log_det = {s.name: s for s in latents}, leaves, []

    def _pyro_sample(self, msg):
        s = self.latents.get(msg["name"])
        if s is None or msg["is_observed"]:
            return
        z = s.transform(self.leaves[s.name])
        steps = [(s.transform, self.leaves[s.name], z)] if not is_identity(s.transform) else []
        for t in unwrap(msg["fn"]).transforms if s.flow else ():
            x, z = z, t(z)
            steps.append((t, x, z))
        self.log_det += [rows(t.log_abs_det_jacobian(x, y), s.lead) for t, x, y in steps]  # (K, N) each
        msg["value"], msg["done"] = z, True


# --------------------------------------------------------------------------- counter-based noise

_M1, _M2, _GOLDEN = (
    0xBF58476D1CE4E5B9,
    0x94D049BB133111EB,
    0x9E3779B97F4A7C15,
)  # splitmix64 (Steele et al. 2014)


def _i64(c: int) -> int:
    """An unsigned 64-bit constant as the int64 with the same bits (torch's integer arithmetic wraps)."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= 1 << 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (``>>`` on int64 is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix(z: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors: a bijection of 64-bit words that scrambles every bit."""
    z = (z ^ _shr(z, 30)) * _i64(_M1)
    z = (z ^ _shr(z, 27)) * _i64(_M2)
    return z ^ _shr(z, 31)


class CounterNoise:
    """Noise as a pure function of (the seed of datapoint i, a stream, the transition t, the element):
    ``keys (N,)`` int64 per-datapoint seeds. Each stream (a site's momentum, the acceptance draws)
    hashes its element index *within* a datapoint once (:meth:`stream`); a draw at transition t
    is one more hash, then a 53-bit uniform, then a normal through erfinv. Philox-like in spirit
    (Salmon et al. 2011): no generator state, so no host sync and the same numbers in any batch."""

    def __init__(self, keys: torch.Tensor):
        self.keys = keys

    def stream(self, number: int, shape, lead: int) -> torch.Tensor:
        """Per-element keys ``shape`` (datapoints along ``lead``) of stream ``number``."""
        inner = list(shape[:lead]) + list(shape[lead + 1 :])
        idx = torch.arange(math.prod(inner), device=self.keys.device).reshape(inner).unsqueeze(lead)
        key = self.keys.reshape([-1 if d == lead else 1 for d in range(len(shape))])
        return mix(key ^ mix(idx + (number << 40))).expand(shape).contiguous()  # (shape) int64

    @staticmethod
    def uniform(base: torch.Tensor, t: int, dtype) -> torch.Tensor:
        """U(0, 1), open at both ends, of transition ``t``, shaped like ``base``."""
        bits = _shr(mix(base + _i64(t * _GOLDEN)), 11)  # 53 random bits
        return ((bits.double() + 0.5) * 2.0**-53).to(dtype)

    @staticmethod
    def normal(base: torch.Tensor, t: int, dtype) -> torch.Tensor:
        u = CounterNoise.uniform(base, t, torch.float64)
        return (math.sqrt(2) * torch.erfinv(2 * u - 1)).to(dtype)


def transition(target: Target, u: dict, pt: Point, beta: float, eps, leapfrog: int, noise: dict, t: int):
    """One HMC transition of every chain and datapoint toward f_β: momentum from ``noise[site]``,
    ``leapfrog`` steps of size ``eps (K, N)``, Metropolis correction from ``noise["accept"]``.
    Returns the new state, its :class:`Point` and the acceptance probability ``(K, N)``."""
    lat = target.latents
    rho = {s.name: CounterNoise.normal(noise[s.name], t, u[s.name].dtype) for s in lat}
    step = {s.name: at(eps, u[s.name], s.lead) for s in lat}

    def grad(p):
        return {s.name: p.grad_r[s.name] + beta * p.grad_ell[s.name] for s in lat}

    def energy(p, mom):  # H = −log f_β + |ρ|²/2, (K, N)
        kinetic = sum(rows(mom[s.name].pow(2), s.lead) for s in lat) / 2
        return kinetic - (p.log_r + beta * p.ell)

    h0 = energy(pt, rho)
    g = grad(pt)
    mom = {n: rho[n] + step[n] / 2 * g[n] for n in rho}  # half step
    new, p1 = u, pt
    for i in range(leapfrog):
        new = {n: new[n] + step[n] * mom[n] for n in mom}
        p1 = target.point(new)
        g = grad(p1)
        frac = 1.0 if i < leapfrog - 1 else 0.5  # the last momentum step is a half step
        mom = {n: mom[n] + frac * step[n] * g[n] for n in mom}
    log_a = h0 - energy(p1, mom)  # (K, N)
    log_a = torch.where(torch.isnan(log_a), torch.full_like(log_a, -math.inf), log_a).clamp(max=0)
    accept_prob = log_a.exp()  # (K, N)
    take = CounterNoise.uniform(noise["accept"], t, log_a.dtype) < accept_prob  # (K, N)

    def pick(a, b, lead=1):
        return torch.where(at(take, a, lead), a, b)

    out = {s.name: pick(new[s.name], u[s.name], s.lead) for s in lat}
    point = Point(
        pick(p1.log_r, pt.log_r),
        pick(p1.ell, pt.ell),
        {s.name: pick(p1.grad_r[s.name], pt.grad_r[s.name], s.lead) for s in lat},
        {s.name: pick(p1.grad_ell[s.name], pt.grad_ell[s.name], s.lead) for s in lat},
    )
    return out, point, accept_prob
