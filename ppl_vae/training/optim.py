"""Optimization settings: the optimizer, and the β (KL weight) schedule of each step.

The learning-rate schedule is torch's ``ExponentialLR`` (``--lr-decay`` γ per epoch:
lr_e = lr·γ^e), stepped by the training loop after each epoch.
"""

from __future__ import annotations

import torch


def make_optimizer(params, cfg, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """One Adam over all parameters: fused (one kernel over all tensors) on CUDA and CPU, where
    it is the fastest (docs/benchmarks.md), else multi-tensor. ``capturable`` (CUDA graphs):
    step counters and the learning rate live on the device, so a replayed step and the
    per-epoch lr decay need no host values."""
    if device.type == "cpu":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if device.type != "cuda":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    lr = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=capturable)


def beta_at(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """β-VAE weight of a step: linearly warmed up from β/(warm-up steps) to β over ``kl_warmup``
    epochs (β itself when the warm-up is off)."""
    if not cfg.kl_warmup:  # 0, or None before the data fixed the default
        return cfg.beta
    t = (epoch * steps_per_epoch + step + 1) / (cfg.kl_warmup * steps_per_epoch)
    return cfg.beta * min(1.0, t)
