"""Annealed importance sampling and bidirectional Monte Carlo (:mod:`ppl_vae.inference.ais`,
:mod:`ppl_vae.inference.bdmc`) against closed forms, float64 unless stated.

Gaussian identities (Bishop 2006, §2.3.3): for z ~ N(0, I) and x | z ~ N(W z + b, σ² I),
x ~ N(b, W Wᵀ + σ² I) and z | x ~ N(Σ Wᵀ (x − b) / σ², Σ), Σ = (I + WᵀW/σ²)⁻¹. Gamma–Poisson:
for z ~ Gamma(a, b) and x_j | z ~ Poisson(z), j = 1..D, z | x ~ Gamma(a + Σx, b + D) and
p(x) = b^a Γ(a + Σx) / (Γ(a) (b + D)^(a + Σx) Π_j x_j!).
"""

import io
import math
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_vae.core.errors import UserError
from ppl_vae.core.seeding import derive_seed
from ppl_vae.inference import ais as ais_module
from ppl_vae.inference import estimators as E
from ppl_vae.inference.checks import inspect_program


@pytest.fixture(autouse=True)
def float64(one_thread):
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


class Linear:
    """z ~ N(0, I_d), x | z ~ N(W z + b, σ² I_D): log p(x) and p(z | x) exact."""

    def __init__(self, d=3, D=5, sigma=0.5, n=8, seed=0, shift=0.5, scale=0.15):
        g = torch.Generator().manual_seed(seed)
        self.d, self.W, self.b, self.sigma = (
            d,
            torch.randn(D, d, generator=g),
            torch.randn(D, generator=g),
            sigma,
        )
        self.cov = torch.linalg.inv(torch.eye(d) + self.W.T @ self.W / sigma**2)
        self.x = torch.randn(n, d, generator=g) @ self.W.T + self.b + sigma * torch.randn(n, D, generator=g)
        self.shift, self.scale = shift, scale

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def post_mean(self, x):
        return (x - self.b) @ self.W / self.sigma**2 @ self.cov  # (N, d)

    def exact_guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(self.post_mean(x), self.cov))

    def poor_guide(self, x):
        """Too narrow (σ 0.15 against posterior sds 0.22-0.35) and shifted by 0.5 in every coordinate."""
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(self.post_mean(x) + self.shift, self.scale).to_event(1))

    def log_px(self, x):  # (N,)
        D = self.b.shape[0]
        return dist.MultivariateNormal(self.b, self.W @ self.W.T + self.sigma**2 * torch.eye(D)).log_prob(x)


class GammaPoisson:
    """A constrained latent (z > 0, moved as log z with its Jacobian): z ~ Gamma(a, b), x_j ~ Poisson(z)."""

    a, b = 2.0, 1.5

    def __init__(self, n=6, D=4, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.poisson(2.0 * torch.ones(n, D), generator=g)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Gamma(torch.tensor(self.a), torch.tensor(self.b)))
            pyro.sample("x", dist.Poisson(z[..., None].expand(z.shape + x.shape[-1:])).to_event(1), obs=x)

    def guide(self, x, sharp=1.0):
        s = x.sum(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Gamma(sharp * (self.a + s), sharp * (self.b + x.shape[-1])))

    def log_px(self, x):
        a, b, s, D = self.a, self.b, x.sum(-1), x.shape[-1]
        return (
            a * math.log(b)
            + torch.lgamma(a + s)
            - math.lgamma(a)
            - (a + s) * math.log(b + D)
            - torch.lgamma(x + 1).sum(-1)
        )


FAST = dict(num_chains=8, leapfrog=2)


# --------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize("num_steps", [1, 2, 7, 40])
def test_with_the_exact_posterior_as_guide_every_ais_estimate_is_log_px(num_steps):
    """q(z|x) = p(z|x): f_t ∝ q for every β, each increment is (β_t − β_{t−1}) log p(x), so every
    chain's weight is p(x) at any T, forward and reverse (1e-6, float64)."""
    lin = Linear()
    exact = lin.log_px(lin.x)
    fwd = E.ais(lin.model, lin.exact_guide, lin.x, num_steps=num_steps, seed=1, **FAST)
    torch.testing.assert_close(fwd.value, exact, atol=1e-6, rtol=0)
    assert fwd.stderr.max() < 1e-6 and bool(fwd.trusted.all())
    x, latents = E.simulate(lin.model, lin.x, seed=3)
    rev = E.reverse_ais(lin.model, lin.exact_guide, x, latents, num_steps=num_steps, seed=2, **FAST)
    torch.testing.assert_close(rev.value, lin.log_px(x), atol=1e-6, rtol=0)


def test_a_constrained_latent_moves_in_log_space_with_its_jacobian():
    """Gamma–Poisson: exact guide → log p(x) to 1e-6 at any T; a guide twice as sharp as the
    posterior → AIS within 3 stderr of log p(x) (a wrong log-det would bias it)."""
    gp = GammaPoisson()
    exact = gp.log_px(gp.x)
    for t in (1, 20):
        est = E.ais(gp.model, gp.guide, gp.x, num_steps=t, seed=0, **FAST)
        torch.testing.assert_close(est.value, exact, atol=1e-6, rtol=0)
    sharp = E.ais(
        gp.model, lambda x: gp.guide(x, sharp=2.0), gp.x, num_steps=200, num_chains=16, leapfrog=2, seed=0
    )
    assert (sharp.value - exact).abs().max() < 3 * sharp.stderr.max() + 1e-3
    assert 0.4 < sharp.accept.mean() < 0.9


