"""``python -m ppl_vae.fit`` end to end, through subprocesses with tiny settings."""

import json
import math
import os
import subprocess
import sys

import pytest

from ppl_vae.training.runs import RUN_FILES

PROG = "python -m ppl_vae.fit"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fit(*args, data_dir=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # small nets: one thread is fastest on a busy 2-core machine
    env.pop("PPL_VAE_DATA", None)
    if data_dir is not None:
        args = (*args, "--data-dir", str(data_dir))
    return subprocess.run(
        [sys.executable, "-m", "ppl_vae.fit", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def metrics_of(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def assert_one_line_error(r, *needles):
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{PROG}: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for needle in needles:
        assert needle in lines[0]


def test_fit_digits_writes_every_output(tmp_path):
    out = tmp_path / "run"
    r = fit("--dataset", "digits", "--epochs", "2", "--quiet", "--out", str(out), "--final-iwae-k", "50")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        (*RUN_FILES, ".lock")
    )  # .lock: the one-writer lock

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dataset"] == "digits" and cfg["binarize"] == "dynamic" and cfg["image_shape"] == [1, 8, 8]
    assert cfg["elbo"] == "trace" and cfg["likelihood"] == "bernoulli" and cfg["epochs"] == 2

    metrics = metrics_of(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    for m in metrics:
        assert {"epoch", "train_objective", "valid_elbo", "epoch_seconds"} <= set(m)
        # per-datapoint nats of 64 binary pixels: between −64·log 2 − slack and 0
        assert -100 < m["valid_elbo"] < 0 and -100 < m["train_objective"] < 0

    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2
    assert summary["best_valid_elbo"] == pytest.approx(max(m["valid_elbo"] for m in metrics))
    # IWAE_50 ≥ ELBO (in expectation; the gap is ≥ 0 and the estimates are on 180 datapoints)
    assert summary["final_iwae_k"] == 50 and summary["final_valid_iwae"] > metrics[-1]["valid_elbo"]
    best = max(metrics, key=lambda m: m["valid_elbo"])["epoch"]
    assert (
        summary["best_epoch"] == best
        and f"{summary['best_valid_elbo']:.3f} nats per datapoint (epoch {best}," in r.stdout
    )

    for name in ("reconstructions.png", "samples.png", "training_curve.png"):
        data = (out / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 1000, name

    # a second fit into the same directory is refused rather than overwriting it
    again = fit("--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(out))
    assert_one_line_error(again, "--resume", "--overwrite")


@pytest.mark.slow  # over ~10 s on 2 cores
@pytest.mark.parametrize("extra", [("--elbo", "meanfield"), ("--elbo", "iwae", "--num-particles", "3")])
def test_fit_other_objectives(tmp_path, extra):
    out = tmp_path / "run"
    r = fit("--dataset", "digits", "--epochs", "1", "--out", str(out), "--final-iwae-k", "0", *extra)
    assert r.returncode == 0, r.stderr
    epoch_line = next(ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("epoch   1/1"))
    assert ("valid IWAE_3 " in epoch_line) == ("iwae" in extra) and "iwae k" not in epoch_line  # K named
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["elbo"] == extra[1] and cfg["num_particles"] == (3 if "iwae" in extra else 1)
    (m,) = metrics_of(out)
    assert math.isfinite(m["train_objective"]) and -100 < m["valid_elbo"] < 0
    summary = json.loads((out / "summary.json").read_text())
    if "iwae" in extra:  # selected on the bound it trains: IWAE_3 ≥ the ELBO of the same model
        assert (
            summary["best_valid_iwae_k"] == pytest.approx(m["valid_iwae_k"])
            and m["valid_iwae_k"] >= m["valid_elbo"]
        )
        assert "best validation IWAE_3 (the bound trained)" in r.stdout
    else:
        assert summary["best_valid_elbo"] == pytest.approx(m["valid_elbo"]) and "valid_iwae_k" not in m


@pytest.mark.slow  # over ~10 s on 2 cores
def test_fit_conv_on_mnist_t10k(tmp_path, data_dir):
    out = tmp_path / "run"
    r = fit(
        "--dataset",
        "mnist-t10k",
        "--arch",
        "conv",
        "--epochs",
        "1",
        "--batch-size",
        "256",
        "--z-dim",
        "8",
        "--final-iwae-k",
        "0",
        "--quiet",
        "--out",
        str(out),
        data_dir=data_dir,
    )
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["arch"] == "conv" and cfg["image_shape"] == [1, 28, 28] and cfg["binarize"] == "dynamic"
    (m,) = metrics_of(out)
    # 784 binary pixels: an untrained model scores about −545; one epoch is far better
    assert -350 < m["valid_elbo"] < 0


@pytest.mark.slow  # over ~10 s on 2 cores
def test_fit_broadcast_decoder_on_circles(tmp_path):
    out = tmp_path / "run"
    r = fit(
        "--dataset",
        "circles",
        "--arch",
        "broadcast",
        "--z-dim",
        "3",
        "--epochs",
        "1",
        "--final-iwae-k",
        "0",
        "--quiet",
        "--out",
        str(out),
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["arch"] == "broadcast"
    (m,) = metrics_of(out)
    # an untrained model scores about −545 nats on 784 binary pixels; one epoch is far better
    assert -300 < m["valid_elbo"] < 0


def test_greyscale_with_bernoulli_and_no_binarization_is_one_line(tmp_path, data_dir):
    r = fit(
        "--dataset",
        "mnist-t10k",
        "--likelihood",
        "bernoulli",
        "--binarize",
        "none",
        "--quiet",
        "--out",
        str(tmp_path / "run"),
        data_dir=data_dir,
    )
    assert_one_line_error(r, "--binarize", "continuous-bernoulli")
    assert not (tmp_path / "run" / "config.json").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--dataset", "imagenet"), "unknown dataset 'imagenet'"),
        (("--likelihood", "poisson"), "--likelihood"),
        (("--conv",), "unrecognized arguments"),
    ],
)
def test_unknown_choices_are_one_line(tmp_path, args, needle):
    r = fit(*args, "--quiet", "--out", str(tmp_path / "run"))
    assert_one_line_error(r, needle)
