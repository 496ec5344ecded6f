"""The skip hierarchy (``hierarchy="skip"``, Tomczak & Welling 2018's two-layer VAE) against
closed forms: model z2 ~ p(z2), z1 ~ p(z1 | z2), x ~ p(x | z1, z2); guide q(z2 | x) q(z1 | x, z2).

Every density is written out by hand, float64, tolerances at each check; log p(x) of a program
with one-dimensional z1 and z2 is integrated on a grid and compared with the estimators. The
chain hierarchy has its own checks in tests/test_programs.py and tests/test_generic_programs.py.
"""

import math

import numpy as np
import pyro
import pytest
import torch
from test_programs import _bernoulli_log_density, _normal_log_density, _traces, assert_joint_densities

from ppl_vae.core.errors import UserError
from ppl_vae.inference import estimators as E
from ppl_vae.inference import importance as I
from ppl_vae.programs.model import VAE
from ppl_vae.programs.nets import JointInputMLP, mlp

SHAPE, D, Z, Z2, K_PSEUDO = (1, 4, 5), 20, 4, 3, 7

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def skip_vae(device="cpu", shape=SHAPE, z_dim=Z, z2_dim=Z2, **kw):
    torch.manual_seed(0)
    return VAE(
        shape,
        z_dim,
        [16, 12],
        activation="gated",
        latent_layers=2,
        hierarchy="skip",
        z2_dim=z2_dim,
        hidden2=[8],
        pseudo_inputs=K_PSEUDO,
        **kw,
    ).to(device)


