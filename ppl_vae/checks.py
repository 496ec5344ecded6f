r"""What the estimators accept, checked once per call before any pass: the data, the program's
plates and, for the analytic-KL ELBO, which latent sites have a valid closed-form KL.

**Data.** ``x`` is a tensor ``(N, ...)`` with the datapoints along dim 0, or a tuple
``(x, y, ...)`` of such tensors with the same N: the per-datapoint arguments of
``model(x, y, ...)`` and ``guide(x, y, ...)`` (class labels, masks, ...), passed positionally
as Pyro's CVAE tutorial writes them and sliced together with x. Keyword arguments
(``size=``, ``beta=``) go to both programs unchanged and are never sliced, so a keyword tensor
with N rows is refused (it would pair datapoints with the wrong rows).

**Program.** Every sample site of model and guide sits inside a vectorized
``pyro.plate("data", N)`` (any ``dim``) over the N datapoints given.

**Analytic KL, site by site.** For a latent site s, E_q[log p(z_s | pa) − log q(z_s | ·)] =
−E_q[KL(q(z_s | ·) ‖ p(z_s | pa))] only when, given everything the guide drew before z_s, z_s
is distributed as q(z_s | ·) *and* p's parents pa are among those earlier draws. The order rule
checks a sufficient condition: every latent that precedes s in the model (its possible
parents) precedes s in the guide too. Pyro's ``TraceMeanField_ELBO`` asks for the same order at
every site (``_check_mean_field_requirement``, a warning); here the rule is per site, and a
site that fails it is weighed by Monte Carlo, which is right for any guide. Example: model
z2 → z1 → x, guide q(z1 | x) q(z2 | z1): KL(q(z2 | z1) ‖ p(z2)) is closed-form given z1, but
p(z1 | z2) depends on z2, drawn after z1, so site z1 is Monte Carlo.

Every refusal is one line, a :class:`~ppl_vae.errors.UserError` (a ``ValueError``).
"""
from __future__ import annotations

import numpy as np
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .errors import DataError, UserError

DATA_PLATE = "data"
# What a program raises on data it cannot take (torch shape/dtype errors, Pyro shape mismatches)
PROGRAM_ERRORS = (RuntimeError, ValueError, TypeError, IndexError)


class NoClosedFormKL(UserError, NotImplementedError):
    """A latent site whose closed-form KL is valid by the order rule but not registered in
    ``torch.distributions`` (a mixture prior, a flow guide). A ``NotImplementedError`` too."""


def as_args(x) -> tuple[torch.Tensor, ...]:
    """The positional per-datapoint arguments: ``(x,)`` for a tensor, the tuple itself otherwise."""
    return (x,) if torch.is_tensor(x) else tuple(x)


def take(args, start: int, stop: int) -> tuple[torch.Tensor, ...]:
    """Datapoints ``start:stop`` of every argument (dim 0)."""
    return tuple(a[start:stop] for a in args)


