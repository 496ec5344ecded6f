"""The program parts: priors, posterior families, two latent layers, class conditioning.

Every combination is traced for its sites, shapes, event dims and scales; the densities are
checked against closed forms written out by hand (float64, tolerances stated at each check).
The tests of a program's tensors run on each ``device`` (conftest): the program is moved there
and its inputs are drawn on the CPU and moved to it (``_args``), so they are the same everywhere.
"""

import itertools
import math
from contextlib import nullcontext

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch.distributions import kl_divergence

from ppl_vae.core.errors import UserError
from ppl_vae.inference.objectives import DeviceTrace_ELBO
from ppl_vae.programs.conditional import ConditionalVAE, make_vae
from ppl_vae.programs.model import VAE
from ppl_vae.programs.priors import draw

SHAPE, D = (1, 4, 5), 20
Z, Z2, C, K_PSEUDO, M = 4, 3, 3, 7, 5
LOG_2PI = math.log(2 * math.pi)


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (conftest.one_thread)


def _vae(prior="normal", posterior="diagonal", layers=1, classes=0, device="cpu", **kw):
    """A small program; ``layers="skip"``: two layers, the skip hierarchy (else the chain)."""
    if layers == "skip":
        layers, kw = 2, {"hierarchy": "skip", **kw}
    return make_vae(
        SHAPE,
        Z,
        [16],
        prior=prior,
        posterior=posterior,
        latent_layers=layers,
        z2_dim=Z2,
        hidden2=[8],
        pseudo_inputs=K_PSEUDO,
        mixture_components=M,
        num_classes=classes,
        **kw,
    ).to(device)


def _args(vae, n=6):
    """``(x,)`` or ``(x, y)`` on the program's device: x (n, D) binary, y (n,) class indices."""
    x = torch.bernoulli(torch.rand(n, D)).to(vae.device)
    return (x, torch.arange(n, device=vae.device) % C) if vae.conditional else (x,)


def _traces(vae, *args, **kw):
    guide_tr = poutine.trace(vae.guide).get_trace(*args, **kw)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(*args, **kw)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    return model_tr, guide_tr


def _sites(trace):
    return [name for name, site in trace.nodes.items() if site["type"] == "sample"]


def _normal_log_density(z, loc, scale):
    """Σ_d log N(z_d; loc_d, scale_d²), written out."""
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)


def _bernoulli_log_density(x, logits):
    """Σ_d x_d l_d − log(1 + e^{l_d}), written out."""
    return (x * logits - torch.log1p(torch.exp(logits))).sum(-1)


