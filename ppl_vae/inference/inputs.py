"""What the estimators accept as data, checked before any pass; the number of samples K; and the
one line for a program that raised on the caller's data (a dtype or shape other than its
module's, a missing positional argument).

**Data.** ``x`` is a tensor ``(N, ...)`` with the datapoints along dim 0, or a tuple
``(x, y, ...)`` of such tensors with the same N: the per-datapoint arguments of
``model(x, y, ...)`` and ``guide(x, y, ...)`` (class labels, masks, ...), passed positionally
as Pyro's CVAE tutorial writes them and sliced together with x. Keyword arguments
(``size=``, ``beta=``) go to both programs unchanged and are never sliced, so a keyword tensor
with N rows is refused (it would pair datapoints with the wrong rows).

Every refusal is one line, a :class:`~ppl_vae.core.errors.UserError` (a ``ValueError``).
"""

from __future__ import annotations

import numpy as np
import torch

from ..core.errors import DataError, UserError
from .replay import as_args


def take(args, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Datapoints ``start:stop`` of every argument (dim 0)."""
    return tuple(a[start:stop] for a in args)


def check_num_samples(k) -> None:
    """Refuse a number of samples K that is not an integer >= 1."""
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        if torch.is_tensor(k):
            raise UserError(
                f"the number of samples K must be an integer >= 1, got a tensor of shape {tuple(k.shape)}: "
                f"per-datapoint arguments go with x as a tuple (x, y, ...)"
            )
        raise UserError(f"the number of samples K must be an integer >= 1, got {k!r}")


def num_datapoints(x) -> int:
    """N, the length of dim 0 of ``x`` (a tensor or a tuple of arguments)."""
    return as_args(x)[0].shape[0]


def select(x, index, device=None):
    """Datapoints ``index`` (a slice or indices along dim 0) of ``x``, a tensor or a tuple of
    arguments (then a tuple), moved to ``device`` when given."""
    args = tuple(a[index] if device is None else a[index].to(device) for a in as_args(x))
    return args[0] if torch.is_tensor(x) else args


def _name(i: int) -> str:
    return "x" if i == 0 else f"argument {i} of (x, ...)"


def check_data(x, kwargs: dict | None = None) -> tuple[torch.Tensor, ...]:
    """``x`` as a tuple of arguments, refused (:class:`DataError`) unless each is a tensor of
    rank ≥ 1 with the same N ≥ 1 along dim 0 and every floating one is finite (the first bad
    datapoint is named); a keyword tensor with N rows is refused too. One reduction and one host
    sync per floating argument."""
    if not (torch.is_tensor(x) or (isinstance(x, (tuple, list)) and x and all(map(torch.is_tensor, x)))):
        raise DataError(
            f"x must be a tensor (N, ...) or a tuple (x, y, ...) of tensors with the datapoints along "
            f"dim 0, got {type(x).__name__}"
        )
    args = as_args(x)
    if args[0].dim() == 0 or args[0].shape[0] == 0:
        raise DataError(f"x must hold at least one datapoint along dim 0, got shape {tuple(args[0].shape)}")
    n = args[0].shape[0]
    for i, a in enumerate(args):
        if a.dim() == 0 or a.shape[0] != n:
            raise DataError(
                f"{_name(i)} has shape {tuple(a.shape)} but x has {n} datapoints: every per-datapoint "
                f"argument needs them along dim 0"
            )
        # a row sum is finite unless the row holds NaN or inf (or overflows: then the rows are looked at)
        if a.is_floating_point() and not bool(torch.isfinite(a.reshape(n, -1).sum(1)).all()):
            bad = ~torch.isfinite(a.reshape(n, -1)).all(1)  # (N,)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
                raise DataError(
                    f"{_name(i)} has NaN or inf at datapoint {rows[0]}{more}: drop or fix those rows"
                )
    for key, v in (kwargs or {}).items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n and n > 1:
            raise UserError(
                f"keyword argument {key}= has {n} rows, one per datapoint: pass per-datapoint arguments "
                f"with x as a tuple (x, {key}), so that they are sliced with x"
            )
    return args


def _module(model, guide) -> torch.nn.Module | None:
    """The ``nn.Module`` that ``model`` or ``guide`` is a bound method of, if any."""
    return next(
        (m for m in (getattr(f, "__self__", None) for f in (model, guide)) if isinstance(m, torch.nn.Module)),
        None,
    )


def _module_mismatch(module, x) -> DataError | None:
    """x of another dtype than the module's parameters, or, for a module with ``x_dim`` (ppl_vae's
    VAE, which takes flattened datapoints), not of shape (N, x_dim)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.dtype != dtype:
        return DataError(
            f"x has dtype {x.dtype} but the program's parameters are {dtype}: pass x.to({dtype})"
        )
    x_dim = getattr(module, "x_dim", None)
    if isinstance(x_dim, int) and (x.dim() != 2 or x.shape[1] != x_dim):
        return DataError(
            f"x must have shape (N, {x_dim}) (N flattened datapoints of {x_dim} values), got {tuple(x.shape)}"
        )
    return None


def check_program_inputs(model, guide, args) -> None:
    """Before running a ppl_vae VAE (a module with ``x_dim``): x's dtype and shape (N, x_dim)."""
    module = _module(model, guide)
    if module is not None and isinstance(getattr(module, "x_dim", None), int):
        err = _module_mismatch(module, args[0])
        if err is not None:
            raise err


def program_failed(model, guide, args, err: Exception) -> UserError:
    """One line for a program that raised on the caller's data: a dtype other than its module's,
    a missing positional argument, else the shapes given with the program's own message."""
    if isinstance(err, UserError):
        return err
    module = _module(model, guide)
    mismatch = _module_mismatch(module, args[0]) if module is not None else None
    if mismatch is not None:
        return mismatch
    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, TypeError) and "positional argument" in msg:
        return UserError(f"{msg}: pass per-datapoint arguments with x as a tuple (x, y, ...)")
    given = ", ".join(f"{_name(i)} {tuple(a.shape)} {a.dtype}" for i, a in enumerate(args))
    return DataError(f"the program failed on {given}: {type(err).__name__}: {msg}")
