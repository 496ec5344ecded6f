"""Training schedules, end to end through the command line (``ppl_vae.fit.main``, the function
``python -m ppl_vae.fit`` runs), read back from the run directory: the KL warm-up of β, the
exponential learning-rate decay, and early stopping with ``--patience``.

The data are 40 random 4×4 binary images (train 32 / valid 4 / test 4), batches of 8: 4 steps
per epoch, a second per run. ``metrics.jsonl`` holds one row per finished epoch (``epoch``
counts from 1); its ``beta`` is the β of the epoch's last step and its ``lr`` the learning
rate after the epoch's decay step.
"""

import json

import numpy as np
import pytest

from ppl_vae import fit


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "x.npy"
    rng = np.random.default_rng(0)
    np.save(path, (rng.random((40, 4, 4)) < 0.5).astype(np.float32))
    return path


def _fit(images, out, *flags) -> tuple[list[dict], dict]:
    """Train on ``images`` into ``out``; return the metric rows and the summary."""
    argv = [
        "--dataset",
        str(images),
        "--out",
        str(out),
        "--hidden",
        "8",
        "--z-dim",
        "2",
        "--batch-size",
        "8",
        "--final-iwae-k",
        "0",
        "--device",
        "cpu",
        "--quiet",
        *map(str, flags),
    ]
    assert fit.main(argv) == 0
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    return rows, json.loads((out / "summary.json").read_text())


@pytest.fixture(scope="module")
def warmup_and_decay(images, tmp_path_factory):
    """β = 2 warmed up over 4 epochs; lr 0.01 halved after every epoch; 6 epochs."""
    return _fit(
        images,
        tmp_path_factory.mktemp("run"),
        "--beta",
        2,
        "--kl-warmup",
        4,
        "--lr",
        0.01,
        "--lr-decay",
        0.5,
        "--epochs",
        6,
    )


def test_kl_warmup_raises_beta_linearly_over_the_warmup_epochs(warmup_and_decay):
    """β after epoch e of a warm-up over E epochs is β·min(1, e/E): 0.5, 1, 1.5, 2, then 2. The
    values are exact (e/E and the products by 2 are exactly representable: compared with ==)."""
    rows, summary = warmup_and_decay
    assert summary["epochs"] == 6
    assert [r["beta"] for r in rows] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]


def test_lr_decays_by_gamma_after_every_epoch(warmup_and_decay):
    """lr after epoch e = lr·γ^e; with γ = 0.5 every product is exact, so the column equals it
    exactly (==), and an off-by-one epoch or a decay per step would differ by a factor ≥ 2."""
    rows, _ = warmup_and_decay
    assert [r["lr"] for r in rows] == [0.01 * 0.5**e for e in range(1, 7)]


def test_kl_warmup_with_the_iwae_objective(images, tmp_path):
    """``--elbo iwae --kl-warmup 2``: β of the tempered IWAE weights rises 0.5, 1, then stays 1;
    the warm-up epochs are named ``beta-iwae-K`` and the rest ``iwae-K``, and the validation bound
    the run selects on is the true IWAE_K (β = 1) from the first epoch."""
    rows, summary = _fit(
        images, tmp_path / "run", "--elbo", "iwae", "--num-particles", 3, "--kl-warmup", 2, "--epochs", 4
    )
    assert [r["beta"] for r in rows] == [0.5, 1.0, 1.0, 1.0]
    assert [r["objective"] for r in rows] == ["beta-iwae-3", "beta-iwae-3", "iwae-3", "iwae-3"]
    assert all(r["iwae_k"] == 3 and r["valid_iwae_k"] >= r["valid_elbo"] - 0.5 for r in rows)
    assert summary["epochs"] == 4


def _stop_epoch(valid: list[float], patience: int, grace: int = 0) -> int | None:
    """The epoch after which a run stops: the first epoch that ends the ``patience``-th epoch in
    a row without a strictly better validation bound than all before it, epochs 1..``grace`` not
    counted (None: it never stops)."""
    best, bad = -float("inf"), 0
    for epoch, v in enumerate(valid, 1):
        best, bad = (v, 0) if v > best else (best, bad + 1 if epoch > grace else 0)
        if bad >= patience:
            return epoch
    return None


