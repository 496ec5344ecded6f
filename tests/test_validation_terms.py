"""The ELBO's two terms, ELBO = E_q[log p(x|z)] − KL, from one pass (estimators.elbo_terms), per
epoch in metrics.jsonl (valid_recon, valid_kl), and the active units of the final model in
summary.json, checked against closed forms.

Closed forms: on the linear-Gaussian model of tests/test_estimators.py with a mean-field guide
q = N(m, diag s²), E_q log p(x|z) and KL(q ‖ N(0, I)) are known exactly; for the default VAE
(diagonal Gaussian guide, N(0, I) prior) the validation KL is the mean over the validation images
of KL(N(μ(x), σ(x)²) ‖ N(0, I)), and E_q[z|x] = μ(x), so the active units are the units with
Var_x μ_u(x) > 10⁻² (Burda et al. 2016).
"""

import json

import pytest
import torch
from test_estimators import gaussian_kl, make_problem

from ppl_vae.data.datasets import load_dataset
from ppl_vae.inference import estimators as E
from ppl_vae.programs.likelihoods import make_likelihood
from ppl_vae.reports import latents
from ppl_vae.training.config import FitConfig
from ppl_vae.training.runs import read_metrics
from ppl_vae.training.train import Trainer
from ppl_vae.training.validation import VALID_SEED, bound_on, elbo_terms_on


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.usefixtures("float64")
def test_elbo_terms_match_closed_forms_on_a_linear_gaussian_model():
    """recon within 4 standard errors of E_q log p(x|z) per datapoint; with analytic KL the KL term
    is the closed-form Gaussian KL to 1e-10 with zero stderr, by Monte Carlo within 4 s.e.; the
    ELBO is elbo()'s value (the same draws) and equals recon − kl."""
    lg, x = make_problem()
    loc, scale = lg.meanfield_params(x, shift=0.3, scale_factor=1.3)
    guide = lg.meanfield_guide(shift=0.3, scale_factor=1.3)
    recon_true, kl_true = lg.expected_log_lik(x, loc, scale), gaussian_kl(loc, scale)  # (N,) each
    by_kind = {}
    for analytic in (True, False):
        t = by_kind[analytic] = E.elbo_terms(
            lg.model, guide, x, num_samples=2000, analytic_kl=analytic, seed=7
        )
        assert all(t[k].value.shape == (x.shape[0],) for k in ("elbo", "recon", "kl"))
        assert torch.equal(
            t["elbo"].value, E.elbo(lg.model, guide, x, 2000, analytic_kl=analytic, seed=7).value
        )
        torch.testing.assert_close(t["elbo"].value, t["recon"].value - t["kl"].value, atol=1e-12, rtol=0)
        assert (t["recon"].stderr > 0).all() and (
            (t["recon"].value - recon_true).abs() <= 4 * t["recon"].stderr
        ).all()
    exact = by_kind[True]["kl"]
    torch.testing.assert_close(exact.value, kl_true, atol=1e-10, rtol=0)
    assert exact.stderr.abs().max() < 1e-12  # nothing left to sample
    mc = by_kind[False]["kl"]
    assert (mc.stderr > 1e-3).all() and ((mc.value - kl_true).abs() <= 4 * mc.stderr).all()
    assert torch.equal(by_kind[True]["recon"].value, by_kind[False]["recon"].value)  # the same draws


