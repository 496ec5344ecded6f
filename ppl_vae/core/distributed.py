"""Data-parallel training and evaluation on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=P -m ppl_vae.fit ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``
(and ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` then joins the process group (NCCL on
GPUs, Gloo on CPU). Without torchrun (or with P = 1) everything runs single-process, unchanged:
no process group, no wrapper. See ``docs/scaling.md``.

Training (:class:`ppl_vae.training.train.Trainer`), with P ranks and ``--batch-size`` B the *global* batch:

* every rank uses the same epoch permutation: rank 0 draws it from its global RNG exactly as a
  single process does, and broadcasts it (one tensor of N indices per epoch);
* global batch i is ``perm[i·B:(i+1)·B]``; rank r takes the r-th of P near-equal slices of it
  (:func:`shard`), so the ranks see disjoint shards of every epoch;
* the loss on rank r is the data plate's full-data estimate from its slice of B_r rows,
  (N / B_r) Σ_{i ∈ slice r} (−ELBO_i), times the weight w_r = P·B_r / B (1 when B is divisible
  by P). DistributedDataParallel averages the gradients over ranks::

      (1/P) Σ_r w_r ∇ (N / B_r) Σ_{i ∈ r} (−ELBO_i) = ∇ (N / B) Σ_{i ∈ batch} (−ELBO_i),

  exactly the gradient of the single-process loss for the same global batch (and the same
  draws of ε); gradient clipping and Adam then see the same gradient on every rank, so the
  parameters stay identical without being broadcast again;
* rank 0 keeps the single-process random stream (seed); rank r > 0 draws its ε and dynamic
  binarizations from :func:`rank_seed`\\ (seed, r);
* the epoch loss and the signal flag are all-reduced at every progress interval, validation
  bounds are computed in fixed blocks spread over the ranks and gathered
  (:func:`strided`, :func:`all_gather_objects`), so every rank takes the same early-stopping,
  NaN and interrupt decisions; only rank 0 writes checkpoints, metrics, figures and log lines.

Evaluation (``torchrun ... -m ppl_vae.evaluate RUN``) gives rank r the blocks r, r+P, ...;
each block's draws are seeded by (seed, block), so the gathered result is the single-process one.
"""

from __future__ import annotations

import atexit
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .seeding import derive_seed


@dataclass
class Context:
    """Where this process stands: ``rank`` of ``world_size``, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True under torchrun (or any launcher that sets WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> tuple[Context, torch.device]:
    """Join the process group when launched by torchrun (once per process; it is left at exit),
    or use the one the caller initialized; returns the context and this rank's device
    (``cuda:LOCAL_RANK`` for a CUDA device)."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dist.is_available() and dist.is_initialized():
        ctx = Context(dist.get_rank(), dist.get_world_size(), local_rank)
    elif launched():
        ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), local_rank)
    else:
        return Context(), device
    if not ctx.enabled:
        return ctx, device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown, ctx)
    return ctx, device


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int, *keys: int) -> int:
    """Seed of rank ``rank``'s global RNG: ``seed`` itself on rank 0 (the single-process stream),
    an independent stream (``derive_seed``) elsewhere; < 2³² as NumPy requires."""
    if rank == 0 and not keys:
        return seed
    return derive_seed(seed, 0xD15, rank, *keys) % 2**32


def shard(batch_idx: torch.Tensor, ctx: Context) -> tuple[torch.Tensor, float]:
    """This rank's slice of a global batch of B indices (the r-th of P near-equal slices, B_r
    rows) and its loss weight w_r = P·B_r / B, which makes DDP's gradient mean the gradient of
    the whole batch (see the module docstring)."""
    if not ctx.enabled:
        return batch_idx, 1.0
    mine = batch_idx.tensor_split(ctx.world_size)[ctx.rank]
    return mine, ctx.world_size * mine.shape[0] / batch_idx.shape[0]


def strided(items, ctx: Context):
    """Items r, r+P, r+2P, ... of a sequence (a ``range`` stays a ``range``): this rank's share."""
    return items[ctx.rank :: ctx.world_size] if ctx.enabled else items


def barrier(ctx: Context) -> None:
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Σ over ranks of ``t``, in place (on this rank's device)."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, ctx: Context) -> list:
    """``[obj of rank 0, ..., obj of rank P−1]`` on every rank (pickled)."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_tensor(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    """Rank 0's ``t`` on every rank, in place (other ranks pass a tensor of the same shape/dtype)."""
    if ctx.enabled:
        dist.broadcast(t, src=0)
    return t


def sync_loss(running: torch.Tensor, flag: dict, ctx: Context) -> tuple[float, bool]:
    """The host sync of a training loop's log interval: the loss summed since the last sync
    (distributed: Σ_r w_r·loss_r / P, the global batches' loss) and whether a signal arrived
    (on any rank)."""
    if not ctx.enabled:
        return running.item(), bool(flag)
    both = torch.stack([running, torch.full_like(running, len(flag))])
    total, signals = all_reduce_sum(both, ctx).tolist()
    return total / ctx.world_size, signals > 0


def any_signalled(flag: dict, ctx: Context, device) -> bool:
    """Whether a signal arrived, on any rank (the same answer on every rank)."""
    if not ctx.enabled:
        return bool(flag)
    return all_reduce_sum(torch.tensor([float(len(flag))], device=device), ctx).item() > 0


def signal_number(flag: dict, ctx: Context) -> int:
    """The signal that arrived (distributed: called by every rank; the largest number any rank saw)."""
    if not ctx.enabled:
        return flag["signum"]
    return max(all_gather_objects(flag.get("signum", 0), ctx))


class LossModule(nn.Module):
    """The ELBO as a module, so that DistributedDataParallel can wrap it: ``forward(batch, size,
    beta)`` returns ``objective(vae.model, vae.guide, *batch, size=size, beta=beta)`` (a scalar) for
    a batch ``(x,)`` or ``(x, y)``, and DDP all-reduces the gradients that reach ``vae``'s parameters.

    An empty slice (a global batch with fewer rows than ranks) gives a zero loss that still
    touches every parameter, so DDP's gradient all-reduce sees all of them."""

    def __init__(self, vae: nn.Module, objective):
        super().__init__()
        self.vae = vae
        self.objective = objective

    def forward(self, batch, size, beta=1.0):
        if batch[0].shape[0] == 0:
            return sum(p.sum() for p in self.vae.parameters()) * 0.0
        return self.objective(self.vae.model, self.vae.guide, *batch, size=size, beta=beta)


def wrap(vae: nn.Module, objective, ctx: Context, device: torch.device) -> nn.Module:
    """``loss_fn(batch, size, beta)``: the objective as a :class:`LossModule`, wrapped in DDP when
    distributed. Buffers (the prior's constants) are not broadcast at every step: they never change."""
    module = LossModule(vae, objective)
    if not ctx.enabled:
        return module
    ddp = nn.parallel.DistributedDataParallel
    no_sync = (
        "forward_sync_buffers"
        if "forward_sync_buffers" in inspect.signature(ddp).parameters
        else "broadcast_buffers"
    )  # (torch < 2.14)
    return ddp(module, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
