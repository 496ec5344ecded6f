"""``ppl_vae.estimators``: the public name of :mod:`ppl_vae.inference.estimators` (the same
module object, so ``import ppl_vae.estimators`` and ``from ppl_vae import estimators`` keep working)."""

import sys

from .inference import estimators as _estimators

sys.modules[__name__] = _estimators
