"""Pyro programs written the way users write them, through the estimators: each construct is
either scored as Pyro's own ``Trace_ELBO`` / ``TraceEnum_ELBO`` scores it or as a closed form
gives it, or refused in one line (issue 24; the table in docs/estimators.md, "Pyro constructs,
one by one")."""

import math
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions.transforms import Householder, Planar, Radial, Spline, Sylvester, affine_coupling
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import (
    AutoDelta,
    AutoDiagonalNormal,
    AutoGuideList,
    AutoLaplaceApproximation,
    AutoNormal,
    init_to_value,
)

from ppl_vae import estimators
from ppl_vae.inference.constructs import ScaledProgram, refuse_point_masses

D, Z, N = 5, 2, 8


FLOWS = {
    "planar": Planar,
    "radial": Radial,
    "sylvester": Sylvester,
    "householder": lambda d: Householder(d, count_transforms=2),
    "spline": lambda d: Spline(d, count_bins=4),
    "affine_coupling": lambda d: affine_coupling(d, hidden_dims=[8]),
}


@pytest.mark.parametrize("transform", FLOWS.values(), ids=FLOWS.keys())
def test_every_pyro_flow_guide_is_scored_as_trace_elbo_scores_it(transform):
    """Each of Pyro's flows as a guide (Planar and Radial, whose cache breaks a slice of the batch:
    a ``KeyError`` before; Sylvester, which has no inverse; Householder, spline, affine coupling)
    is weighed on the trace that drew it: its ELBO agrees with the mean of Pyro's ``Trace_ELBO``
    within 4 combined standard errors, and IWAE_100 ≥ ELBO."""
    torch.manual_seed(0)
    w, x = torch.randn(Z, D), torch.randn(N, D)
    flow = transform(Z)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))  # [N, Z]
            pyro.sample("x", dist.Normal(z @ w, 1.0).to_event(1), obs=x)  # [N, D]

    def guide(x):
        pyro.module("flow", flow)
        with pyro.plate("data", x.shape[0]):
            base = dist.Normal(torch.zeros(Z), 1.0).to_event(1)
            pyro.sample("z", dist.TransformedDistribution(base, [flow]))

    ours = estimators.elbo(model, guide, x, num_samples=2000, seed=0)
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    theirs = torch.tensor([-elbo.loss(model, guide, x) / N for _ in range(6)])  # 6 means of 500
    se = math.hypot(ours.mean_stderr(), theirs.std().item() / math.sqrt(len(theirs)))
    assert abs(ours.mean() - theirs.mean().item()) < 4 * se, (ours.mean(), theirs.mean().item(), se)
    iwae = estimators.iwae(model, guide, x, num_samples=100, seed=2)
    assert iwae.mean() >= ours.mean() - 4 * ours.mean_stderr()


def test_the_0_1_names_are_still_in_estimators_and_ks_says_where_it_belongs():
    from ppl_vae.core.errors import UserError
    from ppl_vae.inference import importance, psis

    assert estimators.log_importance_weights is importance.log_importance_weights
    assert estimators.psis_diagnostics is psis.psis_diagnostics
    assert estimators.derive_seed(3, 1) == importance.derive_seed(3, 1)
    with pytest.raises(UserError, match="use iwae_curve"):
        estimators.iwae(lambda x: None, lambda x: None, torch.zeros(2, 1), 10, ks=[1, 10])


# --------------------------------------------------------------------------- masks and scales


