r"""Log importance weights of any Pyro model/guide pair, drawn in seeded, memory-bounded passes.

Like :mod:`pyro.infer.importance`, this module is generic over Pyro programs ``model(*args)``,
``guide(*args)``: ``x`` is a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint
arguments, sliced together; every sample site sits in ``pyro.plate("data", N)`` with its event
dims declared (:mod:`ppl_vae.inference.checks`). For z_k ~ q(z | x) it returns the log importance weights

    log w_k(x_i) = log p(x_i, z_k) − log q(z_k | x_i),   shape ``(K, N)``, nats,

from which :mod:`ppl_vae.inference.estimators` builds the ELBO and IWAE_K and :mod:`ppl_vae.inference.psis` k̂.
The particles are an outer plate placed left of the model's plates. Log-densities are scaled and
masked as Pyro's ``Trace_ELBO`` does (``poutine.scale``, ``poutine.mask``, ``.mask()``), except for
the data plate's minibatch factor ``size / N``, which is left out so that each weight belongs
to one datapoint.

Every call first probes the program once on the caller's own arguments
(:func:`ppl_vae.inference.checks.inspect_program`); the drawing, replaying and weighing of one pass are
in :mod:`ppl_vae.inference.replay`.

Reproducibility: with ``seed`` given, the K draws come in units of :data:`SAMPLE_UNIT`
particles, unit j drawn from the torch RNG seeded with ``derive_seed(seed, j)``. A pass draws
whole units, so the weights do not depend on ``chunk_size`` (up to float rounding), and the
caller's RNG stream is left untouched. A pass draws its units' latents for the whole batch
(the guide runs once per unit), then weighs them through the model in slices of datapoints,
so that the decoder sees about ``chunk_size`` particles × datapoints at a time. A program
that is not :func:`slice_safe` (per-datapoint guide parameters read by plate index, ``(N, d)``
tensors in a closure, batch statistics) is weighed on all N rows in one model pass instead:
``max(chunk_size, SAMPLE_UNIT · N)`` rows when seeded. So is a program whose guide is a flow
(``Program.flow_guide``), one unit of particles per pass, weighed on the guide trace that drew
it: scoring a replayed z would invert the flow (one network pass per dimension for an IAF).
The draws for datapoint i still depend on the whole batch (the guide draws (u, N, ...) at
once): fix the batches too (as :mod:`ppl_vae.reports.evaluation` does) when results must not depend on
how work is split.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from ..core.errors import UserError
from ..core.seeding import derive_seed  # noqa: F401 (re-exported: importance.derive_seed)
from . import inputs

# re-exported (importance.* in evaluate, latents, psis and the tests): DATA_PLATE, guide_trace, max_plate_nesting, slice_safe
from .checks import Program, inspect_program, max_plate_nesting, slice_safe  # noqa: F401
from .replay import (  # noqa: F401
    DATA_PLATE,
    Draws,
    as_args,
    draw_units,
    guide_trace,
    replay,
    rng_fork,
    take_rows,
    weigh,
    weigh_enumerated,
)

# Particles × datapoints per decoder pass (``chunk_size=None``): bounds memory, not K. On a CPU a
# pass that stays near the caches is fastest (benchmarks/eval_speed.py, docs/benchmarks.md); a GPU
# wants large passes.
DEFAULT_CHUNK = {"cpu": 4096, "cuda": 2_000_000}
SAMPLE_UNIT = 100  # particles per seeded draw; a pass holds whole units (memory ≥ SAMPLE_UNIT rows)


def log_importance_weights(
    model,
    guide,
    x,
    num_samples: int,
    seed: int | None = None,
    chunk_size: int | None = None,
    nesting: int | None = None,
    **kwargs,
) -> torch.Tensor:
    """log w_k = log p(x, z_k) − log q(z_k | x) for z_k ~ q(z|x): shape ``(num_samples, N)``,
    nats. ``x``: a tensor ``(N, ...)`` or a tuple ``(x, y, ...)`` of per-datapoint arguments
    (:mod:`ppl_vae.inference.checks`). Differentiable, so it also serves the IWAE training objective.
    ``nesting`` given: the program's plate nesting, trusted (no probe, no checks, no slicing: each
    pass weighs all N datapoints), the training step's fast path."""
    return torch.cat(
        [
            d.log_w
            for d in iter_log_weights(
                model, guide, x, num_samples, seed, chunk_size, nesting=nesting, **kwargs
            )
        ],
        0,
    )  # (K, N)


