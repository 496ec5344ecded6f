r"""Per-datapoint estimators of log p(x) for any Pyro model/guide pair.

Every function takes ``(model, guide, x)``: ``x`` a tensor ``(N, ...)``, or a tuple ``(x, y, ...)``
of per-datapoint arguments passed positionally to ``model(x, y, ...)`` and ``guide(x, y, ...)``
and sliced together; all sample sites inside ``pyro.plate("data", N)`` (:mod:`ppl_vae.inference.checks`).
Results are per datapoint, shape ``(N,)``, in nats, with the sign of a log-density (an ELBO,
not a loss), as an :class:`Estimate` with its Monte Carlo standard error.

With importance weights w_k = p(x, z_k) / q(z_k | x), z_k ~ q(z | x):

* ELBO = E_q[log w] ≤ E[IWAE_K] = E[log (1/K) Σ_k w_k] ≤ log p(x), and E[IWAE_K] ↑ in K
  (Burda et al. 2016, Thm. 1); the ELBO gap is KL(q(z|x) ‖ p(z|x)). IWAE_1 is the one-draw ELBO.
* ``elbo(analytic_kl=True)`` replaces a latent site's E_q[log p(z_s|·) − log q(z_s|·)] by
  −KL(q ‖ p) in closed form (``torch.distributions.kl_divergence``) wherever that is valid: p's
  parents all drawn before z_s in the guide (the order rule of :mod:`ppl_vae.inference.checks`); the other
  sites stay Monte Carlo, so the value is right for any guide. ``"auto"``: the same, with Monte
  Carlo also where no closed form is registered (a mixture prior, a flow) instead of raising.
* ``elbo_terms``: the ELBO's two terms, ELBO = recon − KL, the reconstruction term
  E_q[log p(x|z)] and the total KL term (in closed form where the ELBO takes it so).

``elbo``, ``elbo_terms``, ``iwae``, ``iwae_curve`` and ``estimate_all`` are views of one
streaming pass over the K draws (:func:`_stream`): memory ``O(N)`` in K beyond one pass of
``chunk_size`` particles × datapoints, and with the same ``seed`` they see the same draws, so
their numbers are consistent with each other (``seed`` and ``chunk_size``: see :mod:`ppl_vae.inference.importance`).
k̂ and the PSIS ESS are in :mod:`ppl_vae.inference.psis`. See ``docs/estimators.md`` for the bias,
variance and standard errors of each estimator.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError
from ..core.seeding import derive_seed  # noqa: F401 (public since 0.1: estimators.derive_seed)
from .importance import (
    Program,
    inspect_program,
    iter_log_weights,
    log_importance_weights,  # noqa: F401 (public since 0.1)
)
from .inputs import check_num_samples
from .psis import psis_diagnostics, psis_from_log_weights  # noqa: F401 (psis_diagnostics: public since 0.1)
from .running import Estimate, GroupedLSE, Moments, delta_method  # noqa: F401 (Estimate: public since 0.1)


def elbo(
    model,
    guide,
    x,
    num_samples: int = 1,
    analytic_kl=False,
    seed: int | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> Estimate:
    """ELBO(x) = E_q[log p(x, z) − log q(z|x)] per datapoint, ``(N,)`` nats, the mean of
    ``num_samples`` draws; ``stderr`` = sample std / √K (NaN for K = 1). ``analytic_kl=True``:
    −KL(q ‖ p) in closed form at every latent site where valid (module docstring), raising
    :class:`~ppl_vae.inference.checks.NoClosedFormKL` (a ``UserError`` and ``NotImplementedError``) where
    none is registered; ``"auto"``: Monte Carlo there instead (e.g. for validation of any program)."""
    out = _stream(
        model, guide, x, num_samples, seed, chunk_size, kwargs, mc=not analytic_kl, analytic_kl=analytic_kl
    )
    return out["elbo_analytic" if analytic_kl else "elbo_mc"]


def elbo_terms(
    model,
    guide,
    x,
    num_samples: int = 1,
    analytic_kl=False,
    seed: int | None = None,
    chunk_size: int | None = None,
    **kwargs,
) -> dict[str, Estimate]:
    r"""The ELBO of :func:`elbo` (same arguments, same draws for the same ``seed``) and its two
    terms, each an :class:`Estimate` ``(N,)`` in nats, the mean of ``num_samples`` draws:

    * ``"recon"`` = E_q[log p(x|z)], the sum of the observed sites' log-densities (the
      reconstruction term; −recon is the reconstruction NLL);
    * ``"kl"`` = recon − ELBO, the total KL term: Σ_sites KL(q ‖ p) in closed form where the ELBO
      takes it (``analytic_kl``), E_q[log q(z|x) − log p(z)] by Monte Carlo at the other latent
      sites (and E_q[log q] of auxiliary guide-only sites);
    * ``"elbo"`` = recon − kl (the value of :func:`elbo`; ``kl.value`` is taken as
      ``recon.value − elbo.value``, so the identity holds up to float rounding).

    ``stderr``: the sample std of each per-draw term / √K (NaN for K = 1); for ``"kl"`` the per-draw
    term is log p(x|z_k) − ELBO_k. With a closed-form KL everywhere it is 0: the KL is then exact."""
    out = _stream(
        model,
        guide,
        x,
        num_samples,
        seed,
        chunk_size,
        kwargs,
        mc=not analytic_kl,
        analytic_kl=analytic_kl,
        terms=True,
    )
    bound, recon = out["elbo_analytic" if analytic_kl else "elbo_mc"], out["recon"]
    return {"elbo": bound, "recon": recon, "kl": Estimate(recon.value - bound.value, out["kl"].stderr)}


def iwae(
    model, guide, x, num_samples: int, seed: int | None = None, chunk_size: int | None = None, **kwargs
) -> Estimate:
    r"""IWAE_K(x) = log (1/K) Σ_k w_k per datapoint, ``(N,)`` nats, K = ``num_samples``: the
    importance-weighted estimate of log p(x) (a lower bound in expectation, tight as K → ∞).

    Standard error (delta method): with m̂ = (1/K) Σ w_k and v̂ the sample variance of the
    w_k, Var(log m̂) ≈ v̂ / (K m̂²), i.e. ``stderr = sqrt((K Σw² / (Σw)² − 1) / (K − 1))``.
    It is only as good as the weights' variance is finite: check :func:`ppl_vae.inference.psis.psis_diagnostics`.
    K = 1 is the one-draw ELBO: the same value and the same (NaN) stderr as ``elbo(num_samples=1)``.
    """
    if "ks" in kwargs:  # else: "iwae_curve() got multiple values for argument 'ks'", a function not called
        raise UserError(
            "iwae(...) estimates one K and takes no ks; for IWAE_k at several k use "
            "iwae_curve(model, guide, x, num_samples, ks)"
        )
    return iwae_curve(model, guide, x, num_samples, [num_samples], seed, chunk_size, **kwargs)[num_samples]


def iwae_curve(
    model, guide, x, num_samples: int, ks, seed: int | None = None, chunk_size: int | None = None, **kwargs
) -> dict[int, Estimate]:
    """E[IWAE_k] for each k in ``ks`` (1 ≤ k ≤ K = ``num_samples``), the convergence curve, from
    one set of K draws: ``{k: Estimate (N,)}``. The draws are split into ⌊K/k⌋ consecutive
    groups; the value is the mean of the groups' IWAE_k (unbiased for E[IWAE_k]), the stderr the
    std over groups / √groups, or the delta-method stderr of :func:`iwae` with one group."""
    ks = _check_ks(ks, num_samples)
    return _stream(model, guide, x, num_samples, seed, chunk_size, kwargs, ks=ks)["iwae_by_k"]


def estimate_all(
    model,
    guide,
    x,
    num_samples: int,
    ks=(),
    seed: int | None = None,
    chunk_size: int | None = None,
    analytic_kl=True,
    psis: bool = True,
    program: Program | None = None,
    **kwargs,
) -> dict:
    """Every estimate from one set of K draws per datapoint (what ``evaluate`` reports):
    ``elbo_mc``, ``elbo_analytic`` (when ``analytic_kl``; ``None`` where a site has no
    registered closed form, with the reason in ``elbo_analytic_na``; ``"auto"``: Monte Carlo
    there), ``iwae`` (IWAE_K) as :class:`Estimate` ``(N,)``; ``iwae_by_k`` {k: Estimate} for
    ``ks``; and, when ``psis``, ``khat`` and ``ess`` ``(N,)`` float64 (this keeps the K × N
    log-weights, not the decoder outputs). ``program``: a probe of model and guide already made
    by the caller (:func:`~ppl_vae.inference.checks.inspect_program` with the same ``analytic_kl``,
    ``"auto"`` for ``True``), e.g. once for all blocks of an evaluation."""
    curve = _check_ks(ks, num_samples)
    if program is None:
        program = inspect_program(model, guide, x, kwargs, "auto" if analytic_kl is True else analytic_kl)
    na = program.no_closed_form if analytic_kl is True else None
    if na:  # the analytic ELBO is n/a: report everything else
        program = program._replace(closed_form=None)
    res = _stream(
        model,
        guide,
        x,
        num_samples,
        seed,
        chunk_size,
        kwargs,
        ks=[*curve, num_samples],
        mc=True,
        keep_log_w=psis,
        program=program,
    )
    out = {
        "elbo_mc": res["elbo_mc"],
        "iwae": res["iwae_by_k"][num_samples],
        "iwae_by_k": {k: res["iwae_by_k"][k] for k in curve},
    }
    if analytic_kl:
        out["elbo_analytic"], out["elbo_analytic_na"] = res.get("elbo_analytic"), na
    if psis:
        out["khat"], out["ess"] = psis_from_log_weights(res["log_w"])  # from (K, N)
    return out


# --------------------------------------------------------------------------- the one streaming pass


@torch.no_grad()
def _stream(
    model,
    guide,
    x,
    num_samples,
    seed,
    chunk_size,
    kwargs,
    ks=(),
    mc=False,
    analytic_kl=False,
    keep_log_w=False,
    program=None,
    terms=False,
) -> dict:
    """One pass over ``num_samples`` draws per datapoint, feeding the summaries asked for:
    ``iwae_by_k`` {k: Estimate} for each k in ``ks``, ``elbo_mc`` (``mc``), ``elbo_analytic``
    (``analytic_kl``, or ``program.closed_form`` set), the log-weights ``log_w (K, N)``
    themselves (``keep_log_w``), and (``terms``) ``recon`` = E_q[log p(x|z)] and ``kl``, the
    moments of the per-draw log p(x|z_k) − ELBO_k (the analytic ELBO's terms where there are any)."""
    groups = {k: GroupedLSE(k) for k in ks}
    mc_moments, analytic, recon, kl, kept = Moments(), Moments(), Moments(), Moments(), []
    for d in iter_log_weights(
        model, guide, x, num_samples, seed, chunk_size, analytic_kl, program=program, **kwargs
    ):
        if mc:
            mc_moments.update(d.log_w)  # (k, N)
        if d.elbo_analytic is not None:
            analytic.update(d.elbo_analytic)  # (k, N)
        if terms:
            recon.update(d.log_lik)  # (k, N)
            kl.update(d.log_lik - (d.log_w if d.elbo_analytic is None else d.elbo_analytic))  # (k, N)
        for g in groups.values():
            g.update(d.log_w)
        if keep_log_w:
            kept.append(d.log_w)
    out = {"iwae_by_k": {k: g.estimate() for k, g in groups.items()}}
    if mc:
        out["elbo_mc"] = mc_moments.estimate()
    if analytic.count:
        out["elbo_analytic"] = analytic.estimate()
    if keep_log_w:
        out["log_w"] = torch.cat(kept, 0)  # (K, N)
    if terms:
        out["recon"], out["kl"] = recon.estimate(), kl.estimate()
    return out


def _check_ks(ks, num_samples) -> list[int]:
    check_num_samples(num_samples)
    ks = sorted(set(ks or []))
    for k in ks:
        check_num_samples(k)
        if k > num_samples:
            raise ValueError(f"ks: every k must be <= num_samples = {num_samples}, got {k}")
    return ks


# --------------------------------------------------------------------------- AIS and BDMC, re-exported

_AIS_NAMES = {"ais": "ais", "simulate": "bdmc", "reverse_ais": "bdmc", "bdmc": "bdmc"}


def __getattr__(name):  # lazily: importing AIS (and its HMC) costs every caller of the estimators
    if name in _AIS_NAMES:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_AIS_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