def test_a_single_step_is_iwae_with_k_equal_to_c_on_the_same_draws():
    """T = 1, init="guide": β jumps from 0 to 1 with no transition, so log w = log p(x, z_0) −
    log q(z_0 | x) with z_0 ~ q: datapoint i's C chains are iwae(x_i, K = C, seed=derive_seed(seed, i))'s
    draws, and value and stderr are IWAE_C's."""
    lin = Linear()
    est = E.ais(lin.model, lin.poor_guide, lin.x, num_steps=1, num_chains=16, seed=7)
    for i in range(lin.x.shape[0]):
        iw = E.iwae(lin.model, lin.poor_guide, lin.x[i : i + 1], 16, seed=derive_seed(7, i))
        lw = E.log_importance_weights(lin.model, lin.poor_guide, lin.x[i : i + 1], 16, seed=derive_seed(7, i))
        torch.testing.assert_close(est.log_weights[:, i], lw[:, 0], rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(est.value[i : i + 1], iw.value, rtol=1e-12, atol=1e-10)
        torch.testing.assert_close(est.stderr[i : i + 1], iw.stderr, rtol=1e-9, atol=1e-10)


def test_with_a_poor_guide_forward_and_reverse_ais_bracket_log_px_and_the_bracket_shrinks():
    """IWAE_100 is far below log p(x); on data simulated from the model, forward AIS ≤ log p(x) ≤
    reverse AIS (within 3 stderr of the mean over datapoints), the gap shrinking from T = 10 to 100."""
    lin = Linear(n=10)
    gaps = []
    for t in (10, 100):
        br = E.bdmc(lin.model, lin.poor_guide, lin.x, num_steps=t, num_chains=16, leapfrog=3, seed=0)
        exact = lin.log_px(br.x)
        n = exact.shape[0]
        se_lo, se_up = br.lower.stderr.pow(2).sum().sqrt() / n, br.upper.stderr.pow(2).sum().sqrt() / n
        assert (br.lower.value - exact).mean() < 3 * se_lo, t
        assert (br.upper.value - exact).mean() > -3 * se_up, t
        gaps.append(br.gap.mean().item())
    iwae = E.iwae(lin.model, lin.poor_guide, br.x, 100, seed=0)
    assert (iwae.value - exact).mean() < -1.0  # far below
    assert gaps[0] > 0.5 and abs(gaps[1]) < gaps[0] / 5, gaps


@pytest.mark.slow
def test_the_bdmc_bracket_reaches_five_hundredths_of_a_nat_at_a_thousand_steps():
    lin = Linear(n=10)
    br = E.bdmc(lin.model, lin.poor_guide, lin.x, num_steps=1000, num_chains=16, leapfrog=3, seed=0)
    exact = lin.log_px(br.x)
    assert br.gap.mean() <= 0.05, br.gap
    assert (br.lower.value - exact).mean() <= 0.05 and (br.upper.value - exact).mean() >= -0.05


def _gaussian_posterior(m, P, H, b, sigma, x):
    """Z | x for Z ~ N(m, P), x | Z ~ N(H Z + b, σ² I): mean (N, k) and covariance (k, k)."""
    cov = torch.linalg.inv(torch.linalg.inv(P) + H.T @ H / sigma**2)
    return (m @ torch.linalg.inv(P) + (x - b) @ H / sigma**2) @ cov, cov


class TwoLayers:
    """z2 ~ N(0, I_2), z1 | z2 ~ N(A z2 + c, S1), x | z1 ~ N(W z1 + b, σ² I_4); the guide is the
    exact posterior's two marginals without their correlation, q(z2 | x) q(z1 | x)."""

    def __init__(self, n=5, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.A, self.c = torch.randn(3, 2, generator=g), torch.randn(3, generator=g)
        self.S1 = torch.diag(0.3 + torch.rand(3, generator=g))
        self.W, self.b, self.sigma = torch.randn(4, 3, generator=g), torch.randn(4, generator=g), 0.6
        z1 = torch.randn(n, 2, generator=g) @ self.A.T + self.c
        self.x = z1 @ self.W.T + self.b + self.sigma * torch.randn(n, 4, generator=g)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z2 = pyro.sample("z2", dist.MultivariateNormal(torch.zeros(2), torch.eye(2)))
            z1 = pyro.sample("z1", dist.MultivariateNormal(z2 @ self.A.T + self.c, self.S1))
            pyro.sample("x", dist.Normal(z1 @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def guide(self, x):
        m = torch.cat([torch.zeros(2), self.c])  # Z = (z2, z1)
        P = torch.cat(
            [torch.cat([torch.eye(2), self.A.T], 1), torch.cat([self.A, self.A @ self.A.T + self.S1], 1)]
        )
        mean, cov = _gaussian_posterior(
            m, P, torch.cat([torch.zeros(4, 2), self.W], 1), self.b, self.sigma, x
        )
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z2", dist.MultivariateNormal(mean[:, :2], cov[:2, :2]))
            pyro.sample("z1", dist.MultivariateNormal(mean[:, 2:], cov[2:, 2:]))

    def log_px(self, x):
        P1 = self.A @ self.A.T + self.S1
        return dist.MultivariateNormal(
            self.c @ self.W.T + self.b, self.W @ P1 @ self.W.T + self.sigma**2 * torch.eye(4)
        ).log_prob(x)


class MixturePrior:
    """z ~ Σ_m π_m N(μ_m, diag s_m²) (M = 3, d = 2), x | z ~ N(W z + b, σ² I_3):
    log p(x) = log Σ_m π_m N(x; W μ_m + b, W diag(s_m²) Wᵀ + σ² I)."""

    def __init__(self, n=5, seed=1):
        g = torch.Generator().manual_seed(seed)
        self.logits, self.locs = torch.randn(3, generator=g), 2 * torch.randn(3, 2, generator=g)
        self.scales = (0.3 * torch.randn(3, 2, generator=g)).exp()
        self.W, self.b, self.sigma = torch.randn(3, 2, generator=g), torch.randn(3, generator=g), 0.8
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            z = self.prior().sample(torch.Size([n]))  # (N, 2)
        self.x = z @ self.W.T + self.b + self.sigma * torch.randn(n, 3, generator=g)

    def prior(self):
        comps = dist.Normal(self.locs, self.scales).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), comps)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", self.prior())
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.sigma).to_event(1), obs=x)

    def _components(self, x):
        """log π_m p_m(x) (N, M), and each component's posterior mean (N, M, 2) and covariance (M, 2, 2)."""
        log_pi, covs = torch.log_softmax(self.logits, 0), torch.diag_embed(self.scales**2)
        joint = torch.stack(
            [
                log_pi[m]
                + dist.MultivariateNormal(
                    self.locs[m] @ self.W.T + self.b,
                    self.W @ covs[m] @ self.W.T + self.sigma**2 * torch.eye(3),
                ).log_prob(x)
                for m in range(3)
            ],
            -1,
        )
        post = [_gaussian_posterior(self.locs[m], covs[m], self.W, self.b, self.sigma, x) for m in range(3)]
        return joint, torch.stack([q[0] for q in post], 1), torch.stack([q[1] for q in post])

    def guide(self, x):
        """One Gaussian with the posterior's mean and 1.5² times its covariance."""
        joint, means, covs = self._components(x)
        w = torch.softmax(joint, -1)[..., None]  # (N, M, 1)
        mean = (w * means).sum(1)  # (N, 2)
        dev = means - mean[:, None]  # (N, M, 2)
        cov = (w[..., None] * (covs + dev[..., :, None] * dev[..., None, :])).sum(1)  # (N, 2, 2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(mean, 1.5**2 * cov))

    def log_px(self, x):
        return torch.logsumexp(self._components(x)[0], -1)


def _within_3_se(est, exact):
    n = exact.shape[0]
    se = est.stderr.pow(2).sum().sqrt() / n
    return abs((est.value - exact).mean().item()) <= 3 * se.item() + 1e-3, ((est.value - exact).mean(), se)


@pytest.mark.parametrize(
    "program,init",
    [(TwoLayers, "guide"), (MixturePrior, "prior"), (MixturePrior, "guide")],
)
def test_a_hierarchy_and_a_mixture_prior_are_within_three_standard_errors_of_log_px(program, init):
    p = program()
    est = E.ais(p.model, p.guide, p.x, num_steps=100, num_chains=16, leapfrog=3, init=init, seed=0)
    ok, why = _within_3_se(est, p.log_px(p.x))
    assert ok, why
    assert 0.4 < est.accept.mean() < 0.9


# --------------------------------------------------------------------------- flow guides: the chains move the base draw


class FlowGuide:
    """q(z|x) = F(N(E[z|x] + 0.5, 0.3² I)) for :class:`Linear`, F an inverse autoregressive flow
    (Pyro's ``AffineAutoregressive``) with random weights: log q(z|x) at a z that F did not output
    needs F's inverse, d network passes."""

    def __init__(self, lin, seed=0):
        from pyro.distributions.transforms import AffineAutoregressive
        from pyro.nn import AutoRegressiveNN

        torch.manual_seed(seed)
        self.lin, self.flow = lin, AffineAutoregressive(AutoRegressiveNN(lin.d, [8]))

    def base(self, x):
        return dist.Normal(self.lin.post_mean(x) + 0.5, 0.3).to_event(1)

    def guide(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(self.base(x), [self.flow]))


