"""The IWAE training loss against closed forms, finite differences and Pyro's RenyiELBO, in float64.

Program (sites "z", "x" in plate "data", a batch of N out of ``size`` datapoints): z ~ N(0, I_Z),
x | z ~ N(W z + b, σ² I_D); guide q(z|x) = N(x A + c, diag exp(log_s)²). With ε_ik the guide's
standard-normal noise, z_ik = μ_i + s ⊙ ε_ik and the loss is
−(size/N) Σ_i [logsumexp_k log w_ik − log K], log w = log p(z) + log p(x|z) − log q(z|x).
The exact posterior is N(Σ Wᵀ(x − b)/σ², Σ), Σ = (I + WᵀW/σ²)⁻¹, and
log p(x) = log N(x; b, W Wᵀ + σ² I) (Bishop 2006, §2.3.3).

Every test runs on each ``device`` (conftest): parameters and data are drawn on the CPU from a
seeded generator and moved there, so the programs are the same on every device.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO

from ppl_vae.inference.importance import log_importance_weights
from ppl_vae.inference.objectives import DeviceTrace_ELBO, iwae_loss

N, D, Z, K, SIGMA = 4, 3, 2, 5, 0.7
PARAMS = ("W", "b", "A", "c", "log_s")


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def init_params(device, seed=0):
    """The parameters W, b, A, c, log_s and x (N, D), drawn on the CPU and moved to ``device``."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"W": (D, Z), "b": (D,), "A": (D, Z), "c": (Z,), "log_s": (Z,)}
    for name, shape in shapes.items():
        pyro.param(name, 0.5 * torch.randn(shape, generator=g).to(device))
    return torch.randn(N, D, generator=g).to(device)  # x (N, D)


def data_plate(x, size):
    """The batch x (N, D) as the subsample 0..N−1 of ``size`` datapoints, its indices on x's device."""
    return pyro.plate("data", size or x.shape[0], subsample=torch.arange(x.shape[0], device=x.device), dim=-1)


def model(x, size=None):
    W, b = pyro.param("W"), pyro.param("b")
    with data_plate(x, size):
        z = pyro.sample("z", dist.Normal(x.new_zeros(Z), 1.0).to_event(1))  # (..., N, Z)
        pyro.sample("x", dist.Normal(z @ W.T + b, SIGMA).to_event(1), obs=x)


def guide(x, size=None):
    A, c, log_s = pyro.param("A"), pyro.param("c"), pyro.param("log_s")
    with data_plate(x, size):
        pyro.sample("z", dist.Normal(x @ A + c, log_s.exp()).to_event(1))


def closed_form_loss(x, size, eps, W, b, A, c, log_s):
    """The loss written out in plain torch for fixed noise ``eps (K, N, Z)``."""
    loc, scale = x @ A + c, log_s.exp()  # (N, Z), (Z,)
    z = loc + scale * eps  # (K, N, Z)
    log_w = (
        dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        + dist.Normal(z @ W.T + b, SIGMA).log_prob(x).sum(-1)
        - dist.Normal(loc, scale).log_prob(z).sum(-1)
    )  # (K, N)
    return -(torch.logsumexp(log_w, 0) - math.log(eps.shape[0])).sum() * size / x.shape[0]


def seeded_loss(x, size, seed=7):
    pyro.set_rng_seed(seed)
    return iwae_loss(model, guide, x, K, size=size)


def test_iwae_loss_value_and_gradient_match_closed_form_and_finite_differences(device):
    """K = 5 particles, fixed noise (the same seed): the loss equals the plain-torch formula to
    1e-10; its autograd gradient equals that formula's gradient to 1e-10 and central finite
    differences of the loss itself (h = 1e-5) to 1e-6 · (1 + |g|)."""
    x, size = init_params(device), 40
    loss = seeded_loss(x, size)
    params = [pyro.param(n).unconstrained() for n in PARAMS]
    grads = torch.autograd.grad(loss, params)
    pyro.set_rng_seed(7)
    eps = torch.randn(
        K, N, Z, device=device
    )  # the noise the guide's Normal.rsample draws first after the seed
    leaves = [p.detach().clone().requires_grad_() for p in params]
    ref = closed_form_loss(x, size, eps, *leaves)
    torch.testing.assert_close(loss, ref, atol=1e-10, rtol=0)
    for g, r in zip(grads, torch.autograd.grad(ref, leaves)):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=0)
    h = 1e-5
    for p, g in zip(params, grads):
        fd = torch.empty_like(g)
        for i in range(p.numel()):
            with torch.no_grad():
                p.view(-1)[i] += h
                up = seeded_loss(x, size)
                p.view(-1)[i] -= 2 * h
                down = seeded_loss(x, size)
                p.view(-1)[i] += h
            fd.view(-1)[i] = (up - down) / (2 * h)
        assert ((g - fd).abs() <= 1e-6 * (1 + fd.abs())).all(), (g, fd)
    assert grads[0].abs().max() > 1e-3  # a gradient that is really there


