r"""What the estimators accept, checked once per call before any pass (:func:`inspect_program`):
the data (:mod:`.inputs`), the program's plates, whether it is slice-safe, whether its guide is a
flow and, for the analytic-KL ELBO, which latent sites have a valid closed-form KL.

**Program.** Every sample site of model and guide sits inside a vectorized
``pyro.plate("data", N)`` (any ``dim``) over the N datapoints given.

**Analytic KL, site by site.** For a latent site s, E_q[log p(z_s | pa) − log q(z_s | ·)] =
−E_q[KL(q(z_s | ·) ‖ p(z_s | pa))] only when, given everything the guide drew before z_s, z_s
is distributed as q(z_s | ·) *and* p's parents pa are among those earlier draws. The order rule
checks a sufficient condition: every latent that precedes s in the model (its possible
parents) precedes s in the guide too. Pyro's ``TraceMeanField_ELBO`` asks for the same order at
every site (``_check_mean_field_requirement``, a warning); here the rule is per site, and a
site that fails it is weighed by Monte Carlo, which is right for any guide. Example: model
z2 → z1 → x, guide q(z1 | x) q(z2 | z1): KL(q(z2 | z1) ‖ p(z2)) is closed-form given z1, but
p(z1 | z2) depends on z2, drawn after z1, so site z1 is Monte Carlo.

Every refusal is one line, a :class:`~ppl_vae.core.errors.UserError` (a ``ValueError``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pyro import poutine
from pyro.poutine.util import prune_subsample_sites, site_is_subsample
from torch.distributions import kl_divergence

from ..core.errors import DataError, UserError
from . import constructs
from .inputs import check_data, check_program_inputs, program_failed, take
from .replay import DATA_PLATE, cat_units, flow_guide, replay, rng_fork, take_rows, weigh

PROBE_ROWS = 8  # datapoints of the probe of each call (inspect_program), when the program runs on them


class NoClosedFormKL(UserError, NotImplementedError):
    """A latent site whose closed-form KL is valid by the order rule but not registered in
    ``torch.distributions`` (a mixture prior, a flow guide). A ``NotImplementedError`` too."""


def check_plates(model_tr, guide_tr, n: int) -> None:
    """Every sample site inside a vectorized ``pyro.plate("data", n)``."""
    for role, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)
            if frame is None or frame.dim is None:
                raise UserError(
                    f"{role} site {name!r} is not inside a vectorized pyro.plate({DATA_PLATE!r}, N): the "
                    f"estimators need every sample site of model and guide in that plate"
                )
            if frame.size != n:
                raise DataError(
                    f"pyro.plate({DATA_PLATE!r}) at {role} site {name!r} has size {frame.size} but x has "
                    f"{n} datapoints along dim 0"
                )


def plate_nesting(model_tr, guide_tr) -> int:
    """How many plate dims (vectorized plates, counted from the right) model and guide use."""
    return max(
        [
            -f.dim
            for tr in (guide_tr, model_tr)
            for s in tr.nodes.values()
            if s["type"] == "sample"
            for f in s["cond_indep_stack"]
            if f.vectorized
        ],
        default=0,
    )


def _latents(tr) -> list[str]:
    return [
        name
        for name, s in tr.nodes.items()
        if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)
    ]


def describe(fn) -> str:
    """``Independent(Normal)``: a distribution's class with those it wraps."""
    base = getattr(fn, "base_dist", None)
    return type(fn).__name__ + (f"({describe(base)})" if base is not None else "")


def _same_weighting(model_site, guide_site) -> bool:
    """Whether model and guide weigh a site alike (the same mask and scale), so that the closed-form
    KL, which the guide's mask and scale weigh (as TraceMeanField_ELBO does), equals E_q of their
    weighted log-densities; else the site is left to Monte Carlo, which weighs each side by its own."""
    a, b = model_site["mask"], guide_site["mask"]
    same_mask = a is b or (
        torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool((a == b).all())
    )
    sa, sb = model_site["scale"], guide_site["scale"]
    same_scale = (
        bool(torch.as_tensor(sa == sb).all()) if torch.is_tensor(sa) or torch.is_tensor(sb) else sa == sb
    )
    return same_mask and same_scale


