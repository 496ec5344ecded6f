r"""Held-out evaluation of any Pyro program, in seeded blocks: :func:`evaluate`.

For every datapoint of ``data (N, ...)``: the analytic-KL ELBO, the Monte Carlo ELBO, IWAE_k for
the convergence curve k ∈ ``ks`` and log p(x) ≈ IWAE_K with K = ``num_samples``, each with its
Monte Carlo standard error, and the Pareto k̂ and PSIS ESS of the importance weights, all from
the same K draws (:func:`ppl_vae.inference.estimators.estimate_all`); and E_q[z|x] of every latent site
for its active units (:mod:`ppl_vae.reports.latents`). :func:`evaluate` returns them as a
:class:`~ppl_vae.reports.report.Report`: dataset means in nats per datapoint with their standard errors
and the verdict on log p(x) (:func:`ppl_vae.reports.report.summarize`), and the per-datapoint arrays.

The protocol: the N datapoints are split into fixed blocks of ``batch_size``; block b is
``data[b·B : (b+1)·B]``, drawn from the seed ``derive_seed(seed, b)``
(:func:`ppl_vae.inference.importance.derive_seed`). A datapoint's numbers therefore depend on ``seed``
and ``batch_size`` only, not on which process or in which order blocks are computed, nor on
``chunk_size`` (up to float rounding): :func:`evaluate_blocks` computes any set of blocks,
and :func:`gather_blocks` merges those of several processes (rank r of P takes blocks
r, r+P, r+2P, ...: ``docs/scaling.md``) into what one process gives.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import UserError
from ..inference import checks, estimators, importance, inputs, replay
from . import annealing, collapse, latents
from .report import KL, MC_VAR, MEAN, Report, headline, summarize

DEFAULT_KS = (1, 10, 100, 1000, 5000)
DEFAULT_BLOCK = 100
PER_DATAPOINT = (
    "elbo_analytic",
    "elbo_analytic_stderr",
    "elbo_mc",
    "elbo_mc_stderr",
    "log_px",
    "log_px_stderr",
    "khat",
    "ess",
)


def curve_ks(num_samples: int, ks=None) -> list[int]:
    """The sorted k of the convergence curve, K included (default: those of :data:`DEFAULT_KS` ≤ K);
    ``ValueError`` unless 1 ≤ k ≤ K are integers."""
    inputs.check_num_samples(num_samples)
    ks = sorted({*(ks if ks is not None else [k for k in DEFAULT_KS if k <= num_samples]), num_samples})
    bad = [k for k in ks if not (isinstance(k, (int, np.integer)) and 1 <= k <= num_samples)]
    if bad:
        raise UserError(f"ks values must be integers in 1..K = {num_samples}, got {bad}")
    return ks


# --------------------------------------------------------------------------- per-datapoint work in blocks

META = ("chunk_size", "elbo_analytic_na")  # per-call entries of a block result, not per datapoint


def _block(model, guide, xb, num_samples, ks, seed, chunk_size, mean_samples, program, ais=None) -> dict:
    """One block ``xb (B, ...)`` drawn from ``seed``: the arrays of :func:`evaluate_blocks`, as
    NumPy on the CPU whatever the device of ``xb``. ``program``: the evaluation's one probe; ``ais``:
    AIS's arguments, to add its arrays (:func:`ppl_vae.reports.annealing.ais_block`)."""
    est = estimators.estimate_all(
        model, guide, xb, num_samples, ks=ks, seed=seed, chunk_size=chunk_size, program=program
    )
    out = {
        "khat": est["khat"].cpu().numpy(),
        "ess": est["ess"].cpu().numpy(),
        "elbo_analytic_na": est["elbo_analytic_na"],
    }
    nan = np.full(inputs.num_datapoints(xb), math.nan)  # no closed-form KL: the analytic ELBO is n/a
    for name, key in (("elbo_analytic", "elbo_analytic"), ("elbo_mc", "elbo_mc"), ("log_px", "iwae")):
        e = est.get(key)
        out[name] = nan if e is None else e.value.double().cpu().numpy()
        out[name + "_stderr"] = nan if e is None else e.stderr.double().cpu().numpy()
    for key, attr in (("iwae_by_k", "value"), ("iwae_by_k_stderr", "stderr")):
        rows = [getattr(est["iwae_by_k"][k], attr).double().cpu().numpy() for k in ks]
        out[key] = np.stack(rows) if rows else np.zeros((0, inputs.num_datapoints(xb)))  # (len(ks), B)
    if mean_samples:
        means = latents.posterior_means(model, guide, xb, mean_samples, seed=seed, nesting=program.nesting)
        for name, pm in means.items():
            out[MEAN + name], out[MC_VAR + name] = (
                pm.mean.T.cpu().numpy(),
                pm.mc_var.T.cpu().numpy(),
            )  # (d, B)
        for name, kl in collapse.kl_terms(model, guide, xb, seed=seed, nesting=program.nesting).items():
            out[KL + name] = kl.double().cpu().numpy()  # (B,)
    if ais:  # inside the retry of evaluate_blocks: AIS too is retried with half the chunk size
        out.update(annealing.ais_block(model, guide, xb, seed, ais, program, chunk_size))
    return out


