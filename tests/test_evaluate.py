"""``python -m ppl_vae.evaluate``: end to end on a short binarized-MNIST run, bad input, the
block design of :mod:`ppl_vae.reports.evaluation` (results independent of how blocks are split over
calls and of the chunk size), the public ``evaluate`` on other Pyro programs (Pyro's tutorial
VAE, a linear-Gaussian model with log p(x) in closed form) and active units against closed
forms. The in-process tests run on every ``device`` (conftest): programs and data are put there,
and every number read back is moved to the CPU first."""

import json
import math
import subprocess
import sys

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.distributions.transforms import AffineTransform

from ppl_vae.core import distributed
from ppl_vae.evaluate import evaluate, main
from ppl_vae.inference import estimators, importance
from ppl_vae.programs.model import VAE
from ppl_vae.reports import evaluation, latents
from ppl_vae.reports import report as report_module

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bmnist_run(tmp_path_factory, data_dir):
    """A VAE trained for one epoch on 1,000 binarized-MNIST training images (the run directory
    names the real dataset, so evaluate reads the real test split)."""
    from ppl_vae.data.datasets import load_dataset
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    ds = load_dataset("binarized-mnist", data_dir)
    ds.train, ds.valid = ds.train[:1000], ds.valid[:200]
    out = tmp_path_factory.mktemp("bmnist_run")
    cfg = FitConfig(
        dataset="binarized-mnist",
        data_dir=str(data_dir),
        hidden=[64],
        z_dim=8,
        epochs=1,
        batch_size=100,
        final_iwae_k=0,
        device="cpu",
    )
    Trainer(cfg, out, overwrite=True, quiet=True, dataset=ds).run()
    return out


