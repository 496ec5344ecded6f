"""Estimators against closed forms on a linear-Gaussian latent model, in float64.

Model (sites "z", "x" in plate "data"): z ~ N(0, I_d), x = W z + b + σ ε, ε ~ N(0, I_D). Then
log p(x) = log N(x; b, W Wᵀ + σ² I) and the posterior is N(μ, Σ) with
Σ = (I + Wᵀ W / σ²)⁻¹, μ = Σ Wᵀ (x − b) / σ² (Bishop 2006, §2.3.3).
"""

import math
import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.core.errors import UserError
from ppl_vae.inference import estimators as E
from ppl_vae.inference import importance as I
from ppl_vae.inference import psis as P
from ppl_vae.programs.model import VAE

N, D, Z = 6, 5, 3


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class LinearGaussian:
    """p(z) p(x|z) above; ``prior="mvn"`` writes p(z) as a MultivariateNormal (so that the
    exact MultivariateNormal posterior has a registered KL against it)."""

    def __init__(self, W, b, sigma, prior="normal"):
        self.W, self.b, self.sigma, self.prior = W, b, sigma, prior

    def model(self, x):
        d = self.W.shape[1]
        zeros, eye = torch.zeros(d, device=x.device), torch.eye(d, device=x.device)
        p_z = (
            dist.MultivariateNormal(zeros, eye)
            if self.prior == "mvn"
            else dist.Normal(zeros, 1.0).to_event(1)
        )
        with pyro.plate("data", x.shape[0], dim=-1):
            z = pyro.sample("z", p_z)  # (..., N, d)
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def log_px(self, x):  # (N,)
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(self.W.shape[0], device=x.device)
        return dist.MultivariateNormal(self.b, cov).log_prob(x)

    def posterior(self, x):  # μ (N, d), Σ (d, d)
        cov = torch.linalg.inv(
            torch.eye(self.W.shape[1], device=x.device) + self.W.T @ self.W / self.sigma**2
        )
        return (x - self.b) @ self.W @ cov / self.sigma**2, cov

    def exact_guide(self, x):
        mu, cov = self.posterior(x)
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov)))

    def meanfield_guide(self, shift=0.0, scale_factor=1.0):
        """q(z|x) = N(μ(x) + shift, diag(Σ) · scale_factor²): a guide that misses the posterior
        correlations (and its mean/scale when shift ≠ 0, scale_factor ≠ 1)."""

        def guide(x):
            loc, scale = self.meanfield_params(x, shift, scale_factor)
            with pyro.plate("data", x.shape[0], dim=-1):
                pyro.sample("z", dist.Normal(loc, scale).to_event(1))

        return guide

    def meanfield_params(self, x, shift=0.0, scale_factor=1.0):
        mu, cov = self.posterior(x)
        return mu + shift, (cov.diagonal().sqrt() * scale_factor).expand_as(mu)

    def expected_log_lik(self, x, loc, scale):
        """E_q log p(x|z) for q = N(loc, diag scale²): Σ_d −½ log 2πσ² − ((x − W m − b)_d² +
        (W diag(s²) Wᵀ)_dd) / 2σ²."""
        resid = x - loc @ self.W.T - self.b  # (N, D)
        var_term = scale.pow(2) @ self.W.T.pow(2)  # (N, D): Σ_j W_dj² s_j²
        s2 = self.sigma**2
        return (-0.5 * math.log(2 * math.pi * s2) - (resid.pow(2) + var_term) / (2 * s2)).sum(-1)


def gaussian_kl(loc, scale):
    """KL(N(m, diag s²) ‖ N(0, I)) = ½ Σ_j (s_j² + m_j² − 1 − log s_j²)  (Kingma & Welling 2014, App. B)."""
    return 0.5 * (scale.pow(2) + loc.pow(2) - 1 - 2 * scale.log()).sum(-1)


