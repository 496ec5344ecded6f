"""Digests and data fingerprints: the one digest of tensors (:mod:`ppl_vae.core.digests`) keeps
the values runs have recorded."""

import torch

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
