"""One digest of tensors, for every record that says "these numbers, exactly": a data set's
fingerprint (:mod:`ppl_vae.data.fingerprint`) and the parameters ``best.pt`` holds
(:mod:`ppl_vae.training.best`).

Runs record these digests (``config.json``'s ``data_fingerprint``, a checkpoint's
``best_digest``) and later starts compare them, so the bytes hashed for a given input never
change: a new algorithm would make every earlier run's data look changed and its ``best.pt``
look stale.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import torch


def digest(parts: Iterable[str | torch.Tensor | np.ndarray]) -> str:
    """BLAKE2b (16 bytes, as 32 hex digits) over ``parts`` in order: a ``str`` as its UTF-8
    bytes, a tensor (or NumPy array) as the raw bytes of its values in row-major order (a
    contiguous CPU copy, so the same numbers give the same digest on any device and in any
    memory layout). Neither dtype nor shape is hashed with a tensor's bytes: callers put what
    distinguishes their tensors in a ``str`` part before each (e.g. ``"float32|784;"``)."""
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        if isinstance(part, str):
            h.update(part.encode())
            continue
        t = torch.as_tensor(part).detach().to("cpu").contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy())
    return h.hexdigest()
