"""Data-parallel training and evaluation on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node=P -m ppl_vae.fit ...`` sets ``WORLD_SIZE``/``RANK``/``LOCAL_RANK``;
:func:`setup` then joins the process group (NCCL on GPUs, Gloo on CPU). Without torchrun
everything runs single-process, unchanged.

Training: every rank draws the same epoch permutation (a generator seeded identically on all
ranks); global batch i is ``perm[i·B:(i+1)·B]`` and rank r takes the r-th of P equal slices
of it, so the ranks see disjoint shards of every epoch. The loss on each rank is the data
plate's full-data estimate from its slice, (N / B_r) Σ_{i ∈ slice} (−ELBO_i);
DistributedDataParallel averages the gradients over ranks, which gives exactly the gradient
of (N / B) Σ_{i ∈ batch} (−ELBO_i), the single-process loss with the same global batch.
Only rank 0 writes checkpoints, metrics and figures.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Context:
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
    """Join the process group when launched by torchrun; returns the context and this rank's device."""
    if not launched():
        return Context(), device
    ctx = Context(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def teardown(ctx: Context) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def shard(batch_idx: torch.Tensor, ctx: Context) -> torch.Tensor:
    """This rank's slice of a global batch of indices (the r-th of P near-equal slices)."""
    if not ctx.enabled:
        return batch_idx
    return batch_idx.tensor_split(ctx.world_size)[ctx.rank]


def all_reduce_sum(t: torch.Tensor, ctx: Context) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj, ctx: Context) -> list:
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, ctx: Context):
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class LossModule(nn.Module):
    """The ELBO as a module, so that DistributedDataParallel can wrap it: ``forward(x, size, beta)``
    returns ``objective(vae.model, vae.guide, x, size=size, beta=beta)`` (a scalar), and DDP
    all-reduces the gradients that reach ``vae``'s parameters."""

    def __init__(self, vae: nn.Module, objective):
        super().__init__()
        self.vae = vae
        self.objective = objective

    def forward(self, x, size, beta=1.0):
        return self.objective(self.vae.model, self.vae.guide, x, size=size, beta=beta)


def wrap(vae: nn.Module, objective, ctx: Context, device: torch.device):
    """``loss_fn(x, size, beta)``: the objective, wrapped in DDP when distributed."""
    module = LossModule(vae, objective)
    if not ctx.enabled:
        return module
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