def _count_inverses(monkeypatch) -> list:
    from pyro.distributions.transforms import AffineAutoregressive

    calls, inverse = [], AffineAutoregressive._inverse
    monkeypatch.setattr(AffineAutoregressive, "_inverse", lambda self, y: calls.append(1) or inverse(self, y))
    return calls


def test_a_flow_guide_is_annealed_without_inverting_its_flow_at_every_step(monkeypatch):
    """The chains move the flow's base draw (ppl_vae.inference.hmc): F is inverted once per pass, at
    the chains' start, not at each of the (T − 1) · L leapfrog steps; forward AIS and reverse AIS
    bracket log p(x) within 3 stderr (a wrong Jacobian would bias both), and T = 1 is IWAE_C on the
    same draws (log q through F's cache equals log q through its inverse)."""
    lin = Linear(n=10)
    fg = FlowGuide(lin)
    program = inspect_program(lin.model, fg.guide, lin.x, {})  # its slice check inverts F once
    calls = _count_inverses(monkeypatch)
    est = E.ais(lin.model, fg.guide, lin.x, num_steps=100, num_chains=16, leapfrog=3, seed=0, program=program)
    assert len(calls) == 1, len(calls)  # one pass of 10 datapoints: one inverse
    ok, why = _within_3_se(est, lin.log_px(lin.x))
    assert ok and 0.4 < est.accept.mean() < 0.9, (why, est.accept.mean())
    x, latents = E.simulate(lin.model, lin.x, seed=1)
    up = E.reverse_ais(lin.model, fg.guide, x, latents, num_steps=100, num_chains=16, leapfrog=3, seed=0)
    ok, why = _within_3_se(up, lin.log_px(x))  # two-sided: the upper bound is not far above either
    assert ok, why
    one = E.ais(lin.model, fg.guide, lin.x, num_steps=1, num_chains=16, seed=7)
    for i in range(3):
        lw = E.log_importance_weights(lin.model, fg.guide, lin.x[i : i + 1], 16, seed=derive_seed(7, i))
        torch.testing.assert_close(one.log_weights[:, i], lw[:, 0], rtol=1e-9, atol=1e-9)


def test_at_a_flow_site_the_state_is_the_base_draw_with_its_change_of_variables():
    """The first point of the chains against the change of variables done by hand, u the base draw
    and z = F(u): log r(u) = log N(u; μ, σ²) (q(F(u)) |det F'(u)|), ℓ(u) = log p(x, F(u)) − log q(F(u))
    with log |det F'(u)| the slogdet of F's Jacobian, and their gradients by autograd."""
    lin = Linear(n=3)
    fg = FlowGuide(lin, seed=1)
    k, x = 2, lin.x
    with torch.no_grad():
        z0 = fg.flow(fg.base(x).sample((k,)))  # (K, N, d)
    ch = ais_module._start(lin.model, fg.guide, (x,), {}, k, 1, "guide", {"z": z0}, torch.arange(3))
    u = ch.u["z"].detach().requires_grad_()  # (K, N, d): the base draws
    torch.testing.assert_close(fg.flow(u), z0)

    def ell(v, i):  # v (d,), the base draw of one chain at datapoint i
        z = fg.flow(v)
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum()
        log_p = log_p + dist.Normal(z @ lin.W.T + lin.b, lin.sigma).log_prob(x[i]).sum()
        jac = torch.autograd.functional.jacobian(fg.flow, v, create_graph=True)  # (d, d)
        return log_p - (fg.base(x[i]).log_prob(v) - torch.linalg.slogdet(jac)[1])  # − log q(F(v))

    log_r = fg.base(x).log_prob(u)  # (K, N)
    ells = torch.stack([torch.stack([ell(u[c, i], i) for i in range(3)]) for c in range(k)])  # (K, N)
    grad_r, grad_ell = (torch.autograd.grad(t.sum(), u)[0] for t in (log_r, ells))
    torch.testing.assert_close(ch.point.log_r, log_r.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.ell, ells.detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.grad_r["z"], grad_r, rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.grad_ell["z"], grad_ell, rtol=0, atol=1e-9)


def test_a_flow_of_two_layers_over_a_positive_base_moves_the_log_of_its_base_draw():
    """A flow whose base has a constrained support, through two layers: z₀ ~ Gamma(α(x), 3) (per
    coordinate, z₀ > 0), z = A(F(z₀)), F an IAF and A an affine map depending on x. The state is
    u = log z₀ (``biject_to`` of the base's positive support), and the first point equals the change
    of variables done by hand in u: log r(u) = log Gamma(e^u) + Σu, ℓ(u) = log p(x, z) − log q(z)
    with log q(z) = log Gamma(z₀) − log |det ∂z/∂z₀| (the slogdet of the two layers' Jacobian by
    autograd), and their gradients in u (1e-9)."""
    from pyro.distributions.transforms import AffineAutoregressive, AffineTransform
    from pyro.nn import AutoRegressiveNN

    lin = Linear(n=3)
    torch.manual_seed(2)
    iaf = AffineAutoregressive(AutoRegressiveNN(lin.d, [8]))

    def base(x):  # (N, d) or (d,)
        return dist.Gamma(2.0 + x[..., : lin.d].abs(), 3.0).to_event(1)

    def affine(x):
        return AffineTransform(lin.post_mean(x) - 0.5, 0.6, event_dim=1)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.TransformedDistribution(base(x), [iaf, affine(x)]))

    k, x = 2, lin.x
    with torch.no_grad():
        z0 = affine(x)(iaf(base(x).sample((k,))))  # (K, N, d)
    ch = ais_module._start(lin.model, guide, (x,), {}, k, 1, "guide", {"z": z0}, torch.arange(3))
    u = ch.u["z"].detach().requires_grad_()  # (K, N, d): the logs of the base draws
    torch.testing.assert_close(affine(x)(iaf(u.exp())), z0)

    def log_r(v, i):  # v (d,): one chain's state at datapoint i
        return base(x[i]).log_prob(v.exp()) + v.sum()

    def ell(v, i):
        def flow(w):  # z₀ (d,) → z (d,)
            return affine(x[i])(iaf(w))

        w = v.exp()
        z = flow(w)
        log_p = dist.Normal(0.0, 1.0).log_prob(z).sum()
        log_p = log_p + dist.Normal(z @ lin.W.T + lin.b, lin.sigma).log_prob(x[i]).sum()
        jac = torch.autograd.functional.jacobian(flow, w, create_graph=True)  # (d, d)
        return log_p - (base(x[i]).log_prob(w) - torch.linalg.slogdet(jac)[1])

    hand = [
        torch.stack([torch.stack([f(u[c, i], i) for i in range(3)]) for c in range(k)]) for f in (log_r, ell)
    ]  # (K, N) each
    grad_r, grad_ell = (torch.autograd.grad(t.sum(), u)[0] for t in hand)
    torch.testing.assert_close(ch.point.log_r, hand[0].detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.ell, hand[1].detach(), rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.grad_r["z"], grad_r, rtol=0, atol=1e-9)
    torch.testing.assert_close(ch.point.grad_ell["z"], grad_ell, rtol=0, atol=1e-9)