def _linear_gaussian(n=6, d=5, z=2, seed=0):
    """z ~ N(0, I_z), x | z ~ N(W z, I_d), float64: W (d, z), x (n, d)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, z, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) * 2
    return w, x


def _exact(w, x, mask, temper=1.0):
    """log ∫ p(z) Π_{observed pixels} N(x_j; (Wz)_j, 1)^temper dz per datapoint, and the Gaussian
    posterior (loc (n, z), precision (n, z, z)) of that tempered, masked joint.
    N(x; μ, 1)^t = N(x; μ, 1/t) · (2π/t)^{1/2} (2π)^{-t/2}."""
    n, zd = x.shape[0], w.shape[1]
    m = mask.to(torch.float64)  # (n, d)
    prec = torch.eye(zd, dtype=torch.float64) + temper * torch.einsum("dj,nd,dk->njk", w, m, w)  # (n, z, z)
    loc = torch.linalg.solve(prec, temper * torch.einsum("dj,nd,nd->nj", w, m, x))  # (n, z)
    log_px = []
    for i in range(n):
        o = mask[i]
        wo, xo = w[o], x[i, o]
        cov = wo @ wo.T + torch.eye(int(o.sum()), dtype=torch.float64) / temper
        lp = dist.MultivariateNormal(torch.zeros_like(xo), cov).log_prob(xo)
        lp = lp + int(o.sum()) * (0.5 * math.log(2 * math.pi / temper) - temper / 2 * math.log(2 * math.pi))
        log_px.append(lp)
    return torch.stack(log_px), loc, prec


@pytest.mark.parametrize("level", ["pixel", "row", "scale"])
def test_poutine_mask_and_scale_are_honoured_as_trace_elbo_honours_them(level):
    """A pixel-level ``poutine.mask`` (a nested plate over pixels), a row-level one (whole
    datapoints, latent sites included, in model and guide), and a ``poutine.scale`` tempering
    the likelihood: with the exact posterior of the masked / tempered joint as the guide every
    log weight is the closed-form log normalizer, so IWAE_K, both ELBOs and Pyro's Trace_ELBO
    (summed over datapoints) all equal it (float64, 1e-9)."""
    w, x = _linear_gaussian()
    n, d = x.shape
    pixel = torch.rand(n, d, generator=torch.Generator().manual_seed(1)) < 0.6
    pixel[:, 0] = True
    rows = torch.tensor([True, False, True, True, False, True])
    temper = 0.5 if level == "scale" else 1.0
    mask = pixel if level == "pixel" else torch.ones(n, d, dtype=torch.bool)
    exact, loc, prec = _exact(w, x, mask, temper)
    if level == "row":
        exact = torch.where(rows, exact, torch.zeros(()))  # a masked datapoint weighs nothing

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with poutine.mask(mask=rows[:, None]) if level == "row" else nullcontext():
                z = pyro.sample("z", dist.Normal(torch.zeros(1, Z, dtype=x.dtype), 1.0).to_event(1))
                with pyro.plate("pixels", d, dim=-1), poutine.mask(mask=mask):
                    with poutine.scale(scale=temper):
                        pyro.sample("x", dist.Normal((z @ w.T).squeeze(-2), 1.0), obs=x)  # [N, D]

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            with poutine.mask(mask=rows[:, None]) if level == "row" else nullcontext():
                post = dist.MultivariateNormal(loc[:, None, :], precision_matrix=prec[:, None])  # [N, 1 | Z]
                pyro.sample("z", post)

    xs = x[: len(loc)]
    with pytest.warns(ScaledProgram, match=r"\('x' × 0.5\)") if level == "scale" else nullcontext():
        iwae = estimators.iwae(model, guide, xs, num_samples=50, seed=0).value
        terms = estimators.estimate_all(model, guide, xs, 20, seed=1, analytic_kl="auto")
    trace_elbo = -Trace_ELBO(max_plate_nesting=2).loss(model, guide, xs)
    for value in (iwae, terms["elbo_mc"].value, terms["iwae"].value):
        torch.testing.assert_close(value, exact, rtol=0, atol=1e-9)
    assert abs(trace_elbo - exact.sum().item()) < 1e-8


# --------------------------------------------------------------------------- enumeration (an M2-style label)

C = 3


def _mixture_program(w_scale: float, guide_scale: float = 1.0, where: str = "data"):
    """y ~ Categorical(π) per datapoint, enumerated in the model (the guide does not sample it),
    z ~ N(0, I), x | y, z ~ N(W z + b_y, I): log p(x) = log Σ_y π_y N(x; b_y, W Wᵀ + I) exactly.
    ``where``: "data" (supported), "global" or "pixels" (refused)."""
    g = torch.Generator().manual_seed(3)
    w = w_scale * torch.randn(D, Z, generator=g, dtype=torch.float64)
    b = 3 * torch.randn(C, D, generator=g, dtype=torch.float64)
    pi = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    x = b[torch.arange(N) % C] + torch.randn(N, D, generator=g, dtype=torch.float64)
    enum = {"enumerate": "parallel"}

    def model(x):
        if where == "global":
            y = pyro.sample("y", dist.Categorical(pi), infer=enum)
        with pyro.plate("data", x.shape[0], dim=-1):
            if where == "data":
                y = pyro.sample("y", dist.Categorical(pi), infer=enum)  # [N] or [C, 1, 1] enumerated
            z = pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))
            if where == "pixels":
                with pyro.plate("pixels", D, dim=-2):
                    y = pyro.sample("y", dist.Categorical(pi), infer=enum)
            pyro.sample("x", dist.Normal(z @ w.T + b[y], 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            loc = 0.1 * x[..., :Z]
            pyro.sample("z", dist.Normal(loc, guide_scale).to_event(1))

    exact = torch.logsumexp(
        pi.log()[:, None]
        + dist.MultivariateNormal(b[:, None], w @ w.T + torch.eye(D, dtype=x.dtype)).log_prob(x),
        0,
    )  # (N,)
    return model, guide, x, exact


def test_an_enumerated_label_is_summed_out_exactly_inside_each_weight():
    """With x independent of z (W = 0) and the prior as guide, every weight is exactly
    log Σ_y π_y N(x; b_y, I) = log p(x): IWAE, the Monte Carlo ELBO and Pyro's TraceEnum_ELBO
    all equal it (float64, 1e-9). Sampling y instead (the old behaviour) is off by nats."""
    model, _, x, exact = _mixture_program(w_scale=0.0)

    def prior_guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))

    terms = estimators.estimate_all(model, prior_guide, x, 10, seed=0)
    for value in (terms["iwae"].value, terms["elbo_mc"].value):
        torch.testing.assert_close(value, exact, rtol=0, atol=1e-9)
    assert terms["elbo_analytic"] is None and "enumerated" in terms["elbo_analytic_na"]
    enum_elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, prior_guide, x)
    assert abs(enum_elbo - exact.sum().item()) < 1e-8
    recon = estimators.elbo_terms(model, prior_guide, x, num_samples=4, seed=1)
    torch.testing.assert_close(recon["recon"].value, exact, rtol=0, atol=1e-9)  # p(x | z) = p(x) here


def test_an_enumerated_label_gives_trace_enum_elbos_bound_and_iwae_converges_to_log_px():
    """W ≠ 0 and a poor guide: the Monte Carlo ELBO is TraceEnum_ELBO's bound (within 4 combined
    standard errors of Pyro's vectorized estimate), and IWAE_5000 is within 0.05 nats of the exact
    log p(x) on average (a lower bound: not above it by more than 3 SE of the mean)."""
    model, guide, x, exact = _mixture_program(w_scale=1.0, guide_scale=0.7)
    ours = estimators.elbo(model, guide, x, num_samples=4000, seed=0)
    pyro.set_rng_seed(0)
    elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=4000, vectorize_particles=True)
    theirs = torch.tensor([-elbo.loss(model, guide, x) / N for _ in range(5)])
    se = math.hypot(ours.mean_stderr(), theirs.std().item() / math.sqrt(len(theirs)))
    assert abs(ours.mean() - theirs.mean().item()) < 4 * se + 1e-3, (ours.mean(), theirs.mean().item(), se)
    iwae = estimators.iwae(model, guide, x, num_samples=5000, seed=1)
    assert (iwae.value - exact).mean().abs() < 0.05
    assert iwae.mean() <= exact.mean().item() + 3 * iwae.mean_stderr()


@pytest.mark.parametrize(
    "where, message",
    [
        ("global", r"model site 'y' is not inside a vectorized pyro.plate\('data', N\)"),
        ("pixels", r"'y' is enumerated inside plate\(s\) \['data', 'pixels'\]"),
    ],
)
def test_enumeration_the_sum_does_not_cover_is_refused_in_one_line(where, message):
    from ppl_vae.core.errors import UserError

    model, guide, x, _ = _mixture_program(w_scale=1.0, where=where)
    with pytest.raises(UserError, match=message):
        estimators.iwae(model, guide, x, num_samples=10, seed=0)


def test_an_enumerated_guide_site_is_refused_in_one_line():
    from ppl_vae.core.errors import UserError

    model, _, x, _ = _mixture_program(w_scale=1.0)

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("y", dist.Categorical(torch.ones(C) / C), infer={"enumerate": "parallel"})
            pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))

    with pytest.raises(UserError, match=r"guide site 'y' is marked for enumeration"):
        estimators.iwae(model, guide, x, num_samples=10, seed=0)


# --------------------------------------------------------------------------- point masses


def test_a_point_mass_guide_is_refused_in_one_line_by_every_estimator():
    """AutoDelta (MAP) has no density: log p(x, z*) is no bound on log p(x). iwae, elbo and
    evaluate refuse it in one line naming the site."""
    import ppl_vae
    from ppl_vae.core.errors import UserError

    _, _, x, _ = _mixture_program(w_scale=1.0)

    def plain(x):  # AutoDelta of the model without its enumerated label
        with pyro.plate("data", x.shape[0], dim=-1):
            pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1), obs=x)

    delta = AutoDelta(plain)
    for call in (
        lambda: estimators.iwae(plain, delta, x, num_samples=10),
        lambda: estimators.elbo(plain, delta, x),
        lambda: ppl_vae.evaluate(plain, delta, x, num_samples=10),
    ):
        with pytest.raises(UserError, match=r"guide site 'z' is a point mass \(Delta"):
            call()


def _two_sites(x):
    """z ~ N(0, I), s ~ HalfNormal(1) (a constrained site: AutoNormal passes it through a bijection),
    x | z, s ~ N(z, s² I)."""
    with pyro.plate("data", x.shape[0], dim=-1):
        z = pyro.sample("z", dist.Normal(torch.zeros(D, dtype=x.dtype), 1.0).to_event(1))
        s = pyro.sample("s", dist.HalfNormal(torch.ones((), dtype=x.dtype)))
        pyro.sample("x", dist.Normal(z, s.unsqueeze(-1)).to_event(1), obs=x)


def _guide_list(*parts):
    """An AutoGuideList of ``(AutoGuide class, site)`` parts, each on the model blocked to its site."""
    guide = AutoGuideList(_two_sites)
    for make, site in parts:
        guide.append(make(poutine.block(_two_sites, expose=[site])))
    return guide


@pytest.mark.parametrize(
    "parts,site",
    [
        ([(AutoDelta, "z"), (AutoNormal, "s")], "z"),
        ([(AutoNormal, "z"), (AutoDelta, "s")], "s"),  # the point mass after the auxiliary draws
        ([(AutoDelta, "z"), (AutoDiagonalNormal, "s")], "z"),  # (its auxiliary site is outside the plate)
    ],
    ids=["delta+normal", "normal+delta", "delta+diagonal"],
)
def test_a_point_mass_part_of_a_guide_list_is_refused_naming_its_site(parts, site):
    """The rule is per site: before, any auxiliary site anywhere in the guide let every point
    mass through, so an AutoGuideList of an AutoDelta part and an AutoNormal part was estimated
    with log q = 0 at the AutoDelta's site. Now that site is refused in one line, by iwae and elbo."""
    from ppl_vae.core.errors import UserError

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    guide = _guide_list(*parts)
    for call in (
        lambda: estimators.iwae(_two_sites, guide, x, num_samples=10, seed=0),
        lambda: estimators.elbo(_two_sites, guide, x, seed=0),
    ):
        with pytest.raises(
            UserError, match=rf"^guide site '{site}' is a point mass \(Delta.*no auxiliary draw"
        ):
            call()


