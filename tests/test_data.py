"""Datasets: file readers, bundled and synthetic data, user arrays, the data directory,
binarization, and the checks that refuse data a likelihood cannot model."""

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae.core.errors import DataError
from ppl_vae.data import datasets as data
from ppl_vae.data import readers as data_files
from ppl_vae.data.circles import make_circles
from ppl_vae.data.datasets import load_dataset
from ppl_vae.programs.likelihoods import make_likelihood

BERNOULLI = make_likelihood("bernoulli")


def _is_binary(x):
    return bool(((x == 0) | (x == 1)).all())


# --------------------------------------------------------------------------- file readers


def _write_amat(path, arr):
    text = "".join(" ".join(str(int(v)) for v in row) + "\n" for row in arr)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt") as f:
        f.write(text)


@pytest.mark.parametrize("suffix", [".amat", ".amat.gz"])
def test_read_amat(tmp_path, suffix):
    arr = np.random.default_rng(0).integers(0, 2, size=(3, 784))
    path = tmp_path / f"tiny{suffix}"
    _write_amat(path, arr)
    x = data_files.read_amat(path)
    assert x.dtype == torch.float32 and x.shape == (3, 784)
    assert torch.equal(x, torch.tensor(arr, dtype=torch.float32))


def test_read_amat_irregular_whitespace_uses_the_slow_path(tmp_path):
    arr = np.random.default_rng(1).integers(0, 2, size=(2, 784))
    path = tmp_path / "crlf.amat"
    path.write_text("".join("  ".join(str(v) for v in row) + " \r\n" for row in arr))
    assert torch.equal(data_files.read_amat(path), torch.tensor(arr, dtype=torch.float32))


@pytest.mark.parametrize("bad", ["short", "greyscale", "empty"])
def test_read_amat_refuses_malformed_files(tmp_path, bad):
    path = tmp_path / "bad.amat"
    if bad == "short":
        _write_amat(path, np.zeros((2, 783)))
    elif bad == "greyscale":
        _write_amat(path, np.full((2, 784), 2))
    else:
        path.write_text("")
    with pytest.raises(DataError, match="binarized-MNIST"):
        data_files.read_amat(path)


def test_load_binarized_mnist_from_a_folder_of_amat_files(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    rng = np.random.default_rng(2)
    sizes = {"train": 5, "valid": 3, "test": 2}
    for split, n in sizes.items():
        suffix = ".amat.gz" if split == "train" else ".amat"  # both spellings are found
        _write_amat(folder / f"binarized_mnist_{split}{suffix}", rng.integers(0, 2, size=(n, 784)))
    ds = load_dataset("binarized-mnist", data_dir=tmp_path, likelihood=BERNOULLI, download=False)
    assert (ds.train.shape[0], ds.valid.shape[0], ds.test.shape[0]) == (5, 3, 2)
    assert ds.image_shape == (1, 28, 28) and ds.binarize == "none"


def test_binarized_mnist_missing_without_download_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="binarized_mnist_train.amat"):
        load_dataset("binarized-mnist", data_dir=tmp_path, download=False)