def test_a_flow_without_an_inverse_is_refused_in_one_line_with_init_guide():
    """Pyro's Planar flow is inverted only from its cache: the chains' start (the base draw of z) is
    refused in one line naming the site and the transform; init="prior" does not use the guide."""
    from pyro.distributions.transforms import Planar

    lin = Linear(n=4)
    planar = Planar(lin.d)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.TransformedDistribution(dist.Normal(lin.post_mean(x), 0.3).to_event(1), [planar])
            )

    refusal = r"guide site 'z'.*its Planar transform has none; use init='prior' \(--ais-init prior\)$"
    with pytest.raises(UserError, match=refusal) as e:
        E.ais(lin.model, guide, lin.x, num_steps=3, num_chains=2, leapfrog=1, seed=0)
    assert "\n" not in str(e.value)
    est = E.ais(lin.model, guide, lin.x, num_steps=3, num_chains=2, leapfrog=1, seed=0, init="prior")
    assert bool(torch.isfinite(est.value).all())


class HalfNormalLatent:
    """z ~ HalfNormal(1), x_j | z ~ N(z, 1), j = 1, 2. torch builds HalfNormal (and HalfCauchy, and
    Pyro's FoldedDistribution) as a TransformedDistribution over |·| (``AbsTransform``: not
    bijective, no Jacobian), so such a site is no flow: it moves as log z, its support's ``biject_to``.
    log p(x) = log ∫_0^∞ p(z) p(x|z) dz by the trapezoidal rule on [0, 12] (error far below 1e-6)."""

    def __init__(self, n=6, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, generator=g).abs() + torch.randn(n, 2, generator=g)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.HalfNormal(torch.ones(x.shape[0])))
            pyro.sample("x", dist.Normal(z[..., None] * torch.ones(2), 1.0).to_event(1), obs=x)

    def log_px(self, x):  # (N,)
        z = torch.linspace(0.0, 12.0, 120_001)  # (G,)
        log_lik = dist.Normal(z[:, None, None], 1.0).log_prob(x).sum(-1)  # (G, N)
        log_joint = dist.HalfNormal(1.0).log_prob(z)[:, None] + log_lik
        return torch.trapezoid(log_joint.exp(), z, dim=0).log()  # (N,)


@pytest.mark.parametrize(
    "guide_fn",
    [
        lambda n: dist.HalfNormal(0.8 * torch.ones(n)),
        lambda n: dist.HalfCauchy(0.8 * torch.ones(n)),
        lambda n: dist.FoldedDistribution(dist.Normal(0.5 * torch.ones(n), 0.8)),
    ],
    ids=["HalfNormal", "HalfCauchy", "Folded"],
)
def test_a_guide_site_on_a_transform_that_is_not_bijective_is_moved_in_its_support_not_as_a_flow(guide_fn):
    """A guide site drawn from a TransformedDistribution over AbsTransform (HalfNormal, HalfCauchy,
    FoldedDistribution) is not a flow: AIS moves log z (the model support's biject_to) and weighs
    the guide's own log_prob, finite and within 3 stderr of log p(x) by quadrature; forward and
    reverse bracket it. Before, it was taken for a flow and |·|'s Jacobian raised NotImplementedError."""
    hn = HalfNormalLatent()

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", guide_fn(x.shape[0]))

    program = inspect_program(hn.model, guide, hn.x, {})
    assert not program.flow_guide  # IWAE may replay it: its log_prob needs no inverse
    est = E.ais(hn.model, guide, hn.x, num_steps=100, num_chains=32, leapfrog=3, seed=0, program=program)
    assert bool(torch.isfinite(est.value).all()), est.value
    ok, why = _within_3_se(est, hn.log_px(hn.x))
    assert ok and 0.4 < est.accept.mean() < 0.9, (why, est.accept.mean())
    x, latents = E.simulate(hn.model, hn.x, seed=1)
    up = E.reverse_ais(hn.model, guide, x, latents, num_steps=100, num_chains=32, leapfrog=3, seed=0)
    assert bool(torch.isfinite(up.value).all())
    ok, why = _within_3_se(up, hn.log_px(x))  # two-sided: the upper bound is not far above either
    assert ok, why


# --------------------------------------------------------------------------- reproducibility, schedule, progress


def test_the_same_seed_gives_the_same_numbers_at_any_chunk_size_and_batch():
    """Datapoint i draws from derive_seed(seed, i) alone: passes of 1, 3 or all datapoints, and x
    cut to its first 3 rows, give the same numbers; another seed gives others."""
    lin = Linear()
    kw = dict(num_steps=6, num_chains=4, leapfrog=2, pilot_chains=2)
    k = 4 + 2
    ref = E.ais(lin.model, lin.poor_guide, lin.x, seed=5, **kw)
    for chunk in (k, 3 * k):
        again = E.ais(lin.model, lin.poor_guide, lin.x, seed=5, chunk_size=chunk, **kw)
        torch.testing.assert_close(again.value, ref.value, rtol=0, atol=1e-10)
        torch.testing.assert_close(again.step_size, ref.step_size, rtol=0, atol=1e-10)
    head = E.ais(lin.model, lin.poor_guide, lin.x[:3], seed=5, **kw)
    torch.testing.assert_close(head.value, ref.value[:3], rtol=0, atol=1e-10)
    assert not torch.allclose(E.ais(lin.model, lin.poor_guide, lin.x, seed=6, **kw).value, ref.value)
    x, latents = E.simulate(lin.model, lin.x, seed=1)
    up = [
        E.reverse_ais(lin.model, lin.poor_guide, x, latents, seed=5, chunk_size=c, **kw).value
        for c in (k, None)
    ]
    torch.testing.assert_close(up[0], up[1], rtol=0, atol=1e-10)


def test_the_schedules():
    """Every schedule runs 0 = β_0 < … < β_T = 1, symmetric about T/2 (1e-12); "linear" is exactly
    β_t = t/T; the default "sigmoid" takes at its first step less than half its step at the middle
    (0.0015 against 0.0207 at T = 100), a test the linear schedule fails (0.01 against 0.005)."""
    for t in (1, 2, 10, 1000):
        for kind in ais_module.SCHEDULES:
            b = ais_module.schedule(t, kind)
            assert len(b) == t + 1 and b[0] == 0.0 and b[-1] == 1.0
            assert all(u < v for u, v in zip(b, b[1:]))
            assert all(abs(b[i] + b[t - i] - 1) < 1e-12 for i in range(t + 1))  # symmetric
    assert ais_module.schedule(100, "linear") == [t / 100 for t in range(101)]

    def small_at_the_ends(b):
        return b[1] - b[0] < (b[51] - b[50]) / 2

    assert small_at_the_ends(ais_module.schedule(100))  # the default, sigmoid
    assert not small_at_the_ends(ais_module.schedule(100, "linear"))  # the check can fail