def run_cli(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "ppl_vae.evaluate", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_evaluate_end_to_end_writes_sane_json(bmnist_run, tmp_path, data_dir):
    js, npz = tmp_path / "out" / "eval.json", tmp_path / "out" / "per.npz"
    r = run_cli(
        bmnist_run,
        "--split",
        "test",
        "--num-samples",
        300,
        "--ks",
        "1,10,100",
        "--subset",
        60,
        "--batch-size",
        25,
        "--json",
        js,
        "--per-datapoint",
        npz,
        "--data-dir",
        data_dir,
        "--quiet",
    )
    assert r.returncode == 0, r.stderr
    s = json.loads(js.read_text())
    assert (s["dataset"], s["split"], s["binarization"], s["n"], s["num_samples"], s["subset"]) == (
        "binarized-mnist",
        "test",
        "static",
        60,
        300,
        60,
    )
    assert s["config"] == json.loads((bmnist_run / "config.json").read_text())
    numbers = [v for k, v in s.items() if isinstance(v, float)]
    assert all(math.isfinite(v) for v in numbers)
    # units: nats per datapoint of 784 binary pixels, and bits/dim = −nats / (784 ln 2) (discrete data)
    assert -550 < s["elbo_analytic"] < -100 and -550 < s["log_px"] < -100
    assert s["discrete"] is True and s["likelihood"] == "bernoulli" and "bits_per_dim_omitted" not in s
    assert s["bits_per_dim"] == pytest.approx(-s["log_px"] / (784 * math.log(2)), rel=1e-12)
    # ELBO ≤ log p(x) (beyond Monte Carlo error), IWAE_k rising with k, the curve ends at log p(x)
    assert s["elbo_analytic"] <= s["log_px"] + 4 * s["log_px_stderr"]
    assert s["elbo_mc"] <= s["log_px"] + 4 * s["log_px_stderr"]
    curve = [s["iwae_by_k"][k] for k in ("1", "10", "100", "300")]
    assert all(b >= a - 4 * s["iwae_by_k_stderr"]["100"] for a, b in zip(curve, curve[1:])), curve
    assert s["iwae_by_k"]["300"] == s["log_px"] and s["iwae_by_k"]["1"] == pytest.approx(
        s["elbo_mc"], abs=1e-9
    )
    assert s["gap"] == pytest.approx(s["log_px"] - s["elbo_analytic"], abs=1e-9) and s["gap"] > 0
    assert (
        abs(s["elbo_analytic"] - s["elbo_mc"])
        < 4 * math.hypot(s["elbo_mc_stderr"], s["elbo_analytic_stderr"]) + 0.5
    )
    assert 0 < s["log_px_stderr"] < 1 and s["log_px_stderr_across_datapoints"] > s["log_px_stderr"]
    per = np.load(npz)
    # k̂ against the K-dependent threshold min(1 − 1/log10 K, 0.7) = 0.5964 at K = 300, from the saved k̂
    assert s["khat_threshold"] == pytest.approx(1 - 1 / math.log10(300), rel=1e-12)
    for key, t in (
        ("khat_frac_above_threshold", s["khat_threshold"]),
        ("khat_frac_above_0_7", 0.7),
        ("khat_frac_above_0_5", 0.5),
    ):
        assert s[key] == pytest.approx(np.mean(per["khat"] > t), abs=1e-12), key
    assert s["log_px_reliable"] is bool(np.mean(per["khat"] > s["khat_threshold"]) <= 0.1)
    assert s["khat_mean"] == pytest.approx(per["khat"][np.isfinite(per["khat"])].mean(), rel=1e-12)
    above, n = int((per["khat"] > s["khat_threshold"]).sum()), len(per["khat"])
    assert (s["khat_n_above_threshold"], s["khat_n"]) == (above, n)
    verdict = (
        f"lower bound; SE unreliable: k̂ > 0.60 on {above:,} of {n:,} datapoints"
        if not s["log_px_reliable"]
        else f"k̂ <= 0.60 on {n - above:,} of {n:,} datapoints"
    )
    assert [line for line in r.stdout.splitlines() if line.startswith("log p(x) (IWAE K=300)")][0].endswith(
        verdict
    )
    # the table: one row per estimate (IWAE_1 is the MC ELBO and IWAE_300 log p(x): not repeated), in
    # nats and bits/dim, then k̂, active units and the across-datapoint SE
    lines = r.stdout.splitlines()
    assert [line[:28].strip() for line in lines[2:8]] == [
        "ELBO (analytic KL)",
        "ELBO (Monte Carlo)",
        "IWAE k=10",
        "IWAE k=100",
        "log p(x) (IWAE K=300)",
        "gap log p(x) − ELBO",
    ]
    assert lines[1].split()[-1] == "bits/dim"
    assert [float(v) for v in lines[6].split()[4:7]] == pytest.approx(
        [s["log_px"], s["log_px_stderr"], s["bits_per_dim"]], abs=5e-4
    )
    # what the bits/dim are: of the binarized images (issue 26: binarized and 8-bit images are other data)
    assert lines[9] == (
        f"bits/dim of the binarized images: {s['bits_per_dim']:.4f} (log p(x), IWAE K=300; the column: "
        "log P(x), a probability of the data; bits/dim = -nats / (D ln 2))"
    )
    assert s["bits_per_dim_label"] == "bits/dim of the binarized images" and s["bits_per_dim_shift"] == 0
    assert lines[8].startswith("Pareto k̂: mean") and lines[10].startswith(
        "active units (Cov_x E_q[z_u|x] > 0.01): z "
    )
    # per-datapoint arrays agree with the summary; the subset is random, not the first 60
    idx = per["index"]
    assert idx.shape == (60,) and len(set(idx.tolist())) == 60 and idx.max() < 10000
    assert not np.array_equal(idx, np.arange(60))
    for key in ("elbo_analytic", "elbo_mc", "log_px"):
        assert per[key].shape == (60,) and per[key].mean() == pytest.approx(s[key], abs=1e-9)
    assert np.sqrt((per["log_px_stderr"] ** 2).sum()) / 60 == pytest.approx(s["log_px_stderr"], rel=1e-9)
    assert per["iwae_by_k"].shape == (4, 60) and per["ks"].tolist() == [1, 10, 100, 300]
    assert per["khat"].shape == per["ess"].shape == (60,) and ((per["ess"] >= 1) & (per["ess"] <= 300)).all()
    # active units: the VAE guide's E_q[z|x] is the encoder's z_loc, exactly (no Monte Carlo)
    from ppl_vae.data.datasets import load_dataset
    from ppl_vae.training.runs import load_run

    vae, _ = load_run(bmnist_run)
    x = load_dataset("binarized-mnist", data_dir).split("test")[torch.as_tensor(idx)]
    with torch.no_grad():
        z_loc = vae.encode(x)[0].double().numpy()  # (60, 8)
    np.testing.assert_allclose(per["posterior_mean_z"], z_loc, rtol=1e-6, atol=1e-6)
    units = s["active_units"]["z"]
    np.testing.assert_allclose(units["variance"], z_loc.var(0, ddof=1), rtol=1e-5)
    assert (units["dims"], units["mc_samples"], units["mc_inflation"]) == (8, 1, 0.0)
    assert units["active"] == int((z_loc.var(0, ddof=1) > 1e-2).sum())
    assert f"z {units['active']} of 8" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-samples", "0"], "--num-samples K must be >= 1"),
        (["--ks", "1,0"], "--ks values must lie in 1..K"),
        (["--num-samples", "50", "--ks", "1,100"], "--ks values must lie in 1..K = 50"),
        (["--ks", "1,x"], "expected comma-separated integers"),
        (["--subset", "10001"], "--subset 10001 is larger than the split (10000 datapoints)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(bmnist_run, data_dir, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main([str(bmnist_run), "--data-dir", str(data_dir), "--quiet", *args])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert (
        message in err and len(err.splitlines()) == 1 and err.startswith("python -m ppl_vae.evaluate: error:")
    )


def test_missing_run_dir_exits_2_through_the_cli(tmp_path):
    r = run_cli(tmp_path / "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"python -m ppl_vae.evaluate: error: run directory {tmp_path / 'nope'} "
        f"does not exist; pass the --out of a python -m ppl_vae.fit run"
    ]


# --------------------------------------------------------------------------- block design


@pytest.fixture
def small_vae(device):
    """A small VAE and 25 binary datapoints (drawn on the CPU: the same data on every device)."""
    torch.manual_seed(0)
    vae = VAE((1, 4, 4), z_dim=3, hidden=[16]).eval().to(device)
    x = torch.bernoulli(torch.full((25, 16), 0.3)).to(device)
    return vae, x


def test_blocks_give_the_same_numbers_however_they_are_split(small_vae, device):
    vae, x = small_vae
    kw = dict(block_size=10, num_samples=250, ks=[1, 10, 250], seed=3)
    whole = evaluation.evaluate_blocks(vae.model, vae.guide, x, range(3), chunk_size=10**6, **kw)
    last = evaluation.evaluate_blocks(vae.model, vae.guide, x, [2], chunk_size=10, **kw)  # another "process"
    first = evaluation.evaluate_blocks(vae.model, vae.guide, x, [0, 1], chunk_size=1000, **kw)
    assert whole["position"].tolist() == list(range(25))
    assert np.concatenate([first["position"], last["position"]]).tolist() == list(range(25))
    for key in (*evaluation.PER_DATAPOINT, "iwae_by_k"):
        np.testing.assert_allclose(
            np.concatenate([first[key], last[key]], -1), whole[key], rtol=1e-6, atol=1e-5
        )
    # block 1 is estimate_all on x[10:20] with the block's derived seed
    ref = estimators.estimate_all(
        vae.model, vae.guide, x[10:20], 250, ks=[1, 10, 250], seed=importance.derive_seed(3, 1)
    )
    np.testing.assert_allclose(whole["log_px"][10:20], ref["iwae"].value.cpu().numpy(), rtol=1e-6)
    # data held on the CPU, blocks moved to the program's device (device=): the same numbers
    moved = evaluation.evaluate_blocks(
        vae.model, vae.guide, x.cpu(), [1], chunk_size=1000, device=device, **kw
    )
    for key in (*evaluation.PER_DATAPOINT, "iwae_by_k"):
        np.testing.assert_allclose(moved[key], whole[key][..., 10:20], rtol=1e-6, atol=1e-5)
    assert evaluation.evaluate_blocks(vae.model, vae.guide, x, [], **kw)["log_px"].shape == (0,)


def test_an_evaluation_probes_the_program_once_and_its_numbers_match_per_block_probes(small_vae, monkeypatch):
    """evaluate() probes model and guide once (plates, closed forms, slice safety, discreteness) and
    passes the probe to every block's estimates, means and KL terms; the numbers are those of
    estimate_all / posterior_means / kl_terms probing each block themselves."""
    from ppl_vae.inference import checks
    from ppl_vae.reports import collapse

    vae, x = small_vae
    calls, probe = [], checks._probe
    monkeypatch.setattr(checks, "_probe", lambda *a: calls.append(1) or probe(*a))
    rep = evaluation.evaluate(
        vae.model, vae.guide, x, num_samples=20, ks=[1, 20], batch_size=10, mean_samples=4
    )
    assert len(calls) == 1  # three blocks, one probe
    calls.clear()
    b = x[20:]
    block = estimators.estimate_all(vae.model, vae.guide, b, 20, ks=[1], seed=importance.derive_seed(0, 2))
    np.testing.assert_allclose(rep.per_datapoint["log_px"][20:], block["iwae"].value.cpu().numpy(), rtol=1e-6)
    kl = collapse.kl_terms(vae.model, vae.guide, b, seed=importance.derive_seed(0, 2))["z"]
    np.testing.assert_allclose(rep.per_datapoint[evaluation.KL + "z"][20:], kl.cpu().numpy(), rtol=1e-6)
    assert len(calls) == 2  # each called alone probes for itself


def test_ranks_gathered_give_the_single_process_report(small_vae, monkeypatch):
    """evaluate(ctx=rank r of 2) computes blocks r, r+2, ... and gathers: the report of one
    process, array for array (the process group replaced by the two ranks' results; with four
    ranks one of them has no block and no latent site to gather)."""
    vae, x = small_vae
    kw = dict(num_samples=60, ks=[1, 10], seed=2, batch_size=10)
    single = evaluate(vae.model, vae.guide, x, **kw)
    for world in (2, 4):
        ranks = [distributed.Context(rank=r, world_size=world) for r in range(world)]
        shares = [
            evaluation.evaluate_blocks(
                vae.model,
                vae.guide,
                x,
                distributed.strided(range(3), c),
                block_size=10,
                num_samples=60,
                ks=[1, 10, 60],
                seed=2,
            )
            for c in ranks
        ]
        assert (world == 4) is not any(
            k.startswith("posterior_mean:") for k in shares[-1]
        )  # 4: rank 3 has no block
        monkeypatch.setattr(distributed, "all_gather_objects", lambda obj, ctx: shares)
        gathered = evaluate(vae.model, vae.guide, x, ctx=ranks[1], **kw)
        assert gathered.per_datapoint.keys() == single.per_datapoint.keys()
        for key, v in single.per_datapoint.items():
            np.testing.assert_array_equal(gathered.per_datapoint[key], v, err_msg=key)
        assert {**gathered, "seconds": 0} == {**single, "seconds": 0}


def test_cuda_out_of_memory_halves_the_chunk_and_retries(small_vae):
    vae, x = small_vae
    calls = []

    class OutOfMemoryAboveOneUnit(pyro.poutine.messenger.Messenger):
        def _pyro_post_sample(self, msg):
            if msg["name"] == "x" and len(msg["fn"].batch_shape) == 2:  # (k, N) under the particle plate
                calls.append(msg["fn"].batch_shape[0])
                if calls[-1] > importance.SAMPLE_UNIT:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    def fragile_model(x, **kw):
        with OutOfMemoryAboveOneUnit():
            vae.model(x, **kw)

    kw = dict(block_size=25, num_samples=400, ks=[1, 400], seed=1)
    logs = []
    got = evaluation.evaluate_blocks(
        fragile_model, vae.guide, x, [0], chunk_size=25 * 400, log=logs.append, **kw
    )
    ref = evaluation.evaluate_blocks(vae.model, vae.guide, x, [0], chunk_size=25 * 100, **kw)
    assert max(calls) > importance.SAMPLE_UNIT and got["chunk_size"] < 25 * 2 * importance.SAMPLE_UNIT
    assert len(logs) >= 1 and "retrying block 0" in logs[0]
    for key in evaluation.PER_DATAPOINT:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-6, atol=1e-5)


