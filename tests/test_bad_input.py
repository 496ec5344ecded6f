"""Bad input: one clear line on stderr, exit code 2, no traceback, and no trace left on disk.

A few cases run the real CLI in a subprocess; the rest call ``ppl_vae.fit.main(argv)`` in
process (the same code path: argparse, then ``cli.user_errors`` turning a ``UserError`` into
``SystemExit(2)``; any other exception would escape ``main`` and fail the test). The last test
feeds a few hundred random malformed arrays to the data validation. See docs/reliability.md.
"""

import hashlib
import io
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae.core.errors import DataError
from ppl_vae.data.datasets import dataset_from_array

REPO = Path(__file__).resolve().parents[1]
# every CLI test is hermetic: a download attempt meets a closed local port at once
OFFLINE = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")}


def command(module: str, *args) -> list[str]:
    return [sys.executable, "-m", f"ppl_vae.{module}", *map(str, args)]


def run(cmd: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, offline."""
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


ENV = {**os.environ, **OFFLINE, "no_proxy": "", "NO_PROXY": ""}


def fit(*args, timeout: float = 180) -> subprocess.CompletedProcess:
    """``python -m ppl_vae.fit ARGS`` from the repository root, offline."""
    return run(command("fit", *args), timeout)


def assert_cli_error(
    r: subprocess.CompletedProcess, code: int = 2, prog: str = "python -m ppl_vae.fit"
) -> str:
    """Exit ``code``, stderr exactly one non-empty ``prog: error: ...`` line, no traceback; returns it."""
    lines = r.stderr.splitlines()
    assert r.returncode == code, (r.returncode, r.stderr)
    assert len(lines) == 1 and lines[0].strip(), r.stderr
    assert "Traceback" not in r.stderr and lines[0].startswith(f"{prog}: error: "), r.stderr
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_in_process(argv, capsys, code: int = 2) -> str:
    """``ppl_vae.fit.main(argv)`` must exit with ``code`` after one stderr line; returns it."""
    from ppl_vae.fit import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    err = capsys.readouterr().err
    return assert_cli_error(subprocess.CompletedProcess(argv, e.value.code, "", err), code)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    """Malformed data files, each (name → path)."""
    d = tmp_path_factory.mktemp("bad")
    rng = np.random.default_rng(0)
    binary = (rng.random((20, 8, 8)) < 0.5).astype(np.float32)
    arrays = {
        "grey": rng.random((20, 8, 8)).astype(np.float32),
        "nan": np.where(rng.random((20, 8, 8)) < 0.01, np.nan, binary).astype(np.float32),
        "inf": np.where(np.arange(64).reshape(8, 8) == 5, np.inf, binary).astype(np.float32),
        "bytes": (rng.random((20, 8, 8)) * 255).astype(np.float32),
        "negative": binary - 0.5,
        "flat50": (rng.random((20, 50)) < 0.5).astype(np.float32),
        "three": (rng.random((20, 3, 3)) < 0.5).astype(np.float32),
        "empty": np.zeros((0, 8, 8), np.float32),
        "no_pixels": np.zeros((20, 0), np.float32),
        "two": binary[:2],
        "vector": binary[:, 0, 0],
        "strings": np.array([["0", "1"]] * 5),
    }
    paths = {}
    for name, arr in arrays.items():
        paths[name] = d / f"{name}.npy"
        np.save(paths[name], arr)
    paths["pickled"] = d / "pickled.npy"
    np.save(paths["pickled"], np.array([{"a": 1}] * 4, dtype=object), allow_pickle=True)
    paths["labels_only"] = d / "labels_only.npz"
    np.savez(paths["labels_only"], labels=np.arange(20), name=np.array("digits"))
    paths["ambiguous"] = d / "ambiguous.npz"
    np.savez(paths["ambiguous"], a=binary, b=binary)
    paths["lying"] = d / "lying.npy"  # a valid header declaring (10**12, 64) float32, then 256 bytes
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 64)}
    )
    paths["lying"].write_bytes(header.getvalue() + bytes(256))
    paths["junk"] = d / "junk.npy"
    paths["junk"].write_bytes(b"\x93NUMPY garbage")
    paths["missing"] = d / "missing.npy"
    paths["empty_dir"] = tmp_path_factory.mktemp("no_data")
    return paths


# --------------------------------------------------------------------------- real CLI, subprocess


def test_cli_unknown_dataset(tmp_path):
    line = assert_cli_error(fit("--dataset", "imagenet", "--out", tmp_path / "run"))
    assert "unknown dataset 'imagenet'; choose one of auto, mnist" in line and ".npy/.npz" in line
    assert not (tmp_path / "run").exists()


def test_cli_nan_pixels(files, tmp_path):
    line = assert_cli_error(fit("--dataset", files["nan"], "--out", tmp_path / "run"))
    assert "pixel values are NaN or infinite" in line and str(files["nan"]) in line
    assert not (tmp_path / "run").exists()


def test_cli_conv_needs_a_suitable_image_shape(files, tmp_path):
    line = assert_cli_error(fit("--dataset", files["flat50"], "--arch", "conv", "--out", tmp_path / "run"))
    assert "--arch conv needs images" in line and "(1, 1, 50)" in line and "use --arch mlp" in line


def test_cli_missing_data_offline_names_files_folder_and_fix(files, tmp_path):
    t0 = time.monotonic()
    line = assert_cli_error(
        fit("--dataset", "binarized-mnist", "--data-dir", files["empty_dir"], "--out", tmp_path / "run")
    )
    assert time.monotonic() - t0 < 60  # one failed attempt, no retry loop
    folder = files["empty_dir"] / "binarized_mnist"
    assert "binarized_mnist_train.amat" in line and f"is not in {folder}" in line
    assert "could not be downloaded" in line and "--data-dir / $PPL_VAE_DATA" in line
    assert not (folder / "binarized_mnist_train.amat").exists()


def test_cli_existing_run_is_never_overwritten_silently(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        (run / name).write_text(name)

    def state():  # the run's files; the empty .lock file of the one-writer lock (ppl_vae.core.files) may appear
        return {f.name: (digest(f), f.stat().st_mtime_ns) for f in run.iterdir() if f.name != ".lock"}

    before = state()
    line = assert_cli_error(fit("--dataset", "circles", "--out", run))
    assert f"{run} already holds a run" in line and "--resume" in line and "--overwrite" in line
    assert state() == before


# --------------------------------------------------------------------------- same code path, in process


@pytest.mark.parametrize(
    "key,extra,match",
    [
        (
            "grey",
            ["--binarize", "none"],
            "is greyscale (values strictly between 0 and 1) but --likelihood bernoulli "
            "needs 0/1 data: pass --binarize dynamic",
        ),
        ("nan", [], "NaN or infinite"),
        ("inf", [], "20 pixel values are NaN or infinite"),
        ("bytes", [], "must lie in [0.0, 1.0], found [0"),
        ("bytes", ["--likelihood", "continuous-bernoulli"], "(images in 0..255? divide by 255)"),
        ("negative", [], "must lie in [0.0, 1.0], found [-0.5, 0.5]"),
        ("three", ["--arch", "conv"], "(1, 3, 3); use --arch mlp"),
        ("empty", [], "the dataset is empty (shape (0, 8, 8))"),
        ("no_pixels", [], "the dataset is empty (shape (20, 0))"),
        ("two", [], "need at least 3 images"),
        (
            "vector",
            [],
            "images must have shape (N, H, W), (N, D), or (N, C, H, W) / (N, H, W, C) with C = 1 or 3 channels, got (20,)",
        ),
        ("strings", [], "images must be numeric, got dtype <U1"),
        ("pickled", [], "pickled Python objects, which ppl_vae never loads"),
        ("junk", [], "cannot read"),
        (
            "lying",
            [],
            "lying.npy: its header declares an array of shape (1000000000000, 64) and dtype float32 "
            "(256,000,000,000,000 bytes) but only 256 bytes follow it",
        ),
        ("labels_only", [], "holds no usable image array (arrays: labels, name)"),
        ("ambiguous", [], "several candidates (a, b) and none named x or images"),
        ("missing", [], "does not exist"),
    ],
)
def test_bad_data(files, tmp_path, capsys, key, extra, match):
    out = tmp_path / "run"
    line = fit_in_process(["--dataset", files[key], *extra, "--out", out], capsys)
    assert match in line, line
    assert not out.exists()  # bad input leaves no run directory behind


def test_missing_mnist_test_files_name_both_folders(files, tmp_path, capsys):
    line = fit_in_process(
        ["--dataset", "mnist-t10k", "--data-dir", files["empty_dir"], "--out", tmp_path / "r"], capsys
    )
    assert "t10k-images-idx3-ubyte(.gz)" in line and str(files["empty_dir"] / "mnist_t10k") in line
    assert "point --data-dir / $PPL_VAE_DATA at a folder holding them" in line


@pytest.mark.parametrize(
    "flags,match",
    [
        (["--epochs", "-1"], "--epochs must be >= 1, got -1"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--log-every", "0"], "--log-every must be >= 1, got 0"),
        (["--final-iwae-k", "-1"], "--final-iwae-k must be >= 0, got -1"),
        (["--seed", "-1"], "--seed must be in 0 .. 2**32 - 1"),
        (["--weight-decay", "-0.1"], "--weight-decay must be >= 0, got -0.1"),
        (["--sigma-floor", "-1"], "--sigma-floor must be >= 0"),
        (["--lr-decay", "0"], "--lr-decay must be in (0, 1], got 0.0"),
        (["--device", "cuda:x"], "--device must be auto, cpu or cuda (or cuda:N), got 'cuda:x'"),
        (["--dataset", " "], "--dataset must be a dataset name, a folder of images or a .npy/.npz path"),
        (["--num-particles", "0"], "--num-particles K must be >= 1, got 0"),
        (["--beta", "0"], "--beta must be > 0, got 0.0"),
        (["--beta", "-2"], "--beta must be > 0, got -2.0"),
        (["--beta", "inf"], "--beta must be a finite number, got inf"),
        (["--lr", "0"], "--lr must be > 0"),
        (["--lr", "nan"], "--lr must be a finite number, got nan"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--z-dim", "0"], "--z-dim must be >= 1"),
        (["--hidden", "400,0"], "--hidden sizes must be >= 1, got [400, 0]"),
        (["--hidden", "4x"], "argument --hidden: expected comma-separated integers"),
        (["--kl-warmup", "-1"], "--kl-warmup must be >= 0"),
        (["--likelihood", "gaussian", "--sigma", "0"], "--sigma must be > 0"),
        (["--grad-clip", "0"], "--grad-clip must be > 0"),
        (["--patience", "0"], "--patience must be >= 1"),
        (["--time-limit", "0"], "--time-limit must be > 0 (minutes)"),
        (["--lr-decay", "1.5"], "--lr-decay must be in (0, 1]"),
        (["--device", "tpu"], "--device must be auto, cpu or cuda"),
        (["--seed", "x"], "argument --seed: invalid int value"),
        (["--likelihood", "poisson"], "argument --likelihood: invalid choice: 'poisson'"),
        (["--elbo", "vi"], "argument --elbo: invalid choice: 'vi'"),
        (
            ["--hierarchy", "skip"],
            "--hierarchy skip is a two-layer program of MLPs: add --latent-layers 2 and --arch "
            "mlp (got 1 layer(s), --arch mlp)",
        ),
        (["--hierarchy", "skip", "--latent-layers", "2", "--arch", "conv"], "(got 2 layer(s), --arch conv)"),
        (["--hierarchy", "ladder"], "argument --hierarchy: invalid choice: 'ladder'"),
        (["--elbo", "iwae", "--beta", "2"], "--beta ≠ 1 makes --elbo iwae no bound on log p(x)"),
        (["--resume", "--overwrite"], "--resume and --overwrite contradict each other"),
        (["--resume"], "holds no run (no config.json)"),
    ],
)
def test_bad_flags(tmp_path, capsys, flags, match):
    out = tmp_path / "run"
    line = fit_in_process(["--dataset", "circles", *flags, "--out", out], capsys)
    assert match in line, line
    assert not out.exists()


def test_resume_needs_out_and_out_must_be_a_folder(tmp_path, capsys):
    assert "--resume needs --out" in fit_in_process(["--resume"], capsys)
    (tmp_path / "file").write_text("not a folder")
    line = fit_in_process(["--dataset", "circles", "--out", tmp_path / "file"], capsys)
    assert "is a file, not a run directory" in line
    assert (tmp_path / "file").read_text() == "not a folder"


# a damaged or hand-edited config.json: (content, what the line says after "run configuration <path>")
BAD_CONFIGS = {
    "null": ("null", " must hold a JSON object of settings, got null"),
    "list": ('["z_dim", 20]', " must hold a JSON object of settings, got a list"),
    "invalid_json": (
        '{"z_dim": 20',
        " is not valid JSON (Expecting ',' delimiter at line 1, column 13); restore or correct the file",
    ),
    "not_utf8": (b"\x80\x81 binary", " is not a JSON text file (UnicodeDecodeError)"),
    "string_z_dim": ('{"z_dim": "20"}', ': "z_dim" must be an integer or null, got "20" (a string)'),
    "zero_epochs": ('{"epochs": 0}', ': "epochs" must be >= 1, got 0'),
    "unknown_key": ('{"zdim": 20}', ": unknown keys ['zdim']; known keys: ['activation', "),
}


def _write_config(run_dir: Path, case: str) -> Path:
    content = BAD_CONFIGS[case][0]
    run_dir.mkdir()
    path = run_dir / "config.json"
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


def _check_config_error(line: str, module: str, path: Path, case: str) -> None:
    content, expected = BAD_CONFIGS[case]
    assert line.startswith(f"python -m ppl_vae.{module}: error: run configuration {path}{expected}"), line
    assert (
        path.read_bytes() if isinstance(content, bytes) else path.read_text()
    ) == content  # left as it was
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.json"]  # nothing written beside it


@pytest.mark.parametrize("module", ["fit", "evaluate"])
@pytest.mark.parametrize("case", BAD_CONFIGS)
def test_bad_config_json_is_one_line(tmp_path, capsys, case, module):
    """``fit --out D --resume`` and ``evaluate D`` read D/config.json first: every bad one is exit 2
    and one line naming the file and the field (in process: the CLIs' ``main``)."""
    import importlib

    path = _write_config(tmp_path / "run", case)
    argv = ["--out", path.parent, "--resume", "--quiet"] if module == "fit" else [path.parent]
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        importlib.import_module(f"ppl_vae.{module}").main([str(a) for a in argv])
    r = subprocess.CompletedProcess(argv, e.value.code, "", capsys.readouterr().err)
    _check_config_error(assert_cli_error(r, 2, f"python -m ppl_vae.{module}"), module, path, case)


def test_bad_config_json_through_the_real_clis(tmp_path):
    """The two faults of issue 15 through the real commands, in subprocesses run side by side:
    "z_dim": "20" once broke ``fit --resume`` with a traceback, a config.json holding null
    raised TypeError. Exit 2, one line, no traceback. (Every case through both commands' ``main``
    is tested above; a subprocess spends seconds importing torch.)"""
    runs = {}
    for case, module in (("string_z_dim", "fit"), ("null", "evaluate")):
        run_dir = _write_config(tmp_path / case, case).parent
        runs[case, module] = (
            command("fit", "--out", run_dir, "--resume", "--quiet")
            if module == "fit"
            else command("evaluate", run_dir)
        )
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(run, runs.values())))
    for (case, module), r in done.items():
        line = assert_cli_error(r, 2, f"python -m ppl_vae.{module}")
        _check_config_error(line, module, tmp_path / case / "config.json", case)


