"""PSIS diagnostics: the K-dependent k̂ threshold, and k̂ / ESS on weights with a known tail.

The fit itself is ArviZ's, in NumPy on the CPU; the log-weights come in on any ``device``
(conftest) and k̂ and the ESS come back on the CPU, float64."""

import math

import pytest
import torch

from ppl_vae.inference.psis import PSIS_MIN_SAMPLES, khat_threshold, psis_from_log_weights


def test_khat_threshold_is_min_of_one_minus_inverse_log10_k_and_0_7():
    """min(1 − 1/log10 K, 0.7) (Vehtari et al. 2024): 1/2 at K = 100, 2/3 at K = 1000, 0.7 from
    K = 10^(10/3) ≈ 2154 on; NaN where k̂ is not computed (K < PSIS_MIN_SAMPLES)."""
    assert khat_threshold(100) == pytest.approx(0.5, abs=1e-12)
    assert khat_threshold(1000) == pytest.approx(2 / 3, abs=1e-12)
    assert khat_threshold(2000) == pytest.approx(1 - 1 / math.log10(2000), abs=1e-12)
    assert khat_threshold(2000) < 0.7
    for k in (2155, 5000, 10**4, 10**6):
        assert khat_threshold(k) == 0.7
    assert khat_threshold(PSIS_MIN_SAMPLES) == pytest.approx(1 - 1 / math.log10(21), abs=1e-12)
    assert math.isnan(khat_threshold(PSIS_MIN_SAMPLES - 1)) and math.isnan(khat_threshold(1))
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match="K must be an integer >= 1"):
            khat_threshold(bad)


def test_khat_recovers_the_pareto_tail_shape(device):
    """w = U^(−k), U ~ Uniform(0, 1), has a Pareto tail of shape k: the median k̂ over 20
    datapoints of K = 10,000 draws is k within 0.1 (one k̂ has a standard error of ~0.1)."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(10_000, 20, generator=g, dtype=torch.float64).to(device)  # (K, N)
    for k in (0.3, 0.9):
        khat, ess = psis_from_log_weights(-k * u.log())
        assert abs(khat.median().item() - k) < 0.1, (k, khat)
        assert ((ess >= 1) & (ess <= 10_000)).all()


def test_ess_closed_forms(device):
    """ESS = 1 / Σ_k w̃_k²: K for equal weights (Pareto-smoothed path, K ≥ PSIS_MIN_SAMPLES), 2 for
    two equal weights and the rest negligible (raw path, K < PSIS_MIN_SAMPLES, k̂ NaN). Both paths
    return CPU tensors whatever the device of the weights (ArviZ's results; the raw path agrees)."""
    khat, ess = psis_from_log_weights(torch.zeros(100, 3, device=device))
    torch.testing.assert_close(ess, torch.full((3,), 100.0, dtype=torch.float64), rtol=1e-12, atol=0)
    assert torch.isinf(khat).all() and khat.device.type == "cpu"  # tied weights: no tail to fit
    log_w = torch.tensor([0.0, 0.0, -1e3, -1e3], device=device)[:, None].expand(4, 2)  # (K, N)
    khat, ess = psis_from_log_weights(log_w)
    assert khat.isnan().all() and khat.device.type == "cpu"
    torch.testing.assert_close(ess, torch.full((2,), 2.0, dtype=torch.float64), rtol=1e-12, atol=0)
