"""Pyro constructs in a user's program that change what the estimators can promise.

Checked once per call, on the probe's traces (:func:`ppl_vae.inference.checks.inspect_program`):

* **Point masses.** A guide site drawn from a ``Delta`` (``AutoDelta``, a MAP guide) whose value
  no auxiliary draw of a density decides (``AutoNormal``'s ``Delta`` passes on a draw from one)
  has no density: log q(z*|x) = 0 is not a log-density of the draw, so log p(x, z*) − 0 is
  neither a lower bound on log p(x) nor an importance weight, and no ELBO or IWAE_K exists.
  Refused in one line naming the site, site by site: one ``AutoDelta`` part of an
  ``AutoGuideList`` is refused beside an ``AutoNormal`` part (:func:`refuse_point_masses`).
* **Scales.** A site under ``poutine.scale`` (a tempered likelihood, a β on the KL) is weighed
  with its scale, as ``Trace_ELBO`` weighs it; the estimates are then those of the scaled joint,
  not of log p(x), and a :class:`ScaledProgram` warning says so (:func:`warn_scaled`).
* **Broadcast data.** An observed site whose value does not vary along the data plate (a 1-D
  ``x`` of one image, ``(784,)``, read as 784 datapoints and broadcast against a ``(784, 784)``
  likelihood) would weigh every "datapoint" on the same data: refused (:func:`refuse_broadcast_data`).
* **Enumeration.** Discrete sites marked ``infer={"enumerate": "parallel"}`` in the model
  only are summed out inside each weight, as ``TraceEnum_ELBO`` sums them
  (:mod:`ppl_vae.inference.replay`); :func:`enumerated_sites` finds them and refuses what that
  sum does not cover: an enumerated guide site, a site outside the data plate or inside
  another plate.
"""

from __future__ import annotations

import warnings

import torch
from pyro.distributions import Delta
from pyro.poutine import Trace
from pyro.poutine.util import site_is_subsample

from ..core.errors import UserError
from .replay import DATA_PLATE, rng_fork, site_scale, unwrap


class ScaledProgram(UserWarning):
    """Estimates of a program with ``poutine.scale`` sites: those of the scaled joint."""


def _latent(site) -> bool:
    return site["type"] == "sample" and not site["is_observed"]


def refuse_point_masses(guide_tr, rerun) -> None:
    """One line for the first latent guide site drawn from a point mass (a ``Delta`` under any
    ``Independent`` / mask wrappers) whose value no auxiliary draw of a density decides.

    Pyro's ``AutoNormal`` and ``AutoContinuous`` guides draw from a density at an auxiliary site
    (``infer={"is_auxiliary": True}``) and pass the value on, through a bijection, to a ``Delta``
    carrying its Jacobian (``log_density``): that site has a density, weighed exactly.
    ``AutoDelta``'s sites, and an auxiliary site that is itself a ``Delta``
    (``AutoLaplaceApproximation`` before ``laplace_approximation()``), have none. The rule is
    per site, not per guide: an ``AutoGuideList`` of an ``AutoDelta`` part and an ``AutoNormal``
    part is refused at the ``AutoDelta``'s sites.

    Which point masses an auxiliary draw decides is found by running the guide once more, only
    when it has both point masses and auxiliary sites of a density: ``rerun(trace)`` runs it
    replayed on the sample sites of ``trace``, which holds every auxiliary site of a density at
    its value as a leaf tensor that requires grad and every other sample site but the point
    masses at its value (the same subsample, the same other latents), under
    ``torch.enable_grad()`` and the caller's RNG restored after. A point mass whose value has an
    autograd path to an auxiliary value passes; one without is refused. Dependence, not a change
    of value: a draw of a tiny scale that rounds to the same float is a dependence (before: the
    value was compared after a fresh draw, so ``AutoNormal(init_scale=1e-9)`` was refused), and
    a value that changes between runs for another reason (``torch.randn`` or dropout inside the
    guide) is none (before: it passed). A point mass decided through no differentiable path (an
    integer auxiliary draw, a comparison, ``argmax``) is refused. A guide that cannot be run so
    (it raises, or a point mass is missing from the second run) is taken as it is: each point
    mass passes, as the rule before per-site checks had it. Not checked: two point masses
    decided by one draw (their joint has no density either)."""
    latent = {name: s for name, s in guide_tr.nodes.items() if _latent(s) and not site_is_subsample(s)}
    points = [name for name, s in latent.items() if isinstance(unwrap(s["fn"]), Delta)]
    if not points:
        return
    aux = {name for name, s in latent.items() if s["infer"].get("is_auxiliary") and name not in points}
    decided = _decided_by(aux, points, guide_tr, rerun) if aux else set()
    for name in points:
        if name not in decided:
            raise UserError(
                f"guide site {name!r} is a point mass (Delta, e.g. AutoDelta or a MAP guide) that no "
                f"auxiliary draw of a density decides: it has no density, so log p(x, z*) is no bound on "
                f"log p(x) and no ELBO or IWAE exists; estimate log p(x) with a guide that has a density "
                f"at every site (e.g. AutoNormal, or AutoLaplaceApproximation's laplace_approximation())"
            )


