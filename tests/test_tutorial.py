"""docs/tutorial.md runs as written: its Python blocks, in order, in one interpreter, offline."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_tutorial_runs_as_written(tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "docs" / "tutorial.md").read_text(), re.S)
    assert len(blocks) == 5
    env = {
        **os.environ,
        "PPL_VAE_DATA": str(tmp_path),
        "HOME": str(tmp_path),
        "PPL_VAE_OFFLINE": "1",
        "PYTHONPATH": str(REPO),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "2",
    }
    r = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    mine, theirs = map(
        float,
        re.search(
            r"test log p\(x\) ≥ (-[\d.]+) \(your SVI loop\) and (-[\d.]+) \(ppl_vae.fit\)", r.stdout
        ).groups(),
    )
    assert -40 < mine < -15 and -40 < theirs < -15  # 64 binary pixels: well above −64 ln 2 = −44.4
    assert abs(mine - theirs) < 5, (mine, theirs)  # the same method, different networks' details
    assert "Pareto k̂" in r.stdout and "KL(q ‖ p) per layer: z" in r.stdout
