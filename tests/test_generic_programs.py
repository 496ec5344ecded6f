"""The estimators on programs other than the default VAE, against closed forms (float64 unless
stated; tolerances at each check): a mixture prior, a two-layer hierarchy, per-datapoint guide
parameters, extra per-datapoint arguments, and every refusal with its exact one-line message.

Gaussian identities used (Bishop 2006, §2.3.3): for z ~ N(m, P) and x | z ~ N(W z + b, σ² I),
x ~ N(W m + b, W P Wᵀ + σ² I) and z | x ~ N(Σ (P⁻¹ m + Wᵀ (x − b) / σ²), Σ), Σ = (P⁻¹ + WᵀW/σ²)⁻¹.

The estimators and ``evaluate`` run on each ``device`` (conftest): every program's parameters and
data are drawn on the CPU from a seeded generator and moved there (the same numbers on every
device), its constants are built there, and values are moved to the CPU before NumPy compares them.
"""

import math
from functools import partial

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.core.errors import DataError, UserError
from ppl_vae.inference import estimators as E
from ppl_vae.inference import importance as I
from ppl_vae.inference import psis as P
from ppl_vae.inference.checks import NoClosedFormKL
from ppl_vae.programs.conditional import ConditionalVAE
from ppl_vae.programs.model import VAE
from ppl_vae.programs.priors import MixturePrior
from ppl_vae.reports import evaluation as V


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def gaussian_posterior(m, P, W, b, sigma, x):
    """z | x for z ~ N(m, P), x | z ~ N(W z + b, σ² I): mean (N, d) and covariance (d, d)."""
    cov = torch.linalg.inv(torch.linalg.inv(P) + W.T @ W / sigma**2)
    return (m @ torch.linalg.inv(P) + (x - b) @ W / sigma**2) @ cov, cov


def constants(device):
    """``zeros(*shape)`` and ``eye(n)`` on ``device``, for the constants of the programs below."""
    return partial(torch.zeros, device=device), partial(torch.eye, device=device)


def mvn(loc, cov):
    """N(loc, cov); its arguments are not validated (a Cholesky factor is lower triangular by
    construction, and checking it on every expanded particle would take most of these tests' time)."""
    return dist.MultivariateNormal(loc, scale_tril=torch.linalg.cholesky(cov), validate_args=False)


# --------------------------------------------------------------------------- two latent layers


class TwoLayers:
    """z2 ~ N(0, I_2), z1 | z2 ~ N(A z2 + c, S1), x | z1 ~ N(W z1 + b, σ² I_4): sites z2, z1, x in
    the model's order. Every conditional is Gaussian, so log p(x), p(z1 | x), p(z2 | z1) (= p(z2 | z1, x)),
    p(z2 | x) and p(z1 | z2, x) are exact (the identities of the module docstring)."""

    def __init__(self, device, seed=0):
        g = torch.Generator().manual_seed(seed)
        A, c = torch.randn(3, 2, generator=g), torch.randn(3, generator=g)
        S1 = torch.diag(0.3 + torch.rand(3, generator=g))
        W, b, self.sigma = torch.randn(4, 3, generator=g), torch.randn(4, generator=g), 0.6
        z1 = torch.randn(5, 2, generator=g) @ A.T + c
        x = z1 @ W.T + b + self.sigma * torch.randn(5, 4, generator=g)  # (N, 4)
        self.A, self.c, self.S1, self.W, self.b, self.x = (t.to(device) for t in (A, c, S1, W, b, x))
        self.zeros, self.eye = constants(device)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", mvn(self.zeros(2), self.eye(2)))  # (..., N, 2)
            z1 = pyro.sample("z1", mvn(z2 @ self.A.T + self.c, self.S1))  # (..., N, 3)
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def log_px(self, x):  # (N,)
        P1 = self.A @ self.A.T + self.S1
        return mvn(self.c @ self.W.T + self.b, self.W @ P1 @ self.W.T + self.sigma**2 * self.eye(4)).log_prob(
            x
        )

    def bottom_up_guide(self, x):
        """q(z1 | x) q(z2 | z1), the two-layer IWAE's order: the exact posterior."""
        mu1, cov1 = gaussian_posterior(self.c, self.A @ self.A.T + self.S1, self.W, self.b, self.sigma, x)
        S1_inv = torch.linalg.inv(self.S1)
        cov2 = torch.linalg.inv(self.eye(2) + self.A.T @ S1_inv @ self.A)
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z1", mvn(mu1, cov1))
            pyro.sample("z2", mvn((z1 - self.c) @ S1_inv @ self.A @ cov2, cov2))

    def top_down_guide(self, x):
        """q(z2 | x) q(z1 | z2, x), the model's order: the exact posterior too."""
        R = self.W @ self.S1 @ self.W.T + self.sigma**2 * self.eye(4)  # Cov(x | z2)
        WA, R_inv = self.W @ self.A, torch.linalg.inv(R)
        cov2 = torch.linalg.inv(self.eye(2) + WA.T @ R_inv @ WA)
        mu2 = (x - self.W @ self.c - self.b) @ R_inv @ WA @ cov2  # (N, 2)
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", mvn(mu2, cov2))
            mu1, cov1 = gaussian_posterior(z2 @ self.A.T + self.c, self.S1, self.W, self.b, self.sigma, x)
            pyro.sample("z1", mvn(mu1, cov1))