def test_point_masses_an_auxiliary_draw_decides_pass_and_a_point_mass_auxiliary_site_does_not():
    """AutoNormal passes every site on through a Delta decided by its auxiliary draw (the
    constrained s through exp, with its Jacobian): estimated, as an AutoGuideList of AutoNormal
    parts is, equal to the single AutoNormal's weights. Against Pyro's Trace_ELBO (which weighs
    log q(u_z) + log q(u_s) − u_s, the Delta's log_density): with s's unconstrained loc at 1, the
    mean ELBO agrees within 4 combined standard errors (SE ≈ 0.012 nats), where a dropped Jacobian
    would move it by E[u_s] = 1 nat per datapoint. AutoLaplaceApproximation before
    laplace_approximation() draws its auxiliary site from a Delta itself: refused, naming it."""
    from ppl_vae.core.errors import UserError

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    single = estimators.iwae(_two_sites, AutoNormal(_two_sites), x, num_samples=10, seed=0).value
    parts = estimators.iwae(
        _two_sites, _guide_list((AutoNormal, "z"), (AutoNormal, "s")), x, num_samples=10, seed=0
    ).value
    assert single.shape == (N,) and torch.isfinite(single).all()
    torch.testing.assert_close(parts, single)  # the same draws, the same Jacobians

    pyro.clear_param_store()
    values = {"z": x / 2, "s": torch.full((N,), math.e, dtype=x.dtype)}  # u_s = log s = 1
    guide = AutoNormal(_two_sites, init_loc_fn=init_to_value(values=values))
    ours = estimators.elbo(_two_sites, guide, x, num_samples=5000, seed=0)
    torch.testing.assert_close(guide.locs.s_unconstrained.detach(), torch.ones(N, dtype=x.dtype))
    pyro.set_rng_seed(1)
    elbo = Trace_ELBO(num_particles=500, vectorize_particles=True, max_plate_nesting=1)
    theirs = torch.tensor([-elbo.loss(_two_sites, guide, x) / N for _ in range(10)])  # 10 means of 500
    se = math.hypot(ours.mean_stderr(), theirs.std().item() / math.sqrt(len(theirs)))
    assert abs(ours.mean() - theirs.mean().item()) < 4 * se, (ours.mean(), theirs.mean().item(), se)
    assert 1.0 > 20 * se  # the Jacobian's mean, E[u_s] = 1, is far outside the tolerance
    with pytest.raises(UserError, match=r"^guide site '_AutoLaplaceApproximation_latent' is a point mass"):
        estimators.iwae(_two_sites, AutoLaplaceApproximation(_two_sites), x, num_samples=10)


