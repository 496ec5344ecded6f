"""The Pyro model/guide pair and the training objectives built on it.

Sites, shapes and scaling are read from Pyro traces; the objectives are checked against
Pyro's stock ELBOs (same seed → same value and gradients), against each other in expectation,
and for minibatch unbiasedness; statistical checks state their tolerance in standard errors
and run under fixed seeds (deterministic).
"""

import math

import pyro
import pytest
import torch
from pyro import poutine

from ppl_vae.inference.objectives import DeviceTrace_ELBO, DeviceTraceMeanField_ELBO, make_objective
from ppl_vae.programs.likelihoods import LIKELIHOODS
from ppl_vae.programs.model import VAE

Z = 3


pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors (conftest.one_thread)


def _data(n, d, likelihood="bernoulli"):
    x = torch.rand(n, d)
    return torch.bernoulli(x) if likelihood == "bernoulli" else x


def _traces(vae, x, **kw):
    guide_tr = poutine.trace(vae.guide).get_trace(x, **kw)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, **kw)
    return model_tr, guide_tr


# --------------------------------------------------------------------------- sites and shapes

ARCH_SHAPES = [("mlp", (1, 4, 5)), ("conv", (1, 28, 28)), ("broadcast", (1, 5, 6))]


@pytest.mark.parametrize("arch,shape", ARCH_SHAPES)
@pytest.mark.parametrize("likelihood", list(LIKELIHOODS))
def test_sites_shapes_and_log_prob_shapes(arch, shape, likelihood):
    n, k = 6, 4
    d = math.prod(shape)
    vae = VAE(shape, z_dim=Z, hidden=[16], likelihood=likelihood, arch=arch)
    x = _data(n, d, likelihood)
    model_tr, guide_tr = _traces(vae, x)
    assert [s for s, v in guide_tr.nodes.items() if v["type"] == "sample"] == ["data", "z"]
    assert [s for s, v in model_tr.nodes.items() if v["type"] == "sample"] == ["data", "z", "x"]
    z, obs = model_tr.nodes["z"], model_tr.nodes["x"]
    assert z["value"].shape == (n, Z) and not z["is_observed"]
    assert obs["is_observed"] and obs["value"] is x
    assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    for site in (model_tr.nodes["z"], model_tr.nodes["x"], guide_tr.nodes["z"]):
        assert site["log_prob"].shape == (n,)
    # the prior is N(0, I)
    prior = model_tr.nodes["z"]["fn"]
    assert prior.event_shape == (Z,) and (prior.mean == 0).all() and (prior.variance == 1).all()

    # under an outer vectorized particle plate every log_prob is (K, N)
    with pyro.plate("particles", k, dim=-2):
        model_tr, guide_tr = _traces(vae, x)
    assert guide_tr.nodes["z"]["value"].shape == (k, n, Z)
    model_tr.compute_log_prob()
    guide_tr.compute_log_prob()
    for site in (model_tr.nodes["z"], model_tr.nodes["x"], guide_tr.nodes["z"]):
        assert site["log_prob"].shape == (k, n)
    assert vae.decode(guide_tr.nodes["z"]["value"]).shape == (k, n, d)


def test_guide_is_normal_from_logvar_head_and_reparameterized():
    vae = VAE((1, 4, 4), z_dim=Z, hidden=[16])
    x = _data(5, 16)
    _, guide_tr = _traces(vae, x)
    site = guide_tr.nodes["z"]
    z_loc, z_logvar = vae.encoder(x)
    torch.testing.assert_close(site["fn"].base_dist.loc, z_loc)
    torch.testing.assert_close(site["fn"].base_dist.scale, torch.exp(0.5 * z_logvar))
    assert site["fn"].has_rsample
    # gradients of the draw reach every encoder parameter, none of the decoder's
    site["value"].pow(2).sum().backward()
    for name, p in vae.encoder.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for p in vae.decoder.parameters())
    # encode() agrees with the guide
    loc, scale = vae.encode(x)
    torch.testing.assert_close(scale, site["fn"].base_dist.scale)


