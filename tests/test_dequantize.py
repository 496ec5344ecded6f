"""One scale for the likelihood swap on 8-bit data (issue 26, point 5): uniform dequantization
(``--dequantize``) and the bits/dim each likelihood's number is, on which data, through which bound.

The closed forms: a density uniform on [0, 1)^D has log p(y) = 0 at every dequantized image, so
its bound is exactly log 256 / log 2 = 8 bits/dim; a factorized Gaussian N(m, σ²) has
E_u log p((k + u)/256) = Σ_d −½ log 2πσ² − [((k_d + ½)/256 − m)² + 1/(12·256²)]/(2σ²) per image,
and its exact P(k) (a difference of normal CDFs) must lie above the dequantized bound (Jensen)."""

import json
import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.core.errors import DataError
from ppl_vae.data import dequantize as dq
from ppl_vae.data.datasets import dataset_from_array, prepare
from ppl_vae.programs.likelihoods import make_likelihood
from ppl_vae.reports import bits as bits_module
from ppl_vae.reports.bits import BitsScale, scale_for
from ppl_vae.reports.evaluation import evaluate

CONTINUOUS = ("gaussian", "gaussian-learned", "continuous-bernoulli")
LABEL_8BIT = "bits/dim of the 8-bit images"
LABEL_DEQ = "bits/dim of the 8-bit images, a bound through uniform dequantization"


def levels(n=60, shape=(4, 4), seed=0) -> np.ndarray:
    """``n`` 8-bit images as the data hold them, k/255 (float32)."""
    return (np.random.default_rng(seed).integers(0, 256, (n, *shape)) / 255.0).astype(np.float32)


# --------------------------------------------------------------------------- the data


def test_uniform_puts_each_level_in_its_own_cube():
    k = torch.arange(256.0).repeat(3)  # every level, three times
    x = k / 255  # (768,) as loaded
    for u in (torch.zeros_like(x), torch.full_like(x, 0.999), torch.rand(x.shape)):
        y = dq.uniform(x, u)
        assert torch.equal(torch.floor(y * 256).clamp_max(255), k)  # y ∈ [k, k + 1)/256: the bin k
        torch.testing.assert_close(y * 256 - k, u, atol=1e-4, rtol=0)
    assert dq.is_8bit(x) and not dq.is_8bit(torch.tensor([0.0, 1.0, 1.0]))  # binary is not 8-bit
    assert not dq.is_8bit(torch.arange(17.0) / 16)  # scikit-learn's digits: 17 levels


def test_auto_dequantizes_8bit_images_under_a_density_only():
    x = levels()
    for name in CONTINUOUS:
        ds = prepare(dataset_from_array(x, name="levels"), "auto", make_likelihood(name))
        assert (ds.dequantize, ds.dequantize_seed, ds.binarize) == ("uniform", 1234, "none")
        raw = dataset_from_array(x, name="levels")
        # held-out splits: one fixed draw each (test 1234, valid 1235), in the levels' cubes
        assert torch.equal(ds.test, dq.fixed(raw.test, 1234)) and torch.equal(
            ds.valid, dq.fixed(raw.valid, 1235)
        )
        assert torch.equal(torch.floor(ds.test * 256), torch.round(raw.test * 255))
        assert torch.equal(ds.train, raw.train)  # training images stay levels: drawn per batch
        idx = torch.arange(10)
        a, b = ds.train_batch(idx), ds.train_batch(idx)
        assert not torch.equal(a, b) and torch.equal(torch.floor(a * 256), torch.round(raw.train[idx] * 255))
    for name in ("bernoulli", "discretized-logistic"):  # a probability already: nothing to do
        ds = prepare(dataset_from_array(x, name="levels"), "auto", make_likelihood(name))
        assert ds.dequantize == "none" and ds.dequantize_seed is None
    grey = np.random.default_rng(1).random((60, 4, 4)).astype(np.float32)  # not 8-bit
    assert prepare(dataset_from_array(grey), "auto", make_likelihood("gaussian")).dequantize == "none"
    none = prepare(dataset_from_array(x), "auto", make_likelihood("gaussian"), dequantize="none")
    assert none.dequantize == "none" and dq.is_8bit(none.test)


@pytest.mark.parametrize(
    "array,binarize,likelihood,match",
    [
        ("levels", "static", "gaussian", "is binarized"),
        ("levels", "none", "discretized-logistic", "needs no dequantization"),
        ("grey", "none", "gaussian", "needs 8-bit images"),
        ("levels", "none", "gaussian", "choose one of auto, uniform, none"),
    ],
)
def test_dequantize_uniform_where_it_means_nothing_is_one_line(array, binarize, likelihood, match):
    x = levels() if array == "levels" else np.random.default_rng(1).random((60, 4, 4)).astype(np.float32)
    asked = "sometimes" if "choose" in match else "uniform"
    with pytest.raises(DataError, match=match) as e:
        prepare(dataset_from_array(x), binarize, make_likelihood(likelihood), dequantize=asked)
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- the bound, in closed form