def evaluate_blocks(
    model,
    guide,
    x: torch.Tensor,
    block_ids,
    *,
    block_size: int = DEFAULT_BLOCK,
    num_samples: int = 5000,
    ks=(),
    seed: int = 0,
    chunk_size: int | None = None,
    mean_samples: int = latents.MEAN_SAMPLES,
    device=None,
    progress=None,
    log=None,
    program: checks.Program | None = None,
    ais: dict | None = None,
) -> dict:
    """Per-datapoint estimates for blocks ``block_ids`` of ``x (N, D)``.

    Block b is ``x[b·block_size : (b+1)·block_size]``, moved to ``device`` and evaluated with
    :func:`ppl_vae.inference.estimators.estimate_all` and :func:`ppl_vae.reports.latents.posterior_means` (from
    ``mean_samples`` guide draws where not exact; 0: skip) seeded by ``derive_seed(seed, b)``:
    any split of the block ids over processes gives the same numbers. Where a latent site has
    no closed-form KL the analytic ELBO is NaN (n/a) and ``elbo_analytic_na`` says why. On CUDA out-of-memory the chunk size is
    halved and the block retried, AIS included (same draws, so the same results:
    :func:`~ppl_vae.inference.importance.halving_on_oom`), the failed attempt's AIS steps taken
    off ``ais``' progress (:func:`~ppl_vae.reports.annealing.retried`).

    Returns arrays over the M datapoints of the blocks, in block order: ``position (M,)`` (row
    of ``x``), those of :data:`PER_DATAPOINT` ``(M,)``, ``iwae_by_k`` and ``iwae_by_k_stderr``
    ``(len(ks), M)``, per latent site s ``posterior_mean:s`` and ``posterior_mc_var:s`` ``(d_s, M)``
    and ``kl:s`` ``(M,)`` (the layer's KL term, :func:`ppl_vae.reports.collapse.kl_terms`; with the means),
    ``chunk_size`` (the one finally used) and ``elbo_analytic_na`` (``None``, or why n/a).
    ``program``: the probe of model and guide (:func:`~ppl_vae.inference.checks.inspect_program`
    with ``analytic_kl="auto"``), made once here on the first block when not given. ``ais``: the
    arguments of :func:`~ppl_vae.inference.ais.ais`, to add AIS's arrays (:mod:`ppl_vae.reports.annealing`).
    """
    ks = sorted(ks)
    if program is None:
        program = checks.inspect_program(
            model, guide, inputs.select(x, slice(0, block_size), device), {}, "auto"
        )
    chunk_size = chunk_size or importance.default_chunk(
        device if device is not None else replay.as_args(x)[0].device
    )
    parts = []
    for b in block_ids:
        rows = torch.arange(b * block_size, min((b + 1) * block_size, inputs.num_datapoints(x)))
        xb = inputs.select(x, rows, device)  # x (B, ...), or the tuple (x, y, ...) of the block
        sb = importance.derive_seed(seed, b)
        ais_b, undo = annealing.retried(ais)  # a retry's AIS steps counted once
        res, chunk_size = importance.halving_on_oom(
            lambda c: _block(model, guide, xb, num_samples, ks, sb, c, mean_samples, program, ais_b),
            chunk_size,
            log,
            f"block {b}",
            undo,
        )
        res["position"] = rows.numpy()
        parts.append(res)
        if progress is not None:
            progress.update(len(rows))
    if not parts:  # e.g. a process given no blocks
        empty = np.zeros((0,))
        parts = [
            {
                **{k: empty for k in (*PER_DATAPOINT, "position")},
                "iwae_by_k": np.zeros((len(ks), 0)),
                "iwae_by_k_stderr": np.zeros((len(ks), 0)),
            }
        ]
    out = _concat(parts)
    out["chunk_size"] = chunk_size
    out["elbo_analytic_na"] = next((p["elbo_analytic_na"] for p in parts if p.get("elbo_analytic_na")), None)
    return out