def test_loss_gradient_reaches_encoder_and_decoder():
    vae = VAE((1, 4, 4), z_dim=Z, hidden=[16])
    loss = make_objective("trace")(vae.model, vae.guide, _data(8, 16))
    loss.backward()
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_plate_scale_is_size_over_batch_and_beta_scales_z_only():
    vae = VAE((1, 4, 4), z_dim=Z, hidden=[8])
    x = _data(5, 16)
    model_tr, guide_tr = _traces(vae, x, size=40, beta=0.25)
    assert model_tr.nodes["x"]["scale"] == pytest.approx(40 / 5)
    assert model_tr.nodes["z"]["scale"] == pytest.approx(40 / 5 * 0.25)
    assert guide_tr.nodes["z"]["scale"] == pytest.approx(40 / 5 * 0.25)
    # the same batch with size = N has scale 1: the scaled loss is exactly size/N times it
    for cls in (DeviceTrace_ELBO, DeviceTraceMeanField_ELBO):
        pyro.set_rng_seed(1)
        scaled = cls(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x, size=40)
        pyro.set_rng_seed(1)
        plain = cls(max_plate_nesting=1).differentiable_loss(vae.model, vae.guide, x)
        torch.testing.assert_close(scaled, 8 * plain, rtol=1e-6, atol=0)


def test_sample_decodes_prior_draws_and_reconstruct_decodes_the_code():
    """sample(n, g) = E[x|z] = σ(decoder(z)) with z ~ N(0, I) drawn from ``g`` (the Bernoulli's
    mean is the sigmoid of its logits); reconstruct(x) = σ(decoder(μ(x))). Exact (same ops)."""
    vae = VAE((1, 4, 4), z_dim=Z, hidden=[8])
    s = vae.sample(7, generator=torch.Generator().manual_seed(0))  # (7, 16)
    z = torch.randn(7, Z, generator=torch.Generator().manual_seed(0))  # (7, Z)
    torch.testing.assert_close(s, torch.sigmoid(vae.decoder(z)), rtol=0, atol=0)
    assert not torch.equal(s, vae.sample(7, generator=torch.Generator().manual_seed(1)))
    x = _data(3, 16)
    torch.testing.assert_close(
        vae.reconstruct(x), torch.sigmoid(vae.decoder(vae.encoder(x)[0])), rtol=0, atol=0
    )


def test_conv_refuses_images_it_cannot_halve_twice():
    VAE((1, 8, 6), z_dim=Z, arch="conv")  # any H, W >= 4 (the decoder's output is cropped)
    with pytest.raises(ValueError, match="--arch mlp"):
        VAE((1, 8, 3), z_dim=Z, arch="conv")


# --------------------------------------------------------------------------- objectives


def _fixed_vae(likelihood="bernoulli", shape=(1, 4, 4), hidden=(16,)):
    torch.manual_seed(3)
    return VAE(shape, z_dim=Z, hidden=list(hidden), likelihood=likelihood)


@pytest.mark.parametrize(
    "ours,stock",
    [(DeviceTrace_ELBO, pyro.infer.Trace_ELBO), (DeviceTraceMeanField_ELBO, pyro.infer.TraceMeanField_ELBO)],
)
@pytest.mark.parametrize("k", [1, 4])
def test_device_elbos_equal_pyro_stock(ours, stock, k):
    """Same seed → same loss value and the same gradient for every parameter (rtol 1e-6, float64)."""
    torch.set_default_dtype(torch.float64)
    vae = _fixed_vae()
    x = _data(7, 16)
    params = list(vae.parameters())
    results = []
    for cls in (ours, stock):
        elbo = cls(num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1)
        pyro.set_rng_seed(11)
        loss = elbo.differentiable_loss(vae.model, vae.guide, x, size=50, beta=0.7)
        results.append((loss, torch.autograd.grad(loss, params)))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-6, atol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("case", ["auxiliary", "no_closed_form_kl"])
@pytest.mark.parametrize(
    "ours,stock",
    [(DeviceTrace_ELBO, pyro.infer.Trace_ELBO), (DeviceTraceMeanField_ELBO, pyro.infer.TraceMeanField_ELBO)],
)
def test_device_elbos_equal_pyro_stock_beyond_the_vae(ours, stock, case):
    """A guide-only (auxiliary) site adds −log q; a prior with no registered KL (Laplace) falls
    back to Monte Carlo: both exactly as Pyro's own ELBOs do (same seed, rtol 1e-6)."""
    prior = pyro.distributions.Laplace if case == "no_closed_form_kl" else pyro.distributions.Normal

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", prior(0.0, 1.0))
            pyro.sample("x", pyro.distributions.Normal(z, 1.0), obs=x)

    def guide(x):
        loc = pyro.param("loc", torch.zeros(x.shape[0]))
        with pyro.plate("data", x.shape[0]):
            if case == "auxiliary":
                loc = pyro.sample("a", pyro.distributions.Normal(loc, 1.0), infer={"is_auxiliary": True})
            pyro.sample("z", pyro.distributions.Normal(loc, 0.5))

    x = torch.randn(4)
    losses = []
    for cls in (ours, stock):
        pyro.set_rng_seed(0)
        losses.append(cls().differentiable_loss(model, guide, x))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)


