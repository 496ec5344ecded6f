"""Whole training steps captured in CUDA graphs (GPU only).

One step (gather the batch by index, Pyro model + guide traces, the ELBO, backward, a fused
capturable Adam update) launches a few hundred small kernels; at batch 128 the GPU finishes
them faster than Python can issue them. Capturing the step once and replaying it per batch
removes the Python and launch overhead. What makes Pyro's ELBO capturable (see
:mod:`ppl_vae.inference.objectives` and :mod:`ppl_vae.programs.model`): the loss never leaves the device (no
``.item()``, no host NaN check), the data plate gets explicit device-side ``subsample``
indices (no CPU ``randperm``), constants such as the prior's parameters are device buffers
(no host-to-device copies), and β is a device tensor so KL warm-up changes it without
recapturing.

:class:`GraphedStep` wraps a ``step(idx, beta) -> loss`` function that does the whole update
for the batch ``idx``. For each batch size it runs ``warmup`` real steps eagerly on a side
stream (as CUDA graph capture requires), captures the next one, and replays from then on;
the eager steps and the replays follow the same sequence of updates. If capture fails it
raises :class:`GraphCaptureError` (one line: rerun with ``--no-cuda-graph``); it cannot fall
back to eager steps in the same process, because the failed capture leaves the CUDA random
generator mid-capture.

.. note:: Opt-in (``fit --cuda-graph``). ``python benchmarks/gpu_check.py`` compares captured
   and eager training, step by step and program family by program family; it becomes the
   default once every family passes (results and timings: docs/benchmarks.md).
   What keeps it capturable is tested on the CPU: ``tests/test_train_step.py`` fails when the
   training step synchronizes with the host.
"""

from __future__ import annotations

import torch

from ..core.errors import UserError


class GraphCaptureError(UserError):
    """The training step could not be captured in a CUDA graph (e.g. it reads a device value
    on the host): a one-line error that names ``--no-cuda-graph``."""


class GraphedStep:
    """``__call__(idx, beta, weight=1) -> loss``: a training step, replayed from a CUDA graph per batch size.

    The returned loss tensor is static (overwritten by the next replay): consume it (e.g.
    add it to a running sum) before the next call.
    """

    def __init__(self, step, device: torch.device, warmup: int = 3):
        self.step = step
        self.warmup = warmup
        self.beta = torch.ones((), device=device)  # read by the captured graph at every replay
        self.graphs: dict[int, tuple] = {}
        self.eager_steps: dict[int, int] = {}

    def _eager(self, idx):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loss = self.step(idx, self.beta)
        torch.cuda.current_stream().wait_stream(side)
        return loss

    def __call__(self, idx: torch.Tensor, beta: float, weight: float = 1.0) -> torch.Tensor:
        """One step on the rows ``idx``; ``weight`` is the loss weight of a distributed shard, which
        graphs never see (they are single-process): it must be 1."""
        if weight != 1.0:
            raise ValueError(
                f"a captured step takes no distributed loss weight (got {weight}); use eager steps"
            )
        self.beta.fill_(beta)
        b = idx.shape[0]
        if b in self.graphs:
            graph, static_idx, static_loss = self.graphs[b]
            static_idx.copy_(idx)
            graph.replay()
            return static_loss
        if self.eager_steps.get(b, 0) < self.warmup:
            self.eager_steps[b] = self.eager_steps.get(b, 0) + 1
            return self._eager(idx)
        static_idx = idx.clone()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):  # records the kernels; nothing runs yet
                static_loss = self.step(static_idx, self.beta)
        except Exception as e:  # noqa: BLE001 - any capture failure: one line, the last checkpoint intact
            # No eager fallback: a failed capture leaves the CUDA generator mid-capture, and the next
            # random draw fails ("Offset increment outside graph capture", seen on an H200).
            raise GraphCaptureError(
                f"CUDA graph capture of the training step failed ({e.__class__.__name__}: "
                f"{str(e).splitlines()[0][:160]}); rerun with --no-cuda-graph (eager steps give the same "
                f"numbers; --resume continues from the last checkpoint)"
            ) from None
        self.graphs[b] = (graph, static_idx, static_loss)
        graph.replay()  # this step's update
        return static_loss
