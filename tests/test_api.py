"""The public API from Python: the names, ``fit(...)`` returning its run, ``evaluate(...)`` of any
program, and the old module path ``ppl_vae.estimators``."""

import json
import subprocess
import sys

import pytest


def test_the_public_names_import_without_loading_torch_first():
    """``import ppl_vae`` is light (a command must handle Ctrl-C while torch loads); the names
    load on first use."""
    code = "import sys, ppl_vae; print('torch' in sys.modules); from ppl_vae import VAE, fit, evaluate; print(callable(fit))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["False", "True"]


def test_fit_trains_from_python_and_returns_the_run(tmp_path):
    import ppl_vae.inference.estimators
    from ppl_vae import VAE, estimators, evaluate, fit, load_dataset
    from ppl_vae.core.errors import UserError

    assert estimators is ppl_vae.inference.estimators
    data = load_dataset("digits")
    run = fit(
        dataset=data, out=tmp_path / "run", epochs=2, z_dim=3, hidden=[16], final_iwae_k=0, device="cpu"
    )
    assert isinstance(run.model, VAE) and not run.model.training
    assert (
        run.config.z_dim == 3
        and run.config.dataset == "digits"
        and [r["epoch"] for r in run.metrics] == [1, 2]
    )
    assert run.summary == json.loads((tmp_path / "run" / "summary.json").read_text())
    # resume from Python: two more epochs, the saved settings kept
    more = fit(out=tmp_path / "run", resume=True, epochs=4, device="cpu")
    assert more.config.z_dim == 3 and [r["epoch"] for r in more.metrics] == [1, 2, 3, 4]
    report = evaluate(run.model.model, run.model.guide, data.test[:20], num_samples=10, ks=[1])
    assert report["n"] == 20 and report["log_px"] < 0
    with pytest.raises(UserError, match=r"unknown option\(s\) \['zdim'\]"):
        fit(dataset="digits", out=tmp_path / "bad", zdim=3)
    with pytest.raises(UserError, match="--z-dim must be"):
        fit(dataset="digits", out=tmp_path / "bad", z_dim=-1)
    assert not (tmp_path / "bad").exists()
