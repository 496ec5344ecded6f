"""Posterior collapse said out loud: each layer's KL against closed forms, the rules of the
warning, and the warning through ``fit`` (with ``--quiet`` too) and ``evaluate``."""

import json

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ppl_vae import evaluate, fit
from ppl_vae.inference import estimators
from ppl_vae.programs.model import VAE
from ppl_vae.reports import collapse
from ppl_vae.training.config import FitConfig


def _x(n=60, d=16, seed=0):
    return (torch.rand(n, d, generator=torch.Generator().manual_seed(seed)) < 0.4).float()


def test_a_layers_kl_is_the_closed_form_gaussian_kl(device):
    """One diagonal-Gaussian layer against N(0, I): KL_z = E_x KL(q(z|x) ‖ N(0, I)) in closed form,
    per datapoint, within 5 Monte Carlo standard errors of 4,000 draws (each about 1 %)."""
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8]).to(device)
    x = _x().to(device)
    with torch.no_grad():
        loc, scale = vae.encode(x)  # (N, 3) each
        exact = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).sum(-1)  # (N,)
    terms = collapse.kl_terms(vae.model, vae.guide, x, num_samples=4000, seed=1)
    assert set(terms) == {"z"} and terms["z"].shape == (60,)
    # the MC standard error of each datapoint's mean of log q − log p: sd/√S with sd ≈ √(2 KL) + ...
    torch.testing.assert_close(terms["z"], exact, rtol=0.08, atol=0.02)
    assert collapse.kl_per_site(vae.model, vae.guide, x, num_samples=4000, seed=1)["z"] == pytest.approx(
        exact.mean().item(), rel=0.03
    )


def test_the_layers_kls_sum_to_the_elbos_kl_term_in_a_hierarchy():
    """Two layers: KL_z1 + KL_z2 = E_q[log p(x|z)] − ELBO, the Monte Carlo KL term of Pyro's
    ELBO as ``estimators.elbo_terms`` gives it, within 5 standard errors of 2,000 draws each."""
    torch.set_default_dtype(torch.float64)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8], latent_layers=2, z2_dim=2)
    x = _x(40).double()
    kl = collapse.kl_per_site(vae.model, vae.guide, x, num_samples=2000, seed=2)
    t = estimators.elbo_terms(vae.model, vae.guide, x, num_samples=2000, seed=3)
    term = (t["recon"].value - t["elbo"].value).mean().item()
    se = (t["recon"].value - t["elbo"].value).std().item() / 40**0.5  # across datapoints: a loose bound
    assert set(kl) == {"z1", "z2"} and all(v > 0 for v in kl.values())
    assert sum(kl.values()) == pytest.approx(term, abs=5 * se + 0.01)


UNITS = {"z": {"active": 0, "dims": 20}}


@pytest.mark.parametrize(
    "kl,units,likelihood,expect",
    [
        (
            {"z": 0.04},
            {"z": {"active": 0, "dims": 20}},
            "gaussian",
            ["posterior collapse in z", "--sigma", "--kl-warmup", "--z-dim"],
        ),
        (
            {"z": 0.5},
            {"z": {"active": 12, "dims": 20}},
            "bernoulli",
            ["posterior collapse in z", "KL(q ‖ p) 0.50"],
        ),
        ({"z": 30.0}, {"z": {"active": 0, "dims": 20}}, "bernoulli", ["posterior collapse in z", "0 of 20"]),
        (
            {"z2": 5.0},
            {"z2": {"active": 12, "dims": 40}},
            "bernoulli",
            ["z2 is mostly unused", "12 of 40", "--z2-dim"],
        ),
        ({"z": 20.0}, {"z": {"active": 10, "dims": 20}}, "bernoulli", []),  # half: in use
        ({"z": 20.0}, None, None, []),
    ],
)
def test_the_warning_names_the_layer_what_is_wrong_and_the_remedies(kl, units, likelihood, expect):
    lines = collapse.warnings_for(kl, units, likelihood)
    assert len(lines) == (1 if expect else 0), lines
    for text in expect:
        assert text in lines[0], (text, lines[0])
    if lines and likelihood != "gaussian":
        assert "--sigma" not in lines[0]