def _concat(parts: list[dict]) -> dict[str, np.ndarray]:
    """Per-datapoint arrays of several results joined along the last (datapoint) axis; a key
    missing from a part (latent sites of a process that had no blocks) has no datapoints there."""
    keys = dict.fromkeys(k for p in parts for k in p if k not in META)
    return {k: np.concatenate([p[k] for p in parts if k in p], axis=-1) for k in keys}


def gather_blocks(res: dict, ctx: distributed.Context) -> dict[str, np.ndarray]:
    """Every rank's :func:`evaluate_blocks` result merged in row order, as one process over all
    blocks gives it (``chunk_size``: the smallest any rank used; ``elbo_analytic_na``: any
    rank's). A no-op single-process."""
    if not ctx.enabled:
        return res
    parts = distributed.all_gather_objects(res, ctx)
    out = _concat(parts)
    order = np.argsort(out["position"], kind="stable")
    out = {key: v[..., order] for key, v in out.items()}
    out["position"] = out["position"].astype(np.int64)
    out["chunk_size"] = min(int(p["chunk_size"]) for p in parts)
    out["elbo_analytic_na"] = next((p["elbo_analytic_na"] for p in parts if p.get("elbo_analytic_na")), None)
    return out


def observed_is_discrete(model, guide, x, **kwargs) -> bool:
    """:func:`ppl_vae.inference.checks.observed_discrete` of ``model(x)`` replayed on one draw of the guide."""
    return checks.inspect_program(model, guide, x, kwargs).observed_discrete