def test_device_elbos_refuse_non_reparameterized_guides():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", pyro.distributions.Bernoulli(0.5))

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("c", pyro.distributions.Bernoulli(0.3))

    for cls in (DeviceTrace_ELBO, DeviceTraceMeanField_ELBO):
        with pytest.raises(ValueError, match="not reparameterizable"):
            cls(max_plate_nesting=1).differentiable_loss(model, guide, torch.zeros(3))


def _draws(objective, vae, x, reps, **kw):
    return torch.stack([objective(vae.model, vae.guide, x, **kw).detach() for _ in range(reps)])


def test_trace_and_meanfield_agree_in_expectation():
    """E[Monte Carlo KL] = analytic KL, so both losses estimate the same −ELBO: their means over
    100 × 200 vectorized particles differ by less than 3 standard errors (and the trace loss
    is visibly noisier, so the check has power)."""
    torch.set_default_dtype(torch.float64)
    vae = _fixed_vae()
    x = _data(8, 16)
    trace = _draws(make_objective("trace", 200), vae, x, 100)
    meanfield = _draws(make_objective("meanfield", 200), vae, x, 100)
    se = math.sqrt(trace.var() / len(trace) + meanfield.var() / len(meanfield))
    assert abs(trace.mean() - meanfield.mean()) < 3 * se
    assert se < 0.005 * meanfield.mean().abs()  # the test resolves differences of 1.5 %
    assert trace.std() > meanfield.std()


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_minibatch_loss_is_unbiased_for_full_data_loss(elbo):
    """Average over 500 random minibatches (B = 16 of N = 128, size = N) of the scaled loss
    = the full-data loss (its mean over 200 evaluations), within 3 standard errors."""
    vae = _fixed_vae()
    g = torch.Generator().manual_seed(0)
    n, b = 128, 16
    # datapoints of very different density (few vs many pixels on), so minibatches differ a lot
    x = torch.bernoulli(torch.rand(n, 1, generator=g).expand(n, 16), generator=g)
    objective = make_objective(elbo)
    full = _draws(objective, vae, x, 200)
    mini = torch.stack(
        [
            objective(vae.model, vae.guide, x[torch.randperm(n, generator=g)[:b]], size=n).detach()
            for _ in range(500)
        ]
    )
    se = math.sqrt(full.var() / len(full) + mini.var() / len(mini))
    assert abs(mini.mean() - full.mean()) < 3 * se
    assert 3 * se < 0.02 * full.mean().abs()  # resolves a 2 % bias
    # without the plate's size/B factor the batch loss would be 8 times smaller: far outside
    assert abs(mini.mean() / (n / b) - full.mean()) > 100 * se


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_beta_changes_loss_by_beta_minus_one_times_kl(elbo):
    """Same seed ⇒ same z; the β-VAE loss differs from β = 1 by exactly (β−1)·(scaled KL term):
    the closed-form KL for meanfield, log q(z|x) − log p(z) at the drawn z for trace."""
    torch.set_default_dtype(torch.float64)
    vae = _fixed_vae()
    x = _data(6, 16)
    size, beta = 24, 3.5
    objective = make_objective(elbo)
    losses = {}
    for bt in (1.0, beta):
        pyro.set_rng_seed(2)
        losses[bt] = objective(vae.model, vae.guide, x, size=size, beta=bt)
    pyro.set_rng_seed(2)
    model_tr, guide_tr = _traces(vae, x, size=size)
    q, p = guide_tr.nodes["z"], model_tr.nodes["z"]
    if elbo == "meanfield":
        kl = torch.distributions.kl_divergence(q["fn"], p["fn"]).sum()
    else:
        kl = (q["fn"].log_prob(q["value"]) - p["fn"].log_prob(q["value"])).sum()
    torch.testing.assert_close(
        losses[beta] - losses[1.0], (beta - 1) * size / x.shape[0] * kl, rtol=1e-8, atol=1e-8
    )


def test_iwae_objective_with_one_particle_is_the_trace_elbo():
    """IWAE_1 = log w = the single-sample ELBO: same seed → same loss (size scaling included)."""
    torch.set_default_dtype(torch.float64)
    vae = _fixed_vae()
    x = _data(6, 16)
    pyro.set_rng_seed(4)
    iwae = make_objective("iwae", 1)(vae.model, vae.guide, x, size=30)
    pyro.set_rng_seed(4)
    trace = make_objective("trace", 1)(vae.model, vae.guide, x, size=30)
    torch.testing.assert_close(iwae, trace, rtol=1e-8, atol=0)


def test_unknown_objective_names_the_choices():
    with pytest.raises(ValueError, match="trace, meanfield, iwae"):
        make_objective("renyi")