# --------------------------------------------------------------------------- the public API on other programs


def assert_same_units(got: dict, want: dict):
    """Active units alike: the counts exactly, the variances to float64 rounding (``evaluate``
    takes them on the CPU from the gathered means, ``active_units_of`` on the program's device)."""
    assert got.keys() == want.keys()
    for name, w in want.items():
        g = got[name]
        assert (g["active"], g["dims"], g["mc_samples"]) == (w["active"], w["dims"], w["mc_samples"]), name
        np.testing.assert_allclose(
            [*g["variance"], g["mc_inflation"]],
            [*w["variance"], w["mc_inflation"]],
            rtol=1e-12,
            atol=0,
            err_msg=name,
        )


class Encoder(nn.Module):
    """Pyro's VAE tutorial (examples/vae/vae.py), shrunk: 784 → hidden → (z_loc, z_scale)."""

    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, z_dim)
        self.fc22 = nn.Linear(hidden_dim, z_dim)
        self.softplus = nn.Softplus()

    def forward(self, x):
        x = x.reshape(-1, 784)
        hidden = self.softplus(self.fc1(x))
        return self.fc21(hidden), torch.exp(self.fc22(hidden))


class Decoder(nn.Module):
    def __init__(self, z_dim, hidden_dim):
        super().__init__()
        self.fc1 = nn.Linear(z_dim, hidden_dim)
        self.fc21 = nn.Linear(hidden_dim, 784)
        self.softplus = nn.Softplus()
        self.sigmoid = nn.Sigmoid()

    def forward(self, z):
        return self.sigmoid(self.fc21(self.softplus(self.fc1(z))))