@pytest.mark.parametrize(
    "kl_warmup,said,not_said",
    [
        (None, "a KL warm-up (--kl-warmup EPOCHS)", "longer"),
        (0.0, "a KL warm-up (--kl-warmup EPOCHS)", "longer"),
        (100.0, "a longer KL warm-up (--kl-warmup EPOCHS; this run's was 100)", "a KL warm-up"),
        (2.5, "this run's was 2.5", "a KL warm-up"),
    ],
)
def test_a_run_that_had_a_warm_up_is_told_of_a_longer_one(kl_warmup, said, not_said):
    """Round 1's record (z2: 13 of 40 units active after a 100-epoch warm-up) was told to add a
    warm-up; a remedy names what the run did not already do."""
    (line,) = collapse.warnings_for({"z2": 12.1}, {"z2": {"active": 17, "dims": 40}}, "bernoulli", kl_warmup)
    assert said in line and not_said not in line and "--z2-dim" in line, line


def test_defaults_that_avoid_the_collapses():
    """σ = 0.1 for data in [0, 1] (σ = 1 left a digits VAE with 0 of 20 units); a KL warm-up of a
    tenth of the epochs for two latent layers, none for one; an explicit value is kept."""
    assert FitConfig().sigma == 0.1
    assert FitConfig(epochs=250).with_data_defaults(1000).kl_warmup == 0.0
    assert FitConfig(epochs=250, latent_layers=2).with_data_defaults(1000).kl_warmup == 25.0
    assert FitConfig(epochs=3, latent_layers=2).with_data_defaults(1000).kl_warmup == 1.0
    assert FitConfig(epochs=250, latent_layers=2, kl_warmup=0.0).with_data_defaults(1000).kl_warmup == 0.0


@pytest.fixture(scope="module")
def collapsed_run(tmp_path_factory):
    """σ = 1 Gaussian on the digits for 3 epochs (a 1-epoch KL warm-up): the collapse of issue 22, in seconds."""
    out = tmp_path_factory.mktemp("collapsed") / "run"
    argv = [
        "--dataset",
        "digits",
        "--likelihood",
        "gaussian",
        "--sigma",
        "1",
        "--kl-warmup",
        "1",
        "--epochs",
        "3",
        "--final-iwae-k",
        "0",
        "--device",
        "cpu",
        "--quiet",
        "--out",
        str(out),
    ]
    return out, argv


def test_fit_says_collapse_out_loud_even_with_quiet(collapsed_run, capsys):
    out, argv = collapsed_run
    assert fit.main(argv) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "posterior collapse in z" in ln]
    assert len(lines) == 1 and lines[0].startswith(
        "python -m ppl_vae.fit: warning: posterior collapse in z: 0 of 20"
    )
    assert "--sigma" in lines[0] and "a longer KL warm-up (--kl-warmup EPOCHS; this run's was 1)" in lines[0]
    s = json.loads((out / "summary.json").read_text())
    assert s["active_units"] == {"z": 0} and s["kl_per_site"]["z"] < collapse.KL_FLOOR
    assert s["collapse"] == [lines[0].split("warning: ", 1)[1]]


def test_evaluate_reports_each_layers_kl_and_the_collapse(collapsed_run, tmp_path, capsys):
    out, argv = collapsed_run
    if not (out / "best.pt").exists():
        assert fit.main(argv) == 0
    js = tmp_path / "e.json"
    assert (
        evaluate.main([str(out), "--num-samples", "20", "--subset", "100", "--quiet", "--json", str(js)]) == 0
    )
    table = capsys.readouterr().out
    assert "KL(q ‖ p) per layer: z 0." in table
    assert "warning: posterior collapse in z: 0 of 20 units active" in table
    s = json.loads(js.read_text())
    assert s["kl_per_site"]["z"] < collapse.KL_FLOOR and len(s["collapse"]) == 1
    assert "this run's was 1)" in s["collapse"][0]  # the run's warm-up, read from its config
    assert "(not binarized)" in table.splitlines()[0]  # the header says what the data are
