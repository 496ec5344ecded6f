"""A newcomer's first run shows a VAE: ``python -m ppl_vae.fit --dataset digits`` with no other
flag (what ``--elbo=trace`` falls back to offline) trains long enough for reconstructions that
follow their image and prior samples that differ from one another.

The measures, on the 180 validation digits:

* reconstruction error: the mean over pixels and images of (E[x | z = μ(x)] − p)², where x is
  the binarized image the model sees and p the greyscale image it was drawn from (x ~
  Bernoulli(p), so p is what a reconstruction can recover: against x itself even p scores
  E[p(1 − p)] = 0.070, about half the data mean's 0.144). The baseline is the same error of the
  per-pixel mean of the training images. Required: ratio < 0.5 (measured 0.34 at the default
  3000 steps; 1.11 after the 120 steps the first run once had, whose reconstructions were one
  grey blob).
* variety: the per-pixel standard deviation across the 10 reconstructions of the figure, and
  across 100 decoded prior draws, averaged over pixels. Required: > 0.1 each (measured 0.17 and
  0.19; 0.03 and 0.05 after 120 steps).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ppl_vae.data.datasets import load_dataset
from ppl_vae.programs.likelihoods import make_likelihood

REPO = Path(__file__).resolve().parents[1]


def load_run(run_dir):
    try:
        from ppl_vae.training.runs import load_run as load
    except ImportError:  # before the training split
        from ppl_vae.training.train import load_run as load
    return load(run_dir)


def first_run_measures(run_dir: Path) -> dict:
    """The measures of the module docstring for the digits run in ``run_dir``."""
    vae, cfg = load_run(run_dir)
    seen = load_dataset("digits", likelihood=make_likelihood("bernoulli"))  # the run's splits (seeded)
    grey = load_dataset("digits")  # the same splits before binarization
    with torch.no_grad():
        recon = vae.reconstruct(seen.valid)  # (180, 64) E[x | z = μ(x)]
        mse = ((recon - grey.valid) ** 2).mean().item()
        mean_mse = ((grey.train.mean(0) - grey.valid) ** 2).mean().item()
        shown = torch.randperm(len(seen.valid), generator=torch.Generator().manual_seed(0))[
            :10
        ]  # the figure's
        samples = vae.decode(
            torch.randn(100, cfg.z_dim, generator=torch.Generator().manual_seed(0))
        )  # (100, 64)
    return {
        "epochs": cfg.epochs,
        "mse_ratio": mse / mean_mse,
        "recon_std": recon[shown].std(0).mean().item(),
        "sample_std": samples.std(0).mean().item(),
    }


@pytest.mark.slow  # over ~10 s on 2 cores
def test_default_digits_run_shows_a_vae(tmp_path):
    out = tmp_path / "run"
    # one thread: on a shared 2-core machine, torch's spinning OpenMP threads slow these tiny steps ~10x
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "ppl_vae.fit", "--dataset", "digits", "--out", str(out), "--quiet"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr
    assert "reconstructions.png" in r.stdout.splitlines()[-1]  # the last line says where the figures are
    assert all((out / f).stat().st_size > 0 for f in ("reconstructions.png", "samples.png"))
    m = first_run_measures(out)
    assert m["epochs"] == 250, m  # 3000 steps of 12 (config.default_epochs), recorded in config.json
    assert m["mse_ratio"] < 0.5, m
    assert m["recon_std"] > 0.1 and m["sample_std"] > 0.1, m