def renyi_and_iwae(x, size):
    """Pyro's RenyiELBO(α = 0) loss and gradients, and ours, from the same draws."""
    params = [pyro.param(n).unconstrained() for n in PARAMS]
    pyro.set_rng_seed(3)
    renyi = RenyiELBO(alpha=0, num_particles=K, vectorize_particles=True, max_plate_nesting=1)
    renyi_loss = renyi.loss_and_grads(model, guide, x, size=size)
    renyi_grads = [p.grad.clone() for p in params]
    pyro.set_rng_seed(3)
    ours = iwae_loss(model, guide, x, K, size=size)
    our_grads = torch.autograd.grad(ours, params)
    pyro.set_rng_seed(3)
    with torch.no_grad():
        log_w = log_importance_weights(model, guide, x, K, size=size)  # (K, N), unscaled
    for p in params:
        p.grad = None
    return renyi_loss, renyi_grads, ours.item(), our_grads, log_w


def test_renyi_elbo_scales_inside_the_log_sum_exp_under_subsampling(device):
    """Our loss is −s Σ_i [LSE_k log w_ik − log K] with s = size/N. Renyi's is −Σ_i [LSE_k(s log w_ik)
    − log K]: equal when the batch is the dataset (s = 1), different by exactly that formula
    otherwise, gradients included (to 1e-8 relative)."""
    x = init_params(device)
    renyi, renyi_grads, ours, our_grads, log_w = renyi_and_iwae(x, size=N)  # s = 1
    assert ours == pytest.approx(renyi, rel=1e-10)
    for a, b in zip(renyi_grads, our_grads):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
    size = 10 * N  # s = 10: the batch is a tenth of the data
    renyi, renyi_grads, ours, our_grads, log_w = renyi_and_iwae(x, size=size)
    s = size / N
    assert ours == pytest.approx(-s * (torch.logsumexp(log_w, 0) - math.log(K)).sum().item(), rel=1e-10)
    assert renyi == pytest.approx(-(torch.logsumexp(s * log_w, 0) - math.log(K)).sum().item(), rel=1e-10)
    assert abs(renyi - ours) > 1.0  # nats: not a rounding difference
    assert max((a - b).abs().max().item() for a, b in zip(renyi_grads, our_grads)) > 1e-2


def test_iwae_loss_scaling_and_k1_matches_trace_elbo(device):
    x, size = init_params(device), 60
    W, b = pyro.param("W").detach(), pyro.param("b").detach()
    eye_z = torch.eye(Z, device=device)
    cov = torch.linalg.inv(eye_z + W.T @ W / SIGMA**2)  # the exact posterior's Σ
    log_px = dist.MultivariateNormal(b, W @ W.T + SIGMA**2 * torch.eye(D, device=device)).log_prob(x)  # (N,)

    def exact_guide(x, size=None):
        with data_plate(x, size):
            mu = (x - b) @ W @ cov / SIGMA**2  # (N, Z)
            pyro.sample("z", dist.MultivariateNormal(mu, scale_tril=torch.linalg.cholesky(cov)))

    def mvn_model(x, size=None):  # the model above with p(z) as an MVN, to match the guide's event shape
        with data_plate(x, size):
            z = pyro.sample("z", dist.MultivariateNormal(x.new_zeros(Z), eye_z))
            pyro.sample("x", dist.Normal(z @ W.T + b, SIGMA).to_event(1), obs=x)

    # exact posterior: every log w = log p(x), so −IWAE_K = −log p(x), summed and scaled by size / N
    loss = iwae_loss(mvn_model, exact_guide, x, 8, size=size)
    torch.testing.assert_close(loss, -log_px.sum() * size / N, atol=1e-8, rtol=0)
    # K = 1 under the same seed is Trace_ELBO's loss (the plate's size / N scaling included)
    pyro.set_rng_seed(3)
    a = iwae_loss(model, guide, x, 1, size=size)
    pyro.set_rng_seed(3)
    b = DeviceTrace_ELBO(num_particles=1, max_plate_nesting=1).differentiable_loss(model, guide, x, size=size)
    torch.testing.assert_close(a, b, atol=1e-8, rtol=1e-10)