class TutorialVAE(nn.Module):
    """Sites ``latent`` and ``obs``, ``pyro.plate("data", x.shape[0])`` without ``dim=``,
    ``pyro.module`` calls: the program of docs/estimators.md, verbatim."""

    def __init__(self, z_dim=4, hidden_dim=32):
        super().__init__()
        self.encoder, self.decoder, self.z_dim = Encoder(z_dim, hidden_dim), Decoder(z_dim, hidden_dim), z_dim

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z_loc = x.new_zeros(torch.Size((x.shape[0], self.z_dim)))
            z_scale = x.new_ones(torch.Size((x.shape[0], self.z_dim)))
            z = pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))
            loc_img = self.decoder(z)
            pyro.sample(
                "obs", dist.Bernoulli(loc_img, validate_args=False).to_event(1), obs=x.reshape(-1, 784)
            )

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            z_loc, z_scale = self.encoder(x)
            pyro.sample("latent", dist.Normal(z_loc, z_scale).to_event(1))


def test_evaluate_a_pyro_tutorial_vae_equals_the_estimators_on_the_same_blocks(device):
    torch.manual_seed(0)
    vae = TutorialVAE().to(device)
    x = torch.bernoulli(torch.full((20, 784), 0.3)).to(device)  # 20 random binary images
    report = evaluate(vae.model, vae.guide, x, num_samples=50, ks=[1, 10], seed=7, batch_size=8)
    # block b = x[8b : 8b + 8], drawn with derive_seed(7, b): the same numbers as the estimators there
    for b, rows in enumerate((slice(0, 8), slice(8, 16), slice(16, 20))):
        ref = estimators.iwae(vae.model, vae.guide, x[rows], 50, seed=importance.derive_seed(7, b))
        np.testing.assert_allclose(report.per_datapoint["log_px"][rows], ref.value.cpu().numpy(), rtol=1e-6)
    assert report["log_px"] == pytest.approx(report.per_datapoint["log_px"].mean(), rel=1e-12)
    assert (report["n"], report["dim"], report["ks"], report["discrete"]) == (20, 784, [1, 10, 50], True)
    assert report["bits_per_dim"] == pytest.approx(-report["log_px"] / (784 * math.log(2)), rel=1e-12)
    # K = 50: threshold 1 − 1/log10(50) = 0.4114
    assert report["khat_threshold"] == pytest.approx(1 - 1 / math.log10(50), rel=1e-12)
    # E_q[latent | x] is the encoder's z_loc: the active units in closed form
    with torch.no_grad():
        var = vae.encoder(x)[0].double().var(0).cpu()  # (4,)
    units = report["active_units"]["latent"]
    assert units["active"] == int((var > 1e-2).sum()) and units["dims"] == 4 and units["mc_samples"] == 1
    np.testing.assert_allclose(units["variance"], var.numpy(), rtol=1e-5)
    assert_same_units(
        latents.active_units_of(vae.model, vae.guide, x, seed=7, block_size=8), report["active_units"]
    )
    table = report.table().splitlines()
    assert table[0] == "n = 20, K = 50, D = 784; nats per datapoint"
    assert table[1].split() == ["nats", "±", "MC", "SE", "bits/dim"]
    assert [line[:28].strip() for line in table[2:7]] == [
        "ELBO (analytic KL)",
        "ELBO (Monte Carlo)",
        "IWAE k=10",
        "log p(x) (IWAE K=50)",
        "gap log p(x) − ELBO",
    ]
    log_px_row = table[5].split()
    assert float(log_px_row[4]) == pytest.approx(report["log_px"], abs=5e-4)
    assert float(log_px_row[6]) == pytest.approx(report["bits_per_dim"], abs=5e-5)
    assert table[5].endswith(report_module.verdict(report))
    assert f"latent {units['active']} of 4" in report.table()
    assert json.loads(report.to_json())["log_px"] == report["log_px"]