def test_progress_is_called_after_every_step_with_the_datapoints_of_the_pass():
    lin = Linear(n=5)
    calls = []
    E.ais(lin.model, lin.poor_guide, lin.x, num_steps=4, num_chains=2, pilot_chains=1, leapfrog=1, seed=0,
          chunk_size=9, progress=calls.append)  # fmt: skip
    assert calls == [3] * 4 + [2] * 4  # passes of 3 and 2 datapoints (9 // 3 chains)
    from tqdm import tqdm

    with tqdm(total=5 * 4, file=io.StringIO()) as bar:  # a bar takes the same counts
        E.ais(lin.model, lin.poor_guide, lin.x, num_steps=4, num_chains=2, leapfrog=1, seed=0, progress=bar)
        assert bar.n == 5 * 4


# --------------------------------------------------------------------------- refusals


class _Frozen(dist.Normal):
    """A density whose log_prob is not differentiable in its value."""

    def log_prob(self, value):
        return super().log_prob(value.detach())


class _Odd(torch.distributions.constraints.Constraint):
    def check(self, value):
        return value == value


class _OddNormal(dist.Normal):
    support = _Odd()


def _one(site, fn_model, fn_guide=None, model_extra=None, guide_extra=None):
    """A model and guide with one scalar latent ``site`` per datapoint (and optional extra sites), x (N, 2)."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample(site, fn_model(x))  # (..., N)
            if model_extra:
                pyro.sample(model_extra, dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Normal(z[..., None] * torch.ones(2), 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(site, (fn_guide or fn_model)(x))
            if guide_extra:
                pyro.sample(guide_extra, dist.Normal(torch.zeros(x.shape[0]), 1.0))

    return model, guide


def _normal(x):
    return dist.Normal(torch.zeros(x.shape[0]), 1.0)


@pytest.mark.parametrize(
    "case,match",
    [
        (
            dict(site="c", fn_model=lambda x: dist.Bernoulli(0.5 * torch.ones(x.shape[0]))),
            "site 'c' is discrete",
        ),
        (
            dict(site="z", fn_model=lambda x: _Frozen(torch.zeros(x.shape[0]), 1.0)),
            "site 'z'.*not reparameterizable",
        ),
        (dict(site="z", fn_model=lambda x: _OddNormal(torch.zeros(x.shape[0]), 1.0)), "site 'z' has support"),
        (dict(site="z", fn_model=_normal, model_extra="w"), "model site 'w' has no guide site"),
        (dict(site="z", fn_model=_normal, guide_extra="a"), "guide site 'a' has no model site"),
    ],
)
def test_what_ais_cannot_move_is_refused_in_one_line_naming_the_site(case, match):
    model, guide = _one(**case)
    x = torch.randn(4, 2)
    with pytest.raises(UserError, match=match) as e:
        E.ais(model, guide, x, num_steps=3, num_chains=2, leapfrog=1, seed=0)
    assert "\n" not in str(e.value)
    if "has no" in match:  # the remedy, named as the Python argument and as the command line's flag
        assert "use init='prior' (--ais-init prior)" in str(e.value)
        # with the prior as base, the guide is not annealed over: no refusal
        E.ais(model, guide, x, num_steps=3, num_chains=2, leapfrog=1, seed=0, init="prior")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_steps=0), "num_steps must be an integer >= 1"),
        (dict(num_chains=0), "num_chains must be an integer >= 1"),
        (dict(leapfrog=1.5), "leapfrog must be an integer >= 1"),
        (dict(pilot_chains=-1), "pilot_chains must be an integer >= 0"),
        (dict(step_size=0.0), "step_size must be a number > 0"),
        (dict(init="posterior"), "init must be 'guide' or 'prior'"),
        (dict(schedule="cosine"), "schedule must be one of sigmoid, linear"),
    ],
)
def test_bad_settings_are_refused_in_one_line(kwargs, match):
    lin = Linear(n=2)
    kw = dict(num_steps=3, num_chains=2, leapfrog=1, seed=0) | kwargs
    with pytest.raises(UserError, match=match) as e:
        E.ais(lin.model, lin.poor_guide, lin.x, **kw)
    assert "\n" not in str(e.value)


def test_simulate_and_reverse_ais_refuse_what_they_cannot_use():
    lin = Linear(n=3)

    def reshaping(x):  # observes a copy of x, not the argument: its draw cannot be returned as x
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(lin.d), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ lin.W.T + lin.b, lin.sigma).to_event(1), obs=x.clone())

    with pytest.raises(UserError, match="observed site 'x' does not observe an argument") as e:
        E.simulate(reshaping, lin.x)
    assert "\n" not in str(e.value)
    x, latents = E.simulate(lin.model, lin.x, seed=0)
    assert x.shape == lin.x.shape and set(latents) == {"z"} and latents["z"].shape == (3, lin.d)
    with pytest.raises(UserError, match="'w' is not a latent site of the model"):
        E.reverse_ais(lin.model, lin.poor_guide, x, {"w": latents["z"]}, num_steps=2, num_chains=2)


# --------------------------------------------------------------------------- no host synchronisation in the loop over t

SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")  # as tests/test_train_step.py


class HostSync(AssertionError):
    pass


def _guard_the_loop(monkeypatch, device):
    """Replace ais._anneal (the loop over t, nothing else) by itself run with every Python-side host
    sync of a tensor raising, and on CUDA with torch's sync debug mode on 'error'."""
    anneal, entered = ais_module._anneal, []

    def guarded(*args, **kwargs):
        entered.append(1)
        saved = {name: getattr(torch.Tensor, name) for name in SYNCS}
        for name in SYNCS:

            def refuse(*a, _name=name, **k):
                raise HostSync(f"Tensor.{_name} called inside the AIS loop (a host synchronization)")

            setattr(torch.Tensor, name, refuse)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            return anneal(*args, **kwargs)
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
            for name, fn in saved.items():
                setattr(torch.Tensor, name, fn)

    monkeypatch.setattr(ais_module, "_anneal", guarded)
    return entered


@pytest.mark.parametrize(
    "program",
    [
        {},
        {"prior": "mog"},
        {"latent_layers": 2, "z2_dim": 2},
        {"posterior": "iaf"},
        {"posterior": "iaf", "latent_layers": 2, "z2_dim": 2},
        {"likelihood": "gaussian-learned"},
    ],
)
def test_the_loop_over_t_makes_no_host_sync(device, monkeypatch, program):
    from ppl_vae.programs.model import VAE

    torch.set_default_dtype(torch.float32)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8], **program).to(device)
    x = (torch.rand(5, 16) < 0.5).float().to(device)
    entered = _guard_the_loop(monkeypatch, device)
    for init in ("guide", "prior"):
        est = E.ais(
            vae.model, vae.guide, x, num_steps=4, num_chains=3, pilot_chains=2, leapfrog=2, init=init, seed=0
        )
        assert est.value.shape == (5,) and bool(torch.isfinite(est.value).all())
    br = E.bdmc(vae.model, vae.guide, x, num_steps=3, num_chains=2, leapfrog=1, seed=0)
    assert bool(torch.isfinite(br.gap).all())
    assert len(entered) == 4  # the guard ran around every loop