# --------------------------------------------------------------------------- a mixture prior


class MixtureLinear:
    """z ~ Σ_m π_m N(μ_m, diag s_m²) (ppl_vae's MixturePrior, M = 3, d = 2), x | z ~ N(W z + b, σ² I_3):

        log p(x) = log Σ_m π_m N(x; W μ_m + b, W diag(s_m²) Wᵀ + σ² I).

    The exact posterior is a mixture of the components' Gaussian posteriors; the guide is one
    Gaussian with its mean and 1.5² times its covariance (wider than the posterior, so the
    weights are bounded and IWAE_K converges)."""

    def __init__(self, device, seed=0, n=4):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.prior = MixturePrior(2, 3).double()
        with torch.no_grad():
            self.prior.logits.copy_(torch.randn(3, generator=g))
            self.prior.locs.copy_(2 * torch.randn(3, 2, generator=g))
            self.prior.log_scales.copy_(0.3 * torch.randn(3, 2, generator=g))
        W, b, self.sigma = torch.randn(3, 2, generator=g), torch.randn(3, generator=g), 0.8
        with torch.no_grad():
            z = self.prior().sample((n,))  # (N, 2)
        x = z @ W.T + b + self.sigma * torch.randn(n, 3, generator=g)  # (N, 3)
        self.prior, self.W, self.b, self.x = (t.to(device) for t in (self.prior, W, b, x))
        self.eye = constants(device)[1]
        self._moments = {}

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())  # (..., N, 2)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def _components(self, x):
        """log π_m N(x; ...) (N, M) and each component's posterior mean (N, M, 2), covariance (M, 2, 2)."""
        with torch.no_grad():
            log_pi = torch.log_softmax(self.prior.logits, 0)
            covs = torch.diag_embed(self.prior.log_scales.exp() ** 2)  # (M, 2, 2)
            joint = torch.stack(
                [
                    log_pi[m]
                    + mvn(
                        self.prior.locs[m] @ self.W.T + self.b,
                        self.W @ covs[m] @ self.W.T + self.sigma**2 * self.eye(3),
                    ).log_prob(x)
                    for m in range(3)
                ],
                -1,
            )  # (N, M)
            post = [
                gaussian_posterior(self.prior.locs[m], covs[m], self.W, self.b, self.sigma, x)
                for m in range(3)
            ]
        return joint, torch.stack([p[0] for p in post], 1), torch.stack([p[1] for p in post])

    def log_px(self, x):  # (N,)
        return torch.logsumexp(self._components(x)[0], -1)

    def guide(self, x):
        key = (
            x.data_ptr(),
            tuple(x.shape),
        )  # the same batch again (one guide run per unit): reuse its moments
        if key not in self._moments:
            joint, means, covs = self._components(x)
            w = torch.softmax(joint, -1)[..., None]  # (N, M, 1): posterior component weights
            mean = (w * means).sum(1)  # (N, 2)
            dev = means - mean[:, None]  # (N, M, 2)
            cov = (w[..., None] * (covs + dev[..., :, None] * dev[..., None, :])).sum(1)  # (N, 2, 2)
            self._moments[key] = mean, torch.linalg.cholesky(1.5**2 * cov)
        mean, scale_tril = self._moments[key]
        with pyro.plate("data", x.shape[0]):
            # validate_args=False: checking scale_tril of all 10,000 expanded draws would take most of the time
            pyro.sample("z", dist.MultivariateNormal(mean, scale_tril=scale_tril, validate_args=False))


def test_mixture_prior_iwae_at_k_10000_matches_the_closed_form_within_3_se(device):
    mix = MixtureLinear(device)
    log_px = mix.log_px(mix.x)
    est = E.estimate_all(mix.model, mix.guide, mix.x, 10_000, seed=0, analytic_kl=False)  # one set of draws
    iwae, elbo = est["iwae"], est["elbo_mc"]
    assert (iwae.stderr > 0).all() and (iwae.stderr < 0.01).all()
    assert ((iwae.value - log_px).abs() <= 3 * iwae.stderr).all(), (iwae.value - log_px, iwae.stderr)
    assert (log_px - elbo.value > 20 * iwae.stderr + 4 * elbo.stderr).all()  # a real gap for IWAE to close
    assert (est["khat"] < 0.5).all()  # bounded weights: the delta-method SE is trustworthy


