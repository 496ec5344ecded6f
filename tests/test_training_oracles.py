"""The training loop against outside oracles, not against itself:

* every training index is seen exactly once per epoch, at any batch size, the last partial
  batch included;
* the β the loss receives at each step is the warm-up schedule's, written out here;
* ``Trainer`` takes the same steps as Pyro's own ``SVI(model, guide, pyro.optim.Adam, Trace_ELBO())``
  on the same batches and the same draws, parameter by parameter, to float tolerance.
"""

import copy
import math

import numpy as np
import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from ppl_vae.training import runs
from ppl_vae.training.config import FitConfig
from ppl_vae.training.train import Trainer


def _bits(path, n=75, d=16, seed=0):
    x = (np.random.default_rng(seed).random((n, d)) < 0.35).astype(np.float32)
    np.save(path, x)
    return path


def _trainer(tmp_path, **kw) -> Trainer:
    cfg = FitConfig(
        dataset=str(_bits(tmp_path / "bits.npy")),
        hidden=[8],
        z_dim=2,
        final_iwae_k=0,
        device="cpu",
        **{"epochs": 2, **kw},
    )
    return Trainer(cfg, tmp_path / "run", quiet=True)


@pytest.mark.parametrize("batch_size", [1, 7, 16, 59, 64])
def test_every_training_index_is_seen_once_per_epoch(tmp_path, batch_size):
    t = _trainer(tmp_path, batch_size=batch_size, epochs=2)
    n = t.data.train.shape[0]
    seen, inner = [], t.step_fn

    def step(idx, beta, weight=1.0):
        seen.append(idx.clone())
        return inner(idx, beta, weight)

    t.step_fn = step
    t.run()
    per_epoch = math.ceil(n / batch_size)
    assert len(seen) == 2 * per_epoch
    for e in range(2):
        batches = seen[e * per_epoch : (e + 1) * per_epoch]
        assert [len(b) for b in batches] == [batch_size] * (per_epoch - 1) + [
            n - batch_size * (per_epoch - 1)
        ]
        assert torch.equal(torch.cat(batches).sort().values, torch.arange(n))  # each index once
    if batch_size < n:
        assert not torch.equal(torch.cat(seen[:per_epoch]), torch.cat(seen[per_epoch:]))  # reshuffled


def test_the_loss_receives_the_warm_up_schedules_beta(tmp_path):
    """β_t = β · min(1, (t + 1) / (W · S)) at global step t, S steps per epoch, W warm-up epochs:
    what reaches the objective, not what the metrics log."""
    t = _trainer(tmp_path, batch_size=16, epochs=3, beta=0.5, kl_warmup=1.5)
    got, inner = [], t.objective

    def objective(*args, beta, **kwargs):
        got.append(float(beta))
        return inner(*args, beta=beta, **kwargs)

    t.objective = objective
    t.run()
    steps = math.ceil(t.data.train.shape[0] / 16)
    want = [0.5 * min(1.0, (i + 1) / (1.5 * steps)) for i in range(3 * steps)]
    assert got == pytest.approx(want, rel=1e-12)


def test_training_takes_pyro_svi_steps(tmp_path):
    """The same initial parameters, batches and random draws through ``pyro.infer.SVI`` with
    ``Trace_ELBO`` and ``pyro.optim.Adam``: every parameter after every step agrees to 1e-5
    (relative; the torch Adam implementations differ in rounding only)."""
    t = _trainer(tmp_path, batch_size=16, epochs=2, lr=1e-2)
    init = copy.deepcopy(t.model.state_dict())
    n = t.data.train.shape[0]
    steps, inner = [], t.step_fn

    def step(idx, beta, weight=1.0):
        rng = torch.get_rng_state()
        loss = inner(idx, beta, weight)
        steps.append((idx.clone(), rng, [p.detach().clone() for p in t.model.parameters()]))
        return loss

    t.step_fn = step
    t.run()

    vae = runs.build_model(t.cfg)  # registers its parameters with Pyro, as SVI needs
    vae.load_state_dict(init)
    pyro.clear_param_store()
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for i, (idx, rng, after) in enumerate(steps):
        torch.set_rng_state(rng)  # the trainer's draws of ε for this step
        svi.step(t.data.train[idx], size=n)
        for (name, p), q in zip(vae.named_parameters(), after):
            torch.testing.assert_close(p.detach(), q, rtol=1e-5, atol=1e-6, msg=f"step {i}, {name}")
    assert len(steps) == 2 * math.ceil(n / 16)
    assert any(not torch.equal(p, init[k]) for k, p in vae.state_dict().items())  # it did train