def test_the_guard_catches_a_host_sync(monkeypatch):
    """The patched methods do fire: a program that reads a value back inside the loop fails."""
    lin = Linear(n=3)

    def syncing_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(lin.d), 1.0).to_event(1))
            if z.sum() > 0:  # Tensor.__bool__: a host sync
                pass
            pyro.sample("x", dist.Normal(z @ lin.W.T + lin.b, lin.sigma).to_event(1), obs=x)

    _guard_the_loop(monkeypatch, torch.device("cpu"))
    with pytest.raises(HostSync, match="__bool__"):
        E.ais(syncing_model, lin.poor_guide, lin.x, num_steps=3, num_chains=2, leapfrog=1, seed=0)


# --------------------------------------------------------------------------- python -m ppl_vae.evaluate --ais T --bdmc N


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    from ppl_vae import fit, load_dataset

    out = tmp_path_factory.mktemp("ais_run") / "run"
    fit(dataset=load_dataset("digits"), out=out, epochs=1, z_dim=2, hidden=[16], final_iwae_k=0, device="cpu")
    return out


def test_evaluate_with_ais_and_bdmc_end_to_end(digits_run, tmp_path, capsys):
    """In process, float32: the AIS row, the bracket and the headline in the table; the JSON keys;
    the per-datapoint arrays; AIS not below IWAE_30 by more than 3 combined SE (both lower bounds
    on the same log p(x); a wrong AIS weight would sit nats away); and the same per-datapoint
    numbers (1e-6) from ppl_vae.evaluate(...) in Python on the subset the command saved. (That any
    split of the blocks over ranks gives these numbers too is
    test_ais_and_bdmc_in_evaluate_give_the_same_numbers_however_blocks_are_split_over_ranks.)"""
    import json

    import numpy as np

    import ppl_vae
    from ppl_vae.evaluate import main
    from ppl_vae.reports import annealing
    from ppl_vae.training.runs import load_run, load_run_data

    js, npz = tmp_path / "e.json", tmp_path / "e.npz"
    torch.set_default_dtype(torch.float32)
    argv = [digits_run, "--subset", 12, "-K", 30, "--batch-size", 6, "--ais", 6, "--ais-chains", 3]
    argv += ["--ais-leapfrog", 2, "--bdmc", 5, "--json", js, "--per-datapoint", npz, "--quiet"]
    assert main([str(a) for a in argv]) == 0
    table = capsys.readouterr().out
    assert "log p(x) (AIS, 6 steps × 3 chains)" in table and "acceptance" in table
    assert "BDMC on 5 datapoints simulated from the model" in table and "headline: " in table
    s = json.loads(js.read_text())
    assert (s["ais_steps"], s["ais_chains"], s["ais_leapfrog"], s["bdmc_n"]) == (6, 3, 2, 5)
    assert s["ais_init"] == "guide" and "from the prior" not in table
    assert s["headline"] in ("ais", "iwae") and s["headline_why"]
    assert 0 < s["ais_accept"] <= 1 and s["ais_stderr"] > 0 and math.isfinite(s["ais"])
    assert s["bdmc_gap"] == pytest.approx(s["bdmc_upper"] - s["bdmc_lower"], abs=1e-9)
    se = math.hypot(s["ais_stderr"], s["log_px_stderr"])
    assert s["ais"] >= s["log_px"] - 3 * se, (s["ais"], s["log_px"], se)  # nats per datapoint
    per = np.load(npz)
    assert per["ais"].shape == (12,) and per["bdmc_gap"].shape == (5,)
    assert s["ais"] == pytest.approx(float(np.mean(per["ais"])), abs=1e-9)
    # the paired difference, recomputed from the saved arrays: its spread across datapoints is
    # below either estimate's own (the datapoints' log p(x) differ by nats, AIS − IWAE by little)
    diff = per["ais"] - per["log_px"]
    assert s["ais_minus_iwae"] == pytest.approx(float(diff.mean()), abs=1e-9)
    assert s["ais_minus_iwae_stderr_across_datapoints"] == pytest.approx(diff.std(ddof=1) / 12**0.5, rel=1e-9)
    assert s["ais_minus_iwae_stderr_across_datapoints"] < s["ais_stderr_across_datapoints"]
    assert f"AIS − IWAE K=30, paired per datapoint: {s['ais_minus_iwae']:+.3f} nats" in table
    # the same numbers from Python: the run's model on the rows of the test split the command used
    vae, cfg = load_run(digits_run)
    ds = load_run_data(cfg, vae.likelihood)  # as evaluate loads it
    x = ds.split("test")[torch.as_tensor(per["index"])]
    rep = ppl_vae.evaluate(vae.model, vae.guide, x, num_samples=30, batch_size=6, ais_steps=6, ais_chains=3,
                           ais_leapfrog=2, bdmc=5)  # fmt: skip
    for key in ("log_px", *annealing.ARRAYS):
        got = np.asarray(rep.per_datapoint[key], dtype=np.float64)
        np.testing.assert_allclose(got, per[key].astype(np.float64), rtol=0, atol=1e-6, err_msg=key)
    assert rep["ais"] == pytest.approx(s["ais"], abs=1e-6)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--bdmc", "5"], "--bdmc N needs --ais T"),
        (["--ais", "0"], "--ais must be >= 1, got 0"),
        (["--ais", "5", "--ais-chains", "0"], "--ais-chains must be >= 1, got 0"),
        (["--ais", "5", "--ais-leapfrog", "-1"], "--ais-leapfrog must be >= 1, got -1"),
        (["--ais", "5", "--bdmc", "0"], "--bdmc must be >= 1, got 0"),
        (["--ais", "5", "--ais-init", "posterior"], "argument --ais-init: invalid choice: 'posterior'"),
    ],
)
def test_bad_ais_flags_are_one_line_and_exit_2(flags, message, tmp_path, capsys):
    from ppl_vae.evaluate import main

    with pytest.raises(SystemExit) as e:
        main([str(tmp_path), *flags])
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1 and message in err[0], err


def test_ais_init_prior_anneals_from_the_prior_and_says_so(digits_run, tmp_path, capsys, monkeypatch):
    import json

    from ppl_vae.evaluate import main
    from ppl_vae.inference import estimators as est_module

    torch.set_default_dtype(torch.float32)
    inits, ais = [], est_module.ais
    monkeypatch.setattr(est_module, "ais", lambda *a, **k: inits.append(k["init"]) or ais(*a, **k))
    js = tmp_path / "e.json"
    argv = [digits_run, "--subset", 4, "-K", 10, "--ais", 3, "--ais-chains", 2, "--ais-init", "prior"]
    assert main([str(a) for a in [*argv, "--ais-leapfrog", 1, "--json", js, "--quiet"]]) == 0
    assert inits == ["prior"] and json.loads(js.read_text())["ais_init"] == "prior"
    assert "acceptance" in (out := capsys.readouterr().out) and "; from the prior p(z)" in out


