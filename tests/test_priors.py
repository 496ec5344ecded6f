"""The mixture priors' fast log-density (``DiagonalNormalMixture``) against Pyro's ``MixtureSameFamily``."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.programs.priors import DiagonalNormalMixture, mixture


def _mixture_params(m, d, scale_low, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(m, d, generator=g, dtype=dtype)  # (M, d)
    scale = torch.rand(m, d, generator=g, dtype=dtype) * 0.8 + scale_low  # (M, d) in [low, low + 0.8]
    logits = torch.randn(m, generator=g, dtype=dtype)  # (M,)
    return logits, loc, scale


def _reference(logits, loc, scale):
    """Pyro's MixtureSameFamily in float64: the elementwise log-density."""
    return dist.MixtureSameFamily(
        dist.Categorical(logits=logits.double()), dist.Normal(loc.double(), scale.double()).to_event(1)
    )


@pytest.mark.parametrize("scale_low", [0.05, 0.2, 1.0])
def test_log_prob_matches_mixture_same_family_at_vampprior_size(device, scale_low):
    """K = 500 components in d = 40 (the VampPrior recipe), z ~ N(0, 1.5²): the float32 expansion
    of the square is within 2e-3 nats of the float64 elementwise value (σ down to 0.05)."""
    logits, loc, scale = (t.to(device) for t in _mixture_params(500, 40, scale_low))
    fast = mixture(logits, dist.Normal(loc, scale).to_event(1))
    assert isinstance(fast, DiagonalNormalMixture)
    z = 1.5 * torch.randn(3, 200, 40, generator=torch.Generator().manual_seed(1)).to(device)  # (K, N, d)
    got, want = fast.log_prob(z), _reference(logits, loc, scale).log_prob(z.double())
    assert got.shape == (3, 200)
    assert (got.double() - want).abs().max() < 2e-3, (got.double() - want).abs().max()


def test_log_prob_and_gradients_equal_in_float64():
    """In float64 the two log-densities and their gradients agree to 1e-9."""
    params = [t.requires_grad_() for t in _mixture_params(7, 3, 0.3, torch.float64)]
    z = torch.randn(11, 3, dtype=torch.float64)
    fast = mixture(params[0], dist.Normal(params[1], params[2]).to_event(1)).log_prob(z)
    ref = _reference(*params).log_prob(z)
    torch.testing.assert_close(fast, ref, rtol=0, atol=1e-9)
    g_fast = torch.autograd.grad(fast.sum(), params)
    g_ref = torch.autograd.grad(ref.sum(), params)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_expanded_by_a_plate_scores_like_the_unexpanded_mixture():
    """Under ``pyro.plate("data", N)`` the site's distribution is ``.expand((N,))``: the fast path
    keeps the (M, d) parameters (no (N, M, d) copies) and gives the unexpanded values."""
    logits, loc, scale = _mixture_params(5, 4, 0.3, torch.float64)
    prior = mixture(logits, dist.Normal(loc, scale).to_event(1))
    z = torch.randn(6, 4, dtype=torch.float64)

    def model():
        with pyro.plate("data", 6):
            return pyro.sample("z", prior, obs=z)

    site = pyro.poutine.trace(model).get_trace().nodes["z"]
    assert isinstance(site["fn"], DiagonalNormalMixture) and site["fn"].batch_shape == (6,)
    torch.testing.assert_close(
        site["fn"].log_prob(z), _reference(logits, loc, scale).log_prob(z), rtol=0, atol=1e-12
    )


def test_non_diagonal_components_keep_pyros_mixture():
    """Full-rank components (a full-rank guide's VampPrior) use MixtureSameFamily itself."""
    loc = torch.zeros(3, 2)
    mvn = dist.MultivariateNormal(loc, scale_tril=torch.eye(2).expand(3, 2, 2))
    d = mixture(torch.zeros(3), mvn)
    assert type(d) is dist.MixtureSameFamily
    torch.testing.assert_close(d.log_prob(torch.zeros(2)), mvn.log_prob(torch.zeros(2))[0])