def test_a_point_mass_an_auxiliary_draw_of_a_tiny_scale_decides_passes():
    """AutoNormal(init_scale=1e-9) at loc 1 in float32: each auxiliary draw rounds to the same
    float, so its Delta's value does not change when the draw is made again. Before, "decided by
    an auxiliary draw" meant "changes when redrawn", and this guide was refused as a point mass;
    now it means an autograd path from the auxiliary value: estimated, finite. The check leaves
    the caller's RNG as it was."""
    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0))  # float32
    pyro.clear_param_store()
    values = {"z": torch.ones(N, D), "s": torch.ones(N)}
    guide = AutoNormal(_two_sites, init_scale=1e-9, init_loc_fn=init_to_value(values=values))
    result = estimators.iwae(_two_sites, guide, x, num_samples=10, seed=0)
    assert result.value.shape == (N,) and torch.isfinite(result.value).all()

    guide_tr = poutine.trace(guide).get_trace(x)
    rerun = lambda tr: poutine.trace(poutine.replay(guide, trace=tr)).get_trace(x)  # noqa: E731
    before = torch.get_rng_state()
    refuse_point_masses(guide_tr, rerun)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("noise", ["randn", "dropout"])
def test_a_point_mass_that_changes_without_an_auxiliary_draw_is_refused(noise):
    """A Delta whose value changes from run to run (torch.randn, dropout in train mode) but is
    derived from no auxiliary draw, beside an auxiliary site that decides another Delta: before,
    its change on the second run passed it as decided by the auxiliary draw, and it was weighed
    with log q = 0. Now it is refused in one line naming it; the Delta that the auxiliary draw
    decides is not."""
    from ppl_vae.core.errors import UserError

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def guide(x):
        loc = pyro.param("point_loc", torch.zeros(D, dtype=x.dtype))
        if noise == "randn":
            z = loc + 0.1 * torch.randn(x.shape[0], D, dtype=x.dtype)
        else:
            z = torch.nn.functional.dropout(loc + x, p=0.5, training=True)
        with pyro.plate("data", x.shape[0], dim=-1):
            u = pyro.sample(
                "u", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0), infer={"is_auxiliary": True}
            )
            pyro.sample("z", dist.Delta(z, event_dim=1))
            pyro.sample("s", dist.Delta(u.exp(), log_density=-u))  # decided by u, with its Jacobian

    pyro.clear_param_store()
    for call in (
        lambda: estimators.iwae(_two_sites, guide, x, num_samples=10, seed=0),
        lambda: estimators.elbo(_two_sites, guide, x, seed=0),
    ):
        with pytest.raises(UserError, match=r"^guide site 'z' is a point mass \(Delta.*no auxiliary draw"):
            call()