def test_ais_and_bdmc_in_evaluate_give_the_same_numbers_however_blocks_are_split_over_ranks(monkeypatch):
    """evaluate(ctx=rank r of 2 or 3): each rank computes its blocks' AIS and BDMC, the gathered
    report is the single process's, array for array (the process group replaced by the ranks' results)."""
    from ppl_vae.core import distributed
    from ppl_vae.programs.model import VAE
    from ppl_vae.reports import annealing, evaluation

    torch.set_default_dtype(torch.float32)
    vae = VAE((1, 4, 4), z_dim=2, hidden=[8])
    x = (torch.rand(13, 16) < 0.5).float()
    ais = dict(num_steps=4, num_chains=2, leapfrog=1)
    kw = dict(num_samples=10, seed=3, batch_size=5, mean_samples=0, ais_steps=4, ais_chains=2, ais_leapfrog=1)
    single = evaluation.evaluate(vae.model, vae.guide, x, bdmc=7, **kw)
    for world in (2, 3):
        ranks = [distributed.Context(rank=r, world_size=world) for r in range(world)]
        shares = [
            evaluation.evaluate_blocks(
                vae.model, vae.guide, x, distributed.strided(range(3), c), block_size=5, num_samples=10,
                ks=[1, 10], seed=3, mean_samples=0, ais=ais,
            )
            for c in ranks
        ]  # fmt: skip
        sims = []
        for c in ranks:  # each rank's BDMC blocks, before the gather
            monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, ctx: sims.append(obj) or [obj])
            annealing.bdmc_blocks(vae.model, vae.guide, x, 7, 5, 3, ais, None, c)
        monkeypatch.setattr(
            distributed, "all_gather_objects", lambda obj, ctx: shares if isinstance(obj, dict) else sims
        )
        gathered = evaluation.evaluate(vae.model, vae.guide, x, ctx=ranks[1], bdmc=7, **kw)
        for key, v in single.per_datapoint.items():
            if isinstance(v, np.ndarray):
                np.testing.assert_allclose(gathered.per_datapoint[key], v, rtol=1e-6, err_msg=key)
        keys = [k for k in single if ("ais" in k or "bdmc" in k) and k != "ais_init"]
        assert {k: gathered[k] for k in keys} == pytest.approx({k: single[k] for k in keys}, rel=1e-6)
        assert gathered["ais_init"] == single["ais_init"] == "guide"


@pytest.mark.parametrize(
    "ais,reliable,pick,says",
    [
        (-90.0, False, "ais", "AIS is 2.000 nats above IWAE_1000"),
        (-94.0, True, "iwae", "AIS is 2.000 nats below IWAE_1000: too few steps"),
        (-92.05, True, "iwae", "agree within 2 SE (-0.050 nats), and its k̂ says its SE holds"),
        (-92.05, False, "ais", "its k̂ says its SE does not hold"),
        (-92.05, None, "ais", "its k̂ is not computed (K < 21)"),
    ],
)
def test_the_headline_is_the_tighter_bound_or_the_one_whose_diagnostics_hold(ais, reliable, pick, says):
    from ppl_vae.reports.report import headline

    s = dict(
        log_px=-92.0, log_px_stderr=0.05, ais=ais, ais_stderr=0.05, num_samples=1000, log_px_reliable=reliable
    )
    assert headline({**s, "ais": None}) is None
    got, why = headline(s)
    assert got == pick and says in why, why
    flagged = headline({**s, "ais_untrusted_frac": 0.5, "bdmc_n": 50, "bdmc_gap": 0.123})[1]
    assert "on 50 simulated datapoints AIS's bracket is 0.123 nats wide" in flagged
    assert ("AIS's SE is unreliable on 50 %" in flagged) == (pick == "ais")


@pytest.mark.parametrize(
    "lower, upper, says",
    [
        (-97.50, -97.40, "-97.500 ≤ log p(x) ≤ -97.400 (means), mean width 0.100 nats"),
        (
            -97.459,
            -97.460,
            "they cross by 0.001 nats, within their Monte Carlo error (SE 0.018): the width is 0",
        ),
        (
            -97.0,
            -97.5,
            "they cross by 0.500 nats, beyond their Monte Carlo error (SE 0.018): not a valid bracket",
        ),
    ],
)
def test_the_bdmc_bracket_never_prints_a_negative_width(lower, upper, says):
    """The two ends are stochastic: means that cross within their error read as width 0 (a real
    run at T = 1000 crossed by 0.0003 nats and printed "-97.459 ≤ log p(x) ≤ -97.460")."""
    from ppl_vae.reports.report import bracket

    s = dict(bdmc_lower=lower, bdmc_upper=upper, bdmc_gap=upper - lower, bdmc_lower_stderr=0.0125)
    s["bdmc_upper_stderr"] = 0.0125
    assert says in bracket(s)


# --------------------------------------------------------------------------- evaluate: one probe, the chunk size, out-of-memory


def _small_vae(n=13):
    """A float64 VAE and n binary datapoints (float64: AIS's numbers at two pass sizes agree to 1e-9)."""
    from ppl_vae.programs.model import VAE

    torch.manual_seed(0)
    return VAE((1, 4, 4), z_dim=2, hidden=[8]), (torch.rand(n, 16) < 0.5).double()


AIS_KW = dict(num_samples=10, ks=[1, 10], seed=3, mean_samples=0)


def test_an_evaluation_with_ais_and_bdmc_probes_the_program_once(monkeypatch):
    """evaluate() probes model and guide once and passes the probe to the AIS of each of its three
    blocks and to both directions of each of its two BDMC blocks (each of which would probe again)."""
    from ppl_vae.inference import checks
    from ppl_vae.reports import evaluation

    vae, x = _small_vae()
    calls, probe = [], checks._probe
    monkeypatch.setattr(checks, "_probe", lambda *a: calls.append(1) or probe(*a))
    rep = evaluation.evaluate(
        vae.model, vae.guide, x, batch_size=5, ais_steps=3, ais_chains=2, ais_leapfrog=1, bdmc=7,
        **{k: v for k, v in AIS_KW.items() if k != "ks"},
    )  # fmt: skip
    assert len(calls) == 1, len(calls)
    assert rep.per_datapoint["ais"].shape == (13,) and rep.per_datapoint["bdmc_gap"].shape == (7,)


def test_the_evaluations_chunk_size_reaches_ais_and_bdmc_and_does_not_change_their_numbers(monkeypatch):
    """evaluate(chunk_size=C) passes C (chains × datapoints per pass) and its probe to every AIS and
    BDMC call; at C = 12 (2 datapoints per pass of 2 + 4 pilot chains) the numbers are those of the
    default chunk size (every block in one pass): datapoint i's chains are seeded by i alone."""
    from ppl_vae.inference import checks
    from ppl_vae.inference import estimators as est_module
    from ppl_vae.reports import evaluation

    vae, x = _small_vae()
    kw = dict(batch_size=5, ais_steps=4, ais_chains=2, ais_leapfrog=2, bdmc=7, **AIS_KW)
    kw.pop("ks")
    seen = []
    for name in ("ais", "bdmc"):
        fn = getattr(est_module, name)
        monkeypatch.setattr(
            est_module, name, lambda *a, _fn=fn, _n=name, **k: seen.append((_n, k)) or _fn(*a, **k)
        )
    small = evaluation.evaluate(vae.model, vae.guide, x, chunk_size=12, **kw)
    assert [n for n, _ in seen] == ["ais"] * 3 + ["bdmc"] * 2
    assert all(k["chunk_size"] == 12 and isinstance(k["program"], checks.Program) for _, k in seen)
    seen.clear()
    whole = evaluation.evaluate(vae.model, vae.guide, x, **kw)
    assert all(k["chunk_size"] == 4096 for _, k in seen)  # the CPU's default
    for key in ("ais", "ais_stderr", "ais_accept", "bdmc_lower", "bdmc_upper"):
        np.testing.assert_allclose(small.per_datapoint[key], whole.per_datapoint[key], rtol=1e-9, err_msg=key)