def linear_gaussian(guide_scale):
    """z ~ N(0, 1), x | z ~ N(z, 1) per datapoint: log p(x) = log N(x; 0, 2), posterior
    N(x/2, 1/2). A guide N(x/2, s) with s > 1/√2 has bounded weights (k̂ small); s = 0.25 makes
    the weights' tail heavy (k̂ large). The prior lives on x's device."""

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, guide_scale))

    return model, guide


@pytest.mark.parametrize("guide_scale, reliable", [(0.8, True), (0.25, False)])
def test_k_dependent_verdict_and_no_bits_per_dim_for_a_density(guide_scale, reliable, device):
    x = torch.linspace(-2.0, 2.0, 40, dtype=torch.float64, device=device)
    model, guide = linear_gaussian(guide_scale)
    report = evaluate(model, guide, x, num_samples=1000, seed=0, batch_size=20)
    log_px = dist.Normal(0.0, math.sqrt(2.0)).log_prob(x.cpu()).mean().item()
    above = np.mean(report.per_datapoint["khat"] > 1 - 1 / 3)  # khat_threshold(1000) = 2/3
    assert report["khat_frac_above_threshold"] == pytest.approx(above, abs=1e-12)
    assert report["log_px_reliable"] is reliable and bool(above <= 0.1) is reliable
    table = report.table()
    if reliable:  # measured: k̂ < 0.2 on every datapoint; log p(x) right within 4 MC standard errors
        assert report["log_px"] == pytest.approx(log_px, abs=4 * report["log_px_stderr"])
        assert "k̂ <= 0.67 on 40 of 40 datapoints" in table
    else:
        assert f"lower bound; SE unreliable: k̂ > 0.67 on {round(40 * above)} of 40 datapoints" in table
    # a density of continuous data: no bits/dim anywhere, and the table says why
    assert report["discrete"] is False and "bits_per_dim" not in report and "elbo_bits_per_dim" not in report
    assert report["bits_per_dim_omitted"] == report_module.NO_BITS
    assert "bits/dim: not shown: p(x|z) is a density of continuous data" in table
    assert table.splitlines()[1].split() == ["nats", "±", "MC", "SE"]