class _ScaleZ(pyro.poutine.messenger.Messenger):
    """Scales the terms of site "z" alone by β (as ppl_vae's programs do for every latent site):
    run under it, model and guide give Pyro's β-ELBO."""

    def __init__(self, beta):
        super().__init__()
        self.beta = beta

    def _process_message(self, msg):
        if msg["name"] == "z":
            msg["scale"] = self.beta * msg["scale"]


def _beta_scaled(fn, beta):
    def scaled(x, size=None):
        with _ScaleZ(beta):
            return fn(x, size)

    return scaled


def test_iwae_beta_is_tempered_prior_ratio_and_k1_is_the_beta_elbo(device):
    """KL warm-up for IWAE: log w^β = log p(x|z) + β (log p(z) − log q(z|x)). With K = 1 and one
    seed it is Pyro's Trace_ELBO of the program whose latent site is scaled by β (to float64
    rounding); its mean over 40,000 draws is the closed-form β-ELBO within 4 standard errors;
    a tensor β gives the float's value; β = 1 is the plain loss, bit for bit."""
    x = init_params(device)
    beta = 0.3
    pyro.set_rng_seed(5)
    a = iwae_loss(model, guide, x, 1, size=20, beta=beta)
    pyro.set_rng_seed(5)
    b = DeviceTrace_ELBO(num_particles=1, max_plate_nesting=1).differentiable_loss(
        _beta_scaled(model, beta), _beta_scaled(guide, beta), x, size=20
    )
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-12)
    pyro.set_rng_seed(5)
    torch.testing.assert_close(
        iwae_loss(model, guide, x, 1, size=20, beta=torch.tensor(beta, device=x.device)),
        a,
        atol=1e-12,
        rtol=0,
    )
    for k in (1, K):
        pyro.set_rng_seed(1)
        plain = iwae_loss(model, guide, x, k)
        pyro.set_rng_seed(1)
        torch.testing.assert_close(iwae_loss(model, guide, x, k, beta=1.0), plain, atol=0, rtol=0)

    # closed form: q = N(μ, diag s²), μ = x A + c; E_q log p(x|z) = Σ_d −½ log 2πσ² − ((x − Wμ − b)_d²
    # + (W diag(s²) Wᵀ)_dd) / 2σ²; E_q log p(z) − E_q log q = −½ (|μ|² + Σ s²) + Σ log s + Z/2
    W, bias, A, c, s = (
        pyro.param("W"),
        pyro.param("b"),
        pyro.param("A"),
        pyro.param("c"),
        pyro.param("log_s").exp(),
    )
    mu = x @ A + c  # (N, Z)
    recon = -0.5 * math.log(2 * math.pi * SIGMA**2) * D - (
        ((x - mu @ W.T - bias) ** 2).sum(-1) + (W**2 * s**2).sum()
    ) / (2 * SIGMA**2)  # (N,)
    neg_kl = -0.5 * ((mu**2).sum(-1) + (s**2).sum()) + s.log().sum() + Z / 2  # (N,)
    exact = (recon + beta * neg_kl).sum()  # the β-ELBO of the batch
    reps = 2000  # the batch repeated: 20 chunks of 2000 × N draws, one per datapoint copy
    chunks = torch.stack(
        [-iwae_loss(model, guide, x.repeat(reps, 1), 1, beta=beta).detach() / reps for _ in range(20)]
    )
    se = chunks.std() / math.sqrt(len(chunks))
    assert abs(chunks.mean() - exact) < 4 * se, (chunks.mean().item(), exact.item(), se.item())
