"""Parameter averaging (``--ema``): the recursion against its closed form, the trainer updating
it after every step, and every consumer (validation, best.pt, evaluate, --resume) using θ̄.

Tiny runs on 48 binary 4x4 images (3 steps per epoch), so each costs little more than the imports.
"""

import math

import pytest
import torch
from test_checkpoint import bits, tiny_config  # noqa: F401  (bits: a fixture)
from torch import nn

from ppl_vae.core.errors import CheckpointError
from ppl_vae.training.averaging import ParameterAverage
from ppl_vae.training.runs import load_run
from ppl_vae.training.train import Trainer
from ppl_vae.training.validation import elbo_terms_on

DECAY = 0.6  # a short memory, so that three steps per epoch move θ̄ well away from θ₀


def test_average_is_the_closed_form_of_the_recursion():
    """θ̄_T = d^T θ₀ + Σ_{t=1..T} (1 − d) d^{T−t} θ_t for any sequence θ_1..θ_T, to 1e-12
    (float64); buffers are copied, not averaged."""
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    net.register_buffer("const", torch.zeros(2, dtype=torch.float64))
    avg = ParameterAverage(net, 0.9)
    thetas = [torch.cat([p.detach().flatten() for p in net.parameters()])]  # θ₀
    for t in range(1, 6):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
            net.const.fill_(t)
        thetas.append(torch.cat([p.detach().flatten() for p in net.parameters()]))
        avg.update()
    T, d = len(thetas) - 1, 0.9
    closed = d**T * thetas[0] + sum((1 - d) * d ** (T - t) * thetas[t] for t in range(1, T + 1))
    torch.testing.assert_close(
        torch.cat([p.flatten() for p in avg.model.parameters()]), closed, rtol=1e-12, atol=1e-12
    )
    assert torch.equal(avg.model.const, torch.full((2,), 5.0, dtype=torch.float64))
    assert not any(p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay must be in"):
            ParameterAverage(net, bad)


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.double().flatten() for v in state.values()])


def test_trainer_averages_after_every_step_and_judges_and_keeps_the_average(bits, tmp_path):  # noqa: F811
    """θ̄ after two epochs is the recursion over the θ_t the optimizer produced (each step's θ
    recorded by a hook), to 1e-6; the validation ELBO in metrics is θ̄'s; best.pt and
    checkpoint.pt hold θ̄ as ``model`` (what evaluate loads) and θ as ``train_model``."""
    trainer = Trainer(tiny_config(bits, epochs=2, ema=DECAY), tmp_path / "run", quiet=True)
    params = list(trainer.model.parameters())
    expected = [p.detach().double().clone() for p in params]  # θ̄₀ = θ₀

    def after_step(*_):
        for e, p in zip(expected, params):
            e.mul_(DECAY).add_((1 - DECAY) * p.detach().double())

    trainer.optim.register_step_post_hook(after_step)
    trainer.run()
    for e, a in zip(expected, trainer.average.model.parameters()):
        torch.testing.assert_close(a.double(), e, rtol=1e-6, atol=1e-6)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert torch.equal(_flat(ckpt["model"]), _flat(trainer.average.model.state_dict()))
    assert torch.equal(_flat(ckpt["train_model"]), _flat(trainer.model.state_dict()))
    assert (_flat(ckpt["model"]) - _flat(ckpt["train_model"])).abs().max() > 1e-3  # θ̄ is not θ
    vae, _ = load_run(tmp_path / "run", "best", device=trainer.device)
    valid = trainer.data.valid
    rows = trainer.state.rows
    best = max(range(len(rows)), key=lambda i: rows[i]["valid_elbo"])
    assert torch.load(tmp_path / "run" / "best.pt", weights_only=True)["epoch"] == best + 1
    # best.pt holds θ̄ of its epoch: its validation ELBO is that epoch's row
    assert elbo_terms_on(vae, valid)["valid_elbo"] == pytest.approx(rows[best]["valid_elbo"], abs=1e-9)
    raw = elbo_terms_on(trainer.model.eval(), valid)["valid_elbo"]
    judged = elbo_terms_on(trainer.average.model, valid)["valid_elbo"]
    assert judged == pytest.approx(rows[-1]["valid_elbo"], abs=1e-9) and not math.isclose(raw, judged)


def test_resume_with_averaging_equals_one_go(bits, tmp_path):  # noqa: F811
    """2 epochs, then --resume to 4 = 4 epochs in one go: θ and θ̄ to 1e-6, the metrics exactly."""
    Trainer(tiny_config(bits, epochs=4, ema=DECAY), tmp_path / "one", quiet=True).run()
    Trainer(tiny_config(bits, epochs=2, ema=DECAY), tmp_path / "two", quiet=True).run()
    Trainer(tiny_config(bits, epochs=4, ema=DECAY), tmp_path / "two", resume=True, quiet=True).run()
    one, two = (torch.load(tmp_path / r / "checkpoint.pt", weights_only=True) for r in ("one", "two"))
    for key in ("model", "train_model"):
        assert (_flat(one[key]) - _flat(two[key])).abs().max() <= 1e-6
    strip = [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in one["metrics"]]
    assert strip == [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in two["metrics"]]
    # what is judged cannot change mid-run: switching --ema on --resume is refused, the run kept
    for ema in (0.0, 0.9):
        with pytest.raises(CheckpointError, match=f"ema: checkpoint has {DECAY}, requested {ema}"):
            Trainer(tiny_config(bits, epochs=5, ema=ema), tmp_path / "two", resume=True, quiet=True)
    assert torch.equal(
        _flat(torch.load(tmp_path / "two" / "checkpoint.pt", weights_only=True)["model"]), _flat(two["model"])
    )