def closed_form_sites(model_tr, guide_tr, analytic_kl) -> tuple[frozenset, str | None]:
    """The latent sites whose KL term is taken in closed form, and why one that passes the order
    rule has none (``None`` if all have one). ``analytic_kl=True`` raises :class:`NoClosedFormKL`
    there; ``"auto"`` leaves such a site to Monte Carlo."""
    if analytic_kl not in (True, "auto"):
        raise ValueError(f"analytic_kl must be True, False or 'auto', got {analytic_kl!r}")
    guide_order = _latents(guide_tr)
    shared = [s for s in _latents(model_tr) if s in guide_order]  # model order
    closed, missing = set(), None
    for i, s in enumerate(shared):
        if not set(shared[:i]) <= set(guide_order[: guide_order.index(s)]):
            continue  # p(z_s | ·) may read a latent the guide draws after z_s: Monte Carlo
        q, p = guide_tr.nodes[s]["fn"], model_tr.nodes[s]["fn"]
        if not _same_weighting(model_tr.nodes[s], guide_tr.nodes[s]):
            continue  # a mask or scale on one side only: KL(q ‖ p) would weigh log p as log q is weighed
        try:
            kl_divergence(q, p)
            closed.add(s)
        except NotImplementedError:
            missing = missing or (
                f"no closed-form KL for site {s!r} (guide {describe(q)}, prior {describe(p)}): use "
                f"analytic_kl=False or 'auto' (Monte Carlo KL), or --elbo trace"
            )
    if missing and analytic_kl is True:
        raise NoClosedFormKL(missing)
    return frozenset(closed), missing


# --------------------------------------------------------------------------- the probe of each call


class Program(NamedTuple):
    """What one probe of model and guide on the caller's arguments found (:func:`inspect_program`):
    ``nesting``, the plate dims they use; ``closed_form``, the latent sites whose KL is taken in
    closed form (``None``: no analytic ELBO asked for); ``no_closed_form``, why a site that could
    have one has none; ``slice_safe``, whether weighing slices of the datapoints gives the
    whole batch's weights (:func:`slice_safe`); ``flow_guide``, whether a guide site is a
    transformed distribution (an IAF), whose log q(z|x) of a *replayed* z needs the flow's
    inverse, for an autoregressive flow one network pass per dimension, where the trace that drew
    z has it cached (:func:`flow_guide`); ``observed_discrete``, whether every observed site has a
    discrete support holding its data, so that p(x|z) is a probability (:func:`observed_discrete`);
    ``enumerated``, the model's sites summed out inside each weight
    (:func:`~ppl_vae.inference.constructs.enumerated_sites`)."""

    nesting: int
    closed_form: frozenset | None = None
    no_closed_form: str | None = None
    slice_safe: bool = True
    flow_guide: bool = False
    observed_discrete: bool = False
    enumerated: tuple = ()


def inspect_program(model, guide, x, kwargs: dict, analytic_kl=False) -> Program:
    """Probe ``guide(*args, **kwargs)`` and the model replayed on it, one draw without particle
    plate and without touching the caller's RNG, on the caller's own arguments: the first
    :data:`PROBE_ROWS` datapoints, or all of them where the program does not run on those (a
    guide holding ``(N, d)`` tensors). Checks the data, the plates, the log weights and the
    analytic-KL sites (:mod:`ppl_vae.inference.checks`; a one-line ``UserError`` on bad input) and
    :func:`slice_safe` (the probe's last two datapoints replayed alone)."""
    args = check_data(x, kwargs)
    check_program_inputs(model, guide, args)
    with rng_fork(), poutine.block(), torch.no_grad():
        probe = None
        if args[0].shape[0] > PROBE_ROWS:
            try:
                probe = _probe(model, guide, take(args, 0, PROBE_ROWS), kwargs)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception:  # noqa: BLE001 - e.g. a guide holding (N, d) tensors: probe all of x
                pass
        if probe is None:
            try:
                probe = _probe(model, guide, args, kwargs)
            except (torch.cuda.OutOfMemoryError, UserError):
                raise
            except Exception as e:  # noqa: BLE001 - any failure of the user's program: one line
                raise program_failed(model, guide, args, e) from e
        probe_args, model_tr, guide_tr, nesting, log_w = probe
        constructs.warn_scaled(model_tr, guide_tr)
        enumerated = constructs.enumerated_sites(model_tr, guide_tr)
        if enumerated and analytic_kl:  # log Σ_y p(x, y, z) has no per-site KL terms
            closed, missing = (
                frozenset(),
                f"site {enumerated[0]!r} is summed out (enumerated): no analytic-KL ELBO",
            )
            if analytic_kl is True:
                raise NoClosedFormKL(missing + "; use analytic_kl=False or 'auto'")
        else:
            closed, missing = (
                closed_form_sites(model_tr, guide_tr, analytic_kl) if analytic_kl else (None, None)
            )
        safe = _same_on_a_slice(model, guide, probe_args, kwargs, nesting, guide_tr, log_w)
    return Program(
        nesting, closed, missing, safe, flow_guide(guide_tr), observed_discrete(model_tr), enumerated
    )


