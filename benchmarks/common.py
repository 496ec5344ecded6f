"""Shared pieces of the benchmark scripts: timing and the hand-written PyTorch references."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ppl_vae.programs.likelihoods import FastBernoulli

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    """Wall seconds of ``fn()`` with the device synchronized before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def save_result(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{name}-{payload.get('device_kind', 'cpu')}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


class TorchVAE(nn.Module):
    """The 784-400-20 MLP VAE written by hand (the architecture ppl_vae builds with --hidden 400)."""

    def __init__(self, x_dim=784, hidden=400, z_dim=20, own_density=False):
        """``own_density``: use ppl_vae's Bernoulli log-density instead of PyTorch's BCE-with-logits
        (isolates what the Pyro program itself costs in benchmarks/fit_speed.py)."""
        super().__init__()
        self.own_density = own_density
        self.enc = nn.Sequential(nn.Linear(x_dim, hidden), nn.ReLU(), nn.Linear(hidden, 2 * z_dim))
        self.dec = nn.Sequential(nn.Linear(z_dim, hidden), nn.ReLU(), nn.Linear(hidden, x_dim))
        self.z_dim = z_dim

    def neg_elbo(self, x, scale: float = 1.0):
        """−ELBO summed over the batch, times ``scale`` (= N_total / B for a full-data estimate):
        BCE-with-logits summed + analytic KL −½ Σ(1 + log σ² − μ² − σ²) (Kingma & Welling 2014, App. B)."""
        mu, logvar = self.enc(x).split(self.z_dim, -1)  # (B, z) each
        z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        logits = self.dec(z)  # (B, D)
        if self.own_density:
            rec = -FastBernoulli(logits=logits, validate_args=False).log_prob(x).sum()
        else:
            rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
        return (rec + kl) * scale

    def log_weights(self, x, k):
        """log p(x, z_k) − log q(z_k|x) for k samples: ``(k, N)``."""
        mu, logvar = self.enc(x).split(self.z_dim, -1)  # (N, z)
        std = torch.exp(0.5 * logvar)
        eps = torch.randn(k, *mu.shape, device=x.device, dtype=x.dtype)  # (k, N, z)
        z = mu + std * eps
        logits = self.dec(z)  # (k, N, D)
        log_px_z = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(mu, std).log_prob(z).sum(-1)
        return log_px_z + log_pz - log_qz  # (k, N)
