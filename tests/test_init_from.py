"""``fit --init-from RUN``: a new run that starts at another run's best (or latest) parameters.

The oracle is the source run itself: at a learning rate of 1e-30 no step moves a parameter, so
the new run's first validation bound must equal the one the source recorded for the epoch its
``best.pt`` holds (the validation images are binarized once with a fixed seed, and the bound uses
fixed draws), and the new ``best.pt`` must hold the source's parameters bit for bit. A start that
did not load them scores a freshly initialized network, tens of nats lower.
"""

import json
import subprocess
import sys

import pytest
import torch

from ppl_vae import fit
from ppl_vae.core.errors import UserError
from ppl_vae.training.best import digest

EPOCH = dict(epochs=1, final_iwae_k=0, device="cpu")
FROZEN = dict(lr=1e-30, **EPOCH)
# a network this small collapses z2 (warned at the end of each run): irrelevant here
pytestmark = pytest.mark.filterwarnings("ignore::ppl_vae.reports.collapse.PosteriorCollapse")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A two-layer run on digits with averaging whose best epoch is not its last: 6 epochs (the
    bound still rising), then 1 more resumed at a learning rate that wrecks it. Statically
    binarized, so that a new run must inherit the data settings to score the same images."""
    out = tmp_path_factory.mktemp("init") / "source"
    fit(
        dataset="digits",
        binarize="static",
        out=out,
        epochs=6,
        latent_layers=2,
        z_dim=4,
        z2_dim=3,
        hidden=[16],
        hidden2=[8],
        kl_warmup=2,
        ema=0.9,
        lr=3e-3,
        final_iwae_k=0,
        device="cpu",
    )
    run = fit(out=out, resume=True, epochs=7, lr=0.3, device="cpu")
    assert run.summary["best_epoch"] == 6 and run.metrics[-1]["valid_elbo"] < run.metrics[5]["valid_elbo"]
    return out, run


def model_state(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


def test_a_new_run_starts_at_the_source_best_parameters(source, tmp_path):
    src, run = source
    best_epoch = run.summary["best_epoch"]
    new = fit(out=tmp_path / "new", init_from=src, ema=0.999, **FROZEN)
    # the program came from the source's config.json, though no model flag was given
    for key in ("latent_layers", "z_dim", "z2_dim", "hidden", "hidden2", "dataset", "binarize"):
        assert getattr(new.config, key) == getattr(run.config, key), key
    assert new.config.binarize == "static"  # (the default would have binarized digits dynamically)
    assert new.config.kl_warmup == 0  # a trained model needs no warm-up (two layers default to 1/10)
    # the same validation bound as the source's best epoch (same parameters, same fixed draws)
    recorded = next(r for r in run.metrics if r["epoch"] == best_epoch)
    assert new.metrics[0]["valid_elbo"] == pytest.approx(recorded["valid_elbo"], abs=1e-4)
    start = new.config.init_record["valid"]  # scored before the first step, as an epoch is
    assert start["valid_elbo"] == pytest.approx(recorded["valid_elbo"], abs=1e-4)
    assert new.summary["init_valid"] == start["valid_elbo"]
    first_epoch = next(r for r in run.metrics if r["epoch"] == 1)
    assert new.metrics[0]["valid_elbo"] > first_epoch["valid_elbo"] + 5  # not a fresh network
    theirs, ours = model_state(src / "best.pt"), model_state(tmp_path / "new" / "best.pt")
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in theirs)
    saved = json.loads((tmp_path / "new" / "config.json").read_text())
    assert saved["init_from"] == str(src.resolve())
    record = {
        "file": str(src.resolve() / "best.pt"),
        "epoch": best_epoch,
        "digest": digest(theirs),
        "valid": start,
    }
    assert saved["init_record"] == record
    # resumed, the run continues from its own checkpoint and keeps its record and its warm-up of 0
    more = fit(out=tmp_path / "new", resume=True, epochs=2, device="cpu")
    assert [r["epoch"] for r in more.metrics] == [1, 2]
    assert more.config.init_record == record and more.config.kl_warmup == 0


def test_checkpoint_pt_starts_at_the_latest_epoch_and_flags_override_training_settings(source, tmp_path):
    src, run = source
    new = fit(
        out=tmp_path / "new",
        init_from=src / "checkpoint.pt",
        kl_warmup=1,
        elbo="iwae",
        num_particles=2,
        **FROZEN,
    )
    assert new.config.init_record["epoch"] == 7 != run.summary["best_epoch"]
    assert new.config.kl_warmup == 1 and new.config.elbo == "iwae" and "valid_iwae_k" in new.metrics[0]
    latest = model_state(src / "checkpoint.pt")  # θ̄ under --ema: what the source is judged by
    assert all(torch.equal(latest[k], v) for k, v in new.model.state_dict().items())


def test_refusals_are_one_line_and_leave_the_source_as_it_was(source, tmp_path):
    src, _ = source
    before = {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()}
    with pytest.raises(UserError, match=r"its program differs from this run's \(z_dim 4 there, 5 here\)"):
        fit(out=tmp_path / "a", init_from=src, z_dim=5, **FROZEN)
    with pytest.raises(UserError, match=r"\(sigma 0.1 there, 0.5 here\)"):  # σ is the program's too
        fit(out=tmp_path / "a", init_from=src, sigma=0.5, **FROZEN)
    with pytest.raises(UserError, match=r"unknown option\(s\) \['init_record'\]"):  # fit records it
        fit(out=tmp_path / "a", init_from=src, init_record={"epoch": 1}, **FROZEN)
    with pytest.raises(UserError, match="is the run --init-from reads"):
        fit(out=src, init_from=src, overwrite=True, **FROZEN)
    with pytest.raises(UserError, match="drop --init-from to resume"):
        fit(out=src, init_from=src, resume=True, **FROZEN)
    with pytest.raises(UserError, match="not a ppl_vae run directory"):
        fit(out=tmp_path / "b", init_from=tmp_path, **FROZEN)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert {p.name: p.read_bytes() for p in src.iterdir() if p.is_file()} == before


@pytest.mark.slow  # two processes that load torch (~10 s on 2 busy cores)
def test_the_command_fine_tunes_a_run_end_to_end(source, tmp_path):
    """Through ``python -m ppl_vae.fit``: IWAE fine-tuning from the best epoch trains and its
    first epoch is its own best-so-far (no earlier row of another objective to compare with)."""
    src, run = source
    out = tmp_path / "ft"
    cmd = [sys.executable, "-m", "ppl_vae.fit", "--init-from", str(src), "--quiet", "--device", "cpu"]
    args = ["--elbo", "iwae", "--num-particles", "3", "--epochs", "2", "--lr", "1e-3", "--final-iwae-k", "0"]
    r = subprocess.run([*cmd, *args, "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in rows] == [1, 2] and all(m["objective"] == "iwae-3" for m in rows)
    # IWAE_3 ≥ the ELBO of the same parameters: the fine-tuned start is at least the source's best
    best = next(m for m in run.metrics if m["epoch"] == run.summary["best_epoch"])
    assert rows[0]["valid_iwae_k"] > best["valid_elbo"]
    bad = subprocess.run(
        [*cmd, "--z-dim", "9", "--out", str(tmp_path / "bad")], capture_output=True, text=True
    )
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "z_dim 4 there, 9 here" in lines[0], bad.stderr
    assert not (tmp_path / "bad").exists()
    # --out the source itself, from another process: refused before its lock file is rewritten or
    # a dead writer's temporary file removed (the source byte for byte as it was)
    (src / ".best.pt.999999.deadbeef.tmp").write_bytes(b"left by a writer that died")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    bad = subprocess.run([*cmd, "--out", str(src), "--overwrite"], capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "is the run --init-from reads" in lines[0], bad.stderr
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_inherited_data_that_changed_since_the_source_are_used_with_a_warning(tmp_path):
    """A source trained on a .npy whose content has since changed: the new run trains on the file
    as it is now and says so in one warning (as ``evaluate`` does for changed data)."""
    import numpy as np

    data = tmp_path / "bits.npy"
    x = (np.random.default_rng(0).random((300, 6, 6)) < 0.3).astype(np.float32)
    np.save(data, x)
    tiny = dict(z_dim=2, hidden=[8], epochs=1, final_iwae_k=0, device="cpu")
    fit(dataset=str(data), out=tmp_path / "src", **tiny)
    np.save(data, 1 - x)
    with pytest.warns(
        UserWarning,
        match=r"--init-from: the data \(.*bits.npy\) differ from those the source was trained on \(the same size, other content\)",
    ):
        fit(
            out=tmp_path / "new", init_from=tmp_path / "src", lr=1e-30, epochs=1, final_iwae_k=0, device="cpu"
        )


def test_a_fine_tuning_that_never_beats_its_start_ends_with_a_warning(source, tmp_path):
    """Fine-tuned on noise (the digits' training images replaced by uniform grey levels, the
    validation images kept), every epoch scores worse than the start: the run says so (its
    best.pt is its own best epoch, not the better model it started from)."""
    import dataclasses

    from ppl_vae import load_dataset

    src, run = source
    digits = load_dataset("digits")
    noise = dataclasses.replace(digits, train=torch.rand_like(digits.train).clamp(0.01, 0.99))
    warned = r"no epoch of this run beat the parameters it started from on the validation ELBO: .* \(epoch 1\) against .* at the start: .*best.pt is the better model"
    with pytest.warns(UserWarning, match=warned):
        new = fit(dataset=noise, binarize="static", out=tmp_path / "noise", init_from=src, lr=0.01, **EPOCH)
    best = next(r for r in run.metrics if r["epoch"] == run.summary["best_epoch"])
    assert new.summary["init_valid"] == pytest.approx(best["valid_elbo"], abs=1e-4)  # the same images
    assert new.summary["best_valid_elbo"] < new.summary["init_valid"] - 1