# --------------------------------------------------------------------------- property test


def _random_array(rng: np.random.Generator) -> np.ndarray:
    ndim = int(rng.choice([0, 1, 2, 2, 3, 3, 4, 5]))
    shape = [int(rng.choice([0, 1, 2, 3, 5, 8, 9] if i else [0, 2, 3, 5, 9, 17])) for i in range(ndim)]
    if ndim == 4 and rng.random() < 0.7:
        shape[1 if rng.random() < 0.5 else 3] = int(rng.choice([1, 3]))  # (N, C, H, W) or (N, H, W, C)
    kind = rng.choice(["unit", "unit", "binary", "binary", "bytes", "signed", "wide"])
    x = {
        "unit": lambda s: rng.random(s),
        "binary": lambda s: (rng.random(s) < 0.5) * 1.0,
        "bytes": lambda s: rng.integers(0, 256, s) * 1.0,
        "signed": lambda s: rng.normal(size=s),
        "wide": lambda s: rng.random(s) * 1.02,
    }[kind](shape)
    x = np.asarray(x)
    if x.size and rng.random() < 0.15:  # a few NaN / inf
        x.flat[rng.integers(0, x.size, 1 + x.size // 10)] = rng.choice([np.nan, np.inf, -np.inf])
    dtype = rng.choice(
        ["float32", "float32", "float64", "float16", "uint8", "int64", "int8", "bool", "complex64", "<U3"]
    )
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(dtype)


def _should_accept(arr: np.ndarray) -> bool:
    """The documented contract, written independently of the implementation."""
    if arr.dtype.kind not in "fiub":
        return False
    a = arr
    if arr.ndim == 4:  # C = 1 or 3 channels, first (preferred) or last
        if not (arr.shape[1] in (1, 3) or arr.shape[3] in (1, 3)):
            return False
        a = arr.reshape(arr.shape[0], math.prod(arr.shape[1:]))
    if a.ndim not in (2, 3) or a.shape[0] < 3 or math.prod(a.shape[1:]) == 0:
        return False
    x = a.astype(np.float32)
    return bool(np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1)


def test_random_malformed_arrays_are_accepted_correctly_or_refused_clearly():
    rng = np.random.default_rng(2024)
    accepted = refused = 0
    for i in range(600):
        arr = _random_array(rng)
        name = f"case{i}"
        if not _should_accept(arr):
            with pytest.raises(DataError) as e:  # DataError, never IndexError/TypeError/...
                dataset_from_array(arr, name=name)
            assert name in str(e.value)  # the message names its source
            assert "\n" not in str(e.value)
            refused += 1
            continue
        ds = dataset_from_array(arr, name=name)
        n = arr.shape[0]
        channels_last = arr.ndim == 4 and arr.shape[1] not in (1, 3)
        chw = arr.transpose(0, 3, 1, 2) if channels_last else arr  # (N, C, H, W) for 4-D
        img = chw.reshape(n, -1).astype(np.float32)  # (N, D): values preserved in float32
        d = img.shape[1]
        side = math.isqrt(d)
        expected_shape = (
            tuple(chw.shape[1:])
            if arr.ndim == 4
            else (1, arr.shape[-2], arr.shape[-1])
            if arr.ndim == 3
            else (1, side, side)
            if side * side == d
            else (1, 1, d)
        )
        assert ds.image_shape == expected_shape, (arr.shape, ds.image_shape)
        splits = [ds.train, ds.valid, ds.test]
        assert all(
            s.dtype == torch.float32 and s.ndim == 2 and s.shape[1] == d and len(s) >= 1 for s in splits
        )
        got = torch.cat(splits).numpy()
        assert got.shape == (n, d)
        # the splits are a permutation of the rows: compare the rows sorted lexicographically
        key = lambda m: m[np.lexsort(m.T[::-1])]  # noqa: E731
        np.testing.assert_array_equal(key(got), key(img))
        accepted += 1
    assert accepted >= 60 and refused >= 300, (accepted, refused)  # both branches well exercised
