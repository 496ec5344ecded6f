"""The README runs as written: its Python block, offline (no data folder: the digits)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # trains for a few epochs: with the examples, outside the fast subset
def test_the_readme_python_block_runs_as_written(tmp_path):
    block = re.search(r"### Python API\n\n```python\n(.*?)```", (REPO / "README.md").read_text(), re.S).group(
        1
    )
    empty = tmp_path / "no-data"
    empty.mkdir()
    env = {
        **os.environ,
        "PPL_VAE_DATA": str(empty),
        "HOME": str(tmp_path),
        "PPL_VAE_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "MPLBACKEND": "Agg",
    }
    r = subprocess.run(
        [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    line = r.stdout.strip().splitlines()[-1]
    elbo, log_px = map(
        float, re.match(r"ELBO (-?[\d.]+), log p\(x\) ≥ (-?[\d.]+) ± [\d.]+ nats per image$", line).groups()
    )
    assert elbo <= log_px + 0.5 and -60 < elbo < 0  # the digits: 64 binary pixels
    assert (tmp_path / "runs" / "readme" / "best.pt").exists()
    assert "falling back to scikit-learn's 8x8 digits" in r.stderr  # the warning says which data