def test_mixture_prior_has_no_closed_form_kl_and_is_evaluated_without_it(device):
    """analytic_kl=True refuses in one line; "auto" is the Monte Carlo ELBO of the same draws;
    estimate_all and evaluate report the analytic ELBO as n/a and everything else."""
    mix = MixtureLinear(device)
    msg = (
        "no closed-form KL for site 'z' (guide MultivariateNormal, prior DiagonalNormalMixture): use analytic_kl=False "
        "or 'auto' (Monte Carlo KL), or --elbo trace"
    )
    with pytest.raises(NoClosedFormKL) as err:
        E.elbo(mix.model, mix.guide, mix.x, 3, analytic_kl=True)
    assert (
        str(err.value) == msg
        and isinstance(err.value, UserError)
        and isinstance(err.value, NotImplementedError)
    )
    assert torch.equal(
        E.elbo(mix.model, mix.guide, mix.x, 30, analytic_kl="auto", seed=2).value,
        E.elbo(mix.model, mix.guide, mix.x, 30, seed=2).value,
    )
    est = E.estimate_all(mix.model, mix.guide, mix.x, 200, ks=[1, 10], seed=3)
    assert est["elbo_analytic"] is None and est["elbo_analytic_na"] == msg
    torch.testing.assert_close(
        est["iwae"].value, E.iwae(mix.model, mix.guide, mix.x, 200, seed=3).value, rtol=0, atol=1e-12
    )
    report = V.evaluate(mix.model, mix.guide, mix.x, num_samples=200, ks=[10], seed=0, mean_samples=0)
    assert math.isnan(report["elbo_analytic"]) and report["gap_elbo"] == "elbo_mc"
    assert "ELBO (analytic KL)                   n/a  (no closed-form KL)" in report.table()
    res = report.per_datapoint
    assert (np.abs(res["log_px"] - mix.log_px(mix.x).cpu().numpy()) <= 4 * res["log_px_stderr"]).all()


