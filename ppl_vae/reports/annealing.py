r"""AIS and BDMC in an evaluation (:func:`ppl_vae.reports.evaluation.evaluate` with ``ais_steps``,
``bdmc``): per block, in the protocol of the rest of the evaluation.

* AIS (:func:`ppl_vae.inference.ais.ais`) on each block of the evaluated data, block b seeded by
  ``derive_seed(derive_seed(seed, b), AIS_STREAM)``: the arrays ``ais``, ``ais_stderr``,
  ``ais_accept``, ``ais_trusted`` ``(M,)`` beside the IWAE ones.
* BDMC (:func:`ppl_vae.inference.bdmc.bdmc`) on ``bdmc`` datapoints simulated from the model,
  shaped like the first rows of the data (their labels kept, for a conditional program), in
  blocks of the same size, block b seeded by ``derive_seed(seed, BDMC_STREAM, b)``: ``bdmc_lower``,
  ``bdmc_upper``, ``bdmc_gap`` and the two stderrs ``(n_sim,)``.

Either way a block's numbers depend on ``seed`` and the block size only, so any split of the
blocks over ``torchrun`` processes gives the same numbers (:func:`bdmc_blocks` gathers them),
and not on the evaluation's ``chunk_size`` (chains × datapoints per pass), which both get, with
its probe of the program: on CUDA out-of-memory a block is retried with half the chunk size.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.seeding import derive_seed
from ..inference import estimators, importance, inputs, replay

AIS_STREAM, BDMC_STREAM = 0xA15, 0xBD3C  # keys of the AIS and BDMC seeds, apart from the IWAE draws'
PER_DATAPOINT = ("ais", "ais_stderr", "ais_accept", "ais_trusted")
BDMC_PER_DATAPOINT = ("bdmc_lower", "bdmc_lower_stderr", "bdmc_upper", "bdmc_upper_stderr", "bdmc_gap")
ARRAYS = PER_DATAPOINT + BDMC_PER_DATAPOINT  # what --per-datapoint saves


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def ais_block(
    model, guide, xb, seed: int, opts: dict, program=None, chunk_size=None
) -> dict[str, np.ndarray]:
    """AIS on one block ``xb (B, ...)`` (``opts``: :func:`~ppl_vae.inference.ais.ais`'s keyword
    arguments, ``num_steps`` and ``num_chains`` included; ``program``, ``chunk_size``: the
    evaluation's): the arrays of :data:`PER_DATAPOINT` ``(B,)``."""
    seed = derive_seed(seed, AIS_STREAM)
    est = estimators.ais(model, guide, xb, seed=seed, program=program, chunk_size=chunk_size, **opts)
    return {
        "ais": _np(est.value),
        "ais_stderr": _np(est.stderr),
        "ais_accept": _np(est.accept),
        "ais_trusted": est.trusted.cpu().numpy(),
    }


def options(steps: int, chains: int, leapfrog: int, work: int, progress: bool, init: str = "guide"):
    """AIS's arguments (``None`` for ``steps`` = 0; ``init``: its base density, ``"guide"`` or
    ``"prior"``) and a progress bar over ``work`` datapoints × ``steps`` on stderr, whose ``update``
    AIS calls after every step: shown with ``progress`` (the command line asks on a terminal only)."""
    show = progress and steps
    bar = tqdm(total=steps * work, desc="AIS", unit="step", disable=not show, file=sys.stderr)
    opts = dict(num_steps=steps, num_chains=chains, leapfrog=leapfrog, init=init, progress=bar)
    return (opts if steps else None), bar


class Tally:
    """AIS's ``progress`` for one attempt at a block that may be retried on out-of-memory: passes
    each count on to ``progress`` (a callable, or a tqdm bar: its ``update``) and keeps their sum,
    which :meth:`undo` takes back (one negative count, then the bar's ``refresh``), so that a
    retried block is counted once and the bar ends at its total."""

    def __init__(self, progress):  # no attribute ``update``: AIS would call it instead of the tally
        self.progress, self.tell, self.n = progress, getattr(progress, "update", progress), 0

    def __call__(self, n: int) -> None:
        self.tell(n)
        self.n += n

    def undo(self) -> None:
        if self.n:
            self.tell(-self.n)
            self.n = 0
            getattr(self.progress, "refresh", lambda: None)()


def retried(opts: dict | None):
    """AIS's arguments ``opts`` for one block run under
    :func:`~ppl_vae.inference.importance.halving_on_oom`, and its ``on_retry``: ``progress`` in a
    :class:`Tally` whose ``undo`` takes the failed attempt's steps back (``None`` without progress)."""
    if not opts or opts.get("progress") is None:
        return opts, None
    tally = Tally(opts["progress"])
    return opts | {"progress": tally}, tally.undo


def bdmc_blocks(model, guide, data, n_sim: int, block_size: int, seed: int, opts: dict, device=None, ctx=None,
                program=None, chunk_size=None, log=None):  # fmt: skip
    """BDMC on ``n_sim`` datapoints simulated like rows ``i mod N`` of ``data`` (a tensor or a tuple
    of per-datapoint arguments), in blocks of ``block_size``, this rank's blocks computed and every
    rank's gathered: the arrays of :data:`BDMC_PER_DATAPOINT` ``(n_sim,)`` in row order, and
    ``chunk_size``, the smallest any block ended with (``chunk_size`` given or the device's default,
    halved on CUDA out-of-memory, ``log`` told; :func:`~ppl_vae.inference.importance.halving_on_oom`;
    the steps of a failed attempt are taken off ``opts``' progress: :func:`retried`)."""
    ctx = ctx or distributed.Context()
    like = inputs.select(data, torch.arange(n_sim) % inputs.num_datapoints(data), device)
    chunk_size = chunk_size or importance.default_chunk(replay.as_args(like)[0].device)
    mine = []
    for b in distributed.strided(range(math.ceil(n_sim / block_size)), ctx):
        xb = inputs.select(like, slice(b * block_size, (b + 1) * block_size))
        seed_b = derive_seed(seed, BDMC_STREAM, b)
        opts_b, undo = retried(opts)  # a retry's progress counted once
        br, chunk_size = importance.halving_on_oom(
            lambda c: estimators.bdmc(model, guide, xb, seed=seed_b, program=program, chunk_size=c, **opts_b),
            chunk_size,
            log,
            f"BDMC block {b}",
            undo,
        )
        lo, up = br.lower, br.upper
        mine.append(
            (b, [_np(lo.value), _np(lo.stderr), _np(up.value), _np(up.stderr), _np(br.gap)], chunk_size)
        )
    parts = sorted(p for rank in distributed.all_gather_objects(mine, ctx) for p in rank)  # by block
    out = {
        k: np.concatenate([np.zeros(0)] + [p[1][i] for p in parts]) for i, k in enumerate(BDMC_PER_DATAPOINT)
    }
    return out | {"chunk_size": min([chunk_size] + [p[2] for p in parts])}


def summarize(res: dict, opts: dict | None, n_sim: int) -> dict:
    """The JSON entries of AIS and BDMC (none without ``opts``): means over datapoints in nats with
    their Monte Carlo standard errors (√(Σ se²)/n), the mean acceptance rate and the fraction of
    datapoints whose chains' weights are too unequal for their stderr (ESS < C/2); with the IWAE
    arrays beside them, the paired difference ``ais_minus_iwae`` = mean_i (AIS_i − IWAE_K,i) with
    both standard errors: its ``_stderr_across_datapoints`` (std_i / √n of the differences, far
    below either estimate's own spread) is what carries a subset's difference to the whole split."""
    if not opts:
        return {}
    n_sim = n_sim or 0
    s = {"ais_steps": opts["num_steps"], "ais_chains": opts["num_chains"], "ais_leapfrog": opts["leapfrog"]}
    s["ais_init"] = opts.get("init", "guide")
    if "ais" in res:
        e = estimators.Estimate(torch.from_numpy(res["ais"]), torch.from_numpy(res["ais_stderr"]))
        s.update(
            ais=e.mean(),
            ais_stderr=e.mean_stderr(),
            ais_stderr_across_datapoints=e.across_datapoints_stderr(),
        )
        s["ais_accept"] = float(np.nanmean(res["ais_accept"])) if opts["num_steps"] > 1 else None
        s["ais_untrusted_frac"] = float(1 - np.mean(res["ais_trusted"]))
        if "log_px" in res:  # paired on the same datapoints: what IWAE_K understates
            d = estimators.Estimate(
                torch.from_numpy(res["ais"] - res["log_px"]),
                torch.from_numpy(np.hypot(res["ais_stderr"], res["log_px_stderr"])),
            )
            s.update(
                ais_minus_iwae=d.mean(),
                ais_minus_iwae_stderr=d.mean_stderr(),
                ais_minus_iwae_stderr_across_datapoints=d.across_datapoints_stderr(),
            )
    if n_sim:
        lo = estimators.Estimate(
            torch.from_numpy(res["bdmc_lower"]), torch.from_numpy(res["bdmc_lower_stderr"])
        )
        up = estimators.Estimate(
            torch.from_numpy(res["bdmc_upper"]), torch.from_numpy(res["bdmc_upper_stderr"])
        )
        s.update(bdmc_n=n_sim, bdmc_lower=lo.mean(), bdmc_lower_stderr=lo.mean_stderr())
        s.update(
            bdmc_upper=up.mean(), bdmc_upper_stderr=up.mean_stderr(), bdmc_gap=float(np.mean(res["bdmc_gap"]))
        )
    return s
