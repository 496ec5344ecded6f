"""Digests and data fingerprints: the one digest of tensors (:mod:`ppl_vae.core.digests`) keeps
the values runs have recorded, and a folder of images is fingerprinted by its content, so that
``fit --resume`` notices an image replaced by another of the same size (tests/test_consistency.py
covers ``.npy`` files); digests of one kind only are compared, so a data set passed from Python
and resumed or evaluated by its name is compared by the digest of its file or folder."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_consistency import warnings_of
from test_own_data import write_shapes
from test_reliability import assert_one_line, copy_run, in_process, snapshot

from ppl_vae import fit
from ppl_vae.core.digests import digest
from ppl_vae.data import load_dataset
from ppl_vae.data.fingerprint import changes, fingerprint, tensor_digest
from ppl_vae.training import best


def _tensors():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, generator=g)  # float32
    b = torch.arange(6, dtype=torch.int64).reshape(2, 3).t()  # not contiguous
    c = torch.tensor([1.5], dtype=torch.float64)
    return a, b, c


def test_digests_keep_the_values_existing_runs_recorded():
    """``config.json``'s data digest and a checkpoint's ``best_digest`` are compared with digests
    computed later: both go through one function now and give the values of the two functions
    they replace (these numbers are theirs, computed before the fold)."""
    a, b, c = _tensors()
    assert tensor_digest([a, b, c]) == "8a37ad51df900f3a2c5620799669c537"
    assert best.digest({"w": a, "b": b, "n": 7, "c": c}) == "7bd42f93316eac8695f903feb012e652"
    # the same numbers in another layout, or as a NumPy array, give the same digest
    assert digest(["x", b]) == digest(["x", b.contiguous()]) == digest(["x", b.numpy()])
    assert digest(["x", a]) != digest(["x", a + 1e-7]) and digest(["x", a]) != digest(["y", a])


# --------------------------------------------------------------------------- folders of images

TINY = ["--hidden", "8", "--z-dim", "2", "--batch-size", "8", "--final-iwae-k", "0", "--quiet"]


@pytest.mark.slow  # four fits in process: ~6 s on 2 busy cores
def test_a_replaced_image_of_the_same_size_in_a_folder_is_noticed(tmp_path, capsys):
    """Before, a folder's fingerprint held its split sizes only: one image's pixels changed (the
    same size, the same file name) passed ``--resume`` unnoticed. Now it holds a digest of the
    decoded images and labels: ``--resume`` exits 2 with the one-line data-changed message, the
    run untouched; ``--accept-changed-data`` continues and records the new fingerprint."""
    folder, run = write_shapes(tmp_path / "shapes", per_class=4), tmp_path / "run"
    argv = ["--dataset", folder, "--likelihood", "gaussian", *TINY, "--epochs", 1, "--out", run]
    assert in_process(argv, capsys).returncode == 0
    recorded = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert len(recorded["digest"]) == 32 and recorded["splits"] == [10, 1, 1]
    # unchanged images: resumed without a word about the data
    r = in_process(["--out", run, "--resume"], capsys)  # (no epoch left to train)
    assert r.returncode == 0 and "changed" not in r.stderr, r.stderr

    path = folder / "square" / "square-01.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel: the same size, the same name
    Image.fromarray(pixels).save(path)
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 2], capsys), 2)
    assert (
        f"--resume: the data ({folder}) changed since the run started (the same size, other content)" in line
    )
    assert "--accept-changed-data" in line, line
    assert snapshot(run) == before

    r = in_process(["--out", run, "--resume", "--epochs", 2, "--accept-changed-data"], capsys)
    assert r.returncode == 0 and "--accept-changed-data" in r.stderr, r.stderr
    now = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert now["digest"] != recorded["digest"] and now["splits"] == recorded["splits"]


# --------------------------------------------------------------------------- digests of one kind


def _change_one_pixel(folder):
    path = folder / "square" / "square-01.png"
    pixels = np.asarray(Image.open(path)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]  # one pixel: the same size, the same name
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("kind", ["folder", "npy"])
def test_a_python_data_set_is_compared_with_its_source_read_by_name(tmp_path, kind):
    """A run fitted on ``load_dataset(source)`` from Python records a digest of its tensors as
    prepared, and the run's ``--dataset`` names the source; resumed or evaluated by that name, the
    source's digest is made (a folder's decoded images, a file's bytes). Before, the two were
    compared as if of one kind: they always differed ("the same size, other content"). Now the
    Python record also holds its source's digest and only digests of one kind are compared: the
    same data pass either way; a pixel changed in the source is noticed either way."""
    if kind == "folder":
        source = write_shapes(tmp_path / "shapes", per_class=4)
    else:
        source = tmp_path / "x.npy"
        np.save(source, np.random.default_rng(0).random((30, 4, 4), dtype=np.float32))
    python, by_name = (
        fingerprint(load_dataset(str(source)), None),
        fingerprint(load_dataset(str(source)), str(source)),
    )
    assert python["digest"] != by_name["digest"]  # of other kinds: never compared
    assert changes(python, by_name) is None and changes(by_name, python) is None
    assert changes(python, fingerprint(load_dataset(str(source)), None)) is None  # Python again

    if kind == "folder":
        _change_one_pixel(source)
    else:
        x = np.load(source)
        x[0, 0, 0] = 1 - x[0, 0, 0]
        np.save(source, x)
    changed = fingerprint(load_dataset(str(source)), str(source))
    assert changes(python, changed) == changes(by_name, changed) == "the same size, other content"
    assert changes(changed, fingerprint(load_dataset(str(source)), None)) is None


def test_records_without_a_kind_are_read_as_before(tmp_path):
    """Runs recorded before kinds were: a ``.npy``'s digest (with its path) is still compared with
    the file's; a Python data set's tensors' digest (no path) is compared with a Python data set's
    only, never with a folder's or a file's (before: a false "other content")."""
    source = tmp_path / "x.npy"
    np.save(source, np.random.default_rng(0).random((30, 4, 4), dtype=np.float32))
    ds = load_dataset(str(source))
    drop = lambda fp: {k: v for k, v in fp.items() if k not in ("kind", "source_digest")}  # noqa: E731
    old_file, old_python = drop(fingerprint(ds, str(source))), drop(fingerprint(ds, None))
    assert "path" in old_file and "path" not in old_python and set(old_python) == {"name", "splits", "digest"}
    assert changes(old_file, fingerprint(ds, str(source))) is None
    assert changes(old_python, fingerprint(ds, str(source))) is None
    assert changes(old_python, fingerprint(ds, None)) is None
    ds.train = ds.train.flip(0)  # the same sizes, other tensors
    assert changes(old_python, fingerprint(ds, None)) == "the same size, other content"
    np.save(source, 1 - np.load(source))
    assert (
        changes(old_file, fingerprint(load_dataset(str(source)), str(source)))
        == "the same size, other content"
    )


@pytest.mark.slow  # three fits and one evaluation in process: ~8 s on 2 busy cores
def test_a_folder_fitted_from_python_resumes_and_evaluates_by_name(tmp_path, capsys):
    """``ppl_vae.fit(dataset=load_dataset(folder))``, then ``python -m ppl_vae.fit --resume`` and
    ``evaluate`` of the run, which read the folder by the name the run records. Before, resume
    was refused ("the same size, other content") and evaluate warned that the data changed: the
    Python run's digest was of its tensors, the resumed run's of the folder. Now both pass
    without a word about the data; a pixel changed in the folder is still refused."""
    folder, run = write_shapes(tmp_path / "shapes", per_class=4), tmp_path / "run"
    small = dict(hidden=[8], z_dim=2, batch_size=8, final_iwae_k=0, device="cpu", likelihood="gaussian")
    fit(dataset=load_dataset(str(folder)), out=run, epochs=1, **small)
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["dataset"] == str(folder) and recorded["data_fingerprint"]["kind"] == "tensors"
    kept = copy_run(run, tmp_path / "kept")  # its Python record, for the changed folder below

    r = in_process([run, "--num-samples", 2, "--device", "cpu", "--quiet"], capsys, module="evaluate")
    assert r.returncode == 0 and warnings_of(r) == [], r.stderr

    r = in_process(["--out", run, "--resume", "--epochs", 2, "--quiet"], capsys)
    assert r.returncode == 0 and "changed" not in r.stderr, r.stderr
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2

    _change_one_pixel(folder)
    before = snapshot(kept)
    line = assert_one_line(in_process(["--out", kept, "--resume", "--epochs", 2], capsys), 2)
    assert "changed since the run started (the same size, other content)" in line, line
    assert snapshot(kept) == before
