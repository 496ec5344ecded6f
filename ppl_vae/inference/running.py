r"""Running per-datapoint statistics over draws streamed chunk by chunk, memory ``O(N)`` in the
number of draws: the result type :class:`Estimate` (a value and its Monte Carlo standard error
per datapoint), the running mean and variance (:class:`Moments`), the delta-method variance of
log (1/k) Σ_j w_j (:func:`delta_method`), and IWAE_k over consecutive groups of k draws
(:class:`GroupedLSE`). The estimators (:mod:`.estimators`) and AIS (:mod:`.ais`) feed them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Estimate:
    """A per-datapoint estimate ``value (N,)`` with its Monte Carlo standard error ``stderr (N,)``
    (NaN where the draws give no error estimate: one draw per datapoint)."""

    value: torch.Tensor
    stderr: torch.Tensor

    def mean(self) -> float:
        """Average over datapoints (nats per datapoint)."""
        return self.value.mean().item()

    def mean_stderr(self) -> float:
        """Monte Carlo standard error of :meth:`mean`: √(Σ_i se_i²) / N (draws independent across
        i). It says how far more samples could move the number on *these* datapoints."""
        return (self.stderr.pow(2).sum().sqrt() / self.stderr.numel()).item()

    def across_datapoints_stderr(self) -> float:
        """std_i(value_i) / √N: the standard error of :meth:`mean` as an estimate of the
        population mean E_x[·] (the datapoints are a sample; Monte Carlo noise included)."""
        n = self.value.numel()
        return (self.value.std() / math.sqrt(n)).item() if n > 1 else math.nan


class Moments:
    """Running per-datapoint mean and sum of squared deviations over rows of ``(c, N)`` chunks
    (Chan et al.'s pairwise merge: no cancellation when the spread is tiny next to the mean)."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, v: torch.Tensor):  # v (c, N)
        c = v.shape[0]
        mean = v.mean(0)  # (N,)
        m2 = (v - mean).pow(2).sum(0)  # (N,)
        if self.count == 0:
            self.count, self.mean, self.m2 = c, mean, m2
            return
        total = self.count + c
        delta = mean - self.mean
        self.m2 = self.m2 + m2 + delta.pow(2) * (self.count * c / total)
        self.mean = self.mean + delta * (c / total)
        self.count = total

    def estimate(self) -> Estimate:
        """Mean ``(N,)`` with stderr = sample std / √count (NaN for a single row)."""
        if self.count < 2:
            return Estimate(self.mean, torch.full_like(self.mean, math.nan))
        return Estimate(self.mean, (self.m2 / (self.count - 1) / self.count).sqrt())


def delta_method(lse: torch.Tensor, lse2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta-method variance of log (1/k) Σ_j w_j from ``lse`` = log Σw and ``lse2`` = log Σw²
    of k weights (any shape, e.g. ``(G, N)``): (k Σw² / (Σw)² − 1) / (k − 1) (NaN for k = 1, one
    weight), and the ratio k Σw² / (Σw)² ∈ [1, k] itself (k / ESS). Used by :func:`iwae` and AIS."""
    ratio = torch.exp(lse2 - 2 * lse + math.log(k))  # k Σw² / (Σw)²
    var = (ratio - 1).clamp_min(0) / (k - 1) if k > 1 else torch.full_like(ratio, math.nan)
    return var, ratio


class GroupedLSE:
    """IWAE_k over consecutive groups of ``k`` samples, streamed chunk by chunk: per finished
    group g, IWAE_k^(g) = logsumexp(log w in g) − log k and its delta-method variance (see
    :func:`iwae`). Memory ``O(N)`` whatever k and the number of samples. For k = 1 a group is
    one draw and IWAE_1^(g) = log w: the rows go to the moments as they are, as in the MC ELBO."""

    def __init__(self, k: int):
        self.k, self.pos = k, 0
        self.lse = self.lse2 = None  # the open group's log Σw, log Σw²: (N,) once pos > 0
        self.values = Moments()
        self.delta_var = 0.0  # Σ over groups of the delta-method variance (becomes (N,))

    def update(self, lw: torch.Tensor):  # lw (c, N)
        if self.k == 1:
            self.values.update(lw)
            return
        while lw.shape[0]:
            if self.pos == 0 and lw.shape[0] >= self.k:  # whole groups at once
                g = lw.shape[0] // self.k
                full = lw[: g * self.k].reshape(g, self.k, lw.shape[1])  # (G, k, N)
                self._close(torch.logsumexp(full, 1), torch.logsumexp(2 * full, 1))  # (G, N)
                lw = lw[g * self.k :]
                continue
            part = lw[: self.k - self.pos]  # (≤ k − pos, N)
            lse, lse2 = torch.logsumexp(part, 0), torch.logsumexp(2 * part, 0)  # (N,)
            if self.pos:
                lse, lse2 = torch.logaddexp(self.lse, lse), torch.logaddexp(self.lse2, lse2)
            self.lse, self.lse2 = lse, lse2
            self.pos += part.shape[0]
            lw = lw[part.shape[0] :]
            if self.pos == self.k:
                self._close(self.lse[None], self.lse2[None])
                self.pos = 0

    def _close(self, lse, lse2):  # (G, N) each: finished groups of k > 1 draws
        self.values.update(lse - math.log(self.k))
        self.delta_var = self.delta_var + delta_method(lse, lse2, self.k)[0].sum(0)

    def estimate(self) -> Estimate:
        """Mean of the groups' IWAE_k. stderr: std over groups / √groups with ≥ 2 groups; with
        one group, its delta-method standard error (NaN for k = 1: one draw)."""
        if self.values.count >= 2 or self.k == 1:
            return self.values.estimate()
        return Estimate(self.values.mean, torch.as_tensor(self.delta_var).sqrt())