def test_cuda_out_of_memory_in_ais_or_bdmc_halves_the_chunk_and_retries_with_the_same_numbers():
    """A model that runs out of memory (simulated) on an AIS pass of more than 20 datapoints, at its
    4th model pass (in the second transition, after one step was counted): the block is retried
    with half the chunk size down to 100 (16 datapoints of 6 chains), and so is each BDMC block;
    the numbers are those of a run that never ran out, and the progress (a tqdm bar, a plain
    callable) ends at the work, datapoints × steps, the failed attempts' steps taken back."""
    from pyro.poutine.messenger import Messenger
    from tqdm import tqdm

    from ppl_vae.reports import annealing, evaluation

    vae, x = _small_vae(30)

    class OutOfMemoryOnLargeAISPasses(Messenger):
        large = 0  # large passes since the last failure: start (2 passes), transition 1, then out

        def _pyro_post_sample(self, msg):
            shape = msg["fn"].batch_shape if msg["name"] == "x" else ()
            if len(shape) == 2 and shape[0] == 6 and shape[1] > 20:  # AIS: 2 + 4 pilot chains
                OutOfMemoryOnLargeAISPasses.large += 1
                if OutOfMemoryOnLargeAISPasses.large == 4:
                    OutOfMemoryOnLargeAISPasses.large = 0
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def fragile(x):
        with OutOfMemoryOnLargeAISPasses():
            vae.model(x)

    ais = dict(num_steps=3, num_chains=2, leapfrog=1)
    kw = dict(block_size=30, **AIS_KW)
    logs = []
    with tqdm(total=30 * 3, file=io.StringIO()) as bar:
        got = evaluation.evaluate_blocks(
            fragile, vae.guide, x, [0], chunk_size=1200, log=logs.append, ais=ais | {"progress": bar}, **kw
        )
        assert bar.n == 30 * 3  # 30 datapoints × 3 steps; without the undo 205 (four failed attempts)
    ref = evaluation.evaluate_blocks(vae.model, vae.guide, x, [0], chunk_size=1200, ais=ais, **kw)
    assert got["chunk_size"] == 100 and logs[0].startswith("CUDA out of memory: retrying block 0"), logs
    assert sum("retrying block 0" in line for line in logs) == 4  # 1200 → 600 → 300 → 150 → 100
    counts = []
    bd = annealing.bdmc_blocks(fragile, vae.guide, x, 30, 30, 3, ais | {"progress": counts.append},
                               chunk_size=1200, log=logs.append)  # fmt: skip
    assert sum(counts) == 2 * 30 * 3 and min(counts) < 0  # forward and reverse: 30 datapoints × 3 steps
    bd_ref = annealing.bdmc_blocks(vae.model, vae.guide, x, 30, 30, 3, ais, chunk_size=1200)
    assert bd["chunk_size"] == 100 and bd_ref["chunk_size"] == 1200
    assert "CUDA out of memory: retrying BDMC block 0 with --chunk-size 600" in logs
    for key in ("ais", "ais_stderr", "log_px"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-9, err_msg=key)
    for key in annealing.BDMC_PER_DATAPOINT:
        np.testing.assert_allclose(bd[key], bd_ref[key], rtol=1e-9, atol=1e-12, err_msg=key)


@pytest.mark.slow  # five one-epoch fits and their evaluations (~20 s)
@pytest.mark.filterwarnings("ignore:posterior collapse")  # one epoch: the fits' warnings are expected
@pytest.mark.parametrize(
    "family",
    [
        {"prior": "vampprior", "pseudo_inputs": 5},
        {"prior": "mog"},
        {"latent_layers": 2, "z2_dim": 2, "hierarchy": "skip"},
        {"guide": "iaf"},
        {"conditional": True},
    ],
    ids=["vampprior", "mog", "two-layers-skip", "iaf-guide", "conditional"],
)
def test_evaluate_ais_and_bdmc_on_a_run_of_every_program_family(family, tmp_path, capsys):
    """``python -m ppl_vae.evaluate RUN --ais T --bdmc N`` on a fitted run of each family of
    programs the CLI trains (priors, guides, one and two layers, conditional): the table's AIS row
    (its value and acceptance) and BDMC line (the bracket of the JSON's numbers); finite numbers in
    the JSON; AIS not below IWAE_50 by more than 3 combined SE (both lower bounds on the same
    log p(x), nats per datapoint)."""
    import json

    from ppl_vae import fit, load_dataset
    from ppl_vae.evaluate import main
    from ppl_vae.reports.report import bracket

    torch.set_default_dtype(torch.float32)  # as the command line runs
    out = tmp_path / "run"
    fit(dataset=load_dataset("digits"), out=out, epochs=1, z_dim=2, hidden=[16], final_iwae_k=0,
        device="cpu", quiet=True, **family)  # fmt: skip
    js = tmp_path / "e.json"
    argv = [out, "--subset", 6, "-K", 50, "--ais", 5, "--ais-chains", 4, "--ais-leapfrog", 2, "--bdmc", 3]
    capsys.readouterr()  # the fit's output
    assert main([str(a) for a in [*argv, "--json", js, "--quiet"]]) == 0  # --quiet: no progress bars
    table = capsys.readouterr().out.splitlines()
    s = json.loads(js.read_text())
    assert (s["ais_steps"], s["ais_chains"], s["bdmc_n"]) == (5, 4, 3)
    for key in ("ais", "ais_stderr", "ais_accept", "bdmc_lower", "bdmc_upper"):
        assert math.isfinite(s[key]), key
    row = [line for line in table if line.startswith("log p(x) (AIS, 5 steps × 4 chains)")]
    assert len(row) == 1 and f"{s['ais']:.3f}" in row[0] and "acceptance" in row[0], table
    assert "BDMC on 3 datapoints simulated from the model: " + bracket(s) in table, table
    se = math.hypot(s["ais_stderr"], s["log_px_stderr"])
    assert s["ais"] >= s["log_px"] - 3 * se, (s["ais"], s["log_px"], se)


@pytest.mark.parametrize("tty", [False, True])
def test_the_command_draws_progress_bars_on_a_terminal_only(digits_run, monkeypatch, capsys, tty):
    """``python -m ppl_vae.evaluate`` draws the IWAE and AIS bars on stderr when it is a terminal;
    into a log (stderr redirected to a file) they would write a line per refresh, so they stay off
    there. From Python, ``evaluate(progress=True)`` draws them anywhere (a notebook's widget)."""
    from ppl_vae.evaluate import main
    from ppl_vae.reports import evaluation

    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    vae, x = _small_vae()
    evaluation.evaluate(
        vae.model, vae.guide, x, batch_size=5, ais_steps=3, ais_chains=2, ais_leapfrog=1, progress=True,
        **{k: v for k, v in AIS_KW.items() if k != "ks"},
    )  # fmt: skip
    err = capsys.readouterr().err
    assert "datapoint" in err and "AIS:" in err, err
    torch.set_default_dtype(torch.float32)  # as the command line runs
    assert main([str(a) for a in [digits_run, "--subset", 6, "-K", 10, "--ais", 3, "--ais-chains", 2]]) == 0
    err = capsys.readouterr().err
    assert ("datapoint" in err, "AIS:" in err) == (tty, tty), err