@pytest.mark.parametrize(
    "layers,posterior,prior,closed",
    [
        (1, "diagonal", "normal", {"z"}),
        (1, "full-rank", "normal", {"z"}),
        (2, "diagonal", "normal", {"z2"}),
        (2, "full-rank", "normal", {"z2"}),
        (1, "iaf", "normal", set()),
        (2, "diagonal", "mog", set()),
        ("skip", "diagonal", "normal", {"z1", "z2"}),
        ("skip", "full-rank", "normal", {"z1", "z2"}),
    ],
)
def test_vae_programs_take_the_kl_in_closed_form_where_the_order_rule_allows(
    layers, posterior, prior, closed, device
):
    """ppl_vae's programs: one layer in closed form (a full-rank guide against the MVN prior
    included); two layers: z2 in closed form given z1, z1 by Monte Carlo (p(z1 | z2) reads z2,
    which the guide draws after z1); the skip hierarchy draws z2, then z1 | x, z2, in the model's
    order: both in closed form. Both ELBOs estimate the same number: within 4 SE (float32)."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    hierarchy = {"hierarchy": "skip"} if layers == "skip" else {}
    vae = (
        VAE(
            (1, 4, 4),
            4,
            [16],
            prior=prior,
            posterior=posterior,
            latent_layers=2 if hierarchy else layers,
            z2_dim=2,
            hidden2=[8],
            mixture_components=3,
            **hierarchy,
        )
        .eval()
        .to(device)
    )
    x = torch.bernoulli(torch.full((6, 16), 0.4)).to(device)
    program = I.inspect_program(vae.model, vae.guide, x, {}, "auto")
    assert program.closed_form == frozenset(closed) and program.slice_safe
    assert (program.no_closed_form is None) == (prior == "normal" and posterior != "iaf")
    analytic = E.elbo(vae.model, vae.guide, x, 1000, analytic_kl="auto", seed=1)
    mc = E.elbo(vae.model, vae.guide, x, 1000, seed=1)
    assert ((analytic.value - mc.value).abs() <= 4 * (analytic.stderr**2 + mc.stderr**2).sqrt()).all()
    if not closed:  # nothing in closed form: the very Monte Carlo ELBO
        assert torch.equal(analytic.value, mc.value)


def test_two_layers_with_the_exact_posterior_every_estimator_returns_log_px(device):
    """Model z2 → z1 → x, guide q(z1 | x) q(z2 | z1) = p(z1, z2 | x): every log weight is log p(x).
    The analytic ELBO takes z2's KL in closed form and z1 by Monte Carlo (the order rule), so it
    is right in expectation (within 4 SE of log p(x)); taking z1's in closed form too, as before,
    was 2.4 nats low here (−9.07 for −6.59 on datapoint 0)."""
    h = TwoLayers(device)
    log_px = h.log_px(h.x)
    m, q = h.model, h.bottom_up_guide
    torch.testing.assert_close(
        I.log_importance_weights(m, q, h.x, 30, seed=0), log_px.expand(30, 5), rtol=0, atol=1e-4
    )
    for k in (1, 10):
        torch.testing.assert_close(E.elbo(m, q, h.x, k, seed=1).value, log_px, rtol=0, atol=1e-4)
        torch.testing.assert_close(E.iwae(m, q, h.x, k, seed=2).value, log_px, rtol=0, atol=1e-4)
    est = E.estimate_all(m, q, h.x, 300, ks=[1, 30], seed=3)
    for e in (est["elbo_mc"], est["iwae"], *est["iwae_by_k"].values()):
        torch.testing.assert_close(e.value, log_px, rtol=0, atol=1e-4)
    assert I.inspect_program(m, q, h.x, {}, True).closed_form == {"z2"}
    analytic = E.elbo(m, q, h.x, 2000, analytic_kl=True, seed=4)
    assert (analytic.stderr < 0.04).all() and ((analytic.value - log_px).abs() <= 4 * analytic.stderr).all()
    report = V.evaluate(m, q, h.x, num_samples=100, ks=[10], seed=0, batch_size=2, mean_samples=0)
    for key in ("elbo_mc", "log_px"):
        np.testing.assert_allclose(report.per_datapoint[key], log_px.cpu().numpy(), rtol=0, atol=1e-4)
    assert abs(report["elbo_analytic"] - log_px.mean().item()) <= 4 * report["elbo_analytic_stderr"]


def test_two_layers_in_the_models_order_take_both_kls_in_closed_form(device):
    """Guide q(z2 | x) q(z1 | z2, x), the exact posterior in the model's order: p(z1 | z2) reads
    only z2, drawn before z1, so both KLs are closed-form; the analytic ELBO is log p(x) within 4 SE."""
    h = TwoLayers(device)
    log_px = h.log_px(h.x)
    m, q = h.model, h.top_down_guide
    assert I.inspect_program(m, q, h.x, {}, True).closed_form == {"z1", "z2"}
    torch.testing.assert_close(E.iwae(m, q, h.x, 50, seed=0).value, log_px, rtol=0, atol=1e-4)
    analytic = E.elbo(m, q, h.x, 2000, analytic_kl=True, seed=4)
    assert (analytic.stderr < 0.04).all() and ((analytic.value - log_px).abs() <= 4 * analytic.stderr).all()


# --------------------------------------------------------------------------- per-datapoint guide parameters


def local_problem(n=50, d=2, device="cpu"):
    """z ~ N(0, I), x | z ~ N(z, I): log p(x) = log N(x; 0, 2 I), posterior N(x/2, I/2); x (n, d) on ``device``."""
    x = 2 * torch.randn(n, d, generator=torch.Generator().manual_seed(0)).to(device)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    return model, x, dist.Normal(x.new_zeros(d), math.sqrt(2)).to_event(1).log_prob(x)


def plate_indexed_guide(init, scale):
    """Pyro's idiom for local latents: ``loc`` (N, d) read by the plate's indices."""

    def guide(x):
        loc = pyro.param("loc", init)
        with pyro.plate("data", x.shape[0]) as idx:
            pyro.sample("z", dist.Normal(loc[idx], scale).to_event(1))

    return guide


def closure_guide(loc, scale):
    """(N, d) locations held by a closure, used whole."""

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    return guide


def test_plate_indexed_guide_gives_the_same_numbers_at_every_chunk_size(device):
    """Slicing the 50 datapoints into blocks of chunk_size // K rows used to re-run this guide on
    each block, which then read loc[0:rows]: rows 40–49 off by up to 27 nats. It is not slice-safe,
    so it is weighed unsliced, and every chunk size gives the unsliced numbers (exact posterior:
    log p(x) to 1e-10; a shifted guide: the unsliced values exactly, and the IWAE recomputed by
    hand from the seeded draws to 1e-10)."""
    model, x, log_px = local_problem(device=device)
    exact = plate_indexed_guide(x / 2, math.sqrt(0.5))
    assert not I.slice_safe(model, exact, x)
    for chunk in (1, 37, 200, None, 10**9):
        torch.testing.assert_close(
            E.iwae(model, exact, x, 200, seed=0, chunk_size=chunk).value, log_px, rtol=0, atol=1e-10
        )
    pyro.clear_param_store()
    loc, scale = x / 2 + 0.3, 0.9
    shifted = plate_indexed_guide(loc, scale)
    ref = E.estimate_all(model, shifted, x, 150, ks=[1, 10], seed=1, chunk_size=10**9)
    for chunk in (1, 37, None):
        est = E.estimate_all(model, shifted, x, 150, ks=[1, 10], seed=1, chunk_size=chunk)
        for key in ("elbo_mc", "elbo_analytic", "iwae"):
            assert torch.equal(est[key].value, ref[key].value), (chunk, key)
        assert torch.equal(est["khat"], ref["khat"])
        assert torch.equal(
            I.log_importance_weights(model, shifted, x, 150, seed=1, chunk_size=chunk),
            I.log_importance_weights(model, shifted, x, 150, seed=1, chunk_size=10**9),
        )
        assert torch.equal(
            P.psis_diagnostics(model, shifted, x, 150, seed=1, chunk_size=chunk)[0], ref["khat"]
        )
        # the trusted path (nesting given: no probe) never slices either; it used to, +124.7 nats
        assert torch.equal(
            I.log_importance_weights(model, shifted, x, 150, seed=1, chunk_size=chunk, nesting=1),
            I.log_importance_weights(model, shifted, x, 150, seed=1, chunk_size=10**9),
        )
    # by hand: units of 100 particles, unit j drawn after torch.manual_seed(derive_seed(1, j))
    log_w = []
    for j, k in enumerate((100, 50)):
        torch.manual_seed(I.derive_seed(1, j))
        z = dist.Normal(loc, scale).expand((k, 50, 2)).rsample()  # (k, N, 2)
        log_w.append(
            dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
            + dist.Normal(z, 1.0).log_prob(x).sum(-1)
            - dist.Normal(loc, scale).log_prob(z).sum(-1)
        )  # (k, N)
    torch.testing.assert_close(
        ref["iwae"].value, torch.logsumexp(torch.cat(log_w), 0) - math.log(150), rtol=0, atol=1e-10
    )


def test_closure_guide_with_n_by_d_locations_works_and_equals_the_plate_indexed_one(device):
    """Plate nesting used to be probed on x[:1] ("Shape mismatch inside plate('data') … 1 vs 50");
    it is probed on the caller's own x, and the closure guide gives the plate-indexed guide's numbers."""
    model, x, log_px = local_problem(device=device)
    loc = x / 2 + 0.3
    closure = closure_guide(loc, 0.9)
    assert I.max_plate_nesting(model, closure, x) == 1 and not I.slice_safe(model, closure, x)
    for chunk in (1, None, 10**9):
        a = E.iwae(model, closure, x, 120, seed=5, chunk_size=chunk)
        b = E.iwae(model, plate_indexed_guide(loc, 0.9), x, 120, seed=5, chunk_size=chunk)
        assert torch.equal(a.value, b.value) and torch.equal(a.stderr, b.stderr)
    torch.testing.assert_close(
        E.iwae(model, closure_guide(x / 2, math.sqrt(0.5)), x, 300, seed=0, chunk_size=1).value,
        log_px,
        rtol=0,
        atol=1e-10,
    )


def test_evaluate_takes_a_program_that_is_not_slice_safe_as_one_block(device):
    model, x, log_px = local_problem(n=20, device=device)
    guide = plate_indexed_guide(x / 2 + 0.3, 0.9)
    report = V.evaluate(model, guide, x, num_samples=100, ks=[10], seed=4, batch_size=8, mean_samples=0)
    assert report["batch_size"] == 20  # one block, drawn with derive_seed(4, 0)
    ref = E.iwae(model, guide, x, 100, seed=I.derive_seed(4, 0))
    np.testing.assert_allclose(report.per_datapoint["log_px"], ref.value.cpu().numpy(), rtol=0, atol=1e-12)
    # an amortized guide of the same law is slice-safe and keeps its blocks of 8

    def amortized(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2 + 0.3, 0.9).to_event(1))

    assert I.slice_safe(model, amortized, x)
    assert (
        V.evaluate(model, amortized, x, num_samples=20, ks=[], seed=4, batch_size=8, mean_samples=0)[
            "batch_size"
        ]
        == 8
    )


# --------------------------------------------------------------------------- extra per-datapoint arguments


class ConditionalLinear:
    """A hand-written conditional program model(x, y): z ~ N(0, I_2), x | z, y ~ N(W z + B y, σ² I_3)
    with y one-hot over 3 classes, so log p(x | y) = log N(x; B y, W Wᵀ + σ² I) and
    z | x, y ~ N(Σ Wᵀ (x − B y) / σ², Σ), Σ = (I + WᵀW/σ²)⁻¹; the guide is that posterior."""

    def __init__(self, device, n=10):
        g = torch.Generator().manual_seed(1)
        W, B, self.sigma = torch.randn(3, 2, generator=g), 3 * torch.randn(3, 3, generator=g), 0.5
        y = torch.eye(3)[torch.arange(n) % 3]  # (N, 3)
        x = y @ B.T + torch.randn(n, 3, generator=g)  # (N, 3)
        self.W, self.B, self.y, self.x = (t.to(device) for t in (W, B, y, x))
        self.zeros, self.eye = constants(device)
        self.batches = []  # (particles, rows) of every model pass

    def model(self, x, y):
        self.batches.append((x.shape[0], y.shape[0]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", mvn(self.zeros(2), self.eye(2)))  # an MVN: closed-form KL to the guide's
            pyro.sample("x", dist.Normal(z @ self.W.T + y @ self.B.T, self.sigma).to_event(1), obs=x)

    def guide(self, x, y):
        mu, cov = gaussian_posterior(self.zeros(2), self.eye(2), self.W, y @ self.B.T, self.sigma, x)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", mvn(mu, cov))

    def log_px(self, x, y):
        return mvn(y @ self.B.T, self.W @ self.W.T + self.sigma**2 * self.eye(3)).log_prob(x)


def test_extra_arguments_go_in_a_tuple_and_are_sliced_with_x(device):
    """x = (x, y): model(x, y) and guide(x, y), y sliced with x. With chunk_size = 1 every model
    pass sees a slice of both, and every estimator returns log p(x | y) (exact guide, 1e-4); with
    the labels shifted by one class the numbers move (the pairing matters)."""
    c = ConditionalLinear(device)
    log_px = c.log_px(c.x, c.y)
    data = (c.x, c.y)
    assert I.slice_safe(c.model, c.guide, data)
    for chunk in (1, None):
        c.batches.clear()
        torch.testing.assert_close(
            E.iwae(c.model, c.guide, data, 150, seed=0, chunk_size=chunk).value, log_px, rtol=0, atol=1e-4
        )
        assert all(rows_x == rows_y for rows_x, rows_y in c.batches)
        assert (min(rows for rows, _ in c.batches) == 1) == (chunk == 1)  # sliced to single rows, or not
    torch.testing.assert_close(
        E.elbo(c.model, c.guide, data, 5, seed=1, chunk_size=1).value, log_px, rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        E.iwae_curve(c.model, c.guide, data, 20, [1, 20], seed=1, chunk_size=1)[1].value,
        log_px,
        rtol=0,
        atol=1e-4,
    )
    torch.testing.assert_close(
        I.log_importance_weights(c.model, c.guide, data, 7, seed=2, chunk_size=3),
        log_px.expand(7, 10),
        rtol=0,
        atol=1e-4,
    )
    assert P.psis_diagnostics(c.model, c.guide, data, 30, seed=2, chunk_size=3)[1].sub(30).abs().max() < 1e-6
    est = E.estimate_all(c.model, c.guide, data, 60, ks=[1, 6], seed=3, chunk_size=5)
    for e in (est["elbo_mc"], est["iwae"], *est["iwae_by_k"].values()):
        torch.testing.assert_close(e.value, log_px, rtol=0, atol=1e-4)
    assert ((est["elbo_analytic"].value - log_px).abs() <= 4 * est["elbo_analytic"].stderr).all()
    report = V.evaluate(c.model, c.guide, data, num_samples=40, ks=[4], seed=0, batch_size=4, mean_samples=0)
    assert report["batch_size"] == 4 and report["n"] == 10 and report["dim"] == 3
    for key in ("elbo_mc", "log_px"):
        np.testing.assert_allclose(report.per_datapoint[key], log_px.cpu().numpy(), rtol=0, atol=1e-4)
    shifted = E.iwae(c.model, c.guide, (c.x, c.y.roll(1, 1)), 150, seed=0)
    assert ((shifted.value - log_px).abs() > 1).all()


def test_conditional_vae_takes_its_labels_in_the_tuple(device):
    """ppl_vae's ConditionalVAE (float32): (x, y) with y one-hot or as indices gives the same
    numbers at every chunk size, those of a closure over y (which is not slice-safe, so weighed
    unsliced), and evaluate's blocks are estimate_all on (x[rows], y[rows])."""
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    cvae = ConditionalVAE((1, 4, 4), 3, [16], num_classes=4).eval().to(device)
    x, labels = torch.bernoulli(torch.full((9, 16), 0.4)).to(device), torch.arange(9, device=device) % 4
    y = torch.eye(4, device=device)[labels]
    ref = E.iwae(cvae.model, cvae.guide, (x, y), 200, seed=1, chunk_size=10**9)

    def closure_model(x):
        return cvae.model(x, y)

    def closure_guide(x):
        return cvae.guide(x, y)

    assert not I.slice_safe(closure_model, closure_guide, x)
    torch.testing.assert_close(
        E.iwae(closure_model, closure_guide, x, 200, seed=1, chunk_size=1).value, ref.value, rtol=0, atol=1e-5
    )
    for data, chunk in (((x, y), 1), ((x, y), 450), ((x, labels), 1)):
        torch.testing.assert_close(
            E.iwae(cvae.model, cvae.guide, data, 200, seed=1, chunk_size=chunk).value,
            ref.value,
            rtol=0,
            atol=1e-5,
        )
    other = E.iwae(cvae.model, cvae.guide, (x, (labels + 1) % 4), 200, seed=1)
    assert not torch.allclose(other.value, ref.value, atol=1e-3)
    report = V.evaluate(
        cvae.model, cvae.guide, (x, labels), num_samples=50, ks=[5], seed=2, batch_size=4, mean_samples=0
    )
    block = E.estimate_all(
        cvae.model, cvae.guide, (x[4:8], labels[4:8]), 50, ks=[5], seed=I.derive_seed(2, 1)
    )
    np.testing.assert_allclose(
        report.per_datapoint["log_px"][4:8], block["iwae"].value.cpu().numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(
        report.per_datapoint["elbo_analytic"][4:8], block["elbo_analytic"].value.cpu().numpy(), rtol=1e-6
    )


# --------------------------------------------------------------------------- refusals, one line each


def _small_vae(device="cpu"):
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    return VAE((1, 4, 4), 3, [8]).eval().to(device), torch.bernoulli(torch.full((5, 16), 0.4)).to(device)


def _with(x, row, value):
    x = x.clone()
    x[row, 2] = value
    return x


def _no_plate_guide(x):
    pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 3), 1.0).to_event(2))