def test_discreteness_is_read_from_the_observed_sites(small_vae, device):
    vae, x = small_vae
    assert evaluation.observed_is_discrete(vae.model, vae.guide, x) is True
    # a Bernoulli fed grey levels (validate_args=False, as Pyro's tutorial on MNIST does): not a probability
    assert evaluation.observed_is_discrete(vae.model, vae.guide, x * 0.5 + 0.25) is False
    gauss = VAE((1, 4, 4), z_dim=3, hidden=[16], likelihood="gaussian").eval().to(device)
    assert evaluation.observed_is_discrete(gauss.model, gauss.guide, x) is False


def test_counts_are_exact_tied_weights_are_n_a_and_skipped_active_units_say_so():
    """One datapoint of 40 above the threshold is "39 of 40", never a rounded "100 %"; the exact
    posterior as guide gives tied weights, whose k̂ is n/a (ArviZ says inf: it used to read as
    unreliable) and whose estimate is exact; with mean_samples=0 the active units say skipped."""
    x = torch.linspace(-2.0, 2.0, 40, dtype=torch.float64)
    model, exact_guide = linear_gaussian(math.sqrt(0.5))
    report = evaluate(model, exact_guide, x, num_samples=100, seed=0, mean_samples=0)
    assert report["khat_n_tied"] == 40 and report["log_px_reliable"] is True
    assert np.isneginf(report.per_datapoint["khat"]).all()
    table = report.table()
    assert "k̂ <= 0.50 on 40 of 40 datapoints" in table
    assert "mean n/a (n/a on 40 datapoints with tied weights: their estimates are exact)" in table
    assert "active units (Cov_x E_q[z_u|x] > 0.01): skipped (mean_samples=0" in table
    res = dict(report.per_datapoint)
    res["khat"] = np.where(np.arange(40) == 7, 5.0, 0.1)  # one datapoint of 40 above
    s = report_module.summarize(res, [], 100, 1, False, 0)
    assert "k̂ <= 0.50 on 39 of 40 datapoints" in report_module.verdict(s)