def evaluate(
    model,
    guide,
    data: torch.Tensor,
    *,
    num_samples: int = 5000,
    ks=None,
    seed: int = 0,
    batch_size: int = DEFAULT_BLOCK,
    chunk_size: int | None = None,
    discrete: bool | None = None,
    bits=None,
    mean_samples: int = latents.MEAN_SAMPLES,
    likelihood: str | None = None,
    kl_warmup: float | None = None,
    device=None,
    progress: bool = False,
    ctx: distributed.Context | None = None,
    ais_steps: int = 0,
    ais_chains: int = 16,
    ais_leapfrog: int = 10,
    ais_init: str = "guide",
    bdmc: int = 0,
) -> Report:
    """Evaluate any Pyro ``model(x)`` / ``guide(x)`` pair on ``data (N, ...)`` (datapoints along
    dim 0, every per-datapoint site in ``pyro.plate("data", ...)``): the report ``python -m
    ppl_vae.evaluate`` prints and writes, in nats per datapoint (see :func:`summarize`).
    ``data`` may be a tuple ``(x, y, ...)`` of per-datapoint arguments for ``model(x, y, ...)``
    (e.g. class labels), split into blocks together. A program that is not
    :func:`~ppl_vae.inference.importance.slice_safe` is evaluated as one block of all N datapoints.

    :param num_samples: K, importance samples per datapoint for log p(x) ≈ IWAE_K.
    :param ks: the convergence curve's k ≤ K (default: those of 1, 10, 100, 1000, 5000 ≤ K; K added).
    :param seed: seeds block b's draws with ``derive_seed(seed, b)``.
    :param batch_size: datapoints per block (part of the protocol: a block's draws are seeded together).
    :param chunk_size: particles × datapoints per vectorized pass (memory only; default per device).
    :param discrete: whether p(x|z) is a probability of discrete data (bits/dim reported) or a density
        (no bits/dim); default: what the probe of the program finds (:func:`observed_is_discrete`).
    :param bits: what bits/dim are here, a :class:`~ppl_vae.reports.bits.BitsScale` (e.g. of 8-bit images
        through uniform dequantization: :func:`~ppl_vae.reports.bits.scale_for`), or why there are none.
    :param mean_samples: guide draws for E_q[z|x] of the active units where it is not exact (0: skip
        them and each layer's KL).
    :param likelihood: the likelihood's name, for the remedies of a collapse line (e.g. σ of a Gaussian).
    :param kl_warmup: the run's KL warm-up in epochs, for the same remedies (None: not known).
    :param device: where blocks are evaluated (default: ``data``'s device).
    :param progress: show progress bars (IWAE's datapoints, AIS's steps) on stderr; ``tqdm.auto``
        draws a widget in a notebook. The command line asks for them on a terminal only.
    :param ctx: a :class:`~ppl_vae.core.distributed.Context`: this rank computes blocks r, r+P, ... and
        every rank returns the gathered report.
    :param ais_steps: T > 0 adds log p(x) by AIS with T steps, ``ais_chains`` chains of ``ais_leapfrog``
        leapfrog steps per datapoint, from ``ais_init`` (``"guide"`` or ``"prior"``); ``bdmc`` > 0 (with
        ``ais_steps``) adds BDMC's bracket on that many datapoints simulated from the model
        (:mod:`ppl_vae.reports.annealing`).
    """
    ks = curve_ks(num_samples, ks)
    n = inputs.num_datapoints(inputs.check_data(data))  # bad data: one line, the datapoint named
    if batch_size < 1:
        raise ValueError(f"need batch_size >= 1, got {batch_size}")
    # the one probe of the evaluation: plates, closed forms, slice safety, discreteness; passed down
    program = checks.inspect_program(model, guide, inputs.select(data, slice(None), device), {}, "auto")
    if not program.slice_safe:  # blocks would give wrong numbers (e.g. guide parameters read by plate index)
        batch_size = n
    ctx = ctx or distributed.Context()
    n_blocks = math.ceil(n / batch_size)
    blocks = list(distributed.strided(range(n_blocks), ctx))  # this rank's share: blocks r, r+P, ...
    if discrete is None:
        discrete = program.observed_discrete
    t0 = time.perf_counter()
    rows = sum(min((b + 1) * batch_size, n) - b * batch_size for b in blocks)
    bar = tqdm(total=rows, unit="datapoint", disable=not progress, dynamic_ncols=True, file=sys.stderr)
    sims = len(distributed.strided(range(bdmc), ctx)) if ais_steps else 0  # this rank's share, about
    ais, steps = annealing.options(ais_steps, ais_chains, ais_leapfrog, rows + 2 * sims, progress, ais_init)
    log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731
    try:
        res = evaluate_blocks(
            model,
            guide,
            data,
            blocks,
            block_size=batch_size,
            num_samples=num_samples,
            ks=ks,
            seed=seed,
            chunk_size=chunk_size,
            mean_samples=mean_samples,
            device=device,
            progress=bar,
            log=log,
            program=program,
            ais=ais,
        )
        res = gather_blocks(res, ctx)
        if ais and bdmc:  # from the chunk size the blocks ended with, halved again on out-of-memory
            sim = (data, bdmc, batch_size, seed, ais, device, ctx, program, res["chunk_size"], log)
            res.update(annealing.bdmc_blocks(model, guide, *sim))
    finally:
        bar.close()
        steps.close()
    dim = int(replay.as_args(data)[0][0].numel())
    s = summarize(res, ks, num_samples, dim, discrete, mean_samples, likelihood, bits, kl_warmup)
    s.update(annealing.summarize(res, ais, bdmc))
    if ais:  # which of IWAE_K and AIS to quote, and why
        s["headline"], s["headline_why"] = headline(s)
    s.update(
        ks=ks,
        seed=seed,
        batch_size=batch_size,
        chunk_size=int(res["chunk_size"]),
        discrete=discrete,
        seconds=time.perf_counter() - t0,
    )
    return Report(s, res)
