"""Seeds for independent, reproducible random streams: one per sample unit, datapoint block,
validation pass or process, all derived from the one seed a user gives."""

from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for stream ``keys`` of ``seed`` (NumPy ``SeedSequence``): independent,
    reproducible streams for sample units and datapoint blocks."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0):
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1, np.uint64)[0] >> 1)