def assert_joint_densities(vae, x, model_tr, guide_tr, log_p, log_q, seed):
    """The traces' log p(x, z) and log q(z | x) are ``log_p``, ``log_q`` (N,) written out by hand, to
    1e-10, and the ELBO loss of the same draw (``seed``) is −Σ (log p − log q)."""
    torch.testing.assert_close(model_tr.log_prob_sum(), log_p.sum(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(guide_tr.log_prob_sum(), log_q.sum(), rtol=1e-10, atol=1e-10)
    pyro.set_rng_seed(seed)
    loss = DeviceTrace_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x)
    torch.testing.assert_close(loss, -(log_p - log_q).sum(), rtol=1e-10, atol=1e-10)


# --------------------------------------------------------------------------- every combination

PRIOR_TYPES = {
    "normal": torch.distributions.Independent,
    "mog": torch.distributions.MixtureSameFamily,
    "vampprior": torch.distributions.MixtureSameFamily,
}
GUIDE_TYPES = {
    "diagonal": torch.distributions.Independent,
    "full-rank": torch.distributions.MultivariateNormal,
    "iaf": torch.distributions.TransformedDistribution,
}


@pytest.mark.parametrize(
    "prior,posterior,layers,classes",
    list(itertools.product(PRIOR_TYPES, GUIDE_TYPES, (1, 2, "skip"), (0, C))),
)
def test_every_program_has_its_sites_shapes_scales_and_gradients(prior, posterior, layers, classes, device):
    vae = _vae(prior, posterior, layers, classes, device)
    n, k, size, beta = 6, 4, 30, 0.5
    args = _args(vae, n)
    latents = ("z",) if layers == 1 else ("z1", "z2")  # bottom (decoded) first
    dims = {"z": Z, "z1": Z, "z2": Z2}
    assert vae.latent_sites == latents
    drawn = ("z2", "z1") if layers == "skip" else latents  # the guide's order: the chain draws z1 first
    for particles in (None, k):
        with pyro.plate("particles", k, dim=-2) if particles else nullcontext():
            model_tr, guide_tr = _traces(vae, *args, size=size, beta=beta)
        batch = (k, n) if particles else (n,)
        assert _sites(guide_tr) == ["data", *drawn]
        assert _sites(model_tr) == ["data", *reversed(latents), "x"]  # ancestral order: top layer first
        for name in latents:
            for tr in (model_tr, guide_tr):
                site = tr.nodes[name]
                assert site["value"].shape == (*batch, dims[name]) and site["fn"].event_shape == (dims[name],)
                assert site["log_prob"].shape == batch and site["scale"] == pytest.approx(size / n * beta)
                assert [f.name for f in site["cond_indep_stack"] if f.name == "data"] == ["data"]
            assert guide_tr.nodes[name]["fn"].has_rsample
        assert model_tr.nodes["x"]["log_prob"].shape == batch
        assert model_tr.nodes["x"]["scale"] == pytest.approx(size / n)
    top = model_tr.nodes[latents[-1]]["fn"]
    prior_type = (
        torch.distributions.MultivariateNormal
        if (prior, posterior) == ("normal", "full-rank")
        else PRIOR_TYPES[prior]
    )
    assert isinstance(top, prior_type) and all(
        isinstance(guide_tr.nodes[s]["fn"], GUIDE_TYPES[posterior]) for s in latents
    )
    # one torch optimizer over vae.parameters() trains every part: each parameter is reached by the loss
    DeviceTrace_ELBO(max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, *args, size=size
    ).backward()
    missing = [name for name, p in vae.named_parameters() if p.grad is None]
    assert not missing
    # the plain helpers work for every program
    label = {"label": 2} if classes else {}
    s = vae.sample(5, torch.Generator().manual_seed(0), **label)
    assert s.shape == (5, D) and torch.equal(s, vae.sample(5, torch.Generator().manual_seed(0), **label))
    codes = Z + Z2 if layers == "skip" else Z  # the skip program decodes cat(z1, z2)
    assert vae.reconstruct(*args).shape == (n, D) and vae.encode(*args)[1].shape == (n, codes)


def test_unknown_parts_are_refused_with_the_choices():
    with pytest.raises(UserError, match="normal, mog, vampprior"):
        _vae(prior="flow")
    with pytest.raises(UserError, match="diagonal, full-rank, iaf"):
        _vae(posterior="maf")
    with pytest.raises(UserError, match="1 or 2"):
        _vae(layers=3)
    with pytest.raises(ValueError, match="ConditionalVAE"):
        VAE(SHAPE, Z, num_classes=3)


def test_plain_vae_keeps_its_parameters_and_state_dict_keys():
    """Checkpoints of the plain VAE load unchanged: same keys, same shapes (784-400-20 layout)."""
    vae = VAE((1, 28, 28))
    shapes = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert shapes == {
        "encoder.body.0.weight": (400, 784),
        "encoder.body.0.bias": (400,),
        "encoder.body.2.weight": (40, 400),
        "encoder.body.2.bias": (40,),
        "decoder.body.0.weight": (400, 20),
        "decoder.body.0.bias": (400,),
        "decoder.body.2.weight": (784, 400),
        "decoder.body.2.bias": (784,),
        "prior_loc": (20,),
        "prior_scale": (20,),
    }


# --------------------------------------------------------------------------- priors


@pytest.mark.parametrize("layers,classes", [(1, 0), (1, C), (2, 0)])
def test_vampprior_is_the_mixture_of_the_encoders_gaussians_at_the_pseudo_inputs(layers, classes, device):
    """p(z) = (1/K) Σ_k N(z; μ_φ(u_k), σ_φ(u_k)²), u = hardtanh(pseudo_inputs) ∈ [0, 1]; with labels
    u_k carries the one-hot of k mod C; with two layers the components are q(z2 | z1 = μ_φ(u_k)).
    Means, scales and the log-density (written out) agree to 1e-12 (float64)."""
    torch.set_default_dtype(torch.float64)
    vae = _vae("vampprior", layers=layers, classes=classes, device=device)
    with torch.no_grad():
        vae.prior.pseudo_inputs.normal_(0.5, 1.0)  # many outside [0, 1]: the clamp must act
    args = _args(vae, 5)
    model_tr, _ = _traces(vae, *args)
    top = model_tr.nodes[vae.top_site]
    p = top["fn"]
    assert p.mixture_distribution.probs.shape == (5, K_PSEUDO)
    torch.testing.assert_close(
        p.mixture_distribution.probs, torch.full((5, K_PSEUDO), 1 / K_PSEUDO, device=device)
    )
    u = vae.prior.pseudo_inputs.clamp(0, 1)  # (K, D)
    if classes:
        u = torch.cat([u, F.one_hot(torch.arange(K_PSEUDO, device=device) % C, C).double()], -1)  # (K, D + C)
    loc, logvar = vae.encoder(u)  # (K, Z)
    if layers == 2:
        loc, logvar = vae.encoder2(loc)  # (K, Z2)
    scale = torch.exp(0.5 * logvar)
    comps = p.component_distribution  # batch (N, K)
    torch.testing.assert_close(comps.mean, loc.expand_as(comps.mean), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(comps.stddev, scale.expand_as(comps.stddev), rtol=1e-12, atol=1e-12)
    z = top["value"]  # (N, d)
    by_hand = torch.logsumexp(_normal_log_density(z[:, None], loc, scale), -1) - math.log(K_PSEUDO)  # (N,)
    torch.testing.assert_close(top["log_prob"], by_hand, rtol=1e-12, atol=1e-12)
    # the pseudo-inputs are learned through log p(z)
    top["log_prob"].sum().backward()
    assert vae.prior.pseudo_inputs.grad.abs().sum() > 0


def test_vampprior_pseudo_inputs_start_at_the_papers_setting():
    """N(0.05, 0.01²) per pixel (Tomczak & Welling's MNIST code): mean and sd of 500 × 20 draws
    within 5 standard errors; all inside [0, 1], so the clamp passes them through."""
    u = make_vae(SHAPE, Z, [16], prior="vampprior").prior.pseudo_inputs  # the default K = 500
    assert u.shape == (500, D)
    se = 0.01 / math.sqrt(u.numel())
    assert abs(u.mean().item() - 0.05) < 5 * se and abs(u.std().item() - 0.01) < 5 * 0.01 / math.sqrt(
        2 * u.numel()
    )
    assert ((u > 0) & (u < 1)).all()


def test_mixture_prior_log_density_is_the_gaussian_mixture(device):
    """log p(z) = log Σ_m π_m N(z; μ_m, diag σ_m²) written out, to 1e-12 (float64)."""
    torch.set_default_dtype(torch.float64)
    vae = _vae("mog", device=device)
    with torch.no_grad():
        for q in vae.prior.parameters():
            q.normal_()
    model_tr, _ = _traces(vae, *_args(vae, 5))
    top = model_tr.nodes["z"]
    pi = torch.softmax(vae.prior.logits, 0)  # (M,)
    comp = _normal_log_density(top["value"][:, None], vae.prior.locs, vae.prior.log_scales.exp())  # (N, M)
    by_hand = torch.log((pi * comp.exp()).sum(-1))  # (N,)
    torch.testing.assert_close(top["log_prob"], by_hand, rtol=1e-12, atol=1e-12)


def test_draws_from_a_mixture_follow_its_weights_and_components(device):
    """``draw`` from a two-component mixture, π = (0.8, 0.2), components far apart, with a generator
    on the prior's device: the share of each component and each component's mean and sd match
    within 5 standard errors (n = 4000), and the same generator state gives the same draws."""
    torch.set_default_dtype(torch.float64)
    mog = _vae("mog", device=device).prior
    with torch.no_grad():
        mog.logits.copy_(torch.log(torch.tensor([0.8, 0.2, 1e-30, 1e-30, 1e-30])))
        mog.locs.zero_()
        mog.locs[0] = -10.0
        mog.locs[1] = 10.0
        mog.log_scales.zero_()
        mog.log_scales[1] = math.log(2.0)
    n = 4000
    z = draw(mog(), torch.Generator(device=device).manual_seed(0), n)  # (n, Z)
    first = z[:, 0] < 0
    assert abs(first.double().mean().item() - 0.8) < 5 * math.sqrt(0.8 * 0.2 / n)
    for part, loc, sd in ((z[first], -10.0, 1.0), (z[~first], 10.0, 2.0)):
        assert (part.mean(0) - loc).abs().max() < 5 * sd / math.sqrt(len(part))
        assert (part.std(0) - sd).abs().max() < 5 * sd / math.sqrt(2 * len(part))
    torch.testing.assert_close(
        draw(mog(), torch.Generator(device=device).manual_seed(0), n), z, rtol=0, atol=0
    )


# --------------------------------------------------------------------------- posterior families


def _copy_shared(src, dst):
    """dst's parameters take src's values on their common leading rows (the encoders' (μ, log σ²)
    outputs; the IAF's extra context rows and flows keep their own)."""
    dst_params = dict(dst.named_parameters())
    with torch.no_grad():
        for name, p in src.named_parameters():
            dst_params[name][tuple(slice(0, s) for s in p.shape)] = p


def _draws_and_log_weights(vae, x, seed=7, particles=3):
    """Latent draws, their log q, and log w = log p(x, z) − log q(z|x) ``(particles, N)`` from ``seed``."""
    pyro.set_rng_seed(seed)
    with pyro.plate("particles", particles, dim=-2):
        model_tr, guide_tr = _traces(vae, x)
    log_w = sum(model_tr.nodes[s]["log_prob"] for s in (*vae.latent_sites, "x")) - sum(
        guide_tr.nodes[s]["log_prob"] for s in vae.latent_sites
    )
    return (
        [guide_tr.nodes[s]["value"] for s in vae.latent_sites],
        [guide_tr.nodes[s]["log_prob"] for s in vae.latent_sites],
        log_w,
    )


@pytest.mark.parametrize("layers", [1, 2])
def test_identity_iaf_gives_the_diagonal_guides_draws_and_log_weights(layers, device):
    """With its autoregressive output layers at zero every IAF step is the identity: from the same
    seed the IAF guide draws the same z and scores the same log q as its base N(μ, σ²) without the
    flow, bit for bit, so the log weights are identical. Against a separately built diagonal VAE
    with the same weights they agree to 1e-12 (its encoder's last matmul has fewer rows, which
    changes the rounding of μ by ~1e-17)."""
    torch.set_default_dtype(torch.float64)
    diag, iaf = (
        _vae("normal", "diagonal", layers, device=device),
        _vae("normal", "iaf", layers, device=device),
    )
    _copy_shared(diag, iaf)
    x = _args(diag, 5)[0]
    with_flow = _draws_and_log_weights(iaf, x)
    flows = [p.transforms for p in (iaf.posterior, iaf.posterior2) if p is not None]
    for p in (iaf.posterior, iaf.posterior2):
        if p is not None:
            p.transforms = torch.nn.ModuleList()  # the base Gaussian alone
    base = _draws_and_log_weights(iaf, x)
    for p, t in zip((iaf.posterior, iaf.posterior2), flows):
        p.transforms = t
    other = _draws_and_log_weights(diag, x)
    for a, b, c in zip(with_flow[0] + with_flow[1], base[0] + base[1], other[0] + other[1]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)
    assert torch.equal(with_flow[2], base[2]) and with_flow[2].shape == (3, 5)
    torch.testing.assert_close(with_flow[2], other[2], rtol=1e-12, atol=1e-12)


def test_iaf_log_density_is_base_minus_log_jacobian_and_trains_with_torch(device):
    """Away from the identity, log q(z|x) = log N(z₀; μ, σ²) − log |det ∂z/∂z₀| with the Jacobian
    of the whole flow taken by autograd, per datapoint (1e-10, float64). The transforms are in
    ``vae.parameters()``: one Adam step over them moves the flow off the identity."""
    torch.set_default_dtype(torch.float64)
    vae = _vae("normal", "iaf", device=device)
    flow = vae.posterior
    assert {id(p) for p in flow.parameters()} <= {id(p) for p in vae.parameters()}
    assert len(flow.transforms) == 2 and torch.equal(
        flow.transforms[1].nn.permutation, torch.arange(Z, device=device).flip(0)
    )
    opt = torch.optim.Adam(vae.parameters(), lr=0.1)
    x = _args(vae, 4)[0]
    DeviceTrace_ELBO(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x).backward()
    opt.step()
    assert all(t.nn.layers[-1].weight.abs().sum() > 0 for t in flow.transforms)
    with torch.no_grad():  # and well away from it
        for t in flow.transforms:
            t.nn.layers[-1].weight.normal_(0, 0.3)
    _, guide_tr = _traces(vae, x)
    z_loc, z_logvar, h = vae.encoder(x)
    site = guide_tr.nodes["z"]
    for i in range(x.shape[0]):
        q = flow(z_loc[i : i + 1], z_logvar[i : i + 1], h[i : i + 1])

        def f(z0):
            for t in q.transforms:
                z0 = t._call(z0)  # the uncached forward map
            return z0

        z0 = q.transforms[0].inv(q.transforms[1].inv(site["value"][i : i + 1]))  # (1, Z)
        jac = torch.autograd.functional.jacobian(lambda v: f(v[None])[0], z0[0])  # (Z, Z)
        base = _normal_log_density(z0[0], z_loc[i], torch.exp(0.5 * z_logvar[i]))
        torch.testing.assert_close(
            site["log_prob"][i], base - torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10
        )
        torch.testing.assert_close(f(z0), site["value"][i : i + 1], rtol=1e-10, atol=1e-10)


def test_full_rank_kl_to_the_standard_normal_is_the_mvn_formula(device):
    """KL(N(μ, Σ) ‖ N(0, I)) = ½ (tr Σ + μᵀμ − d − log det Σ), Σ = L Lᵀ, to 1e-10 (float64); L has
    σ = exp(½ log σ²) on its diagonal and the encoder's extra outputs below it, row by row."""
    torch.set_default_dtype(torch.float64)
    vae = _vae("normal", "full-rank", device=device)
    with torch.no_grad():  # off-diagonal outputs start at zero: make L a full lower triangle
        last = vae.encoder.body[-1]
        last.weight[2 * Z :].normal_(0, 0.5)
        last.bias[2 * Z :].normal_(0, 0.5)
    x = _args(vae, 5)[0]
    model_tr, guide_tr = _traces(vae, x)
    q, p = guide_tr.nodes["z"]["fn"], model_tr.nodes["z"]["fn"]
    mu, logvar, lower = vae.encoder(x)
    rows, cols = torch.tril_indices(Z, Z, -1, device=device)
    L = torch.diag_embed(torch.exp(0.5 * logvar))  # (N, Z, Z)
    L[:, rows, cols] = lower
    torch.testing.assert_close(q.scale_tril, L, rtol=0, atol=0)
    sigma = L @ L.transpose(-1, -2)  # (N, Z, Z)
    formula = 0.5 * (sigma.diagonal(dim1=-2, dim2=-1).sum(-1) + (mu**2).sum(-1) - Z - torch.logdet(sigma))
    torch.testing.assert_close(kl_divergence(q, p), formula, rtol=1e-10, atol=1e-10)
    assert (lower.abs() > 1e-3).any()


def test_untrained_full_rank_guide_is_the_diagonal_guide(device):
    """Zero off-diagonal outputs at initialisation: same draws and log q as the diagonal guide with
    the same encoder (1e-12; the MVN scores through a triangular solve, so not bit for bit)."""
    torch.set_default_dtype(torch.float64)
    diag, full = _vae("normal", "diagonal", device=device), _vae("normal", "full-rank", device=device)
    _copy_shared(diag, full)
    x = _args(diag, 5)[0]
    sites = []
    for vae in (diag, full):
        pyro.set_rng_seed(3)
        sites.append(_traces(vae, x)[1].nodes["z"])
    torch.testing.assert_close(sites[0]["value"], sites[1]["value"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sites[0]["log_prob"], sites[1]["log_prob"], rtol=1e-12, atol=1e-12)


def test_full_rank_scale_tril_is_torchs_row_by_row_layout(device):
    """L from integer indices (capturable in a CUDA graph) equals torch's own
    ``vec_to_tril_matrix(lower, diag=-1)`` plus the diagonal σ, and each entry's gradient is 1."""
    from torch.distributions.utils import vec_to_tril_matrix

    from ppl_vae.programs.guides import FullRankGaussian

    lower = torch.randn(3, 7, 10, device=device, requires_grad=True)  # [S, N, d(d−1)/2], d = 5
    logvar = torch.randn(3, 7, 5, device=device)  # [S, N, d]
    L = FullRankGaussian(5).scale_tril(logvar, lower)  # [S, N, d, d]
    torch.testing.assert_close(
        L, vec_to_tril_matrix(lower, diag=-1) + torch.diag_embed(torch.exp(0.5 * logvar)), rtol=0, atol=0
    )
    L.sum().backward()
    assert torch.equal(lower.grad, torch.ones_like(lower))


# --------------------------------------------------------------------------- two latent layers


def test_two_layer_joint_densities_are_the_sums_of_their_gaussian_terms(device):
    """log p(x, z1, z2) = log N(z2; 0, I) + log N(z1; μ_θ(z2), σ_θ(z2)²) + log Bern(x; decoder(z1)) and
    log q(z1, z2 | x) = log N(z1; μ_φ(x), σ_φ(x)²) + log N(z2; μ_φ(z1), σ_φ(z1)²), each written out,
    agree with the traces to 1e-10 (float64); the ELBO loss of that draw is their difference."""
    torch.set_default_dtype(torch.float64)
    vae = _vae(layers=2, device=device)
    x = _args(vae, 5)[0]
    pyro.set_rng_seed(5)
    model_tr, guide_tr = _traces(vae, x)
    z1, z2 = guide_tr.nodes["z1"]["value"], guide_tr.nodes["z2"]["value"]
    torch.testing.assert_close(model_tr.nodes["z1"]["value"], z1, rtol=0, atol=0)
    prior_loc, prior_logvar = vae.layer.net(z2)
    q1_loc, q1_logvar = vae.encoder(x)
    q2_loc, q2_logvar = vae.encoder2(z1)
    log_p = (
        _normal_log_density(z2, torch.zeros(Z2, device=device), torch.ones(Z2, device=device))
        + _normal_log_density(z1, prior_loc, torch.exp(0.5 * prior_logvar))
        + _bernoulli_log_density(x, vae.decoder(z1))
    )  # (N,)
    log_q = _normal_log_density(z1, q1_loc, torch.exp(0.5 * q1_logvar)) + _normal_log_density(
        z2, q2_loc, torch.exp(0.5 * q2_logvar)
    )  # (N,)
    assert_joint_densities(vae, x, model_tr, guide_tr, log_p, log_q, seed=5)


def test_two_layer_sample_draws_z2_from_the_prior_then_z1_given_z2(device):
    """sample(n, g) = E[x | z1] with z2 = ε₂, z1 = μ_θ(z2) + σ_θ(z2)·ε₁, ε₂ then ε₁ drawn from g: exact.
    g is a CPU generator: its numbers are drawn on the CPU and moved to the program's device."""
    vae = _vae(layers=2, device=device)
    n = 6
    g = torch.Generator().manual_seed(4)
    z2 = torch.randn(n, Z2, generator=g).to(device)
    loc, logvar = vae.layer.net(z2)
    z1 = loc + torch.exp(0.5 * logvar) * torch.randn(n, Z, generator=g).to(device)
    torch.testing.assert_close(
        vae.sample(n, torch.Generator().manual_seed(4)), torch.sigmoid(vae.decoder(z1)), rtol=0, atol=0
    )


# --------------------------------------------------------------------------- conditioning


def test_conditional_decoder_reads_the_label(device):
    """E[x | z, y] = σ(decoder(cat(z, onehot(y)))) exactly, and changing y changes it."""
    vae = _vae(classes=C, device=device)
    z = torch.randn(5, Z).to(device)
    for c in range(C):
        y = torch.full((5,), c, device=device)
        torch.testing.assert_close(
            vae.decode(z, y),
            torch.sigmoid(vae.decoder(torch.cat([z, F.one_hot(y, C).float()], -1))),
            rtol=0,
            atol=0,
        )
    y0, y1 = torch.zeros(5, dtype=torch.long, device=device), torch.ones(5, dtype=torch.long, device=device)
    assert (vae.decode(z, y0) - vae.decode(z, y1)).abs().max() > 1e-4


def test_conditional_sample_of_a_label_is_deterministic_given_the_generator(device):
    """sample(n, g, label=3) = E[x | z, y = 3], z = randn(n, Z, generator=g): the same generator state
    gives the same images (exact); another label gives other images from the same z."""
    vae = ConditionalVAE(SHAPE, num_classes=5, z_dim=Z, hidden=[16]).to(device)
    s3 = vae.sample(8, torch.Generator().manual_seed(2), label=3)
    z = torch.randn(8, Z, generator=torch.Generator().manual_seed(2)).to(device)
    torch.testing.assert_close(s3, vae.decode(z, torch.full((8,), 3, device=device)), rtol=0, atol=0)
    torch.testing.assert_close(vae.sample(8, torch.Generator().manual_seed(2), label=3), s3, rtol=0, atol=0)
    assert not torch.equal(s3, vae.sample(8, torch.Generator().manual_seed(2), label=4))
    cycle = vae.sample(10, torch.Generator().manual_seed(2))  # no label: classes 0..4 in turn
    z = torch.randn(10, Z, generator=torch.Generator().manual_seed(2)).to(device)
    torch.testing.assert_close(cycle, vae.decode(z, torch.arange(10, device=device) % 5), rtol=0, atol=0)


def test_conditional_program_takes_indices_or_one_hot_labels_and_refuses_misuse(device):
    """model(x, y)/guide(x, y) with class indices and with one-hot rows: identical traces (same seed)."""
    vae = _vae(classes=C, device=device)
    x, y = _args(vae, 6)
    logs = []
    for labels in (y, F.one_hot(y, C).float()):
        pyro.set_rng_seed(1)
        model_tr, guide_tr = _traces(vae, x, labels)
        logs.append(model_tr.log_prob_sum() - guide_tr.log_prob_sum())
    assert torch.equal(logs[0], logs[1])
    with pytest.raises(ValueError, match="needs class labels"):
        vae.decode(torch.zeros(2, Z, device=device))
    with pytest.raises(ValueError, match="label must be in 0..2"):
        vae.sample(2, label=3)
    with pytest.raises(ValueError, match="one-hot labels must have shape"):
        vae.model(x, torch.zeros(6, C + 1, device=device))
    with pytest.raises(ValueError, match="conditional VAE"):
        _vae().sample(2, label=1)


@pytest.mark.parametrize("arch,shape", [("mlp", SHAPE), ("conv", (1, 8, 8)), ("broadcast", (1, 5, 6))])
def test_every_architecture_reads_the_label_in_encoder_and_decoder(arch, shape, device):
    """q(z | x, y) and p(x | z, y): with x and z fixed, another label moves μ_φ and E[x | z, y]."""
    vae = ConditionalVAE(shape, num_classes=C, z_dim=Z, hidden=[16], arch=arch).to(device)
    n, d = 4, math.prod(shape)
    x, z = torch.bernoulli(torch.rand(n, d)).to(device), torch.randn(n, Z).to(device)
    y0, y1 = torch.zeros(n, dtype=torch.long, device=device), torch.ones(n, dtype=torch.long, device=device)
    assert (vae.encode(x, y0)[0] - vae.encode(x, y1)[0]).abs().max() > 1e-5
    assert (vae.decode(z, y0) - vae.decode(z, y1)).abs().max() > 1e-5
    model_tr, guide_tr = _traces(vae, x, y0)
    assert model_tr.nodes["x"]["log_prob"].shape == (n,) and guide_tr.nodes["z"]["value"].shape == (n, Z)


def test_an_iaf_guide_is_weighed_on_the_trace_that_drew_it(device):
    """Evaluation weighs an IAF guide's draws on the guide trace that drew them, where the flow
    cached each step's (z_{t-1}, z_t, log s_t): one MADE pass per step and unit of particles. Replayed
    on slices of the datapoints (what a Gaussian guide gets), log q(z|x) needs the flow's inverse,
    one MADE pass per latent dimension. Both give the same log weights (float64, 1e-10)."""
    from ppl_vae.inference import importance

    torch.set_default_dtype(torch.float64)
    vae = _vae("normal", "iaf", 2, device=device)
    with torch.no_grad():  # away from the identity
        for t in list(vae.posterior.transforms) + list(vae.posterior2.transforms):
            t.nn.layers[-1].weight.normal_(0, 0.3)
    (x,) = _args(vae, 30)
    program = importance.inspect_program(vae.model, vae.guide, x, {})
    assert (
        program.flow_guide
        and not importance.inspect_program(
            _vae(device=device).model, _vae(device=device).guide, x, {}
        ).flow_guide
    )
    calls = []
    made = [t.nn for t in list(vae.posterior.transforms) + list(vae.posterior2.transforms)]
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in made]

    def log_w(prog):
        calls.clear()
        with torch.no_grad():
            lw = torch.cat(
                [
                    d.log_w
                    for d in importance.iter_log_weights(
                        vae.model, vae.guide, x, 300, seed=1, chunk_size=300, program=prog
                    )
                ],
                0,
            )  # (300, 30)
        return lw, len(calls)

    drawn, drawn_calls = log_w(program)
    replayed, replayed_calls = log_w(program._replace(flow_guide=False))  # 30 slices of 10 datapoints
    for h in hooks:
        h.remove()
    torch.testing.assert_close(drawn, replayed, rtol=1e-10, atol=1e-10)
    assert drawn.shape == (300, 30)
    assert drawn_calls == 3 * len(made)  # 3 units of 100 particles, one pass per step
    assert replayed_calls >= 3 * len(made) * Z  # the inverse: a pass per dimension