def test_no_closed_form_kl_reports_the_analytic_elbo_as_na(device):
    """A guide through a transform has no registered KL against the prior: the analytic ELBO is
    n/a, the gap is taken against the Monte Carlo ELBO, and everything else is reported."""
    model, _ = linear_gaussian(1.0)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample(
                "z", dist.TransformedDistribution(dist.Normal(x / 4, 0.5), [AffineTransform(0.0, 2.0)])
            )

    x = torch.linspace(-2.0, 2.0, 10, dtype=torch.float64, device=device)
    report = evaluate(model, guide, x, num_samples=200, seed=0, mean_samples=400)
    assert report["elbo_analytic"] is not None and math.isnan(report["elbo_analytic"])
    assert report["elbo_analytic_na"].startswith(
        "no closed-form KL for site 'z' (guide TransformedDistribution"
    )
    assert report["gap_elbo"] == "elbo_mc" and report["gap"] == pytest.approx(
        report["log_px"] - report["elbo_mc"]
    )
    assert json.loads(report.to_json())["elbo_analytic"] is None
    assert "ELBO (analytic KL)                   n/a  (no closed-form KL)" in report.table()
    # no .mean on a TransformedDistribution: E_q[z|x] = x/2 by Monte Carlo over 400 draws (se 1/√400)
    units = report["active_units"]["z"]
    assert units["mc_samples"] == 400 and units["mc_inflation"] == pytest.approx(1 / 400, rel=0.2)
    np.testing.assert_allclose(
        report.per_datapoint["posterior_mean:z"][0], x.cpu().numpy() / 2, atol=5 * 0.05
    )


# --------------------------------------------------------------------------- active units in closed form


def linear_guide_program(scales, device):
    """x (N, 3) → E_q[z|x] = A x + b with row u of A = scales[u] · e_(u mod 3) and the columns of
    x standardized (sample variance 1): Cov_x(E_q[z_u|x]) = scales[u]² exactly."""
    A = torch.zeros(len(scales), 3, dtype=torch.float64, device=device)
    for u, c in enumerate(scales):
        A[u, u % 3] = c
    b = torch.arange(len(scales), dtype=torch.float64, device=device)  # constant offsets: no variance

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(scales)), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., :3], 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ A.T + b, 0.3).to_event(1))

    return model, guide, A, b


def standardized(device, n=50):
    """x (n, 3), drawn on the CPU and moved to ``device``, each column of sample mean 0 and variance 1."""
    x = torch.randn(n, 3, dtype=torch.float64)
    return ((x - x.mean(0)) / x.std(0)).to(device)


def test_active_units_of_a_linear_guide_in_closed_form(device):
    scales = [0.5**0.5, 0.0, 0.02**0.5, 0.005**0.5, 0.0, 0.15]  # variances .5, 0, .02, .005, 0, .0225
    model, guide, A, b = linear_guide_program(scales, device)
    x = standardized(device)
    means = latents.posterior_means(model, guide, x, seed=0)
    assert list(means) == ["z"] and means["z"].exact and means["z"].samples == 1
    torch.testing.assert_close(means["z"].mean, x @ A.T + b, rtol=1e-12, atol=1e-12)
    units = latents.active_units(means)["z"]
    np.testing.assert_allclose(units["variance"], np.square(scales), rtol=1e-10, atol=1e-12)
    assert (units["active"], units["dims"], units["mc_inflation"]) == (3, 6, 0.0)


