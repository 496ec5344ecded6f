"""``benchmarks/weight_decay_scale.py``, the measurement behind the weight decay of record
candidate 8: its closed forms against torch's own Adam and against the update written out, and
the script end to end on a tiny AdamNormGrad run."""

import math
import sys
from pathlib import Path

import pytest
import torch

from ppl_vae import fit
from ppl_vae.training.optim import normalize_and_clip_grads

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import weight_decay_scale as wds  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


def test_unit_norm_noise_gives_adams_momentum_the_stated_norm():
    """Adam's first moment (torch's Adam, its ``exp_avg``) after many steps of independent random
    gradients of unit norm: ‖m‖ → √((1−β₁)/(1+β₁)) (0.229 for β₁ = 0.9), the summary's
    ``noise_momentum``; 2% tolerance for 4,000 dimensions and 1,000 steps."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4000))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.999))
    for _ in range(1000):
        g = torch.randn(4000)
        p.grad = g / g.norm()
        opt.step()
    rows = [{"name": "p", "numel": 4000, "theta": 1.0, "grad": 1.0, "m": 1.0, "sqrt_v": 1.0}]
    expected = wds.summary(rows, {"lr": 1e-3, "beta1": 0.9, "steps_per_epoch": 1}, 1e-4)["noise_momentum"]
    assert expected == pytest.approx(math.sqrt(0.1 / 1.9))
    assert opt.state[p]["exp_avg"].norm().item() == pytest.approx(expected, rel=0.02)


def test_the_implied_decay_is_the_prior_with_sigma_the_weight_rms():
    """With wd = wd*, the step AdamNormGrad takes (``normalize_and_clip_grads``, then Adam's
    coupled wd·θ) is the raw gradient plus θ/σ² with σ = rms(θ), divided by ‖g‖."""
    torch.manual_seed(1)
    theta = torch.nn.Parameter(torch.randn(50, 40) * 0.07)
    g = torch.randn(50, 40) * 300.0
    theta.grad = g.clone()
    wd = wds.implied_wd({"numel": theta.numel(), "theta": theta.norm().item(), "grad": g.norm().item()})
    normalize_and_clip_grads([theta], normalize=True)
    step = theta.grad + wd * theta.detach()  # what Adam's coupled weight decay adds
    sigma2 = theta.detach().pow(2).mean()
    torch.testing.assert_close(step, (g + theta.detach() / sigma2) / (g.norm() + 1e-7), rtol=1e-5, atol=1e-9)


def test_weighted_median():
    assert wds.weighted_median([3.0, 1.0, 2.0], [1, 1, 1]) == 2.0
    assert wds.weighted_median([1.0, 2.0], [1, 3]) == 2.0  # most of the weight on 2
    assert wds.weighted_median([1.0, 2.0], [3, 1]) == 1.0


def test_script_on_a_tiny_adam_normgrad_run(tmp_path, capsys):
    """Two epochs on the 8×8 digits with AdamNormGrad: a row for each tensor over 1,000 elements
    with Adam's moment as the checkpoint holds it, raw gradient norms that are not unit norms, and
    the summary line."""
    out = tmp_path / "run"
    argv = "--dataset digits --hidden 64 --z-dim 3 --epochs 2 --final-iwae-k 0 --device cpu --quiet"
    assert fit.main([*argv.split(), "--optimizer", "adam-normgrad", "--out", str(out)]) == 0
    rows, settings = wds.measure(out, batches=3)
    state = torch.load(out / "checkpoint.pt", weights_only=False)["optimizer"]["state"]
    moments = sorted(s["exp_avg"].norm().item() for s in state.values() if s["exp_avg"].numel() > 1000)
    assert sorted(r["m"] for r in rows) == pytest.approx(moments)
    assert rows and all(
        r["numel"] > 1000 and r["grad"] > 1.5 for r in rows
    )  # the loss is summed over the data
    assert settings["lr"] == pytest.approx(1e-3) and settings["steps_per_epoch"] >= 1
    assert wds.main([str(out), "--batches", "2"]) == 0
    assert "empirical-Bayes wd*" in capsys.readouterr().out
