"""The training step is the loss, its backward and one optimizer update, with no host
synchronization: nothing in it reads a device value back to Python. That is what lets a CUDA
graph capture it (``--cuda-graph``), and this test checks it on any device, the CPU included,
so that a change that would break capture fails here first."""
import pyro
import pytest
import torch

from ppl_vae.config import FitConfig
from ppl_vae.model import VAE
from ppl_vae.objectives import make_objective
from ppl_vae.optim import make_optimizer
from ppl_vae.train import train_step

SYNCS = ("item", "__bool__", "__float__", "__int__", "tolist", "cpu", "numpy")


class HostSync(AssertionError):
    pass


def _forbid_host_syncs(monkeypatch):
    for name in SYNCS:
        def refuse(*args, _name=name, **kwargs):
            raise HostSync(f"Tensor.{_name} called inside the training step (a host synchronization)")
        monkeypatch.setattr(torch.Tensor, name, refuse)


@pytest.mark.parametrize("elbo,k,grad_clip,beta,program", [
    ("trace", 1, None, 1.0, {}), ("meanfield", 1, 5.0, 0.3, {}), ("trace", 4, 1.0, 0.5, {}),
    ("iwae", 5, None, 1.0, {}), ("trace", 1, None, 1.0, {"prior": "vampprior", "pseudo_inputs": 3}),
    ("trace", 1, None, 1.0, {"posterior": "iaf"}), ("trace", 2, None, 1.0, {"latent_layers": 2, "z2_dim": 2})])
def test_train_step_makes_no_host_sync(device, monkeypatch, elbo, k, grad_clip, beta, program):
    pyro.enable_validation(False)  # as in the training loop: the data were checked at load time
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8], **program).to(device)
    vae.register_params = False
    cfg = FitConfig(lr=1e-2)
    optim = make_optimizer(vae.parameters(), cfg, device)
    objective = make_objective(elbo, k)

    def loss_fn(batch, size, b):
        return objective(vae.model, vae.guide, *batch, size=size, beta=b)

    x = (torch.rand(6, 16, device=device) < 0.5).float()
    train_step(loss_fn, optim, vae.parameters(), (x,), 60, beta, grad_clip)  # first call: one-time checks
    before = [p.detach().clone() for p in vae.parameters()]
    _forbid_host_syncs(monkeypatch)
    loss = train_step(loss_fn, optim, vae.parameters(), (x,), 60, beta, grad_clip)
    monkeypatch.undo()
    assert loss.device.type == device.type and loss.dim() == 0 and torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, vae.parameters()))  # it did update


def test_the_guard_catches_a_host_sync(monkeypatch):
    """The patched methods do fire: a step whose loss function reads a value back fails."""
    vae = VAE((1, 4, 4), z_dim=3, hidden=[8])
    optim = make_optimizer(vae.parameters(), FitConfig(), torch.device("cpu"))
    objective = make_objective("trace")

    def syncing_loss(batch, size, b):
        loss = objective(vae.model, vae.guide, *batch, size=size, beta=b)
        if loss > 0:  # Tensor.__bool__: a host sync
            return loss
        return loss

    x = (torch.rand(6, 16) < 0.5).float()
    _forbid_host_syncs(monkeypatch)
    with pytest.raises(HostSync, match="__bool__"):
        train_step(syncing_loss, optim, vae.parameters(), (x,), 60, 1.0)