def test_one_image_as_a_1_d_x_is_refused_in_one_line_and_scalar_datapoints_are_not():
    """The tutorial VAE given one image of shape (784,) would read it as 784 datapoints, each
    weighed on the same broadcast image: refused, saying to pass x[None]. A 1-D x of N scalar
    datapoints (a likelihood with no event dims) is what it says and is estimated."""
    from ppl_vae.core.errors import UserError

    dec = torch.nn.Linear(Z, D)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=dec(z)).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))

    image = torch.bernoulli(torch.full((D,), 0.5))
    with pytest.raises(UserError, match=r"observed site 'x' does not vary along .*x\[None\]"):
        estimators.iwae(model, guide, image, num_samples=10)
    assert estimators.iwae(model, guide, image[None], num_samples=10).value.shape == (1,)

    def scalar_model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def scalar_guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, math.sqrt(0.5)))  # the exact posterior

    x = torch.randn(7, dtype=torch.float64)
    exact = dist.Normal(0.0, math.sqrt(2)).log_prob(x)
    torch.testing.assert_close(estimators.iwae(scalar_model, scalar_guide, x, 20).value, exact)


def test_an_autonormal_guide_set_to_the_exact_posterior_gives_log_px_exactly():
    """AutoNormal, Pyro's default guide, holds one (loc, scale) per datapoint read by the data
    plate's indices (not slice-safe: weighed unsliced). Initialized at the exact posterior of
    z ~ N(0, I), x | z ~ N(z, I), N(x/2, I/2), every estimator returns log N(x; 0, 2 I) (1e-9)."""
    x = 2 * torch.randn(N, Z, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    guide = AutoNormal(model, init_loc_fn=lambda site: x / 2, init_scale=math.sqrt(0.5))
    exact = dist.Normal(torch.zeros(Z, dtype=x.dtype), math.sqrt(2)).to_event(1).log_prob(x)
    terms = estimators.estimate_all(guide.model, guide, x, 200, seed=0)
    for key in ("iwae", "elbo_mc", "elbo_analytic"):
        torch.testing.assert_close(terms[key].value, exact, rtol=0, atol=1e-9)


def test_a_prior_masked_in_the_model_only_is_not_taken_in_closed_form():
    """The autoencoder's trick: log p(z) masked out in the model, the guide unmasked. The closed-form
    KL would weigh −KL(q ‖ p) by the guide's mask (as TraceMeanField_ELBO does) although the model
    counts no log p(z); the site goes to Monte Carlo, so the analytic-KL ELBO equals the Monte
    Carlo one on the same draws (it was off by the whole KL term). Both against the closed form of
    the masked ELBO, E_q[log N(x; W z, I)] + H(q) with q = N(m, ¼ I), m = x[:Z]/3:
    −d/2 log 2π − ½(‖x − W m‖² + ¼ tr WᵀW) + Z/2 (1 + log 2π) + Z log ½, within 4 standard errors
    per datapoint and for the mean (SE ≈ 0.18; counting E_q[log p(z)] would move it by 2.1-2.6)."""
    w, x = _linear_gaussian()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            with poutine.mask(mask=False):
                z = pyro.sample("z", dist.Normal(torch.zeros(Z, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ w.T, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, :Z] / 3, 0.5).to_event(1))

    terms = estimators.estimate_all(model, guide, x, 50, seed=0)
    torch.testing.assert_close(terms["elbo_analytic"].value, terms["elbo_mc"].value, rtol=0, atol=1e-9)
    m, d = x[:, :Z] / 3, x.shape[1]
    exact = (
        -d / 2 * math.log(2 * math.pi)
        - 0.5 * ((x - m @ w.T).pow(2).sum(-1) + 0.25 * w.pow(2).sum())
        + Z / 2 * (1 + math.log(2 * math.pi))
        + Z * math.log(0.5)
    )  # (n,)
    mc = terms["elbo_mc"]
    assert bool(((mc.value - exact).abs() < 4 * mc.stderr).all()), (mc.value, exact, mc.stderr)
    assert abs(mc.mean() - exact.mean().item()) < 4 * mc.mean_stderr(), (mc.mean(), exact.mean())