def iter_log_weights(
    model,
    guide,
    x,
    num_samples: int,
    seed: int | None = None,
    chunk_size: int | None = None,
    analytic_kl=False,
    nesting: int | None = None,
    program: Program | None = None,
    **kwargs,
):
    """Yield :class:`Draws` pass by pass, ``num_samples`` particles in all, about ``chunk_size``
    particles × datapoints per pass (see the module docstring for ``seed``). Differentiable
    (no ``no_grad`` here). ``x`` and ``kwargs`` as :func:`log_importance_weights`. The program
    is probed once (:func:`inspect_program`) unless ``program`` is given, or ``nesting`` is
    given without ``analytic_kl`` (the training step's trusted fast path: no checks, no
    slicing). ``analytic_kl``: ``True`` adds the analytic-KL ELBO (:class:`~ppl_vae.inference.checks.NoClosedFormKL`
    where a valid closed form is not registered), ``"auto"`` the same with Monte Carlo there."""
    inputs.check_num_samples(num_samples)
    if program is None:
        program = (
            Program(nesting, slice_safe=False)  # trusted: no probe, so no slicing (all N rows per pass)
            if nesting is not None and not analytic_kl
            else inspect_program(model, guide, x, kwargs, analytic_kl)
        )
    args = as_args(x)
    n, chunk_size = args[0].shape[0], chunk_size or default_chunk(args[0].device)
    # a flow guide is weighed on the trace that drew z, whose log q(z|x) needs no inverse: one unit of
    # particles per pass and all n datapoints in its model pass (replaying an IAF inverts it
    # autoregressively, one MADE pass per dimension; the cost is in docs/benchmarks.md)
    for units in _plan(num_samples, n, chunk_size, seed, one_unit=program.flow_guide):
        k = sum(size for size, _ in units)
        # datapoints per model pass: k × rows ≈ chunk_size; all of them for a program that is not slice-safe
        rows = max(1, chunk_size // k) if program.slice_safe and not program.flow_guide else n
        with rng_fork() if seed is not None else nullcontext():  # restored before each yield
            values, drawn = draw_units(
                guide, args, units, program.nesting, kwargs
            )  # (k, N, ...): a guide run per unit
            whole = drawn if rows >= n else None  # one slice, the whole batch: its guide trace is drawn's
            parts = []
            for i in range(0, n, rows):  # the drawn latents replayed on datapoints i : i + rows
                z_rows = take_rows(values, i, min(i + rows, n))  # (k, rows, ...)
                model_tr, guide_tr = replay(
                    model,
                    guide,
                    z_rows,
                    inputs.take(args, i, i + rows),
                    k,
                    program.nesting,
                    kwargs,
                    whole,
                    enumerate=bool(program.enumerated),
                )
                parts.append(
                    weigh_enumerated(model_tr, guide_tr, program.nesting, program.enumerated)
                    if program.enumerated
                    else weigh(model_tr, guide_tr, program.nesting, program.closed_form)
                )  # (k, rows) fields
        yield parts[0] if len(parts) == 1 else Draws.cat(parts)  # (k, N) from the (k, rows) of each slice


def default_chunk(device) -> int:
    """The ``chunk_size`` used when none is given, for tensors on ``device``."""
    return DEFAULT_CHUNK.get(torch.device(device).type, DEFAULT_CHUNK["cpu"])


def halving_on_oom(work, chunk_size: int, log=None, what: str = "the work", on_retry=None):
    """``(work(chunk_size), the chunk size used)``: on CUDA out-of-memory the chunk size is halved
    and ``work`` run again (the same draws, so the same results: they do not depend on
    ``chunk_size``), down to one :data:`SAMPLE_UNIT` × 1 datapoint, then one line. ``log``: told
    of each retry; ``on_retry()``: called before each retry (e.g. to take the failed attempt's
    steps off a progress bar)."""
    while True:
        try:
            return work(chunk_size), chunk_size
        except torch.cuda.OutOfMemoryError:
            if chunk_size <= SAMPLE_UNIT:  # a pass holds at least one unit on one datapoint
                raise UserError(
                    f"out of GPU memory even with the smallest pass ({SAMPLE_UNIT} particles × 1 datapoint); "
                    f"the model is too large for this GPU"
                ) from None
            chunk_size = max(SAMPLE_UNIT, chunk_size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if log:
                log(f"CUDA out of memory: retrying {what} with --chunk-size {chunk_size}")
            if on_retry:
                on_retry()


# --------------------------------------------------------------------------- the pass plan


def _plan(num_samples: int, n: int, chunk_size: int, seed: int | None, one_unit: bool = False):
    """Passes, each a list of units (size, seed). Unseeded: one unit per pass of about
    ``chunk_size / n`` particles. Seeded: fixed units of SAMPLE_UNIT particles (the last may be
    smaller), as many whole units per pass as ``chunk_size`` allows (at least one; exactly one
    with ``one_unit``)."""
    per_pass = max(1, min(num_samples, chunk_size // max(n, 1)))
    if seed is None:
        for start in range(0, num_samples, per_pass):
            yield [(min(per_pass, num_samples - start), None)]
        return
    units = [
        (min(SAMPLE_UNIT, num_samples - start), derive_seed(seed, j))
        for j, start in enumerate(range(0, num_samples, SAMPLE_UNIT))
    ]
    step = 1 if one_unit else max(1, per_pass // SAMPLE_UNIT)
    for i in range(0, len(units), step):
        yield units[i : i + step]