def _no_latent_program(obs_dist):
    """z ~ N(0, 1) independent of x, x ~ ``obs_dist``; the guide is the prior, so every importance
    weight is p(x): IWAE_K = ELBO = log p(x) exactly."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", obs_dist(x).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))

    return model, guide


def test_a_uniform_density_is_exactly_8_bits_per_dim():
    x = torch.from_numpy(levels(20).reshape(20, -1)).double()
    y = dq.fixed(x, 1234)  # (20, 16) dequantized
    model, guide = _no_latent_program(lambda x: dist.Uniform(torch.zeros_like(x), torch.ones_like(x)))
    scale = BitsScale("8-bit images", dequantized=True, seed=1234)
    r = evaluate(model, guide, y, num_samples=5, ks=[1], bits=scale, mean_samples=0)
    assert r["log_px"] == pytest.approx(0.0, abs=1e-12) and r["bits_per_dim"] == pytest.approx(8.0, abs=1e-12)
    assert r["elbo_bits_per_dim"] == pytest.approx(8.0, abs=1e-12)
    assert r["gap_bits_per_dim"] == pytest.approx(0.0, abs=1e-12)
    assert r["bits_per_dim_label"] == LABEL_DEQ and r["bits_per_dim_shift"] == pytest.approx(
        -16 * math.log(256)
    )
    assert "seed 1234" in r["bits_per_dim_bound"] and "Jensen" in r["bits_per_dim_bound"]
    lines = r.table().splitlines()
    row = next(line for line in lines if line.startswith("log p(x) (IWAE K=5)"))
    assert [float(v) for v in row[28:].split()[:3]] == pytest.approx([0.0, 0.0, 8.0])  # nats, SE, bits/dim
    assert any(line.startswith(LABEL_DEQ + ": 8.0000") for line in lines)


def test_a_factorized_gaussian_matches_its_expectation_over_u_and_bounds_the_exact_bits():
    """One fixed draw of u per image: the mean over N images estimates E_u within its standard
    error; the exact −log₂ P(k)/D from the Gaussian's CDF is at or below it (Jensen)."""
    n, d, m, s = 4000, 3, 0.4, 0.1
    k = torch.randint(60, 200, (n, d), generator=torch.Generator().manual_seed(5)).double()
    y = dq.fixed(k / 255, 1234)  # (n, d)
    model, guide = _no_latent_program(lambda x: dist.Normal(torch.full_like(x, m), s))
    r = evaluate(
        model, guide, y, num_samples=2, ks=[1], bits=BitsScale("8-bit images", True, 1234), mean_samples=0
    )
    centre = (k + 0.5) / 256
    e_u = (-0.5 * math.log(2 * math.pi * s**2) - ((centre - m) ** 2 + 1 / (12 * 256**2)) / (2 * s**2)).sum(1)
    se = r["log_px_stderr_across_datapoints"]  # std of log p(y) over the n images / √n
    assert r["log_px"] == pytest.approx(e_u.mean().item(), abs=4 * se)
    expected_bits = -(e_u.mean().item() - d * math.log(256)) / (d * math.log(2))
    assert r["bits_per_dim"] == pytest.approx(expected_bits, abs=4 * se / (d * math.log(2)))
    normal = torch.distributions.Normal(torch.tensor(m, dtype=torch.float64), s)
    p_k = normal.cdf((k + 1) / 256) - normal.cdf(k / 256)  # (n, d) the exact P(k) of each pixel's bin
    exact_bits = (-torch.log2(p_k).sum(1) / d).mean().item()
    assert 0 <= expected_bits - exact_bits < 1e-2  # Jensen; σ ≫ 1/256, so the gap is small here


# --------------------------------------------------------------------------- which label for which run


def test_scale_for_each_likelihood_and_data():
    x = levels()
    lik = make_likelihood
    deq = scale_for(prepare(dataset_from_array(x), "auto", lik("gaussian")), lik("gaussian"))
    assert deq == BitsScale("8-bit images", True, 1234) and deq.label == LABEL_DEQ
    direct = scale_for(
        prepare(dataset_from_array(x), "auto", lik("discretized-logistic")), lik("discretized-logistic")
    )
    assert direct == BitsScale("8-bit images") and direct.label == LABEL_8BIT and direct.shift == 0.0
    for binarize in ("dynamic", "static"):  # binarized 8-bit images: other data, never the 8-bit label
        for name in ("bernoulli", "discretized-logistic"):
            scale = scale_for(prepare(dataset_from_array(x), binarize, lik(name)), lik(name))
            assert scale.label == "bits/dim of the binarized images" and "8-bit" not in scale.label
    raw = prepare(dataset_from_array(x), "auto", lik("gaussian"), dequantize="none")
    assert scale_for(raw, lik("gaussian")) == bits_module.UNDEQUANTIZED
    grey = dataset_from_array(np.random.default_rng(1).random((60, 4, 4)).astype(np.float32))
    assert scale_for(prepare(grey, "auto", lik("gaussian")), lik("gaussian")) == bits_module.NO_BITS


