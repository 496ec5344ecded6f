"""``python -m ppl_vae.evaluate``: end to end on a short binarized-MNIST run, bad input, and the
block design (results independent of how blocks are split over calls and of the chunk size)."""
import json
import math
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch

from ppl_vae import estimators, evaluate
from ppl_vae.model import VAE

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bmnist_run(tmp_path_factory, data_dir):
    """A VAE trained for one epoch on 1,000 binarized-MNIST training images (the run directory
    names the real dataset, so evaluate reads the real test split)."""
    from ppl_vae.config import FitConfig
    from ppl_vae.data import load_dataset
    from ppl_vae.train import Trainer

    ds = load_dataset("binarized-mnist", data_dir)
    ds.train, ds.valid = ds.train[:1000], ds.valid[:200]
    out = tmp_path_factory.mktemp("bmnist_run")
    cfg = FitConfig(dataset="binarized-mnist", data_dir=str(data_dir), hidden=[64], z_dim=8, epochs=1,
                    batch_size=100, final_iwae_k=0, device="cpu")
    Trainer(cfg, out, overwrite=True, quiet=True, dataset=ds).run()
    return out


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ppl_vae.evaluate", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_evaluate_end_to_end_writes_sane_json(bmnist_run, tmp_path, data_dir):
    js, npz = tmp_path / "out" / "eval.json", tmp_path / "out" / "per.npz"
    r = run_cli(bmnist_run, "--split", "test", "--num-samples", 300, "--ks", "1,10,100", "--subset", 60,
                "--batch-size", 25, "--json", js, "--per-datapoint", npz, "--data-dir", data_dir, "--quiet")
    assert r.returncode == 0, r.stderr
    s = json.loads(js.read_text())
    assert (s["dataset"], s["split"], s["binarization"], s["n"], s["num_samples"], s["subset"]) == \
        ("binarized-mnist", "test", "static", 60, 300, 60)
    assert s["config"] == json.loads((bmnist_run / "config.json").read_text())
    numbers = [v for k, v in s.items() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)
    # units: nats per datapoint of 784 binary pixels, and bits/dim = −nats / (784 ln 2)
    assert -550 < s["elbo_analytic"] < -100 and -550 < s["log_px"] < -100
    assert s["bits_per_dim"] == pytest.approx(-s["log_px"] / (784 * math.log(2)), rel=1e-12)
    # ELBO ≤ log p(x) (beyond Monte Carlo error), IWAE_k rising with k, the curve ends at log p(x)
    assert s["elbo_analytic"] <= s["log_px"] + 4 * s["log_px_stderr"]
    assert s["elbo_mc"] <= s["log_px"] + 4 * s["log_px_stderr"]
    curve = [s["iwae_by_k"][k] for k in ("1", "10", "100", "300")]
    assert all(b >= a - 4 * s["iwae_by_k_stderr"]["100"] for a, b in zip(curve, curve[1:])), curve
    assert s["iwae_by_k"]["300"] == s["log_px"] and s["iwae_by_k"]["1"] == pytest.approx(s["elbo_mc"], abs=1e-9)
    assert s["gap"] == pytest.approx(s["log_px"] - s["elbo_analytic"], abs=1e-9) and s["gap"] > 0
    assert abs(s["elbo_analytic"] - s["elbo_mc"]) < 4 * math.hypot(s["elbo_mc_stderr"], s["elbo_analytic_stderr"]) + 0.5
    assert 0 < s["log_px_stderr"] < 1 and s["log_px_stderr_across_datapoints"] > s["log_px_stderr"]
    assert 0 <= s["khat_frac_above_0_7"] <= 1 and -1 < s["khat_mean"] < 5
    # the table names each row once, in nats and bits/dim
    for label in ("ELBO (analytic KL)", "ELBO (Monte Carlo)", "IWAE k=10", "log p(x) (IWAE K=300)",
                  "gap log p(x) − ELBO", "Pareto k̂"):
        assert label in r.stdout
    # per-datapoint arrays agree with the summary; the subset is random, not the first 60
    per = np.load(npz)
    idx = per["index"]
    assert idx.shape == (60,) and len(set(idx.tolist())) == 60 and idx.max() < 10000
    assert not np.array_equal(idx, np.arange(60))
    for key in ("elbo_analytic", "elbo_mc", "log_px"):
        assert per[key].shape == (60,) and per[key].mean() == pytest.approx(s[key], abs=1e-9)
    assert np.sqrt((per["log_px_stderr"] ** 2).sum()) / 60 == pytest.approx(s["log_px_stderr"], rel=1e-9)
    assert per["iwae_by_k"].shape == (4, 60) and per["ks"].tolist() == [1, 10, 100, 300]
    assert per["khat"].shape == per["ess"].shape == (60,) and ((per["ess"] >= 1) & (per["ess"] <= 300)).all()