def make_problem(seed=0, W_scale=1.0, prior="normal", device="cpu"):
    """The model with a random W (D, Z), b (D,), σ = 0.7 and N datapoints x (N, D) drawn from it,
    on ``device`` (drawn on the CPU, so every device gets the same numbers)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, Z, generator=g) * W_scale
    b = torch.randn(D, generator=g)
    x = torch.randn(Z, generator=g) @ W.T + b + 0.7 * torch.randn(N, D, generator=g)  # (N, D)
    return LinearGaussian(W.to(device), b.to(device), sigma=0.7, prior=prior), x.to(device)


# --------------------------------------------------------------------------- exact posterior


def test_exact_posterior_every_estimator_returns_log_px(device):
    lg, x = make_problem(prior="mvn", device=device)
    log_px = lg.log_px(x)
    m, q = lg.model, lg.exact_guide
    lw = I.log_importance_weights(m, q, x, 50, seed=1)  # (50, N): log w = log p(x) for every z
    assert lw.shape == (50, N)
    torch.testing.assert_close(lw, log_px.expand(50, N), atol=1e-4, rtol=0)
    for k in (1, 10):
        est = E.elbo(m, q, x, num_samples=k, seed=2)
        torch.testing.assert_close(est.value, log_px, atol=1e-4, rtol=0)
        if k > 1:
            assert est.stderr.abs().max() < 1e-6
    # The analytic-KL ELBO is log p(x|z_k) − KL per draw: exact only in expectation (its
    # log p(x|z_k) still varies with z_k), so it is checked within 4 standard errors.
    est = E.elbo(m, q, x, num_samples=4000, analytic_kl=True, seed=2)
    assert (est.stderr > 1e-3).all() and ((est.value - log_px).abs() <= 4 * est.stderr).all()
    for k in (1, 2, 10, 1000):
        curve = E.iwae_curve(m, q, x, k, [1, k], seed=3)
        est = E.iwae(m, q, x, k, seed=3)
        assert torch.equal(est.value, curve[k].value)  # the same draws, the same pass
        torch.testing.assert_close(est.value, log_px, atol=1e-4, rtol=0)
        torch.testing.assert_close(curve[1].value, log_px, atol=1e-4, rtol=0)
        if k >= 2:
            assert est.stderr.abs().max() < 1e-6 and curve[1].stderr.abs().max() < 1e-6
        else:
            assert est.stderr.isnan().all()  # one draw gives no error estimate
    allest = E.estimate_all(m, q, x, 500, ks=[1, 10, 500], seed=4)
    for key in ("elbo_mc", "iwae"):
        torch.testing.assert_close(allest[key].value, log_px, atol=1e-4, rtol=0)
    torch.testing.assert_close(
        allest["ess"], torch.full((N,), 500.0, dtype=allest["ess"].dtype), rtol=1e-6, atol=0
    )  # equal weights


# --------------------------------------------------------------------------- mean-field guide


def test_analytic_kl_equals_gaussian_kl_formula():
    """With W = 0, log p(x|z) = log N(x; b, σ²I) whatever z, so the analytic-KL ELBO is
    exactly that constant minus KL(q ‖ p): the KL path is checked draw by draw."""
    lg, x = make_problem()
    lg.W = torch.zeros_like(lg.W)
    g = torch.Generator().manual_seed(5)
    A, c, s = torch.randn(D, Z, generator=g), torch.randn(Z, generator=g), 0.3 + torch.rand(Z, generator=g)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(x @ A + c, s).to_event(1))

    const = dist.Normal(lg.b, lg.sigma).to_event(1).log_prob(x)  # (N,)
    est = E.elbo(lg.model, guide, x, num_samples=4, analytic_kl=True, seed=0)
    kl = const - est.value
    torch.testing.assert_close(kl, gaussian_kl(x @ A + c, s.expand(N, Z)), atol=1e-4, rtol=0)
    assert est.stderr.abs().max() < 1e-6  # nothing left to sample


def test_meanfield_elbos_within_4_se_of_closed_form():
    lg, x = make_problem()
    loc, scale = lg.meanfield_params(x, shift=0.3, scale_factor=1.3)
    guide = lg.meanfield_guide(shift=0.3, scale_factor=1.3)
    closed = lg.expected_log_lik(x, loc, scale) - gaussian_kl(loc, scale)  # (N,)
    assert (closed < lg.log_px(x) - 0.05).all()  # a real gap to detect
    for analytic in (True, False):
        est = E.elbo(lg.model, guide, x, num_samples=2000, analytic_kl=analytic, seed=7)
        assert (est.stderr > 0).all()
        assert ((est.value - closed).abs() <= 4 * est.stderr).all(), (
            analytic,
            est.value - closed,
            est.stderr,
        )
        assert abs(est.mean() - closed.mean().item()) <= 4 * est.mean_stderr()


def test_iwae_increases_with_k_and_approaches_log_px():
    lg, x = make_problem()
    log_px = lg.log_px(x)
    guide = lg.meanfield_guide(shift=0.3, scale_factor=1.3)
    ks = [1, 4, 16, 64, 256, 4096]
    curve = E.iwae_curve(lg.model, guide, x, 4096 * 4, ks + [4096 * 4], seed=11)
    est = curve[4096 * 4]
    means = [curve[k].mean() for k in ks]
    ses = [curve[k].mean_stderr() for k in ks]
    elbo_closed = (
        (
            lg.expected_log_lik(x, *lg.meanfield_params(x, 0.3, 1.3))
            - gaussian_kl(*lg.meanfield_params(x, 0.3, 1.3))
        )
        .mean()
        .item()
    )
    assert abs(means[0] - elbo_closed) <= 4 * ses[0]  # IWAE_1 is the ELBO
    for i in range(len(ks) - 1):  # non-decreasing within noise
        assert means[i + 1] >= means[i] - 3 * math.hypot(ses[i], ses[i + 1]), (ks[i], means)
    assert means[-1] - means[0] > 0.5 * (log_px.mean().item() - elbo_closed)  # and really moving up
    gap_1 = log_px.mean().item() - means[0]
    gap_K = log_px.mean().item() - est.mean()
    assert gap_K < gap_1 / 50
    assert ((est.value - log_px).abs() <= 4 * est.stderr + 1e-3).all()
    assert est.mean() <= log_px.mean().item() + 4 * est.mean_stderr()


# --------------------------------------------------------------------------- chunking, memory, seeds


def test_chunked_and_unchunked_iwae_agree():
    lg, x = make_problem()
    guide = lg.meanfield_guide(shift=0.5, scale_factor=0.8)
    ref_curve = E.iwae_curve(lg.model, guide, x, 1234, [1, 7, 100, 1234], seed=5, chunk_size=10**9)
    ref = ref_curve[1234]
    for chunk in (1, N * 150, N * 333):
        curve = E.iwae_curve(lg.model, guide, x, 1234, [1, 7, 100, 1234], seed=5, chunk_size=chunk)
        torch.testing.assert_close(curve[1234].stderr, ref.stderr, atol=1e-5, rtol=0)
        for k in curve:
            torch.testing.assert_close(curve[k].value, ref_curve[k].value, atol=1e-5, rtol=0)
    # and the streaming log-sum-exp equals the one-shot formula on the materialized weights
    lw = I.log_importance_weights(lg.model, guide, x, 1234, seed=5, chunk_size=N * 100)
    torch.testing.assert_close(ref.value, torch.logsumexp(lw, 0) - math.log(1234), atol=1e-10, rtol=0)


def test_chunked_iwae_agrees_in_float32_vae():
    torch.set_default_dtype(torch.float32)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8]).eval()
    x = torch.bernoulli(torch.full((7, 16), 0.4))
    a = E.iwae(vae.model, vae.guide, x, 750, seed=2, chunk_size=10**9)
    b = E.iwae(vae.model, vae.guide, x, 750, seed=2, chunk_size=1)
    torch.testing.assert_close(a.value, b.value, atol=1e-5, rtol=0)


@pytest.mark.slow  # 8 s: the fast subset stays under 3 minutes
def test_iwae_memory_is_bounded_for_k_10000():
    """K = 10,000 on a batch: the model never sees more than ``chunk_size`` particles × datapoints
    (here N, so passes of SAMPLE_UNIT particles on slices of the batch), 10,000× fewer than all K
    at once; all K particles of every datapoint are weighed, and the estimate is still exact."""
    lg, x = make_problem(prior="mvn")
    batch_shapes = []

    class Spy(pyro.poutine.messenger.Messenger):
        def _pyro_post_sample(self, msg):
            if msg["name"] == "x":
                batch_shapes.append(tuple(msg["fn"].batch_shape))  # (k, N) per pass

    def spied_model(x):
        with Spy():
            lg.model(x)

    K = 10_000
    est = E.iwae(spied_model, lg.exact_guide, x, K, seed=0, chunk_size=N)
    passes = [s for s in batch_shapes if len(s) == 2]  # (particles, datapoints) of each model pass
    assert sum(k * m for k, m in passes) == K * N
    assert max(k * m for k, m in passes) <= max(N, I.SAMPLE_UNIT)
    assert max(k for k, _ in passes) == I.SAMPLE_UNIT == K // 100
    torch.testing.assert_close(est.value, lg.log_px(x), atol=1e-4, rtol=0)
    assert est.stderr.abs().max() < 1e-6


def test_iwae_k1_equals_mc_elbo_with_one_sample():
    """IWAE_1 = log w_1 is the one-draw MC ELBO: the same value and the same standard error,
    which is NaN for both (one draw per datapoint has no sample variance). From K > 1 draws,
    the IWAE_1 point of the curve is the K-draw ELBO, stderr std/√K included."""
    lg, x = make_problem()
    guide = lg.meanfield_guide(shift=0.5, scale_factor=0.8)
    for seed in (0, 1, 2):
        a = E.iwae(lg.model, guide, x, 1, seed=seed)
        b = E.elbo(lg.model, guide, x, 1, seed=seed)
        torch.testing.assert_close(a.value, b.value, atol=0, rtol=0)
        assert a.stderr.isnan().all() and b.stderr.isnan().all()
    curve = E.iwae_curve(lg.model, guide, x, 300, [1, 300], seed=3)
    mc = E.elbo(lg.model, guide, x, 300, seed=3)
    torch.testing.assert_close(curve[1].value, mc.value, atol=0, rtol=0)
    torch.testing.assert_close(curve[1].stderr, mc.stderr, atol=0, rtol=0)
    assert (mc.stderr > 0).all()
    torch.set_default_dtype(torch.float32)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8]).eval()
    xv = torch.bernoulli(torch.full((5, 16), 0.5))
    a, b = E.iwae(vae.model, vae.guide, xv, 1, seed=9), E.elbo(vae.model, vae.guide, xv, 1, seed=9)
    torch.testing.assert_close(a.value, b.value, atol=0, rtol=0)
    torch.testing.assert_close(a.stderr, b.stderr, atol=0, rtol=0, equal_nan=True)


def test_seeded_estimators_leave_the_global_rng_alone_and_repeat():
    lg, x = make_problem()
    guide = lg.meanfield_guide(shift=0.5)
    state = torch.get_rng_state()
    a = E.iwae(lg.model, guide, x, 300, seed=4)
    assert torch.equal(state, torch.get_rng_state())
    b = E.iwae(lg.model, guide, x, 300, seed=4)
    c = E.iwae(lg.model, guide, x, 300, seed=5)
    assert torch.equal(a.value, b.value) and not torch.equal(a.value, c.value)


# --------------------------------------------------------------------------- diagnostics, errors


def test_khat_small_for_good_guide_large_for_mismatched_one():
    lg, x = make_problem()
    good = lg.meanfield_guide(scale_factor=1.5)  # wider than the posterior: bounded weights
    bad = lg.meanfield_guide(shift=1.0, scale_factor=0.2)  # far too narrow and off-centre
    k_good, ess_good = P.psis_diagnostics(lg.model, good, x, 2000, seed=0)
    k_bad, ess_bad = P.psis_diagnostics(lg.model, bad, x, 2000, seed=0)
    assert k_good.shape == (N,) and ess_good.shape == (N,)
    assert (k_good < 0.5).all(), k_good
    assert (k_bad > 0.7).all(), k_bad
    assert (ess_good > 5 * ess_bad).all()
    assert ((ess_good > 1) & (ess_good <= 2000)).all()
    # too few draws to fit a Pareto tail: k̂ is NaN (not a number that looks fine), ESS still in [1, K]
    k_few, ess_few = P.psis_diagnostics(lg.model, good, x, P.PSIS_MIN_SAMPLES - 1, seed=0)
    assert k_few.isnan().all() and ((ess_few >= 1) & (ess_few <= P.PSIS_MIN_SAMPLES - 1)).all()


def test_analytic_kl_without_closed_form_raises_and_mc_elbo_is_exact():
    lg, x = make_problem()  # Normal(...).to_event(1) prior

    def student_guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.StudentT(4.0, torch.zeros(x.shape[0], Z), 1.0).to_event(1))

    msg = (
        "no closed-form KL for site 'z' (guide Independent(StudentT), prior Independent(Normal)): use "
        "analytic_kl=False or 'auto' (Monte Carlo KL), or --elbo trace"
    )
    with pytest.raises(NotImplementedError, match=re.escape(msg)) as err:
        E.elbo(lg.model, student_guide, x, 2, analytic_kl=True)
    assert isinstance(err.value, UserError) and str(err.value) == msg
    # "auto": Monte Carlo where no closed form is registered, the very MC ELBO of the same draws
    assert torch.equal(
        E.elbo(lg.model, student_guide, x, 5, analytic_kl="auto", seed=1).value,
        E.elbo(lg.model, student_guide, x, 5, seed=1).value,
    )
    # The Monte Carlo ELBO is the mean of log p(x, z_k) − log q(z_k) over the seeded draws, recomputed
    # here by hand: seed 0's first unit is drawn after torch.manual_seed(derive_seed(0, 0)), as the
    # (K, N, Z) reparameterized sample of the guide's distribution.
    K = 3
    est = E.elbo(lg.model, student_guide, x, K, seed=0)
    student = dist.StudentT(4.0, torch.zeros(N, Z), 1.0)
    torch.manual_seed(I.derive_seed(0, 0))
    z = student.expand((K, N, Z)).rsample()  # (K, N, Z)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        - student.log_prob(z).sum(-1)
        + dist.Normal(z @ lg.W.T + lg.b, lg.sigma).log_prob(x).sum(-1)
    )  # (K, N)
    torch.testing.assert_close(est.value, log_w.mean(0), atol=1e-10, rtol=0)
    torch.testing.assert_close(est.stderr, log_w.std(0) / math.sqrt(K), atol=1e-10, rtol=0)
    # and IWAE_1 from the same draws is that ELBO
    torch.testing.assert_close(
        E.iwae_curve(lg.model, student_guide, x, K, [1], seed=0)[1].value, est.value, atol=0, rtol=0
    )


def test_bad_k_and_ks_are_refused():
    lg, x = make_problem()
    for k in (0, -3, 2.5):
        with pytest.raises(ValueError, match="K must be an integer >= 1"):
            E.iwae(lg.model, lg.meanfield_guide(), x, k)
    with pytest.raises(ValueError, match="k must be <= num_samples"):
        E.iwae_curve(lg.model, lg.meanfield_guide(), x, 10, [1, 20])
    with pytest.raises(ValueError, match="K must be an integer >= 1"):
        E.estimate_all(lg.model, lg.meanfield_guide(), x, 10, ks=[0])


def test_other_plate_dims_are_summed_per_datapoint():
    """A model whose pixels sit in their own plate (dim −1, data plate at dim −2) gives the
    same per-datapoint weights as the .to_event(1) model."""
    lg, x = make_problem(prior="mvn")

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.MultivariateNormal(torch.zeros(Z), torch.eye(Z)))  # (..., N, 1, Z)
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Normal(z.squeeze(-2) @ lg.W.T + lg.b, lg.sigma), obs=x)  # (..., N, D)

    def guide(x):
        mu, cov = lg.posterior(x)
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.MultivariateNormal(mu[:, None], scale_tril=torch.linalg.cholesky(cov)))

    est = E.iwae(model, guide, x, 20, seed=0)
    torch.testing.assert_close(est.value, lg.log_px(x), atol=1e-4, rtol=0)


def test_iwae_delta_method_stderr_is_the_weights_sample_variance_over_k_mean_squared():
    """One group of K draws: stderr² = v̂ / (K m̂²), m̂ the mean and v̂ the sample variance (÷ K − 1)
    of the weights w_k (delta method, docs/estimators.md), computed here from the materialized
    log-weights of the same seeded draws. For K = 2 that is |w₁ − w₂| / (w₁ + w₂) =
    |tanh((log w₁ − log w₂) / 2)| exactly; a variance over K instead of K − 1 would be √(1/2) of it."""
    lg, x = make_problem()
    guide = lg.meanfield_guide(shift=0.4, scale_factor=1.3)  # spread-out weights: stderr ≫ rounding
    for k, chunk in ((2, 10**9), (5, N * 3), (50, N * 7)):  # chunk < k: groups closed across chunks too
        est = E.iwae(lg.model, guide, x, k, seed=3, chunk_size=chunk)
        lw = I.log_importance_weights(lg.model, guide, x, k, seed=3)  # (k, N), the same draws
        w = torch.exp(lw - lw.max(0).values)  # (k, N), rescaled per datapoint: the ratio is unchanged
        want = (w.var(0, correction=1) / (k * w.mean(0).pow(2))).sqrt()  # (N,)
        assert (want > 0.05).all(), want
        torch.testing.assert_close(est.stderr, want, rtol=1e-9, atol=0)
        if k == 2:
            torch.testing.assert_close(est.stderr, torch.tanh((lw[0] - lw[1]) / 2).abs(), rtol=1e-9, atol=0)