def _fit_and_evaluate(tmp_path, capsys, data, likelihood, *extra):
    from ppl_vae import evaluate as evaluate_cmd
    from ppl_vae import fit as fit_cmd

    out = tmp_path / likelihood
    argv = ["--dataset", data, "--likelihood", likelihood, "--epochs", "1", "--hidden", "8", "--z-dim", "2"]
    argv += ["--batch-size", "16", "--final-iwae-k", "0", "--quiet", "--out", out, *extra]
    assert fit_cmd.main([str(a) for a in argv]) == 0
    js = tmp_path / f"{likelihood}.json"
    capsys.readouterr()
    assert evaluate_cmd.main([str(out), "-K", "5", "--json", str(js), "--quiet"]) == 0
    return json.loads((out / "config.json").read_text()), json.loads(js.read_text()), capsys.readouterr().out


@pytest.mark.parametrize(
    "likelihood,extra,label",
    [
        ("gaussian", [], LABEL_DEQ),
        ("gaussian-learned", [], LABEL_DEQ),
        ("continuous-bernoulli", [], LABEL_DEQ),
        ("discretized-logistic", [], LABEL_8BIT),
        ("bernoulli", [], "bits/dim of the binarized images"),
        ("gaussian", ["--dequantize", "none"], None),
    ],
)
def test_evaluate_prints_and_records_what_each_bits_per_dim_is(tmp_path, capsys, likelihood, extra, label):
    path = tmp_path / "levels.npy"
    np.save(path, levels())
    cfg, report, printed = _fit_and_evaluate(tmp_path, capsys, path, likelihood, *extra)
    deq = label == LABEL_DEQ
    assert (cfg["dequantize"], cfg["dequantize_seed"]) == (("uniform", 1234) if deq else ("none", None))
    assert (report["dequantize"], report["dequantize_seed"]) == (cfg["dequantize"], cfg["dequantize_seed"])
    if label is None:  # a density at the levels themselves: no bits/dim, and the reason
        assert "bits_per_dim" not in report and report["bits_per_dim_omitted"] == bits_module.UNDEQUANTIZED
        assert "bits/dim: not shown: p(x|z) is a density fitted to the 8-bit levels" in printed
        return
    assert report["bits_per_dim_label"] == label and report["bits_per_dim_of"] in label
    shift = 16 * math.log(256) if deq else 0.0
    assert report["bits_per_dim"] == pytest.approx(
        -(report["log_px"] - shift) / (16 * math.log(2)), rel=1e-12
    )
    line = [s for s in printed.splitlines() if s.startswith("bits/dim of the")]
    assert len(line) == 1 and line[0].startswith(f"{label}: {report['bits_per_dim']:.4f} (log p(x), IWAE K=5")
    if "binarized" in label:
        assert "8-bit" not in printed and report["binarize_seed"] == 1234
    header = printed.splitlines()[0]
    assert ("uniform dequantization, (x + u)/256, u drawn once with seed 1234" in header) is deq


def test_dequantized_training_resumes_exactly(tmp_path):
    """As dynamic binarization: a run continued from its state after one epoch is the
    uninterrupted two-epoch run, bit for bit (the u come from the generator the checkpoint saves)."""
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    path = tmp_path / "levels.npy"
    np.save(path, levels())

    def cfg(epochs, seed=0):
        return FitConfig(
            dataset=str(path),
            likelihood="gaussian",
            hidden=[8],
            z_dim=2,
            batch_size=16,
            final_iwae_k=0,
            epochs=epochs,
            seed=seed,
        )

    whole = Trainer(cfg(2), tmp_path / "whole", quiet=True)
    assert whole.data.dequantize == "uniform" and whole.cfg.dequantize_seed == 1234
    whole.run()
    Trainer(cfg(1), tmp_path / "resumed", quiet=True).run()
    second = Trainer(cfg(2), tmp_path / "resumed", resume=True, quiet=True)
    assert second.cfg.dequantize == "uniform"
    second.run()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert strip(whole.state.rows) == strip(second.state.rows)
    sa, sb = whole.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    saved = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert (saved["dequantize"], saved["dequantize_seed"]) == ("uniform", 1234)


def test_a_run_of_an_earlier_version_stays_undequantized(tmp_path):
    """config.json written before --dequantize existed: the run trained on the levels; evaluating
    or resuming it must not switch dequantization on."""
    from ppl_vae.training.config import FitConfig

    old = {"dataset": "x.npy", "likelihood": "gaussian", "image_shape": [1, 4, 4]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert FitConfig.load(tmp_path / "config.json").dequantize == "none"
    (tmp_path / "new.json").write_text(json.dumps({"dataset": "x.npy"}))  # not a run's: the default
    assert FitConfig.load(tmp_path / "new.json").dequantize == "auto"