def observed_discrete(model_tr) -> bool:
    """True when every observed site of a model trace has a discrete support (``support.is_discrete``)
    and its data lie in it, so p(x) is a probability (bits/dim meaningful); False for densities of
    continuous data, and for a Bernoulli fed grey levels (``validate_args=False``)."""
    observed = [s for s in model_tr.nodes.values() if s["type"] == "sample" and s["is_observed"]]
    return bool(observed) and all(
        s["fn"].support.is_discrete and bool(s["fn"].support.check(s["value"]).all()) for s in observed
    )


def _probe(model, guide, args, kwargs):
    """``(args, model trace, guide trace, nesting, log w (1, n))`` of one plain run on ``args``,
    once its point masses (:func:`~ppl_vae.inference.constructs.refuse_point_masses`, which may
    run the guide once more), plates and observed sites have passed."""
    guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
    rerun = lambda tr: poutine.trace(poutine.replay(guide, trace=tr)).get_trace(*args, **kwargs)  # noqa: E731
    constructs.refuse_point_masses(guide_tr, rerun)  # (before the plates: the more basic refusal)
    model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    check_plates(model_tr, guide_tr, args[0].shape[0])
    constructs.refuse_broadcast_data(model_tr, args[0].shape[0])
    nesting = plate_nesting(model_tr, guide_tr)
    log_w = weigh(prune_subsample_sites(model_tr), prune_subsample_sites(guide_tr), nesting).log_w  # (1, n)
    return args, model_tr, guide_tr, nesting, log_w


def max_plate_nesting(model, guide, x, **kwargs) -> int:
    """How many plate dims the model and guide use, traced on the caller's own ``x`` (tensor or
    tuple of per-datapoint arguments) without touching the caller's RNG."""
    return inspect_program(model, guide, x, kwargs).nesting


def slice_safe(model, guide, x, **kwargs) -> bool:
    """Whether datapoint i gets the same weight from a run on a slice of ``x`` as from one on all
    of it: not so for a guide reading per-datapoint parameters by plate index (``loc[idx]``,
    idx = 0..rows−1 on a slice), holding ``(N, d)`` tensors or using batch statistics. Tested on
    the probe's last two datapoints (its draw for the probe's batch replayed on those two alone;
    agreement to 1000 float eps, relative)."""
    return inspect_program(model, guide, x, kwargs).slice_safe


def _same_on_a_slice(model, guide, args, kwargs, nesting, guide_tr, log_w) -> bool:
    """:func:`slice_safe` from the probe: its arguments, guide trace and log weights ``(1, n)``."""
    n = args[0].shape[0]
    if n == 1:
        return True
    try:
        part = weigh(
            *replay(
                model,
                guide,
                take_rows(cat_units([guide_tr], nesting), n - 2, n),
                take(args, n - 2, n),
                None,
                nesting,
                kwargs,
            ),
            nesting,
        ).log_w  # (1, 2)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception:  # noqa: BLE001 - e.g. a guide holding (N, d) tensors, or a flow's cache (Planar,
        return False  # Radial: a KeyError): whatever fails on a slice is weighed unsliced, never a traceback
    whole, tol = log_w[:, n - 2 :], 1000 * torch.finfo(log_w.dtype).eps
    return bool(((part - whole).abs() <= tol * (1 + whole.abs())).all())