def _decided_by(aux: set, points: list, guide_tr, rerun) -> set:
    """The point masses ``points`` whose values have an autograd path to the values of the
    auxiliary sites ``aux``, replayed as leaves that require grad, every other sample site but
    the point masses at its value (:func:`refuse_point_masses`)."""
    replayed, leaves = Trace(), []
    try:
        for name, site in guide_tr.nodes.items():
            if site["type"] == "sample" and name not in points:
                value = site["value"]
                if name in aux and torch.is_tensor(value) and value.is_floating_point():
                    value = value.detach().clone().requires_grad_(True)
                    leaves.append(value)
                replayed.add_node(name, **{**site, "value": value})
        with rng_fork(), torch.enable_grad():
            again = rerun(replayed).nodes
            decided = {name for name in points if name not in again}  # taken as they are
            for name in points:
                value = again[name]["value"] if name in again else None
                if leaves and torch.is_tensor(value) and value.requires_grad:
                    grads = torch.autograd.grad(value.sum(), leaves, allow_unused=True, retain_graph=True)
                    if any(g is not None for g in grads):
                        decided.add(name)
    except Exception:  # noqa: BLE001 - a guide that cannot be run again so: taken as it is
        return set(points)
    return decided


def refuse_broadcast_data(model_tr, n: int) -> None:
    """One line for an observed site whose value lacks the data plate's n rows at its dim."""
    for name, site in model_tr.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        frame = next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)
        if frame is None or frame.dim is None:
            continue
        dim = frame.dim - site["fn"].event_dim  # the data dim of the value, from the right
        value, shape = site["value"], tuple(site["fn"].shape())
        try:
            broadcast = torch.broadcast_shapes(value.shape, shape) == shape
        except RuntimeError:  # not broadcastable at all: the program's log_prob says so itself
            continue
        if broadcast and (value.dim() < -dim or value.shape[dim] != n):
            raise UserError(
                f"observed site {name!r} does not vary along pyro.plate('data', {n}): its value has shape "
                f"{tuple(value.shape)} but its distribution {shape}, so the data were "
                f"broadcast across the datapoints; pass x with the datapoints along dim 0 (one datapoint: "
                f"x[None], shape (1, ...))"
            )


def _scale_of(site) -> float | None:
    """The site's ``poutine.scale`` factor, without the data plate's minibatch factor; None if 1."""
    scale = site_scale(site)
    if torch.is_tensor(scale):
        return None if bool((scale == 1).all()) else float(scale.float().mean())
    return None if abs(scale - 1) < 1e-12 else float(scale)


def warn_scaled(model_tr, guide_tr) -> None:
    """A :class:`ScaledProgram` warning naming the scaled sites."""
    scaled = {
        name: s
        for tr in (model_tr, guide_tr)
        for name, site in tr.nodes.items()
        if site["type"] == "sample" and (s := _scale_of(site)) is not None
    }
    if scaled:
        sites = ", ".join(f"{name!r} × {s:g}" for name, s in scaled.items())
        warnings.warn(
            f"sites under poutine.scale ({sites}): they are weighed with their scales, as Trace_ELBO "
            f"weighs them, so the estimates are of that scaled joint, not of log p(x)",
            ScaledProgram,
            stacklevel=4,
        )


def enumerated_sites(model_tr, guide_tr) -> tuple[str, ...]:
    """The model's sites marked for parallel enumeration, in model order, each checked: discrete,
    in the guide not at all, inside the data plate and no other plate (one value per datapoint,
    summed out in that datapoint's weight)."""
    for name, site in guide_tr.nodes.items():
        if _latent(site) and site["infer"].get("enumerate") == "parallel":
            raise UserError(
                f"guide site {name!r} is marked for enumeration: the estimators sum out enumerated sites "
                f"of the model only; leave {name!r} out of the guide (enumerated in the model, as "
                f"TraceEnum_ELBO does when the guide does not sample it), or let the guide sample it"
            )
    out = []
    for name, site in model_tr.nodes.items():
        if not (_latent(site) and site["infer"].get("enumerate") == "parallel"):
            continue
        if name in guide_tr.nodes:
            continue  # replayed from the guide: not enumerated
        if not site["fn"].has_enumerate_support:
            raise UserError(
                f"model site {name!r} is marked for enumeration but its distribution has no finite support"
            )
        plates = [f.name for f in site["cond_indep_stack"] if f.vectorized and f.name != "_particles"]
        if plates != [DATA_PLATE]:
            where = "outside the data plate" if DATA_PLATE not in plates else f"inside plate(s) {plates}"
            raise UserError(
                f"model site {name!r} is enumerated {where}: the estimators sum out one enumerated value "
                f"per datapoint (in pyro.plate('data') and no other plate) and cannot weigh this exactly"
            )
        out.append(name)
    return tuple(out)
