"""Scaling figures: epoch time vs batch size, and evaluation time vs K, for ppl_vae and the
hand-written PyTorch references (b) and (f) of ``fit_speed.py`` / ``eval_speed.py``.

    python benchmarks/scaling.py --data-dir ../shared/data [--device cpu] [--quick]

Writes ``docs/figures/scaling-<device>.png`` and ``benchmarks/results/scaling-<device>-*.json``.
Epoch times are extrapolated from a fixed number of timed steps after warm-up steps
(seconds per step × steps per epoch), so large and small batches cost the same to measure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pyro  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TorchVAE, device_name, save_result, sync  # noqa: E402
from eval_speed import iwae_batched_reference, torch_copy  # noqa: E402

from ppl_vae.data.datasets import load_dataset  # noqa: E402
from ppl_vae.inference import estimators  # noqa: E402
from ppl_vae.inference.objectives import make_objective  # noqa: E402
from ppl_vae.programs.model import VAE  # noqa: E402
from ppl_vae.training.config import FitConfig  # noqa: E402
from ppl_vae.training.optim import make_optimizer  # noqa: E402

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def seconds_per_epoch(step, n, b, device, warmup=5, timed_steps=20):
    for _ in range(warmup):
        step(b)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(timed_steps):
        step(b)
    sync(device)
    return (time.perf_counter() - t0) / timed_steps * math.ceil(n / b)


def _panel(ax, rows, x_key, series, xlabel, ylabel, title):
    """One log-log panel: a line per ``(key, label)`` in ``series`` against ``x_key``."""
    for (key, label), style in zip(series, ("o-", "s--")):
        ax.loglog([r[x_key] for r in rows], [r[key] for r in rows], style, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="fewer points (for a smoke run)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ds = load_dataset("binarized-mnist", args.data_dir)
    x = ds.train.to(device)
    n = x.shape[0]
    pyro.enable_validation(False)
    batches = [32, 128, 512] if args.quick else [32, 64, 128, 256, 512, 1024, 2048, 4096]
    ks = [1, 10, 100] if args.quick else [1, 10, 100, 1000, 5000, 10000]

    vae = VAE((1, 28, 28), 20, [400]).to(device)
    opt = make_optimizer(vae.parameters(), FitConfig(), device)
    loss_fn = make_objective("trace")
    ref = TorchVAE().to(device)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-3, fused=True)

    def ppl_step(b):
        idx = torch.randint(n, (b,), device=device)
        loss = loss_fn(vae.model, vae.guide, x[idx], size=n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def ref_step(b):
        idx = torch.randint(n, (b,), device=device)
        loss = ref.neg_elbo(x[idx], n / b)
        ref_opt.zero_grad(set_to_none=True)
        loss.backward()
        ref_opt.step()

    fit_rows = []
    for b in batches:
        a = seconds_per_epoch(ppl_step, n, b, device)
        r = seconds_per_epoch(ref_step, n, b, device)
        fit_rows.append({"batch_size": b, "ppl_vae": a, "b_handwritten": r})
        print(
            f"batch {b:>5}: ppl_vae {a:7.3f} s/epoch   (b) {r:7.3f} s/epoch   ratio {a / r:5.2f}", flush=True
        )

    vae.eval()
    xt = ds.test[torch.randperm(ds.test.shape[0], generator=torch.Generator().manual_seed(0))[:100]].to(
        device
    )
    tref = torch_copy(vae)
    eval_rows = []
    for k in ks:
        sync(device)
        t0 = time.perf_counter()
        estimators.iwae(vae.model, vae.guide, xt, k, seed=0)
        sync(device)
        t1 = time.perf_counter()
        iwae_batched_reference(tref, xt, k)
        sync(device)
        t2 = time.perf_counter()
        eval_rows.append({"k": k, "ppl_vae": t1 - t0, "f_batched_torch": t2 - t1})
        print(
            f"K {k:>6}: ppl_vae {t1 - t0:7.3f} s   (f) {t2 - t1:7.3f} s   ratio {(t1 - t0) / (t2 - t1):5.2f}",
            flush=True,
        )

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    _panel(
        axes[0],
        fit_rows,
        "batch_size",
        [("ppl_vae", "ppl_vae (a)"), ("b_handwritten", "hand-written PyTorch (b)")],
        "batch size",
        "seconds per epoch (50k images)",
        "Training: epoch time vs batch size",
    )
    _panel(
        axes[1],
        eval_rows,
        "k",
        [("ppl_vae", "ppl_vae.inference.estimators.iwae"), ("f_batched_torch", "batched PyTorch (f)")],
        "importance samples K",
        "seconds for 100 test images",
        "Evaluation: time vs K",
    )
    fig.suptitle(f"Scaling on {device_name(device)}")
    FIGURES.mkdir(parents=True, exist_ok=True)
    fig_path = FIGURES / f"scaling-{device.type}.png"
    fig.savefig(fig_path, dpi=110, bbox_inches="tight")
    path = save_result(
        "scaling",
        {
            "device": device_name(device),
            "device_kind": device.type,
            "fit": fit_rows,
            "eval": eval_rows,
            "command": "python benchmarks/scaling.py " + " ".join(argv or sys.argv[1:]),
        },
    )
    print(f"saved {fig_path} and {path}")


if __name__ == "__main__":
    main()
