"""Likelihoods against their closed forms, and the analytic Gaussian KL.

Every log-density is checked in float64 against a formula written out here (not against the
code's own helper), at rtol 1e-10 unless stated; shapes follow the module's contract: batch
``(...)``, event ``(D,)``, so ``log_prob`` gives one number per datapoint.
"""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import kl_divergence

from ppl_vae.inference.objectives import DeviceTraceMeanField_ELBO
from ppl_vae.programs.likelihoods import LIKELIHOODS, make_likelihood
from ppl_vae.programs.model import VAE

K, N, D = 3, 5, 12


def _close(a, b, rtol=1e-10, atol=1e-10):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("name", list(LIKELIHOODS))
def test_shapes_one_number_per_datapoint(name):
    lik = make_likelihood(name)
    out = torch.randn(K, N, D * lik.params_per_pixel)  # (K, N, out_dim)
    d = lik.dist(out)
    assert d.batch_shape == (K, N) and d.event_shape == (D,)
    x = torch.rand(N, D) if name != "bernoulli" else torch.bernoulli(torch.full((N, D), 0.5))
    assert d.log_prob(x).shape == (K, N)
    assert lik.mean(out).shape == (K, N, D)


def test_bernoulli_is_minus_summed_bce_with_logits():
    logits = 4 * torch.randn(N, D, dtype=torch.float64)
    x = torch.bernoulli(torch.full((N, D), 0.3, dtype=torch.float64))
    lp = make_likelihood("bernoulli").dist(logits).log_prob(x)  # (N,)
    bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)  # (N,)
    _close(lp, -bce)
    # and the textbook form Σ x·l − softplus(l)
    _close(lp, (x * logits - F.softplus(logits)).sum(-1))
    _close(make_likelihood("bernoulli").mean(logits), torch.sigmoid(logits))
    # greyscale x gets the same formula, with Pyro's validation on (conftest): the densities are
    # built with validate_args=False, and the data are checked once, at load (ppl_vae.data.prepare)
    grey = torch.rand(N, D, dtype=torch.float64)
    _close(
        make_likelihood("bernoulli").dist(logits).log_prob(grey), (grey * logits - F.softplus(logits)).sum(-1)
    )


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_fast_bernoulli_values_and_gradients_match_bce(dtype, tol):
    """ppl_vae's own Bernoulli log-density (vectorized log instead of log1p) against PyTorch's
    BCE-with-logits: values, gradients w.r.t. the logits (x − σ(l)) and w.r.t. the data (l),
    with logits broadcast over K particles and extreme logits (±80: exp underflows to 0)."""
    logits = 6 * torch.randn(K, N, D, dtype=dtype)
    logits[0, 0, :4] = torch.tensor([80.0, -80.0, 0.0, 1e-3], dtype=dtype)
    x = torch.bernoulli(torch.full((N, D), 0.4, dtype=dtype))
    ours_l, ref_l = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours_x, ref_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = make_likelihood("bernoulli").dist(ours_l).log_prob(ours_x)  # (K, N)
    ref = -F.binary_cross_entropy_with_logits(ref_l, ref_x.expand(K, N, D), reduction="none").sum(
        -1
    )  # (K, N)
    assert ours.shape == (K, N)
    # per pixel the error is ≤ ½ ulp of 1 (log(1 + e) for log1p(e)); D pixels are summed
    torch.testing.assert_close(ours, ref, rtol=tol, atol=D * tol)
    w = torch.randn(K, N, dtype=dtype)  # any upstream gradient
    (ours * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(ours_l.grad, ref_l.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ours_x.grad, ref_x.grad, rtol=tol, atol=tol)  # (N, D): summed over K


@pytest.mark.parametrize("sigma", [1.0, 0.3])
def test_fixed_sigma_gaussian_closed_form(sigma):
    mu = torch.randn(N, D, dtype=torch.float64)
    x = torch.rand(N, D, dtype=torch.float64)
    lp = make_likelihood("gaussian", sigma=sigma).dist(mu).log_prob(x)  # (N,)
    expected = (
        -0.5 * ((x - mu) ** 2).sum(-1) / sigma**2 - D * math.log(sigma) - 0.5 * D * math.log(2 * math.pi)
    )
    _close(lp, expected)
    if sigma == 1.0:  # σ = 1 is −½ · summed squared error plus a constant
        mse = F.mse_loss(mu, x, reduction="none").sum(-1)
        _close(lp, -0.5 * mse - 0.5 * D * math.log(2 * math.pi))


def test_gaussian_refuses_nonpositive_sigma():
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="sigma"):
            make_likelihood("gaussian", sigma=bad)