def test_active_units_of_a_lower_layer_by_monte_carlo(device):
    """z1 ~ q(z1|x) = N(A x + b, 0.3), z2 ~ q(z2|z1) = N(W z1, 0.1) (sites by name, the second
    below the first): E_q[z2|x] = W (A x + b), averaged over draws of z1 (Rao-Blackwellized:
    mean of W z1), Monte Carlo error se² = 0.09 ‖W_u‖² / S per entry."""
    _, _, A, b = linear_guide_program([1.0, 1.0, 1.0], device)  # z1 = x + b, Cov_x = I
    W = torch.tensor(
        [[0.8, 0.0, 0.0], [0.0, 0.0, 0.0], [0.05, 0.0, 0.0], [0.0, 0.6, 0.0]],
        dtype=torch.float64,
        device=device,
    )
    S = 1000

    def model(x):  # only traced for its plates
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z", dist.Normal(x.new_zeros(3), 1.0).to_event(1))
            pyro.sample("z2", dist.Normal(z1 @ W.T, 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z1, 1.0).to_event(1), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            z1 = pyro.sample("z", dist.Normal(x @ A.T + b, 0.3).to_event(1))
            pyro.sample("z2", dist.Normal(z1 @ W.T, 0.1).to_event(1))

    x = standardized(device)
    means = latents.posterior_means(model, guide, x, num_samples=S, seed=1)
    assert means["z"].exact and not means["z2"].exact and means["z2"].samples == S
    se = 0.3 * W.norm(dim=1) / math.sqrt(S)  # (4,) on the device
    assert ((means["z2"].mean - (x @ A.T + b) @ W.T).abs() <= 5 * se + 1e-12).all()
    units = latents.active_units(means)
    exact_var = np.square(W.cpu().numpy()).sum(1)  # Cov_x(W (x + b)) = W Wᵀ diagonal: .64, 0, .0025, .36
    # the Monte Carlo error of a variance: cross term 2 sd_x se / √N (random) plus se² (upward bias)
    se = se.cpu().numpy()
    tol = 5 * 2 * np.sqrt(exact_var) * se / math.sqrt(x.shape[0]) + 2 * se**2
    assert (np.abs(np.array(units["z2"]["variance"]) - exact_var) <= tol).all(), (
        units["z2"]["variance"],
        tol,
    )
    assert units["z2"]["active"] == 2 and units["z"]["active"] == 3
    assert units["z2"]["mc_inflation"] == pytest.approx(0.09 * 0.64 / S, rel=0.2)
    assert latents.describe(units).startswith("z 3 of 3, z2 2 of 4 (Monte Carlo mean over 1000 draws")


def test_too_few_samples_for_khat_leave_the_verdict_unknown(device):
    model, guide = linear_gaussian(0.8)
    report = evaluate(
        model, guide, torch.linspace(-1.0, 1.0, 6, dtype=torch.float64, device=device), num_samples=20
    )
    assert report["log_px_reliable"] is None and report["khat_frac_above_threshold"] is None
    assert json.loads(report.to_json())["khat_threshold"] is None  # NaN below K = 21
    assert (
        "log p(x) (IWAE K=20)" in report.table() and "reliability unknown: k̂ needs K >= 21" in report.table()
    )


def test_a_conditional_program_gets_its_labels_block_by_block(device):
    """model(x, y): data = (x, y), split into blocks together; the same numbers as the estimators
    (and the active units as latents.active_units_of) on each block's (x, y)."""
    from ppl_vae.programs.conditional import ConditionalVAE

    torch.manual_seed(0)
    cvae = ConditionalVAE((1, 4, 4), z_dim=3, hidden=[16], num_classes=3).eval().to(device)
    x, y = torch.bernoulli(torch.full((25, 16), 0.3)).to(device), torch.arange(25, device=device) % 3
    report = evaluate(cvae.model, cvae.guide, (x, y), num_samples=40, seed=4, batch_size=10)
    for b, rows in enumerate((slice(0, 10), slice(10, 20), slice(20, 25))):
        ref = estimators.iwae(
            cvae.model, cvae.guide, (x[rows], y[rows]), 40, seed=importance.derive_seed(4, b)
        )
        np.testing.assert_allclose(report.per_datapoint["log_px"][rows], ref.value.cpu().numpy(), rtol=1e-6)
    assert (report["n"], report["dim"], report["discrete"]) == (25, 16, True)
    assert_same_units(
        latents.active_units_of(cvae.model, cvae.guide, (x, y), seed=4, block_size=10), report["active_units"]
    )
