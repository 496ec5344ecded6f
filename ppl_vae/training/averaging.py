"""Parameter averaging (``--ema DECAY``): the weights a run is judged and kept by.

After every optimizer step the average moves towards the trained parameters,

    θ̄ ← d·θ̄ + (1 − d)·θ,    θ̄₀ = θ₀,

an exponential moving average with time constant 1/(1 − d) steps (Polyak averaging in the form
deep generative models use it, e.g. Kingma et al. 2016's IAF VAE). Adam's last iterates jitter
around the optimum at the scale of the learning rate; their average sits closer to it. With
averaging on, validation, early stopping, ``best.pt``, the end-of-run numbers and figures, and
``ppl_vae.evaluate`` all use θ̄, while the optimizer keeps stepping θ (a checkpoint holds both, so
``--resume`` continues exactly). Buffers (e.g. a prior's constant loc) are copied, not averaged.
θ̄ starts at θ₀ without a bias correction, so for the first ~1/(1 − d) steps it still leans on the
initial weights; ``train_objective`` in metrics stays θ's running bound (so train − validation
is not a generalization gap under averaging).
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ParameterAverage:
    """The average θ̄ of ``model``'s parameters as a second module, :attr:`model` (eval mode, no
    gradients), updated in place by :meth:`update` with one fused ``lerp`` over all parameters and
    no host synchronization (so it can run inside a captured CUDA graph)."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"the averaging decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._trained = list(model.parameters())
        self._averaged = list(self.model.parameters())
        self._buffers = list(zip(model.buffers(), self.model.buffers()))

    @torch.no_grad()
    def update(self) -> None:
        """θ̄ ← θ̄ + (1 − d)(θ − θ̄), after an optimizer step."""
        torch._foreach_lerp_(self._averaged, self._trained, 1 - self.decay)
        for src, dst in self._buffers:
            dst.copy_(src)