def test_continuous_bernoulli_matches_torch_and_closed_form():
    # λ away from ½, where torch uses the exact normalizer (a Taylor expansion near ½)
    logits = torch.cat([torch.linspace(-6, -0.5, D // 2), torch.linspace(0.5, 6, D // 2)]).double()
    logits = logits.expand(N, D)  # (N, D)
    x = torch.rand(N, D, dtype=torch.float64)
    lik = make_likelihood("continuous-bernoulli")
    lp = lik.dist(logits).log_prob(x)  # (N,)
    _close(lp, torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x).sum(-1))
    # Loaiza-Ganem & Cunningham 2019, eq. (5): C(λ) = 2 artanh(1 − 2λ) / (1 − 2λ)
    lam = torch.sigmoid(logits)
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    _close(lp, (log_c + x * torch.log(lam) + (1 - x) * torch.log1p(-lam)).sum(-1))
    # its mean is λ/(2λ − 1) + 1/(2 artanh(1 − 2λ)), not λ
    mean = lam / (2 * lam - 1) + 1 / (2 * torch.atanh(1 - 2 * lam))
    _close(lik.mean(logits), mean)
    assert (lik.mean(logits) - lam).abs().max() > 0.1


def test_continuous_bernoulli_at_half_is_uniform():
    lp = make_likelihood("continuous-bernoulli").dist(torch.zeros(N, D)).log_prob(torch.rand(N, D))
    _close(lp, torch.zeros(N), atol=1e-4, rtol=0)  # λ = ½: uniform density 1 on [0, 1]^D


def test_gaussian_learned_sigma_never_below_floor():
    floor = 0.05
    lik = make_likelihood("gaussian-learned", sigma_floor=floor)
    raw = torch.cat([torch.full((1, D), -1e4), torch.full((1, D), -30.0), 10 * torch.randn(N, D)])
    loc = torch.randn_like(raw)
    out = torch.cat([loc, raw], -1)  # (N+2, 2D): first D means, then D raw scales
    d = lik.dist(out)
    scale = d.base_dist.scale  # (N+2, D)
    assert (scale >= floor).all()
    _close(scale, floor + F.softplus(raw), rtol=1e-6, atol=1e-7)
    _close(scale[0], torch.full((D,), floor), rtol=1e-6, atol=0)  # softplus(−∞) = 0: exactly the floor
    _close(lik.mean(out), loc, rtol=0, atol=0)
    # the floor bounds the density: log p(x = μ) ≤ −D log floor − (D/2) log 2π
    bound = -D * math.log(floor) - 0.5 * D * math.log(2 * math.pi)
    assert (d.log_prob(loc) <= bound + 1e-4).all()
    _close(d.log_prob(loc)[0], torch.tensor(bound), rtol=1e-5, atol=0)


def test_unknown_likelihood_names_the_choices():
    with pytest.raises(ValueError, match="bernoulli"):
        make_likelihood("poisson")


# --------------------------------------------------------------------------- the analytic KL


def test_meanfield_elbo_is_reconstruction_plus_closed_form_kl_on_the_models_sites():
    """On the sites the program builds (guide N(μ, diag σ²) from the log-variance head, prior
    N(0, I), both ``.to_event(1)``), the KL the objectives and estimators call is one number per
    datapoint, KL(q ‖ p) = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²) (Kingma & Welling 2014, app. B);
    and DeviceTraceMeanField_ELBO = (size/N) Σ_i [−log p(x_i|z_i) + KL_i], with z the guide's
    draw under the same seed and log p(x|z) = Σ_d x_d·l_d − softplus(l_d). float64, rtol 1e-10."""
    torch.set_default_dtype(torch.float64)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8], likelihood="bernoulli")
    with torch.no_grad():  # spread the codes (the initial encoder gives μ ≈ 0 and σ ≈ 1, where KL ≈ 0)
        [m for m in vae.encoder.modules() if isinstance(m, torch.nn.Linear)][-1].weight.mul_(10)
    x = torch.bernoulli(torch.full((6, 16), 0.4))
    size = 30
    pyro.set_rng_seed(5)
    loss = DeviceTraceMeanField_ELBO(max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x, size=size
    )
    pyro.set_rng_seed(5)
    guide_tr = pyro.poutine.trace(vae.guide).get_trace(x, size=size)
    model_tr = pyro.poutine.trace(pyro.poutine.replay(vae.model, trace=guide_tr)).get_trace(x, size=size)
    mu, logvar = vae.encoder(x)  # (6, 3) each
    kl = 0.5 * (mu**2 + logvar.exp() - 1 - logvar).sum(-1)  # (6,)
    assert mu.abs().max() > 1 and logvar.abs().max() > 1  # the check covers more than q ≈ p
    _close(kl_divergence(guide_tr.nodes["z"]["fn"], model_tr.nodes["z"]["fn"]), kl)
    logits = vae.decoder(guide_tr.nodes["z"]["value"])  # (6, 16)
    log_lik = (x * logits - F.softplus(logits)).sum(-1)  # (6,)
    _close(loss, size / x.shape[0] * (-log_lik + kl).sum())


# --------------------------------------------------------------------------- discretized logistic

LEVELS = torch.arange(256, dtype=torch.float64) / 255  # (256,) the 8-bit levels k/255
# (μ, log s): near the data, far outside [0, 1], very narrow (the clamp at −7), very wide
LOGISTIC_PARAMS = [(0.5, -3.0), (0.0, -7.0), (1.0, -7.0), (0.37, -9.0), (-10.0, 5.0), (3.0, -1.0), (0.5, 8.0)]