@pytest.mark.parametrize("activation", ["gated", "relu"])
def test_joint_input_mlp_is_the_mlp_of_the_concatenation(activation):
    """JointInputMLP(a, b) = mlp(cat(a, b)) with W = [W_a W_b]: to 1e-12 for a (N, ·) shared by
    particles b (K, N, ·), the first layer's a-part computed once."""
    torch.manual_seed(1)
    net = JointInputMLP(5, 3, [6, 4, 2], activation)
    ref = mlp([8, 6, 4, 2], activation)
    first = ref[0].linear if activation == "gated" else ref[0]
    with torch.no_grad():
        first.weight.copy_(torch.cat([net.a.weight, net.b.weight], 1))
        first.bias.copy_(net.a.bias)
        for mine, theirs in zip(net.rest.parameters(), ref[1 + (activation != "gated") :].parameters()):
            theirs.copy_(mine)
    a, b = torch.randn(7, 5), torch.randn(3, 7, 3)  # (N, 5), (K, N, 3)
    out = net(a, b)  # (K, N, 2)
    torch.testing.assert_close(out, ref(torch.cat([a.expand(3, 7, 5), b], -1)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="at least one hidden layer"):
        JointInputMLP(5, 3, [2])


def test_skip_joint_densities_are_the_sums_of_their_gaussian_terms(device):
    """log p(x, z1, z2) = log N(z2; 0, I) + log N(z1; μ_θ(z2), σ_θ(z2)²) + log Bern(x; f_θ(z1, z2)) and
    log q(z1, z2 | x) = log N(z2; μ_φ(x), σ_φ(x)²) + log N(z1; μ_φ(x, z2), σ_φ(x, z2)²), written out,
    agree with the traces to 1e-10; the ELBO loss of that draw is their difference."""
    vae = skip_vae(device)
    x = torch.bernoulli(torch.rand(5, D)).to(device)
    pyro.set_rng_seed(5)
    model_tr, guide_tr = _traces(vae, x)
    z1, z2 = guide_tr.nodes["z1"]["value"], guide_tr.nodes["z2"]["value"]
    p1_loc, p1_logvar = vae.layer.net(z2)
    q2_loc, q2_logvar = vae.encoder2(x)
    q1_loc, q1_logvar = vae.encoder(x, z2)
    log_p = (
        _normal_log_density(z2, torch.zeros(Z2, device=device), torch.ones(Z2, device=device))
        + _normal_log_density(z1, p1_loc, torch.exp(0.5 * p1_logvar))
        + _bernoulli_log_density(x, vae.decoder(torch.cat([z1, z2], -1)))
    )  # (N,)
    log_q = _normal_log_density(z2, q2_loc, torch.exp(0.5 * q2_logvar)) + _normal_log_density(
        z1, q1_loc, torch.exp(0.5 * q1_logvar)
    )  # (N,)
    assert_joint_densities(vae, x, model_tr, guide_tr, log_p, log_q, seed=5)
    # encode: q(z1 | x, z2 = E[z2|x]) beside q(z2|x), the code that decode reads
    loc, scale = vae.encode(x)
    torch.testing.assert_close(
        loc, torch.cat([vae.encoder(x, q2_loc)[0], q2_loc], -1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        scale,
        torch.cat([torch.exp(0.5 * vae.encoder(x, q2_loc)[1]), torch.exp(0.5 * q2_logvar)], -1),
        rtol=1e-12,
        atol=1e-12,
    )
    torch.testing.assert_close(vae.reconstruct(x), torch.sigmoid(vae.decoder(loc)), rtol=1e-12, atol=1e-12)


def test_skip_vampprior_components_are_q_z2_at_the_pseudo_inputs_exactly(device):
    """p(z2) = (1/K) Σ_k q(z2 | u_k): the skip guide encodes x straight to z2, so the components are
    the guide's own Gaussians (no z1 in between, unlike the chain's q(z2 | E[z1 | u_k]))."""
    vae = skip_vae(device, prior="vampprior")
    u = vae.prior.pseudo_inputs.clamp(0, 1)  # (K, D)
    loc, logvar = vae.encoder2(u)  # (K, Z2)
    comps = vae.prior().component_distribution  # batch (K,)
    torch.testing.assert_close(comps.mean, loc, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comps.stddev, torch.exp(0.5 * logvar), rtol=1e-12, atol=1e-12)
    z2 = torch.randn(6, Z2, device=device)
    by_hand = torch.logsumexp(_normal_log_density(z2[:, None], loc, torch.exp(0.5 * logvar)), -1) - math.log(
        K_PSEUDO
    )
    torch.testing.assert_close(vae.prior().log_prob(z2), by_hand, rtol=1e-12, atol=1e-12)


def test_skip_sample_draws_z2_then_z1_given_z2_and_decodes_both(device):
    """sample(n, g) = E[x | z1, z2] with z2 = ε₂, z1 = μ_θ(z2) + σ_θ(z2)·ε₁ (ε₂ then ε₁ from g): exact."""
    vae = skip_vae(device)
    g = torch.Generator().manual_seed(4)
    z2 = torch.randn(6, Z2, generator=g).to(device)
    loc, logvar = vae.layer.net(z2)
    z1 = loc + torch.exp(0.5 * logvar) * torch.randn(6, Z, generator=g).to(device)
    torch.testing.assert_close(
        vae.sample(6, torch.Generator().manual_seed(4)),
        torch.sigmoid(vae.decoder(torch.cat([z1, z2], -1))),
        rtol=0,
        atol=0,
    )


def test_skip_log_px_by_quadrature_is_what_the_estimators_find(device):
    """z1, z2 one-dimensional, 4 pixels: log p(x) = log ∬ N(z2; 0, 1) N(z1; μ(z2), σ(z2)²) p(x | z1, z2)
    on a 401² grid over [−12, 12]² (the integrand is smooth and negligible outside: 801² gives the
    same to 1e-4). IWAE_20000 is within 4 SE of it; both KLs are in closed form (the guide draws in the model's order, and
    p(z1 | z2) reads only z2), and that analytic ELBO is the Monte Carlo ELBO within 4 SE."""
    vae = skip_vae(device, shape=(1, 2, 2), z_dim=1, z2_dim=1).eval()
    x = torch.tensor(
        [[1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]], device=device
    )  # (N, 4)
    grid = torch.linspace(-12, 12, 401, device=device)
    step = (grid[1] - grid[0]).item()
    z1, z2 = torch.meshgrid(grid, grid, indexing="ij")  # (G, G) each
    z1, z2 = z1.reshape(-1, 1), z2.reshape(-1, 1)  # (G², 1)
    with torch.no_grad():
        loc, logvar = vae.layer.net(z2)
        log_joint_z = _normal_log_density(
            z2, torch.zeros(1, device=device), torch.ones(1, device=device)
        ) + _normal_log_density(z1, loc, torch.exp(0.5 * logvar))  # (G²,)
        logits = vae.decoder(torch.cat([z1, z2], -1))  # (G², 4)
        log_lik = _bernoulli_log_density(x[:, None], logits)  # (N, G²)
        exact = torch.logsumexp(log_joint_z + log_lik, -1) + 2 * math.log(step)  # (N,)
    est = E.estimate_all(vae.model, vae.guide, x, 20_000, seed=0, analytic_kl=False)
    iwae = est["iwae"]
    assert (iwae.stderr < 0.01).all()
    assert ((iwae.value - exact).abs() <= 4 * iwae.stderr).all(), (iwae.value - exact, iwae.stderr)
    assert I.inspect_program(vae.model, vae.guide, x, {}, True).closed_form == {"z1", "z2"}
    analytic = E.elbo(vae.model, vae.guide, x, 2000, analytic_kl=True, seed=1)
    mc = E.elbo(vae.model, vae.guide, x, 2000, seed=1)
    assert ((analytic.value - mc.value).abs() <= 4 * (analytic.stderr**2 + mc.stderr**2).sqrt()).all()
    assert (exact - mc.value > 4 * mc.stderr).all()  # a real gap: the guide is not the posterior


def test_skip_needs_two_layers_of_mlps():
    for kw in ({"latent_layers": 1}, {"latent_layers": 2, "arch": "conv"}):
        with pytest.raises(
            UserError, match="skip is a two-layer program of MLPs: add --latent-layers 2 and --arch mlp"
        ):
            VAE((1, 28, 28), 4, [8], hierarchy="skip", **kw)
    with pytest.raises(UserError, match="needs at least one --hidden layer"):
        VAE((1, 28, 28), 4, [], latent_layers=2, hierarchy="skip")
    with pytest.raises(UserError, match="--hierarchy must be one of chain, skip"):
        VAE((1, 28, 28), 4, [8], latent_layers=2, hierarchy="ladder")
    assert np.isfinite(skip_vae().sample(2).sum().item())
