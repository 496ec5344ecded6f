"""Test setup: every test starts seeded, with an empty Pyro param store and validation on.

Devices: tests that touch tensors take the ``device`` fixture: ``cpu`` always, and ``cuda`` too
when a CUDA device is present (``PPL_VAE_TEST_DEVICES=cuda`` runs only the CUDA cases, as
``benchmarks/gpu_check.py`` does).

Real data: tests that need ``../shared/data`` (static binarized MNIST, the MNIST test set)
take the ``data_dir`` fixture. Without the data they skip, except when ``CI=true`` or
``PPL_VAE_REQUIRE_DATA=1``: then missing data fail the test.
"""

import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _devices() -> list[str]:
    wanted = os.environ.get("PPL_VAE_TEST_DEVICES")
    found = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d for d in found if wanted is None or d in wanted.split(",")] or found


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    """Each device this machine has: ``cpu``, and ``cuda`` when available."""
    return torch.device(request.param)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of small-tensor tests: on a busy 2-core machine a second
    thread only adds synchronization (a step can get ~20x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    pyro.enable_validation(True)
    torch.set_default_dtype(torch.float32)
    yield
    pyro.clear_param_store()


def _require_data() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("PPL_VAE_REQUIRE_DATA") == "1"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder: $PPL_VAE_DATA, else ../shared/data beside the repo."""
    d = Path(os.environ.get("PPL_VAE_DATA") or REPO.parent / "shared" / "data")
    needed = [
        d / "binarized_mnist" / "binarized_mnist_train.amat.gz",
        d / "mnist_t10k" / "t10k-images-idx3-ubyte.gz",
    ]
    missing = [str(p) for p in needed if not p.exists() and not p.with_suffix("").exists()]
    if missing:
        msg = f"real data missing: {', '.join(missing)} (set PPL_VAE_DATA to the shared data folder)"
        if _require_data():
            pytest.fail(msg)
        pytest.skip(msg)
    return d