@pytest.mark.parametrize("args, message", [
    (["--num-samples", "0"], "--num-samples K must be >= 1"),
    (["--ks", "1,0"], "--ks values must lie in 1..K"),
    (["--num-samples", "50", "--ks", "1,100"], "--ks values must lie in 1..K = 50"),
    (["--ks", "1,x"], "expected comma-separated integers"),
    (["--subset", "10001"], "--subset 10001 is larger than the split (10000 datapoints)"),
])
def test_bad_input_is_one_line_and_exit_2(bmnist_run, data_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(bmnist_run), "--data-dir", str(data_dir), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("python -m ppl_vae.evaluate: error:")


def test_missing_run_dir_exits_2_through_the_cli(tmp_path):
    r = run_cli(tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"python -m ppl_vae.evaluate: error: run directory {tmp_path / 'nope'} "
                                             f"does not exist; pass the --out of a python -m ppl_vae.fit run"]


# --------------------------------------------------------------------------- block design

@pytest.fixture
def small_vae():
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[16]).eval()
    x = torch.bernoulli(torch.full((25, 16), 0.3))
    return vae, x


def test_blocks_give_the_same_numbers_however_they_are_split(small_vae):
    vae, x = small_vae
    kw = dict(block_size=10, num_samples=250, ks=[1, 10, 250], seed=3)
    whole = evaluate.evaluate_blocks(vae.model, vae.guide, x, range(3), chunk_size=10 ** 6, **kw)
    last = evaluate.evaluate_blocks(vae.model, vae.guide, x, [2], chunk_size=10, **kw)  # another "process"
    first = evaluate.evaluate_blocks(vae.model, vae.guide, x, [0, 1], chunk_size=1000, **kw)
    assert whole["position"].tolist() == list(range(25))
    assert np.concatenate([first["position"], last["position"]]).tolist() == list(range(25))
    for key in (*evaluate.PER_DATAPOINT, "iwae_by_k"):
        np.testing.assert_allclose(np.concatenate([first[key], last[key]], -1), whole[key], rtol=1e-6, atol=1e-5)
    # block 1 is estimate_all on x[10:20] with the block's derived seed
    ref = estimators.estimate_all(vae.model, vae.guide, x[10:20], 250, ks=[1, 10, 250],
                                  seed=estimators.derive_seed(3, 1))
    np.testing.assert_allclose(whole["log_px"][10:20], ref["iwae"].value.numpy(), rtol=1e-6)
    assert evaluate.evaluate_blocks(vae.model, vae.guide, x, [], **kw)["log_px"].shape == (0,)


def test_cuda_out_of_memory_halves_the_chunk_and_retries(small_vae):
    vae, x = small_vae
    calls = []

    class OutOfMemoryAboveOneUnit(pyro.poutine.messenger.Messenger):
        def _pyro_post_sample(self, msg):
            if msg["name"] == "x" and len(msg["fn"].batch_shape) == 2:  # (k, N) under the particle plate
                calls.append(msg["fn"].batch_shape[0])
                if calls[-1] > estimators.SAMPLE_UNIT:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def fragile_model(x, **kw):
        with OutOfMemoryAboveOneUnit():
            vae.model(x, **kw)

    kw = dict(block_size=25, num_samples=400, ks=[1, 400], seed=1)
    logs = []
    got = evaluate.evaluate_blocks(fragile_model, vae.guide, x, [0], chunk_size=25 * 400, log=logs.append, **kw)
    ref = evaluate.evaluate_blocks(vae.model, vae.guide, x, [0], chunk_size=25 * 100, **kw)
    assert max(calls) > estimators.SAMPLE_UNIT and got["chunk_size"] < 25 * 2 * estimators.SAMPLE_UNIT
    assert len(logs) >= 1 and "retrying block 0" in logs[0]
    for key in evaluate.PER_DATAPOINT:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-5)