def _pixels(mu, log_s, dtype, n=256):
    from ppl_vae.programs.likelihoods import DiscretizedLogisticPixels

    return DiscretizedLogisticPixels(torch.full((n,), mu, dtype=dtype), torch.full((n,), log_s, dtype=dtype))


def _reference_log_prob(x: float, mu: float, log_s: float) -> float:
    """log P(bin of x) at 1000 digits (mpmath: e^−1100 still resolved): σ(b) − σ(a) with bin k = ⌊256 x⌋ (255 at x = 1),
    a = (k/256 − μ)/s, b = ((k+1)/256 − μ)/s, and σ(a) := 0 for k = 0, σ(b) := 1 for k = 255."""
    import mpmath

    mpmath.mp.dps = 1000
    k = min(math.floor(x * 256), 255)
    s = mpmath.exp(max(log_s, -7.0))
    sig = lambda t: 1 / (1 + mpmath.exp(-t))  # noqa: E731
    upper = mpmath.mpf(1) if k == 255 else sig((mpmath.mpf(k + 1) / 256 - mu) / s)
    lower = mpmath.mpf(0) if k == 0 else sig((mpmath.mpf(k) / 256 - mu) / s)
    return float(mpmath.log(upper - lower))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu,log_s", LOGISTIC_PARAMS)
def test_discretized_logistic_256_bins_sum_to_one(mu, log_s, dtype):
    lp = _pixels(mu, log_s, dtype).log_prob(LEVELS.to(dtype))  # (256,) one per bin
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    _close(lp.logsumexp(0), torch.zeros((), dtype=dtype), rtol=0, atol=tol)
    # the levels k/255 and the bin centres (k + 0.5)/256 fall in the same bins
    centres = ((torch.arange(256, dtype=torch.float64) + 0.5) / 256).to(dtype)
    _close(_pixels(mu, log_s, dtype).log_prob(centres), lp, rtol=0, atol=0)


@pytest.mark.parametrize("mu,log_s", LOGISTIC_PARAMS)
def test_discretized_logistic_matches_a_high_precision_reference(mu, log_s):
    """float64 to 1e-10 and float32 to 1e-5 relative (tails included: bins far from the mean,
    where σ(b) − σ(a) in float32 would be 0 or lose every digit)."""
    ks = [0, 1, 2, 50, 93, 94, 95, 127, 128, 200, 254, 255]
    x = torch.tensor([k / 255 for k in ks], dtype=torch.float64)
    ref = torch.tensor([_reference_log_prob(k / 255, mu, log_s) for k in ks], dtype=torch.float64)
    _close(_pixels(mu, log_s, torch.float64, len(ks)).log_prob(x), ref, rtol=1e-10, atol=1e-12)
    f32 = _pixels(mu, log_s, torch.float32, len(ks)).log_prob(x.float()).double()
    _close(f32, ref, rtol=1e-5, atol=1e-5)


def test_discretized_logistic_gradients_match_finite_differences():
    from ppl_vae.programs.likelihoods import DiscretizedLogisticPixels

    g = torch.Generator().manual_seed(3)
    x = torch.tensor([0, 1, 17, 128, 200, 254, 255], dtype=torch.float64) / 255  # edges included
    loc = (torch.rand(7, generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    log_s = (torch.rand(7, generator=g, dtype=torch.float64) * 5 - 6).requires_grad_()
    assert torch.autograd.gradcheck(lambda m, s: DiscretizedLogisticPixels(m, s).log_prob(x), (loc, log_s))
    assert torch.autograd.gradgradcheck(
        lambda m, s: DiscretizedLogisticPixels(m, s).log_prob(x), (loc, log_s)
    )


def test_discretized_logistic_mean_and_samples_follow_the_bin_probabilities():
    lik = make_likelihood("discretized-logistic")
    out = torch.tensor(
        [[0.3, 0.9, -0.2, -3.0, -2.0, 0.5]], dtype=torch.float64
    )  # (1, 2D): μ then log s, D = 3
    d = lik.dist(out)
    assert d.batch_shape == (1,) and d.event_shape == (3,)
    mu, log_s = out[0, :3], out[0, 3:]
    probs = torch.stack(
        [_pixels(m.item(), s.item(), torch.float64).log_prob(LEVELS).exp() for m, s in zip(mu, log_s)]
    )
    _close(lik.mean(out)[0], (probs * LEVELS).sum(-1))  # E[x] = Σ_k (k/255) P(k)
    torch.manual_seed(0)
    draws = d.sample((20000,))[:, 0]  # (20000, 3) levels k/255
    assert torch.equal(draws * 255, (draws * 255).round())
    freq = (
        torch.stack([torch.bincount((draws[:, i] * 255).round().long(), minlength=256) for i in range(3)])
        / 20000
    )
    assert (freq - probs).abs().max() < 0.015  # binomial s.d. ≤ 0.0036 per bin
    assert bool(d.support.check(draws).all()) and d.support.is_discrete
