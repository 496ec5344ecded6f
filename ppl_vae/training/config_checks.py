"""The check of each :class:`~ppl_vae.training.config.FitConfig` field: its type and its range,
and the one line a bad value gets, naming the field as a flag (``--z-dim``) or as a key of the
file it came from. Most fields that take a name take their choices from the programs' and data's
own tables (``PRIORS``, ``LIKELIHOODS``, …); ``--optimizer`` and ``--elbo`` have theirs here. A
new field needs its range in ``_RANGES``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import typing

from ..core.errors import UserError
from ..data.dequantize import DEQUANTIZE
from ..data.prepare import BINARIZE
from ..programs.guides import POSTERIORS
from ..programs.likelihoods import LIKELIHOODS
from ..programs.model import HIERARCHIES
from ..programs.nets import ACTIVATIONS, ARCHS
from ..programs.priors import PRIORS

#: ``--optimizer``: torch's Adam, or Adam on each parameter tensor's gradient scaled to unit L2
#: norm (``training.optim.normalize_and_clip_grads``), the VampPrior authors' ``AdamNormGrad``
OPTIMIZERS = ("adam", "adam-normgrad")
# The training objectives (--elbo); ppl_vae.inference.objectives.OBJECTIVES implements exactly these
# (tests/test_config.py), named here so that the configuration imports no inference code.
ELBO_CHOICES = ("trace", "meanfield", "iwae")


def check_fields(cfg, source: str | None = None) -> None:
    """Raise a one-line :class:`UserError` for a field of ``cfg`` of the wrong type or out of
    range. Fields are named as flags (``--z-dim``), or as ``"z_dim"`` of the file ``source``."""
    where = (lambda name: f'{source}: "{name}"') if source else flag
    types = field_types(type(cfg))
    for name, kind in types.items():
        ok, expected = _TYPE_CHECKS[kind]
        value = getattr(cfg, name)
        if not ok(value):
            raise UserError(f"{where(name)} must be {expected}, got {_show(value, source)}")
    for name, ok, expected in _RANGES:
        value = getattr(cfg, name)
        if value is not None and not ok(value):
            raise UserError(f"{where(name)} must be {expected}, got {_show(value, source)}")


@functools.cache
def field_types(cls) -> dict:
    """Field name → type of the dataclass ``cls``, e.g. ``"epochs"`` → ``int | None``."""
    return typing.get_type_hints(cls)


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return (is_int(v) and abs(v) < 1e300) or (isinstance(v, float) and math.isfinite(v))


def _optional(check):
    ok, expected = check
    return (lambda v: v is None or ok(v)), f"{expected} or null"


_INT_LIST = (lambda v: isinstance(v, list) and all(is_int(x) for x in v), "a list of integers")
_TYPE_CHECKS = {
    int: (is_int, "an integer"),
    float: (is_number, "a finite number"),
    str: (lambda v: isinstance(v, str), "a string"),
    bool: (lambda v: isinstance(v, bool), "true or false"),
    list[int]: _INT_LIST,
    dict: (lambda v: isinstance(v, dict), "a JSON object"),
}
_TYPE_CHECKS.update({t | None: _optional(c) for t, c in list(_TYPE_CHECKS.items())})


def _one_of(choices):
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


# (field, test, what the value must be); a None value (where the type allows it) is not tested
_RANGES = (
    ("binarize", *_one_of(BINARIZE)),
    ("dequantize", *_one_of(DEQUANTIZE)),
    ("likelihood", *_one_of(tuple(LIKELIHOODS))),
    ("arch", *_one_of(ARCHS)),
    ("activation", *_one_of(tuple(ACTIVATIONS))),
    ("elbo", *_one_of(ELBO_CHOICES)),
    ("dataset", lambda v: v.strip() != "", "a dataset name, a folder of images or a .npy/.npz path"),
    ("channels", lambda v: v in (1, 3), "1 or 3"),
    ("image_size", lambda v: len(v) == 2 and all(s >= 1 for s in v), "two sizes >= 1 (H,W)"),
    ("epochs", lambda v: v >= 1, ">= 1"),
    ("batch_size", lambda v: v >= 1, ">= 1"),
    ("lr", lambda v: v > 0, "> 0"),
    ("num_particles", lambda v: v >= 1, ">= 1"),
    ("beta", lambda v: v > 0, "> 0"),
    ("kl_warmup", lambda v: v >= 0, ">= 0"),
    ("z_dim", lambda v: v >= 1, ">= 1"),
    ("hidden", lambda v: all(h >= 1 for h in v), ">= 1"),
    ("sigma", lambda v: v > 0, "> 0"),
    ("sigma_floor", lambda v: v >= 0, ">= 0"),
    ("weight_decay", lambda v: v >= 0, ">= 0"),
    ("lr_decay", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("ema", lambda v: 0 <= v < 1, "in [0, 1) (0: off)"),
    ("grad_clip", lambda v: v > 0, "> 0"),
    ("patience", lambda v: v >= 1, ">= 1"),
    ("time_limit", lambda v: v > 0, "> 0 (minutes)"),
    ("seed", lambda v: 0 <= v < 2**32, "in 0 .. 2**32 - 1 (NumPy's seed range)"),
    ("log_every", lambda v: v >= 1, ">= 1"),
    ("final_iwae_k", lambda v: v >= 0, ">= 0"),
    ("tensorboard", lambda v: v.strip() != "", "a directory name"),
    (
        "device",
        lambda v: v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", v),
        "auto, cpu or cuda (or cuda:N)",
    ),
    ("prior", *_one_of(tuple(PRIORS))),
    ("guide", *_one_of(tuple(POSTERIORS))),
    ("latent_layers", lambda v: v in (1, 2), "1 or 2"),
    ("hierarchy", *_one_of(HIERARCHIES)),
    ("optimizer", *_one_of(OPTIMIZERS)),
    ("z2_dim", lambda v: v >= 1, ">= 1"),
    ("hidden2", lambda v: all(h >= 1 for h in v), ">= 1"),
    ("pseudo_inputs", lambda v: v >= 1, ">= 1"),
    ("mixture_components", lambda v: v >= 1, ">= 1"),
    ("flow_steps", lambda v: v >= 1, ">= 1"),
    ("num_classes", lambda v: v >= 2, ">= 2"),
    ("image_shape", lambda v: len(v) == 3 and all(s >= 1 for s in v), "3 sizes >= 1 (C, H, W)"),
)
_FLAG_NAMES = {
    "num_particles": "--num-particles K",
    "hidden": "--hidden sizes",
    "image_shape": "the image shape",
    "image_size": "--image-size H,W",
}


def flag(name: str) -> str:
    return _FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def json_type(v) -> str:
    return {
        type(None): "null",
        bool: "true/false",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }.get(type(v), type(v).__name__)


def _show(value, source) -> str:
    """``value`` as the user wrote it: JSON with its type for a file, Python's repr (str) otherwise."""
    if source:
        text = json.dumps(value) + (f" ({json_type(value)})" if not isinstance(value, (int, float)) else "")
    else:
        text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
