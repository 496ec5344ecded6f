"""Optimization settings: the optimizer, and the β (KL weight) schedule of each step.

The learning-rate schedule is torch's ``ExponentialLR`` (``--lr-decay`` γ per epoch:
lr_e = lr·γ^e), stepped by the training loop after each epoch.
"""

from __future__ import annotations

import math

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


def normalize_and_clip_grads(params, normalize: bool = False, clip: float | None = None) -> None:
    """The gradients of ``params`` before the update, in place and without a host sync:
    ``normalize`` (``--optimizer adam-normgrad``) scales each tensor's gradient g to g / (‖g‖₂ + 1e-7),
    the update of the VampPrior authors' ``AdamNormGrad`` (Tomczak & Welling 2018, their
    ``utils/optimizer.py``: this, then Adam), so that a batch with a large gradient weighs no more in
    Adam's averages than another. Per torch tensor: where ppl_vae keeps in one tensor what their
    networks keep in two (a gated layer's two halves, the encoder's μ and log σ² heads), the groups
    differ. ``clip`` (``--grad-clip``; refused with ``normalize``) bounds the global L2 norm."""
    if not (normalize or clip):  # plain Adam: nothing to do on the hot path
        return
    params = list(params)
    grads = [p.grad for p in params if p.grad is not None]
    if normalize and grads:
        norms = torch._foreach_norm(grads)  # one device scalar per tensor
        torch._foreach_add_(norms, 1e-7)
        torch._foreach_div_(grads, norms)
    if clip:
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)


def apply_settings(optim: torch.optim.Optimizer, scheduler, cfg, saved_lr, device: torch.device) -> None:
    """After loading a checkpoint's optimizer state: the settings given anew with ``--resume``
    (lr when it differs from the run's ``saved_lr``, weight decay, lr decay) apply from here on, and
    a state from another device or path (CUDA graph or eager) continues with this run's Adam
    implementation (the loaded groups carry the old one's fused/foreach/capturable flags)."""
    for g in optim.param_groups:
        if saved_lr != cfg.lr:
            g["lr"] = g["initial_lr"] = cfg.lr
        g["weight_decay"] = cfg.weight_decay
        for key in ("fused", "foreach", "capturable"):
            g[key] = optim.defaults.get(key)
        if isinstance(g["lr"], torch.Tensor) and not g["capturable"]:
            g["lr"] = float(g["lr"])
        elif g["capturable"] and not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(g["lr"], device=device)
    scheduler.gamma = cfg.lr_decay


def beta_at(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """β-VAE weight of a step: linearly warmed up from β/(warm-up steps) to β over ``kl_warmup``
    epochs (β itself when the warm-up is off)."""
    if not cfg.kl_warmup:  # 0, or None before the data fixed the default
        return cfg.beta
    t = (epoch * steps_per_epoch + step + 1) / (cfg.kl_warmup * steps_per_epoch)
    return cfg.beta * min(1.0, t)


def patience_grace(cfg, steps_per_epoch: int) -> int:
    """The first epochs, in which early stopping does not count an epoch without a better
    validation bound: the KL warm-up (the bound judged is at β = 1, the one trained is not yet) and,
    with ``--ema d``, one averaging time constant more, 1/(1 − d) steps (θ̄, which validation
    judges, still averages the warm-up's parameters). The VampPrior authors' code does the same for
    its warm-up (Tomczak & Welling 2018). ``ceil(kl_warmup + 1/((1 − d)·steps_per_epoch))``; 0 with
    neither."""
    lag = 1 / ((1 - cfg.ema) * steps_per_epoch) if cfg.ema else 0.0
    return math.ceil((cfg.kl_warmup or 0) + lag)