@pytest.mark.usefixtures("float64")
def test_elbo_terms_do_not_depend_on_the_chunk_size():
    """A pass weighed in slices of datapoints (chunk_size 50: one row per slice) joins the slices'
    log p(x|z) as it joins the log weights."""
    lg, x = make_problem()
    guide = lg.meanfield_guide(shift=0.3)
    whole = E.elbo_terms(lg.model, guide, x, num_samples=300, analytic_kl=True, seed=2)
    sliced = E.elbo_terms(lg.model, guide, x, num_samples=300, analytic_kl=True, seed=2, chunk_size=50)
    for key in ("elbo", "recon", "kl"):
        torch.testing.assert_close(sliced[key].value, whole[key].value, atol=1e-12, rtol=0)
        torch.testing.assert_close(sliced[key].stderr, whole[key].stderr, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- a fit writes them


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", likelihood=make_likelihood("bernoulli"))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(
    "settings", [{}, {"conditional": True}, {"guide": "iaf"}], ids=["vae", "cvae", "iaf"]
)
def test_fit_writes_valid_recon_and_kl_and_active_units(tmp_path, digits, settings):
    """Two epochs on the 8×8 digits: every metrics row has valid_elbo = valid_recon − valid_kl
    (to 1e-6); valid_elbo is bound_on's value; the last row's KL is the closed-form KL of the final
    model's encoder (diagonal guide) and summary.json's active units are the units with
    Var_x μ(x) > 10⁻² (as latents.active_units_of computes them, E_q[z|x] by Monte Carlo for IAF)."""
    cfg = FitConfig(
        dataset="digits", hidden=[32], z_dim=6, epochs=2, lr=3e-3, final_iwae_k=0, device="cpu", **settings
    )
    trainer = Trainer(cfg, tmp_path / "run", quiet=True, dataset=digits)
    trainer.run()
    rows = read_metrics(tmp_path / "run")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        assert abs(r["valid_elbo"] - (r["valid_recon"] - r["valid_kl"])) < 1e-6
        assert r["valid_recon"] < 0  # Bernoulli pixels: log p(x|z) < 0
    x = trainer._valid_args()
    model = trainer.model.eval()
    assert bound_on(model, x) == rows[-1]["valid_elbo"]  # the same estimator, the same draws
    assert elbo_terms_on(model, x) == {k: rows[-1][k] for k in ("valid_elbo", "valid_recon", "valid_kl")}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    n = trainer.data.valid.shape[0]
    assert n < 2000 and summary["active_units_n"] == n and summary["active_units_samples"] == 100
    assert summary["active_units_of"] == {"z": 6}
    with torch.no_grad():
        loc, scale = model.encode(*((x,) if torch.is_tensor(x) else x))  # (N, 6) each
    if settings.get("guide") == "iaf":  # E_q[z|x] by 100 draws: the same numbers, recomputed
        units = latents.active_units_of(model.model, model.guide, x, 100, seed=VALID_SEED, block_size=500)
        assert summary["active_units"] == {"z": units["z"]["active"]} and units["z"]["mc_samples"] == 100
        return
    kl = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc, scale), torch.distributions.Normal(0.0, 1.0)
    ).sum(-1)  # (N,)
    assert rows[-1]["valid_kl"] == pytest.approx(kl.mean().item(), abs=1e-4)
    active = int((loc.var(0) > latents.ACTIVE_THRESHOLD).sum())
    assert summary["active_units"] == {"z": active} and 0 < active <= 6


@pytest.mark.usefixtures("one_thread")
def test_a_failing_active_units_diagnostic_still_writes_the_summary(tmp_path, digits, monkeypatch):
    """The active units are a diagnostic: if they fail (e.g. on a user's program), the run still
    ends with its summary, which records why, and a warning says so."""
    import ppl_vae.training.finish

    def broken(*args, **kwargs):
        raise ValueError("this guide has no .mean")

    monkeypatch.setattr(ppl_vae.training.finish, "latent_use_on", broken)
    cfg = FitConfig(dataset="digits", hidden=[16], z_dim=2, epochs=1, final_iwae_k=0, device="cpu")
    with pytest.warns(RuntimeWarning, match="active units not computed: ValueError: this guide has no .mean"):
        Trainer(cfg, tmp_path / "run", quiet=True, dataset=digits).run()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["active_units_error"] == "ValueError: this guide has no .mean" and summary["epochs"] == 1