def _three_datapoint_guide(x):
    with pyro.plate("data", 3):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))


def _unplated_model(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    pyro.sample("x", dist.Normal(torch.zeros(16), 1.0).to_event(1), obs=x[0])


def _scalar_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)  # one value per datapoint


BAD = {  # name: (program and data from the small VAE, message)
    "float64": (
        lambda v, x: (v.model, v.guide, x.double()),
        "x has dtype torch.float64 but the program's parameters are torch.float32: pass x.to(torch.float32)",
    ),
    "uint8": (
        lambda v, x: (v.model, v.guide, x.to(torch.uint8)),
        "x has dtype torch.uint8 but the program's parameters are torch.float32: pass x.to(torch.float32)",
    ),
    "nan": (
        lambda v, x: (v.model, v.guide, _with(x, 3, math.nan)),
        "x has NaN or inf at datapoint 3: drop or fix those rows",
    ),
    "inf": (
        lambda v, x: (v.model, v.guide, _with(_with(x, 1, -math.inf), 4, math.nan)),
        "x has NaN or inf at datapoint 1 (and 1 more): drop or fix those rows",
    ),
    "width": (
        lambda v, x: (v.model, v.guide, torch.rand(5, 17)),
        "x must have shape (N, 16) (N flattened datapoints of 16 values), got (5, 17)",
    ),
    "one image": (
        lambda v, x: (v.model, v.guide, x[0]),
        "x must have shape (N, 16) (N flattened datapoints of 16 values), got (16,)",
    ),
    "images": (
        lambda v, x: (v.model, v.guide, x.reshape(5, 1, 4, 4)),
        "x must have shape (N, 16) (N flattened datapoints of 16 values), got (5, 1, 4, 4)",
    ),
    "scalar": (
        lambda v, x: (v.model, v.guide, torch.tensor(1.0)),
        "x must hold at least one datapoint along dim 0, got shape ()",
    ),
    "empty": (
        lambda v, x: (v.model, v.guide, x[:0]),
        "x must hold at least one datapoint along dim 0, got shape (0, 16)",
    ),
    "not a tensor": (
        lambda v, x: (v.model, v.guide, x.tolist()),
        "x must be a tensor (N, ...) or a tuple (x, y, ...) of tensors with the datapoints along dim 0, "
        "got list",
    ),
    "labels of another N": (
        lambda v, x: (v.model, v.guide, (x, torch.zeros(4))),
        "argument 1 of (x, ...) has shape (4,) but x has 5 datapoints: every per-datapoint "
        "argument needs them along dim 0",
    ),
    "no data plate": (
        lambda v, x: (v.model, _no_plate_guide, x),
        "guide site 'z' is not inside a vectorized pyro.plate('data', N): the estimators need every "
        "sample site of model and guide in that plate",
    ),
    "observation outside the plate": (
        lambda v, x: (_unplated_model, v.guide, x),
        "model site 'x' is not inside a vectorized pyro.plate('data', N): the "
        "estimators need every sample site of model and guide in that plate",
    ),
    "plate of another size": (
        lambda v, x: (v.model, _three_datapoint_guide, x),
        "pyro.plate('data') at guide site 'z' has size 3 but x has 5 datapoints along dim 0",
    ),
    "a program's own error": (
        lambda v, x: (_scalar_model, _scalar_model, x),
        "the program failed on x (5, 16) torch.float32: ValueError: Value is not broadcastable "
        "with batch_shape+event_shape: torch.Size([5, 16]) vs torch.Size([5]).",
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_refused_in_one_line(case):
    make, message = BAD[case]
    model, guide, x = make(*_small_vae())
    with pytest.raises(UserError) as err:
        E.iwae(model, guide, x, 10, seed=0)
    assert str(err.value) == message and isinstance(err.value, ValueError)
    assert isinstance(err.value, DataError) == (not case.startswith(("no data plate", "observation")))


@pytest.mark.parametrize(
    "estimator",
    [
        lambda m, g, x: E.elbo(m, g, x, 2),
        lambda m, g, x: E.elbo(m, g, x, 2, analytic_kl=True),
        lambda m, g, x: E.iwae(m, g, x, 2),
        lambda m, g, x: E.iwae_curve(m, g, x, 4, [2]),
        lambda m, g, x: E.estimate_all(m, g, x, 30),
        lambda m, g, x: I.log_importance_weights(m, g, x, 2),
        lambda m, g, x: P.psis_diagnostics(m, g, x, 30),
        lambda m, g, x: I.max_plate_nesting(m, g, x),
        lambda m, g, x: V.evaluate(m, g, x, num_samples=30, batch_size=4),
    ],
)
def test_every_entry_point_checks_its_data(estimator, device):
    """The same line from every public function; evaluate names the datapoint in all of the data
    (row 13 sits in its fourth block of 4)."""
    vae, x = _small_vae(device)
    x = torch.cat([x, x, x, x])  # (20, 16)
    with pytest.raises(DataError, match=r"^x has NaN or inf at datapoint 13: drop or fix those rows$"):
        estimator(vae.model, vae.guide, _with(x, 13, math.nan))


def test_extra_arguments_anywhere_but_in_the_tuple_are_refused():
    """A positional y used to bind to num_samples, a keyword y= was not sliced with x."""
    torch.set_default_dtype(torch.float32)
    cvae = ConditionalVAE((1, 4, 4), 3, [8], num_classes=3).eval()
    x, y = torch.bernoulli(torch.full((5, 16), 0.4)), torch.arange(5) % 3
    cases = [
        (
            lambda: E.iwae(cvae.model, cvae.guide, x, y),
            "the number of samples K must be an integer >= 1, got a tensor of shape (5,): per-datapoint arguments go "
            "with x as a tuple (x, y, ...)",
        ),
        (
            lambda: E.iwae(cvae.model, cvae.guide, x, 10, y=y),
            "keyword argument y= has 5 rows, one per datapoint: pass per-datapoint arguments with x as a tuple (x, y), "
            "so that they are sliced with x",
        ),
        (
            lambda: E.elbo(cvae.model, cvae.guide, x, 10),
            "ConditionalVAE.guide() missing 1 required positional argument: 'y': pass per-datapoint arguments with x as "
            "a tuple (x, y, ...)",
        ),
    ]
    for call, message in cases:
        with pytest.raises(UserError) as err:
            call()
        assert str(err.value) == message


def test_the_probe_of_each_call_runs_on_eight_datapoints_unless_the_program_needs_all():
    """One plain run (no particle plate) on the first 8 datapoints and one on the last two of
    those; a guide holding (50, d) locations does not run on 8, so it is probed on all 50."""
    model, x, _ = local_problem()
    plain = []

    class Spy(pyro.poutine.messenger.Messenger):
        def _pyro_post_sample(self, msg):
            if msg["name"] == "x" and len(msg["fn"].batch_shape) == 1:  # (n,): no particle plate
                plain.append(msg["fn"].batch_shape[0])

    def spied(x):
        with Spy():
            model(x)

    def amortized(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.9).to_event(1))

    E.iwae(spied, amortized, x, 10, seed=0)
    assert plain == [8, 2]
    plain.clear()
    E.iwae(spied, closure_guide(x / 2, 0.9), x, 10, seed=0)
    assert plain == [50]  # its slice of two does not run either: not slice-safe, weighed unsliced
