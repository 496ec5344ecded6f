"""``fit --tensorboard DIR``: each epoch's metrics and image grids as TensorBoard events.

At every epoch (``global_step`` = the epoch number, so a resumed run's curves continue):

* one scalar per numeric key of the ``metrics.jsonl`` row, under the same name
  (``train_objective``, ``valid_elbo``, ``valid_recon``, ``valid_kl``, ``valid_iwae_k``, ``beta``,
  ``lr``, ``epoch_seconds``, …; TensorBoard stores them as float32);
* ``reconstructions``: the validation images that ``plots.run_figures`` shows (the same seeded
  choice) in the top row, their reconstructions E[x | z = μ(x)] below;
* ``samples``: decoded means E[x|z] of prior draws from a fixed seed (the same z every epoch, as
  ``samples.png``), so the grid shows the decoder learning.

The ``tensorboard`` package is an optional extra (``pip install 'ppl_vae[tensorboard]'``); asking
for it without the package is a :class:`UserError` when the logger is made, before any training.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import torch

from ..core.errors import UserError

MISSING = (
    "--tensorboard needs the tensorboard package: pip install 'ppl_vae[tensorboard]' "
    "(or pip install tensorboard)"
)


class TensorBoardLog:
    """A ``SummaryWriter`` on ``logdir``, opened at the first :meth:`log_epoch` (a run that fails
    before its first epoch leaves no directory). ``n`` validation images, ``n_samples`` prior
    samples, both drawn with ``seed``."""

    def __init__(self, logdir: str | Path, n: int = 10, n_samples: int = 64, seed: int = 0):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # not installed, or older than torch supports
            raise UserError(MISSING) from None
        self._writer_class, self.logdir = SummaryWriter, Path(logdir)
        self.n, self.n_samples, self.seed = n, n_samples, seed
        self.writer = None

    def log_epoch(self, row: dict, model, data, labels: dict | None = None) -> None:
        """Write ``row``'s numbers and the two image grids at step ``row["epoch"]``; ``data`` is the
        run's :class:`~ppl_vae.data.splits.Dataset`, ``labels`` the one-hot ``{split: (N, C)}`` of a
        conditional program (None otherwise)."""
        step = int(row["epoch"])
        if self.writer is None:
            # purge_step: events of a step ≥ this one (an epoch logged before a crash and now
            # redone, or an earlier run in DIR replaced with --overwrite) are hidden
            self.writer = self._writer_class(str(self.logdir), purge_step=step)
        for key, value in row.items():
            if key != "epoch" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        from .plots import grid_tensor  # (matplotlib and torchvision: imported only when a run logs)

        x, recon, samples = self._images(model, data, labels)
        shape = tuple(data.image_shape)
        self.writer.add_image("reconstructions", grid_tensor(torch.cat([x, recon]), shape, len(x)), step)
        self.writer.add_image(
            "samples", grid_tensor(samples, shape, math.ceil(math.sqrt(len(samples)))), step
        )
        self.writer.flush()  # each epoch shows up at once, and survives a killed job

    @torch.no_grad()
    def _images(self, model, data, labels):
        """Validation images ``(n, D)``, their reconstructions ``(n, D)``, prior samples
        ``(n_samples, D)``; the model's train/eval mode and the global RNG are left as they were."""
        training = model.training
        model.eval()
        try:
            from .plots import validation_reconstructions  # the images of reconstructions.png

            valid_labels = None if labels is None else labels["valid"]
            x, recon = validation_reconstructions(model, data, self.n, self.seed, valid_labels)
            samples = model.sample(self.n_samples, torch.Generator().manual_seed(self.seed))
        finally:
            model.train(training)
        return x, recon, samples

    def close(self) -> None:
        """Flush and close the event file (a later :meth:`log_epoch` opens a new one)."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
