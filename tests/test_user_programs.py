"""Pyro programs written the way users write them, through the estimators: each construct is
either scored as Pyro's own ``Trace_ELBO`` scores it, or refused in one line (issue 24; more
constructs to come: masks, point-mass guides, enumeration)."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions.transforms import Planar, Radial
from pyro.infer import Trace_ELBO

from ppl_vae import estimators

D, Z, N = 5, 2, 8


@pytest.mark.parametrize("transform", [Planar, Radial])
def test_a_planar_or_radial_flow_guide_is_scored_as_trace_elbo_scores_it(transform):
    """A flow guide whose cache breaks a slice of the batch (a ``KeyError`` before) is weighed on
    the whole batch: its ELBO agrees with the mean of Pyro's ``Trace_ELBO`` within 4 combined
    standard errors, and IWAE_100 ≥ ELBO."""
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

    ours = estimators.elbo(model, guide, x, num_samples=5000, seed=0)
    pyro.set_rng_seed(1)
    theirs = torch.tensor([-Trace_ELBO().loss(model, guide, x) / N for _ in range(1500)])
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
