"""Digests and data fingerprints: the one digest of tensors (:mod:`ppl_vae.core.digests`) keeps
the values runs have recorded, and a folder of images is fingerprinted by its content, so that
``fit --resume`` notices an image replaced by another of the same size (tests/test_consistency.py
covers ``.npy`` files)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_own_data import write_shapes
from test_reliability import assert_one_line, in_process, snapshot

from ppl_vae.core.digests import digest
from ppl_vae.data.fingerprint import tensor_digest
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
