"""What a weight decay means for a trained run: the measurement behind candidate 8's value
(docs/benchmarks.md, "How 1e-4 was chosen").

    python benchmarks/weight_decay_scale.py RUN --data-dir ../shared/data [--wd 1e-4]

From ``RUN/checkpoint.pt`` (the last epoch's parameters θ and Adam's state), per parameter tensor
of more than 1,000 elements:

* ‖g‖, the raw gradient norm of the training loss (Pyro's ``Trace_ELBO``, scaled to the whole
  training set as the run's steps are), median over ``--batches`` batches of the run's size;
* wd*, the coupled weight decay that equals the empirical-Bayes Gaussian prior N(0, σ²) with
  σ = the tensor's weight RMS. Under ``--optimizer adam-normgrad`` the step sees g/‖g‖ + wd·θ =
  (g + wd‖g‖·θ)/‖g‖, a prior with 1/σ² = wd·‖g‖, so wd* = 1/(rms(θ)²·‖g‖);
* ‖m‖, the norm of Adam's first moment (unit-norm noise alone gives √((1−β₁)/(1+β₁)));
* wd·‖θ‖ for the given ``--wd``, against the unit step and against ‖m‖, and τ, the epochs in
  which that decay alone shrinks a weight of the largest tensor by e (lr·wd/√v per step, √v the
  RMS of the root of Adam's second moment over the tensor).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

import torch
from pyro.infer import Trace_ELBO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl_vae.training import checkpoint  # noqa: E402
from ppl_vae.training.runs import load_run, load_run_data  # noqa: E402


def measure(run: Path, data_dir=None, batches: int = 20, seed: int = 0) -> tuple[list[dict], dict]:
    """Per tensor of more than 1,000 elements: name, numel, ‖θ‖, median raw ‖g‖, ‖m‖, rms √v
    (the rows); and the run's settings that the summary needs (lr, β₁, steps per epoch)."""
    model, cfg = load_run(run)
    ckpt = checkpoint.load(run / "checkpoint.pt")
    # the last iterate, what the optimizer state belongs to (with --ema, "model" is the average)
    model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
    x = load_run_data(cfg, model.likelihood, data_dir).train  # [N, ...]
    x = x.reshape(x.shape[0], -1).float()  # [N, D]
    params = list(model.named_parameters())  # the optimizer's order (make_optimizer(model.parameters()))
    norms = {name: [] for name, _ in params}
    gen = torch.Generator().manual_seed(seed)
    elbo = Trace_ELBO()
    for _ in range(batches):
        idx = torch.randint(0, x.shape[0], (cfg.batch_size,), generator=gen)  # [B]
        model.zero_grad()
        elbo.differentiable_loss(model.model, model.guide, x[idx], size=x.shape[0]).backward()
        for name, p in params:
            norms[name].append(p.grad.norm().item())
    state = ckpt["optimizer"]["state"]
    rows = [
        {
            "name": name,
            "numel": p.numel(),
            "theta": p.detach().norm().item(),
            "grad": statistics.median(norms[name]),
            "m": state[i]["exp_avg"].norm().item(),
            "sqrt_v": state[i]["exp_avg_sq"].mean().sqrt().item(),  # RMS of √v
        }
        for i, (name, p) in enumerate(params)
        if p.numel() > 1000
    ]
    group = ckpt["optimizer"]["param_groups"][0]
    settings = {
        "lr": float(group["lr"]),
        "beta1": group["betas"][0],
        "steps_per_epoch": math.ceil(x.shape[0] / cfg.batch_size),
    }
    return rows, settings


def implied_wd(row: dict) -> float:
    """wd* = 1/(rms(θ)²·‖g‖): the coupled decay that is the prior N(0, rms(θ)²) after the scaling."""
    return row["numel"] / (row["theta"] ** 2 * row["grad"])


def weighted_median(values: list[float], weights: list[float]) -> float:
    """The value below which half of the total weight lies."""
    pairs, half, seen = sorted(zip(values, weights)), sum(weights) / 2, 0.0
    for v, w in pairs:
        seen += w
        if seen >= half:
            return v
    raise ValueError("no values")


def summary(rows: list[dict], settings: dict, wd: float) -> dict:
    """The numbers docs/benchmarks.md quotes, for a decay ``wd``."""
    largest = max(rows, key=lambda r: r["numel"])
    per_step = settings["lr"] * wd / largest["sqrt_v"]  # relative shrink of a weight per step
    implied = [implied_wd(r) for r in rows]
    return {
        "median_grad": statistics.median(r["grad"] for r in rows),
        "implied_wd_range": (min(implied), max(implied)),
        "implied_wd_size_weighted_median": weighted_median(implied, [r["numel"] for r in rows]),
        "decay_share_of_step": statistics.median(wd * r["theta"] for r in rows),
        "decay_share_of_momentum": statistics.median(wd * r["theta"] / r["m"] for r in rows),
        "median_momentum": statistics.median(r["m"] for r in rows),
        "noise_momentum": math.sqrt((1 - settings["beta1"]) / (1 + settings["beta1"])),
        "tau_epochs": 1 / (per_step * settings["steps_per_epoch"]),
        "tau_tensor": largest["name"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a run directory with checkpoint.pt")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--wd", type=float, default=1e-4, help="the decay to describe (default: 1e-4)")
    a = ap.parse_args(argv)
    rows, settings = measure(a.run, a.data_dir, a.batches)
    print(f"{'tensor':<48} {'numel':>8} {'|theta|':>8} {'median |g|':>11} {'|m|':>6} {'wd*':>9}")
    for r in sorted(rows, key=lambda r: -r["numel"]):
        print(
            f"{r['name']:<48} {r['numel']:>8} {r['theta']:>8.2f} {r['grad']:>11.4g} {r['m']:>6.3f} {implied_wd(r):>9.2e}"
        )
    s = summary(rows, settings, a.wd)
    lo, hi = s["implied_wd_range"]
    print(
        f"median raw |g| {s['median_grad']:.3g} ({a.batches} batches); empirical-Bayes wd* from {lo:.2g} to "
        f"{hi:.2g} by tensor, {s['implied_wd_size_weighted_median']:.2g} weighted by size\n"
        f"wd {a.wd:g}: wd·|θ| is {100 * s['decay_share_of_step']:.2f} % of a unit step and "
        f"{100 * s['decay_share_of_momentum']:.2f} % of |m| (median |m| {s['median_momentum']:.3f}; unit-norm "
        f"noise gives {s['noise_momentum']:.3f}); alone it shrinks {s['tau_tensor']} by e in "
        f"{s['tau_epochs']:.0f} epochs"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
