"""Class-conditional VAEs (Sohn et al. 2015) and :func:`make_vae`, which builds either kind.

The conditional program is the :class:`~ppl_vae.programs.model.VAE` with a one-hot label y appended to
the inputs of its encoder and decoder; every part (prior, posterior family, hierarchy) is the
same. docs/models.md ("Class conditioning") has the math.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .model import VAE


class ConditionalVAE(VAE):
    """A class-conditional VAE (Sohn et al. 2015): p(z) p_θ(x | z, y) and q_φ(z | x, y), with the
    one-hot label y appended to the encoder's and the decoder's inputs (z stays independent of
    y under the prior). Labels are the second positional argument of ``model`` and ``guide``,
    as in Pyro's CVAE tutorial: class indices ``(N,)`` or one-hot rows ``(N, C)``.

    :param num_classes: C, the number of classes (>= 2), keyword only. Other parameters as :class:`VAE`.
    """

    conditional = True

    def __init__(self, image_shape: Sequence[int], *args, num_classes: int = 10, **kwargs):
        if num_classes < 2:
            raise ValueError(f"a ConditionalVAE needs num_classes >= 2, got {num_classes}")
        super().__init__(image_shape, *args, num_classes=num_classes, **kwargs)

    def model(
        self, x: torch.Tensor, y: torch.Tensor, size: int | None = None, beta: float = 1.0
    ) -> torch.Tensor:
        """p(z) p_θ(x | z, y) for a batch ``x (N, D)`` with labels ``y``."""
        return self._model(x, self._labels(y, x.shape[0], x.dtype), size, beta)

    def guide(
        self, x: torch.Tensor, y: torch.Tensor, size: int | None = None, beta: float = 1.0
    ) -> torch.Tensor:
        """q_φ(z | x, y), reparameterized."""
        return self._guide(x, self._labels(y, x.shape[0], x.dtype), size, beta)


def make_vae(image_shape: Sequence[int], *args, num_classes: int = 0, **kwargs) -> VAE:
    """A :class:`ConditionalVAE` when ``num_classes`` is given, else a :class:`VAE`."""
    if num_classes:
        return ConditionalVAE(image_shape, *args, num_classes=num_classes, **kwargs)
    return VAE(image_shape, *args, **kwargs)