def check_num_samples(k) -> None:
    """Refuse a number of samples K that is not an integer >= 1."""
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        if torch.is_tensor(k):
            raise UserError(f"the number of samples K must be an integer >= 1, got a tensor of shape {tuple(k.shape)}: "
                            f"per-datapoint arguments go with x as a tuple (x, y, ...)")
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
    datapoint is named); a keyword tensor with N rows is refused too. One host sync per
    floating argument."""
    if not (torch.is_tensor(x) or (isinstance(x, (tuple, list)) and x and all(map(torch.is_tensor, x)))):
        raise DataError(f"x must be a tensor (N, ...) or a tuple (x, y, ...) of tensors with the datapoints along "
                        f"dim 0, got {type(x).__name__}")
    args = as_args(x)
    if args[0].dim() == 0 or args[0].shape[0] == 0:
        raise DataError(f"x must hold at least one datapoint along dim 0, got shape {tuple(args[0].shape)}")
    n = args[0].shape[0]
    for i, a in enumerate(args):
        if a.dim() == 0 or a.shape[0] != n:
            raise DataError(f"{_name(i)} has shape {tuple(a.shape)} but x has {n} datapoints: every per-datapoint "
                            f"argument needs them along dim 0")
        if a.is_floating_point():
            bad = ~torch.isfinite(a.reshape(n, -1)).all(1)  # (N,)
            if bool(bad.any()):
                rows = bad.nonzero().flatten().tolist()
                more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
                raise DataError(f"{_name(i)} has NaN or inf at datapoint {rows[0]}{more}: drop or fix those rows")
    for key, v in (kwargs or {}).items():
        if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n and n > 1:
            raise UserError(f"keyword argument {key}= has {n} rows, one per datapoint: pass per-datapoint arguments "
                            f"with x as a tuple (x, {key}), so that they are sliced with x")
    return args


def _module(model, guide) -> torch.nn.Module | None:
    """The ``nn.Module`` that ``model`` or ``guide`` is a bound method of, if any."""
    return next((m for m in (getattr(f, "__self__", None) for f in (model, guide)) if isinstance(m, torch.nn.Module)),
                None)


def _module_mismatch(module, x) -> DataError | None:
    """x of another dtype than the module's parameters, or, for a module with ``x_dim`` (ppl_vae's
    VAE, which takes flattened datapoints), not of shape (N, x_dim)."""
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None and x.dtype != dtype:
        return DataError(f"x has dtype {x.dtype} but the program's parameters are {dtype}: pass x.to({dtype})")
    x_dim = getattr(module, "x_dim", None)
    if isinstance(x_dim, int) and (x.dim() != 2 or x.shape[1] != x_dim):
        return DataError(f"x must have shape (N, {x_dim}) (N flattened datapoints of {x_dim} values), "
                         f"got {tuple(x.shape)}")
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


def check_plates(model_tr, guide_tr, n: int) -> None:
    """Every sample site inside a vectorized ``pyro.plate("data", n)``."""
    for role, tr in (("guide", guide_tr), ("model", model_tr)):
        for name, site in tr.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            frame = next((f for f in site["cond_indep_stack"] if f.name == DATA_PLATE), None)
            if frame is None or frame.dim is None:
                raise UserError(f"{role} site {name!r} is not inside a vectorized pyro.plate({DATA_PLATE!r}, N): the "
                                f"estimators need every sample site of model and guide in that plate")
            if frame.size != n:
                raise DataError(f"pyro.plate({DATA_PLATE!r}) at {role} site {name!r} has size {frame.size} but x has "
                                f"{n} datapoints along dim 0")


def plate_nesting(model_tr, guide_tr) -> int:
    """How many plate dims (vectorized plates, counted from the right) model and guide use."""
    return max([-f.dim for tr in (guide_tr, model_tr) for s in tr.nodes.values() if s["type"] == "sample"
                for f in s["cond_indep_stack"] if f.vectorized], default=0)


def data_dim(site) -> int:
    """The (negative) dim of the data plate in a site's batch shape."""
    return next(f.dim for f in site["cond_indep_stack"] if f.name == DATA_PLATE)


def _latents(tr) -> list[str]:
    return [name for name, s in tr.nodes.items()
            if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]


def describe(fn) -> str:
    """``Independent(Normal)``: a distribution's class with those it wraps."""
    base = getattr(fn, "base_dist", None)
    return type(fn).__name__ + (f"({describe(base)})" if base is not None else "")


def closed_form_sites(model_tr, guide_tr, analytic_kl) -> tuple[frozenset, str | None]:
    """The latent sites whose KL term is taken in closed form, and why one that passes the order
    rule has none (``None`` if all have one). ``analytic_kl=True`` raises :class:`NoClosedFormKL`
    there; ``"auto"`` leaves such a site to Monte Carlo."""
    if analytic_kl not in (True, "auto"):
        raise ValueError(f"analytic_kl must be True, False or 'auto', got {analytic_kl!r}")
    guide_order = _latents(guide_tr)
    shared = [s for s in _latents(model_tr) if s in guide_order]  # model order
    closed, missing = set(), None
    for i, s in enumerate(shared):
        if not set(shared[:i]) <= set(guide_order[:guide_order.index(s)]):
            continue  # p(z_s | ·) may read a latent the guide draws after z_s: Monte Carlo
        q, p = guide_tr.nodes[s]["fn"], model_tr.nodes[s]["fn"]
        try:
            kl_divergence(q, p)
            closed.add(s)
        except NotImplementedError:
            missing = missing or (f"no closed-form KL for site {s!r} (guide {describe(q)}, prior {describe(p)}): use "
                                  f"analytic_kl=False or 'auto' (Monte Carlo KL), or --elbo trace")
    if missing and analytic_kl is True:
        raise NoClosedFormKL(missing)
    return frozenset(closed), missing