@pytest.mark.parametrize(
    "lr, stops_after",
    [
        (1e-30, 4),  # Adam steps of ~1e-30 leave every float32 parameter as it is: the bound never
        # improves after epoch 1, so the run stops after exactly 1 + patience epochs
        (0.05, None),  # a large lr on 32 images: the bound improves, then wanders (where: read below)
    ],
)
def test_early_stopping_after_patience_epochs_without_improvement(images, tmp_path, lr, stops_after):
    """``--patience 3``: the run stops after the third epoch in a row whose validation ELBO is not
    above the best before it, and not earlier; the summary's best is the best row's, and β and
    the lr stay constant (no warm-up, no decay by default)."""
    patience, epochs = 3, 40
    rows, summary = _fit(images, tmp_path / "run", "--lr", lr, "--patience", patience, "--epochs", epochs)
    valid = [r["valid_elbo"] for r in rows]
    assert _stop_epoch(valid, patience) == len(rows) == summary["epochs"] < epochs
    if stops_after is not None:
        assert len(rows) == stops_after and len(set(valid)) == 1
    else:  # the improvement counter was reset at least once before it ran out
        assert max(valid) > valid[0] and len(rows) > 1 + patience
    assert summary["best_valid_elbo"] == max(valid)
    assert summary["stopped_by"] == ("patience" if len(rows) < epochs else "epochs")
    assert all(r["beta"] == 1.0 and r["lr"] == lr for r in rows)


@pytest.mark.parametrize(
    "flags, grace",
    [
        (["--kl-warmup", 3], 3),  # the warm-up's 3 epochs
        (["--kl-warmup", 3, "--ema", 0.5], 4),  # + θ̄'s time constant, 1/(1 − 0.5) = 2 steps = 0.5 epoch
        (["--ema", 0.9], 3),  # 10 steps = 2.5 epochs: θ̄ starts at θ₀ and follows θ that slowly
    ],
)
def test_early_stopping_does_not_count_the_warm_up(images, tmp_path, flags, grace):
    """Epochs inside the KL warm-up, as the judged parameters see it (ceil(warm-up epochs +
    1/((1 − d)·steps per epoch)) with ``--ema d``; 4 steps per epoch here), are not counted by
    ``--patience``: the validation bound is at β = 1 while the objective is not yet. Adam steps of
    1e-30 leave every parameter (and θ̄, a lerp between equal values) as it is, so the bound never
    improves after epoch 1: the run stops after exactly grace + patience epochs, where counting
    from epoch 2 would stop it after 1 + patience = 4 (the seed-2 Frey Faces run that stopped at
    epoch 147, 50 after a best epoch inside the warm-up as θ̄ saw it, is the case this fixes)."""
    patience = 3
    rows, summary = _fit(
        images, tmp_path / "run", "--lr", 1e-30, "--patience", patience, "--epochs", 20, *flags
    )
    valid = [r["valid_elbo"] for r in rows]
    assert len(set(valid)) == 1
    assert (
        len(rows) == grace + patience == _stop_epoch(valid, patience, grace)
        and summary["stopped_by"] == "patience"
    )
    assert _stop_epoch(valid, patience) == 1 + patience < len(rows)  # the old rule, on the same curve


def test_time_limit_stops_after_the_epoch_that_passes_it(images, tmp_path):
    """``--time-limit``: training stops after the first epoch that ends past the limit (here the
    first: 0.0001 minutes), best.pt and the summary still chosen on validation; without a limit the
    same run goes on to ``--epochs``."""
    rows, summary = _fit(images, tmp_path / "limited", "--time-limit", "0.0001", "--epochs", 30)
    assert len(rows) == summary["epochs"] == 1 and summary["stopped_by"] == "time_limit"
    assert summary["best_valid_elbo"] == rows[0]["valid_elbo"] and (tmp_path / "limited" / "best.pt").exists()
    rows, summary = _fit(images, tmp_path / "free", "--time-limit", "60", "--epochs", 3)
    assert len(rows) == summary["epochs"] == 3 and summary["stopped_by"] == "epochs"