def _fake_download_url(calls, fail=None):
    """A stand-in for torchvision's ``download_url`` (no network in tests): records its arguments
    and writes a tiny valid ``.amat`` where asked, or half of one and then raises ``fail``."""

    def download_url(url, root, filename=None, md5=None):
        calls.append({"url": url, "root": root, "filename": filename, "md5": md5})
        text = "".join(" ".join("1" if (i + j) % 3 else "0" for j in range(784)) + "\n" for i in range(4))
        path = Path(root) / filename
        path.parent.mkdir(parents=True, exist_ok=True)  # as download_url does
        path.write_text(text[: len(text) // 2] if fail else text)
        if fail:
            raise fail

    return download_url


def test_binarized_mnist_download_is_https_with_the_md5_of_each_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    calls = []
    monkeypatch.setattr(torchvision.datasets.utils, "download_url", _fake_download_url(calls))
    ds = load_dataset("binarized-mnist", data_dir=tmp_path)
    folder = tmp_path / "binarized_mnist"
    assert [c["url"] for c in calls] == [
        f"https://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{s}.amat"
        for s in ("train", "valid", "test")
    ]
    assert [c["md5"] for c in calls] == [
        "db28b1a6ae0fe70cbd3da91acf46e477",
        "bf37822a04e94123630de6a7dfd9c9ef",
        "14e41ae11040adba6ab8cb291eda0dd8",
    ]
    assert all(Path(c["root"]) == folder for c in calls)
    # each file was fetched under a temporary name and renamed once checked
    assert sorted(p.name for p in folder.iterdir()) == [
        f"binarized_mnist_{s}.amat" for s in ("test", "train", "valid")
    ]
    assert torch.equal(
        ds.train, torch.tensor([[float((i + j) % 3 != 0) for j in range(784)] for i in range(4)])
    )
    # a second load reads the local copies: no download
    load_dataset("binarized-mnist", data_dir=tmp_path)
    assert len(calls) == 3


@pytest.mark.parametrize(
    "fail,why",
    [
        (RuntimeError("File not found or corrupted."), "its MD5 check failed"),
        (ConnectionResetError("reset"), "ConnectionResetError"),
    ],
)
def test_failed_download_leaves_no_file_that_looks_local(tmp_path, monkeypatch, fail, why):
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", _fake_download_url([], fail=fail))
    with pytest.raises(DataError) as e:
        load_dataset("binarized-mnist", data_dir=tmp_path)
    assert f"could not be downloaded ({why})" in str(e.value)
    assert list((tmp_path / "binarized_mnist").iterdir()) == []  # neither the .amat nor its .part


def test_binarized_mnist_md5_constants_match_the_real_files(data_dir):
    """The checksums the download checks are those of the public files (the shared gzip copies
    hold the same bytes, see ../shared/data/README.md)."""
    import hashlib

    for split, md5 in data_files.BINARIZED_MNIST_MD5.items():
        with gzip.open(data_dir / "binarized_mnist" / f"binarized_mnist_{split}.amat.gz", "rb") as f:
            assert hashlib.md5(f.read()).hexdigest() == md5, split


def _write_idx(path, arr):
    arr = np.asarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx(tmp_path, suffix):
    arr = np.random.default_rng(3).integers(0, 256, size=(4, 3, 5))
    path = tmp_path / f"images-idx3-ubyte{suffix}"
    _write_idx(path, arr)
    out = data_files.read_idx(path)
    assert out.shape == (4, 3, 5) and np.array_equal(out, arr)


def test_read_idx_refuses_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "images-idx3-ubyte"
    _write_idx(path, np.zeros((4, 3, 5)))
    path.write_bytes(path.read_bytes()[:-7])  # a cut download
    with pytest.raises(
        DataError, match=r"header declares shape \(4, 3, 5\) \(60 bytes\) but 53 bytes follow it"
    ):
        data_files.read_idx(path)
    path.write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(DataError, match="is not an IDX file"):
        data_files.read_idx(path)


def test_mnist_t10k_from_idx_files(tmp_path):
    folder = tmp_path / "mnist_t10k"
    folder.mkdir()
    rng = np.random.default_rng(4)
    imgs = rng.integers(0, 256, size=(20, 28, 28))
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", imgs)
    _write_idx(folder / "t10k-labels-idx1-ubyte", rng.integers(0, 10, size=20))
    ds = load_dataset("mnist-t10k", data_dir=tmp_path)
    assert (ds.train.shape[0], ds.valid.shape[0], ds.test.shape[0]) == (16, 2, 2)
    assert ds.image_shape == (1, 28, 28)
    # the splits partition the images, scaled to [0, 1]
    all_x = torch.cat([ds.train, ds.valid, ds.test])
    expected = torch.tensor(imgs.reshape(20, 784) / 255.0, dtype=torch.float32)
    assert torch.equal(all_x.sort(0).values, expected.sort(0).values)
    assert ds.labels["train"].shape == (16,)


# --------------------------------------------------------------------------- bundled and synthetic


def test_digits():
    ds = load_dataset("digits")
    assert ds.image_shape == (1, 8, 8)
    assert (ds.train.shape, ds.valid.shape, ds.test.shape) == ((1438, 64), (180, 64), (179, 64))
    all_x = torch.cat([ds.train, ds.valid, ds.test])
    assert all_x.min() == 0 and all_x.max() == 1 and not _is_binary(all_x)
    assert {k: v.shape[0] for k, v in ds.labels.items()} == {"train": 1438, "valid": 180, "test": 179}
    # seeded: the same split on every load
    assert torch.equal(load_dataset("digits").valid, ds.valid)


def test_circles_factors_match_pixels():
    """Each image is a filled circle of its factors (x, y, r): pixel count ≈ πr² (off by less
    than a quarter of the rim's 2πr pixels; unbiased, mean error < 0.5 px over 200 circles) and
    pixel centroid ≈ (x, y) (within 0.25 px)."""
    x, f = make_circles(200, seed=5)
    img = x.reshape(200, 28, 28)
    cx, cy, r = f.unbind(-1)
    area = img.sum((1, 2))
    err = area - math.pi * r**2
    assert (err.abs() <= 0.5 * math.pi * r).all() and err.mean().abs() < 0.5
    grid = torch.arange(28.0) + 0.5
    mx = (img * grid[None, None, :]).sum((1, 2)) / area
    my = (img * grid[None, :, None]).sum((1, 2)) / area
    assert (mx - cx).abs().max() < 0.25 and (my - cy).abs().max() < 0.25
    assert ((r >= 3) & (r <= 8)).all() and ((cx - r >= 0) & (cx + r <= 28)).all()


def test_load_circles_dataset():
    ds = load_dataset("circles", likelihood=BERNOULLI)
    assert ds.image_shape == (1, 28, 28) and ds.factor_names == ("x", "y", "radius")
    for split in ("train", "valid", "test"):
        assert ds.factors[split].shape == (ds.split(split).shape[0], 3)
    assert _is_binary(ds.train) and ds.binarize == "none"


# --------------------------------------------------------------------------- user arrays


@pytest.mark.parametrize(
    "shape,image_shape",
    [((30, 6, 5), (1, 6, 5)), ((30, 1, 4, 4), (1, 4, 4)), ((30, 16), (1, 4, 4)), ((30, 10), (1, 1, 10))],
)
@pytest.mark.parametrize("ext", [".npy", ".npz"])
def test_load_array_files(tmp_path, shape, image_shape, ext):
    arr = np.random.default_rng(6).random(shape).astype(np.float32)
    path = tmp_path / f"imgs{ext}"
    if ext == ".npy":
        np.save(path, arr)
    else:
        np.savez(path, labels=np.arange(30), images=arr)  # a named image array is preferred
    ds = load_dataset(str(path))
    assert ds.image_shape == image_shape
    d = math.prod(image_shape)
    assert (ds.train.shape, ds.valid.shape, ds.test.shape) == ((24, d), (3, d), (3, d))
    all_x = torch.cat([ds.train, ds.valid, ds.test])
    assert torch.equal(all_x.sort(0).values, torch.from_numpy(arr.reshape(30, d)).sort(0).values)


@pytest.mark.parametrize(
    "arr,match",
    [
        (np.random.default_rng(0).random(30), "shape"),
        (np.random.default_rng(0).random((3, 2, 4, 4)), "shape"),  # 2 channels: neither grey nor RGB
        (np.zeros((0, 4, 4)), "empty"),
        (np.full((10, 4, 4), 255.0), "divide by 255"),
        (np.full((10, 4, 4), -0.5), r"\[0.0, 1.0\]"),
        (np.full((10, 4, 4), np.nan), "NaN"),
        (np.array([["a", "b"]] * 5), "numeric"),
    ],
)
def test_bad_arrays_refused(tmp_path, arr, match):
    path = tmp_path / "bad.npy"
    np.save(path, arr)
    with pytest.raises(DataError, match=match):
        load_dataset(str(path))


def test_bad_files_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npy"))
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(DataError, match="cannot read"):
        load_dataset(str(tmp_path / "junk.npy"))
    np.savez(tmp_path / "two.npz", a=np.zeros((4, 4, 4)), b=np.zeros((4, 4, 4)))
    with pytest.raises(DataError, match="no usable image array"):
        load_dataset(str(tmp_path / "two.npz"))
    with pytest.raises(DataError, match="unknown dataset"):
        load_dataset("imagenet")


def _lying_npy(shape) -> bytes:
    """A valid ``.npy`` header declaring ``shape`` float32, followed by only 256 bytes."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + bytes(256)


@pytest.mark.parametrize("ext", [".npy", ".npz"])
@pytest.mark.parametrize("shape,need", [((10**12, 64), "256,000,000,000,000"), ((10, 8, 8), "2,560")])
def test_a_header_that_declares_more_than_the_file_holds_is_refused(tmp_path, ext, shape, need):
    """Refused from the header alone (before NumPy allocates what it declares: 233 TiB here),
    whether the lie is absurd or a few bytes (a truncated file)."""
    import zipfile

    path = tmp_path / f"lie{ext}"
    if ext == ".npy":
        path.write_bytes(_lying_npy(shape))
    else:
        with zipfile.ZipFile(path, "w") as z:  # as numpy.savez stores its members
            z.writestr("images.npy", _lying_npy(shape))
    with pytest.raises(DataError) as e:
        load_dataset(str(path))
    where = str(path) + (" (array 'images')" if ext == ".npz" else "")
    assert str(e.value) == (
        f"{where}: its header declares an array of shape {shape} and dtype float32 ({need} "
        f"bytes) but only 256 bytes follow it; the file is truncated or damaged: save the "
        f"images again with numpy.save / numpy.savez"
    )


# --------------------------------------------------------------------------- data directory


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert data_files.resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert data_files.resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("PPL_VAE_DATA")
    assert data_files.resolve_data_dir(None) == tmp_path / "cache" / "ppl_vae"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_files.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "ppl_vae"


def test_data_dir_env_is_used_by_load_dataset(tmp_path, monkeypatch):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        _write_amat(folder / f"binarized_mnist_{split}.amat", np.ones((3, 784)))
    monkeypatch.setenv("PPL_VAE_DATA", str(tmp_path))
    assert load_dataset("binarized-mnist", download=False).train.shape == (3, 784)
    # an explicit data_dir wins over the environment
    with pytest.raises(DataError, match=str(tmp_path / "elsewhere")):
        load_dataset("binarized-mnist", data_dir=tmp_path / "elsewhere", download=False)


def test_auto_falls_back_to_digits_with_a_warning(tmp_path):
    """Nothing in the data dir and no network: MNIST's download fails, digits it is."""
    with pytest.warns(UserWarning, match="falling back to scikit-learn's 8x8 digits") as rec:
        ds = load_dataset("auto", data_dir=tmp_path, likelihood=BERNOULLI)
    assert ds.name == "digits" and ds.image_shape == (1, 8, 8)
    assert "--data-dir" in str(rec[0].message)
    assert ds.binarize == "dynamic"  # greyscale under a Bernoulli


def test_auto_prefers_local_binarized_mnist_over_digits(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        _write_amat(folder / f"binarized_mnist_{split}.amat.gz", np.ones((3, 784)))
    with pytest.warns(UserWarning, match="static binarized MNIST"):
        ds = load_dataset("auto", data_dir=tmp_path, likelihood=BERNOULLI)
    assert ds.name == "binarized-mnist" and ds.train.shape == (3, 784)


# --------------------------------------------------------------------------- binarization


def test_binarize_auto_is_dynamic_for_greyscale_under_bernoulli():
    ds = load_dataset("digits", likelihood=BERNOULLI)
    grey = load_dataset("digits")
    assert ds.binarize == "dynamic"
    assert torch.equal(ds.train, grey.train)  # training images stay greyscale ...
    idx = torch.arange(ds.train.shape[0])
    b1, b2 = ds.train_batch(idx), ds.train_batch(idx)
    assert _is_binary(b1) and not torch.equal(b1, b2)  # ... and are drawn afresh per batch
    # E[Bernoulli(p)] = p: the per-pixel mean over the draws matches the greyscale mean (5 SE)
    p = grey.train.mean()
    se = math.sqrt(p * (1 - p) / grey.train.numel())
    assert abs(b1.mean() - p) < 5 * se
    assert _is_binary(ds.valid) and _is_binary(ds.test)  # held-out splits: drawn once, seeded
    assert torch.equal(ds.valid, load_dataset("digits", likelihood=BERNOULLI).valid)
    assert (ds.valid <= (grey.valid > 0)).all()  # black stays black


@pytest.mark.parametrize("likelihood", [None, "continuous-bernoulli", "gaussian"])
def test_binarize_auto_keeps_greyscale_otherwise(likelihood):
    lik = make_likelihood(likelihood) if likelihood else None
    ds = load_dataset("digits", likelihood=lik)
    assert ds.binarize == "none" and not _is_binary(ds.train)
    assert torch.equal(ds.train_batch(torch.arange(5)), ds.train[:5])


def test_binarize_static_draws_once_for_every_split():
    ds = load_dataset("digits", binarize="static")
    assert ds.binarize == "static"
    assert all(_is_binary(ds.split(s)) for s in ("train", "valid", "test"))
    idx = torch.arange(10)
    assert torch.equal(ds.train_batch(idx), ds.train_batch(idx))
    assert torch.equal(ds.train, load_dataset("digits", binarize="static").train)


def test_binarize_explicit_dynamic_and_none():
    ds = load_dataset("digits", binarize="dynamic")
    assert ds.binarize == "dynamic" and not _is_binary(ds.train) and _is_binary(ds.valid)
    ds = load_dataset("digits", binarize="none", likelihood=make_likelihood("continuous-bernoulli"))
    assert ds.binarize == "none" and not _is_binary(ds.valid)


def test_binarize_is_a_no_op_on_binary_data():
    ds = load_dataset("circles", binarize="dynamic")
    assert ds.binarize == "none"


def test_unknown_binarize_refused():
    with pytest.raises(DataError, match="dynamic"):
        load_dataset("digits", binarize="sometimes")


def test_greyscale_with_bernoulli_and_no_binarization_is_refused():
    with pytest.raises(DataError) as e:
        load_dataset("digits", binarize="none", likelihood=BERNOULLI)
    msg = str(e.value)
    assert "--binarize" in msg and "continuous-bernoulli" in msg and "\n" not in msg


def test_data_outside_likelihood_support_refused(tmp_path):
    path = tmp_path / "signed.npy"
    np.save(path, np.random.default_rng(0).random((10, 4, 4)))
    ds = load_dataset(str(path))
    ds.train = ds.train - 0.5  # e.g. centred data
    with pytest.raises(DataError, match="must lie in"):
        data.check_for_likelihood(ds, make_likelihood("continuous-bernoulli"))
    data.check_for_likelihood(ds, make_likelihood("gaussian"))  # any real value is fine


# --------------------------------------------------------------------------- real data


def test_mnist_t10k_real(data_dir):
    ds = load_dataset("mnist-t10k", data_dir=data_dir)
    assert (ds.train.shape, ds.valid.shape, ds.test.shape) == ((8000, 784), (1000, 784), (1000, 784))
    assert ds.train.min() == 0 and ds.train.max() == 1 and not _is_binary(ds.train)
    assert 0.1 < ds.train.mean() < 0.15  # MNIST's mean intensity is about 0.13
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bin_ds = load_dataset("mnist-t10k", data_dir=data_dir, likelihood=BERNOULLI)
    assert bin_ds.binarize == "dynamic" and _is_binary(bin_ds.test)


# --------------------------------------------------------------------------- MNIST's IDX files (issue 26)


def _idx_bytes(arr: np.ndarray) -> bytes:
    """``arr`` (uint8) in IDX: magic 0x0000 08 ndim, then big-endian sizes, then the bytes."""
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    return head + np.ascontiguousarray(arr, dtype=np.uint8).tobytes()


def _write_mnist(
    folder: Path, n_train: int = 10003, n_test: int = 5, gz=("train-labels", "t10k-images")
) -> dict:
    """Random MNIST-shaped IDX files in ``folder`` (some ``.gz``, some not); returns the arrays
    and the MD5 of each file's content."""
    import hashlib

    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    md5 = {}
    for stem, arr in arrays.items():
        raw = _idx_bytes(arr)
        md5[stem] = hashlib.md5(raw).hexdigest()
        if stem.rsplit("-", 2)[0] in gz:
            with gzip.open(folder / f"{stem}.gz", "wb", compresslevel=1) as f:
                f.write(raw)
        else:
            (folder / stem).write_bytes(raw)
    return {"arrays": arrays, "md5": md5}


def test_mnist_reads_the_idx_files_gz_or_not_and_splits_first_and_last(tmp_path, monkeypatch):
    made = _write_mnist(tmp_path / "MNIST" / "raw")
    monkeypatch.setattr(data_files, "MNIST_MD5", made["md5"])
    ds = load_dataset("mnist", data_dir=tmp_path, binarize="none", download=False)
    images, labels = made["arrays"]["train-images-idx3-ubyte"], made["arrays"]["train-labels-idx1-ubyte"]
    as_x = lambda a: torch.from_numpy(a.reshape(len(a), -1) / 255.0).float()  # noqa: E731
    assert torch.equal(ds.train, as_x(images[:3])) and torch.equal(
        ds.valid, as_x(images[3:])
    )  # first / last 10,000
    assert torch.equal(ds.test, as_x(made["arrays"]["t10k-images-idx3-ubyte"]))
    assert torch.equal(ds.labels["valid"], torch.from_numpy(labels[3:].astype(np.int64)))
    assert ds.image_shape == (1, 28, 28) and "the last 10,000 validate" in ds.describe()
    # the content is checked, not the bytes of the .gz: a changed label is refused in one line
    raw = bytearray((tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").read_bytes())
    raw[-1] = (raw[-1] + 1) % 10
    (tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").write_bytes(bytes(raw))
    with pytest.raises(
        DataError, match=r"t10k-labels-idx1-ubyte: its content's MD5 is [0-9a-f]{32}, not the original's"
    ) as e:
        load_dataset("mnist", data_dir=tmp_path, binarize="none", download=False)
    assert "\n" not in str(e.value)


def test_mnist_downloads_through_torchvision_only_when_files_are_missing(tmp_path, monkeypatch):
    import torchvision

    made = {}
    calls = []

    class FakeMNIST:  # stands in for torchvision.datasets.MNIST: writes the raw files as it would
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            made.update(
                _write_mnist(
                    Path(root) / "MNIST" / "raw",
                    gz=("train-images", "train-labels", "t10k-images", "t10k-labels"),
                )
            )

    monkeypatch.setattr(torchvision.datasets, "MNIST", FakeMNIST)
    monkeypatch.setattr(
        data_files, "MNIST_MD5", _write_mnist(tmp_path / "probe")["md5"]
    )  # the same seed: same content
    monkeypatch.setenv("PPL_VAE_OFFLINE", "1")
    with pytest.raises(DataError, match="no download offline"):
        load_dataset("mnist", data_dir=tmp_path / "cache", binarize="none")
    assert calls == []
    monkeypatch.delenv("PPL_VAE_OFFLINE")
    ds = load_dataset("mnist", data_dir=tmp_path / "cache", binarize="none")
    assert calls == [(str(tmp_path / "cache"), True, True)] and len(ds.test) == 5
    load_dataset("mnist", data_dir=tmp_path / "cache", binarize="none")  # present now: no second download
    assert len(calls) == 1


def _need(path: Path) -> None:
    if not path.exists():
        msg = f"real data missing: {path}"
        if (
            data_files.os.environ.get("CI", "").lower() == "true"
            or data_files.os.environ.get("PPL_VAE_REQUIRE_DATA") == "1"
        ):
            pytest.fail(msg)
        pytest.skip(msg)


def test_mnist_real_is_the_usual_50k_10k_10k(data_dir):
    raw = data_dir / "MNIST" / "raw"
    _need(raw / "train-images-idx3-ubyte.gz")
    ds = load_dataset("mnist", data_dir=data_dir, binarize="none", download=False)  # MD5 of each file checked
    assert (len(ds.train), len(ds.valid), len(ds.test)) == (50000, 10000, 10000)
    images = data_files.read_idx(raw / "train-images-idx3-ubyte.gz")
    assert torch.equal(ds.valid[0], torch.from_numpy(images[50000].reshape(-1) / 255.0).float())
    assert ds.labels["train"][:5].tolist() == [5, 0, 4, 1, 9]  # MNIST's first five digits
    assert abs(torch.cat([ds.train, ds.valid]).mean().item() - 0.1307) < 1e-3


# --------------------------------------------------------------------------- Frey Faces (issue 26)


def test_frey_faces_real_npy_and_mat(data_dir, tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.utils

    _need(data_dir / "frey_faces" / "frey_faces.npy")
    ds = load_dataset("frey-faces", data_dir=data_dir, download=False)
    assert ds.image_shape == (1, 28, 20) and (len(ds.train), len(ds.valid), len(ds.test)) == (1565, 200, 200)
    frames = np.load(data_dir / "frey_faces" / "frey_faces.npy")  # (1965, 28, 20) uint8
    every = torch.cat([ds.train, ds.valid, ds.test])
    assert torch.equal(
        every.sort(0).values, torch.from_numpy(frames.reshape(1965, -1) / 255.0).float().sort(0).values
    )
    assert torch.equal(load_dataset("frey-faces", data_dir=data_dir, download=False).test, ds.test)  # seeded
    # the original .mat (ff: 560 x 1965, one frame per column) reads to the same frames
    mat = tmp_path / "frey_rawface.mat"
    scipy.io.savemat(mat, {"ff": frames.reshape(1965, 560).T})
    assert np.array_equal(data_files.read_frey_faces(mat), frames)
    # online: downloaded from Roweis' page and checked by the decoded frames' MD5
    calls = []

    def fake_download_url(url, root, filename=None, md5=None, source=mat):
        calls.append(url)
        (Path(root) / filename).write_bytes(Path(source).read_bytes())

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download_url)
    got = load_dataset("frey-faces", data_dir=tmp_path / "cache")
    assert calls == [data_files.FREY_FACES_URL] and torch.equal(got.test, ds.test)
    # a download that decodes to other frames is refused and leaves nothing that looks local
    wrong = tmp_path / "wrong.mat"
    scipy.io.savemat(wrong, {"ff": (frames.reshape(1965, 560).T // 2)})
    monkeypatch.setattr(
        torchvision.datasets.utils, "download_url", lambda *a, **k: fake_download_url(*a, **k, source=wrong)
    )
    with pytest.raises(DataError, match="the frames' MD5 is") as e:
        load_dataset("frey-faces", data_dir=tmp_path / "other")
    assert (
        "could not be downloaded" in str(e.value)
        and list((tmp_path / "other" / "frey_faces").iterdir()) == []
    )
    # a damaged local copy: one line naming it
    bad = tmp_path / "bad" / "frey_faces"
    bad.mkdir(parents=True)
    np.save(bad / "frey_faces.npy", frames[::-1])
    with pytest.raises(DataError, match=r"frey_faces.npy: the frames' MD5 is"):
        load_dataset("frey-faces", data_dir=tmp_path / "bad", download=False)
    with pytest.raises(DataError, match="no download offline"):
        load_dataset("frey-faces", data_dir=tmp_path / "none", download=False)


# --------------------------------------------------------------------------- dynamic binarization (issue 26)


def test_dynamic_binarization_protocol():
    """Training batches: a fresh x ~ Bernoulli(grey) per draw, from torch's seeded generator;
    valid/test: one draw each, the test split from its own generator seeded BINARIZE_SEED (so it
    depends on nothing but the test images and the seed), valid from BINARIZE_SEED + 1."""
    grey = load_dataset("digits", binarize="none")
    ds = load_dataset("digits", binarize="dynamic")
    assert ds.binarize == "dynamic" and ds.binarize_seed == data.BINARIZE_SEED == 1234
    assert torch.equal(ds.test, torch.bernoulli(grey.test, generator=torch.Generator().manual_seed(1234)))
    assert torch.equal(ds.valid, torch.bernoulli(grey.valid, generator=torch.Generator().manual_seed(1235)))
    assert torch.equal(ds.train, grey.train)  # the training images stay grey: drawn per batch
    idx = torch.arange(64)
    torch.manual_seed(7)
    a = ds.train_batch(idx)
    torch.manual_seed(7)
    assert torch.equal(ds.train_batch(idx), a)  # the run's generator decides
    b = ds.train_batch(idx)
    assert _is_binary(a) and not torch.equal(a, b)  # a new draw every time
    many = torch.stack([ds.train_batch(idx) for _ in range(400)]).mean(0)
    assert (many - grey.train[idx]).abs().max() < 0.12  # E[x] = the grey level (400 draws: s.d. ≤ 0.025)
    static = load_dataset("digits", binarize="static")
    assert static.binarize_seed == 1234 and torch.equal(static.test, ds.test)
    assert load_dataset("digits", binarize="none").binarize_seed is None


def test_dynamic_binarization_resumes_exactly(tmp_path):
    """A run on greyscale data under a Bernoulli (auto: dynamic) continued from its state after
    one epoch is the uninterrupted two-epoch run, bit for bit: the training draws come from the
    torch generator the checkpoint restores."""
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    path = tmp_path / "grey.npy"
    np.save(path, np.random.default_rng(3).random((60, 4, 4)).astype(np.float32))

    def cfg(epochs, seed=0):
        return FitConfig(
            dataset=str(path), hidden=[8], z_dim=2, batch_size=16, final_iwae_k=0, epochs=epochs, seed=seed
        )

    whole = Trainer(cfg(2), tmp_path / "whole", quiet=True)
    assert whole.data.binarize == "dynamic" and whole.cfg.binarize_seed == 1234
    whole.run()
    Trainer(cfg(1), tmp_path / "resumed", quiet=True).run()
    second = Trainer(cfg(2), tmp_path / "resumed", resume=True, quiet=True)  # fit --resume: checkpoint.pt
    second.run()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in rows]  # noqa: E731
    assert strip(whole.state.rows) == strip(second.state.rows)
    sa, sb = whole.model.state_dict(), second.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and another seed draws other binarizations: other numbers
    other = Trainer(cfg(1, seed=1), tmp_path / "other", quiet=True)
    other.run()
    assert other.state.rows[0]["train_objective"] != whole.state.rows[0]["train_objective"]


def test_each_split_names_the_seed_of_its_own_fixed_draw():
    """evaluate --split valid used to record and print the test split's seed (1234) although the
    validation images are drawn with 1235: Dataset.fixed_seed gives each split's seed, and
    redrawing with it gives exactly the images held; the training split of a dynamic binarization
    and of dequantization has no fixed draw."""
    import dataclasses

    grey = torch.rand(60, 16, generator=torch.Generator().manual_seed(0))
    ds = data.dataset_from_array(grey.reshape(60, 4, 4).numpy())
    before = dataclasses.replace(ds)
    data.prepare(ds, "dynamic")
    for split in ("test", "valid"):
        seed = ds.fixed_seed("binarize", split)
        assert seed == data.BINARIZE_SEED + (split == "valid")
        again = torch.bernoulli(before.split(split), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(ds.split(split), again), split
    assert ds.fixed_seed("binarize", "train") is None and ds.fixed_seed("dequantize", "valid") is None


def test_an_npz_whose_y_is_not_class_labels_still_loads(tmp_path):
    """A float regression target (or a one-hot array) named ``y`` is not taken for class labels: the
    file loads as before, without labels; integer ``y`` and ``labels`` arrays give labels."""
    x = (np.random.default_rng(0).random((30, 4, 4)) < 0.5).astype(np.float32)
    np.savez(tmp_path / "target.npz", x=x, y=np.linspace(0, 1, 30))
    np.savez(tmp_path / "onehot.npz", x=x, y=np.eye(3)[np.arange(30) % 3])
    np.savez(tmp_path / "classes.npz", x=x, y=np.arange(30) % 3)
    for name in ("target", "onehot"):
        assert not data.load_dataset(str(tmp_path / f"{name}.npz")).labels
    assert data.load_dataset(str(tmp_path / "classes.npz")).labels["train"].dtype == torch.int64
