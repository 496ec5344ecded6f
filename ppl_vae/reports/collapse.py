r"""Posterior collapse, said out loud: the KL each latent layer pays and the units it uses.

For every latent site s of the guide inside the data plate (a *layer*: ``z``, or ``z1`` and
``z2``), the Monte Carlo KL term it contributes to the ELBO, in nats per datapoint,

.. math:: \mathrm{KL}_s = \mathbb{E}_x\, \mathbb{E}_{q(z|x)}\big[\log q(z_s \mid \cdot) - \log p(z_s \mid \cdot)\big],

the guide drawn ``num_samples`` times under a particle plate and the model replayed on the
draws (the sites' unscaled densities, as the estimators weigh them). Summed over the layers it
is the ELBO's KL term, ``valid_kl`` = E_q[log p(x|z)] − ELBO, estimated by Monte Carlo.

A layer is *collapsed* when its KL is under :data:`KL_FLOOR` (about 1 nat: the decoder can
read at most that much about x from it) or none of its units is active, and *mostly unused*
when fewer than half of its units are active (Burda et al. 2016's Cov_x(E_q[z_u|x]) > 10⁻²,
:mod:`ppl_vae.reports.latents`). :func:`warnings_for` turns both into one line per layer with the
usual remedies; ``fit`` and ``evaluate`` print them, ``--quiet`` or not.
"""

from __future__ import annotations

import torch

from ..inference import importance, inputs
from ..inference.replay import log_density, replay

KL_FLOOR = 1.0  # nats per datapoint: a layer paying less carries (almost) nothing about x
ACTIVE_SHARE = 0.5  # fewer than this share of a layer's units active: mostly unused
KL_SAMPLES = 10  # guide draws per datapoint for each layer's KL
_STREAM = 0xC011  # seed stream of these draws


class PosteriorCollapse(UserWarning):
    """A latent layer the model does not use (see :func:`warnings_for`)."""


@torch.no_grad()
def kl_terms(
    model, guide, x, num_samples: int = KL_SAMPLES, seed: int = 0, nesting: int | None = None, **kwargs
) -> dict[str, torch.Tensor]:
    """Per datapoint, each layer's KL term, ``{site: (N,)}`` in nats: log q(z_s | ·) − log p(z_s | ·)
    averaged over ``num_samples`` seeded guide draws, for every latent site of ``guide(*x, **kwargs)``
    in the data plate that the model samples too (``x``: a tensor ``(N, ...)`` or a tuple of
    per-datapoint arguments). The caller's RNG is left as it was. ``nesting``: the plate dims of
    the caller's probe (``Program.nesting``); probed here when not given."""
    args = inputs.check_data(x, kwargs)
    if nesting is None:
        nesting = importance.max_plate_nesting(model, guide, args, **kwargs)
    with importance.rng_fork():
        torch.manual_seed(importance.derive_seed(seed, _STREAM))
        guide_tr = importance.guide_trace(guide, args, num_samples, nesting, kwargs)  # sites (k, ..., N, ...)
        model_tr, guide_tr = replay(model, guide, None, args, num_samples, nesting, kwargs, guide_tr=guide_tr)
    out = {}
    for name, g in guide_tr.nodes.items():
        site = model_tr.nodes.get(name)
        if g["type"] != "sample" or g["is_observed"] or site is None or site.get("is_observed", True):
            continue
        if not any(f.name == importance.DATA_PLATE for f in g["cond_indep_stack"]):
            continue  # a global latent: not a per-datapoint layer
        log_q, log_p = log_density(g, nesting), log_density(site, nesting)  # (k, N) each, masked
        out[name] = (log_q - log_p).mean(0)  # (N,)
    return out


def kl_per_site(model, guide, x, num_samples: int = KL_SAMPLES, seed: int = 0, **kwargs) -> dict[str, float]:
    """KL_s of every layer (see :func:`kl_terms`), by name, in nats per datapoint."""
    return {
        name: float(v.mean()) for name, v in kl_terms(model, guide, x, num_samples, seed, **kwargs).items()
    }


def warnings_for(
    kl: dict[str, float],
    units: dict[str, dict] | None,
    likelihood: str | None = None,
    kl_warmup: float | None = None,
) -> list[str]:
    """One line per collapsed or mostly unused layer (empty when every layer is in use), naming
    the layer, its active units and KL, and the usual remedies. ``kl``: :func:`kl_per_site`;
    ``units``: :func:`ppl_vae.reports.latents.active_units` (``{site: {"active", "dims", ...}}``) or
    ``None``; ``likelihood``: the run's, to name σ where it is the cause; ``kl_warmup``: the run's
    KL warm-up in epochs (None: not known), so that a run that had one is told of a longer one."""
    lines = []
    for name in dict.fromkeys([*kl, *(units or {})]):
        u = (units or {}).get(name)
        k = kl.get(name)
        used = "" if u is None else f"{u['active']} of {u['dims']} units active"
        paid = "" if k is None else f"KL(q ‖ p) {k:.2f} nats per datapoint"
        facts = ", ".join(p for p in (used, paid) if p)
        if (k is not None and k < KL_FLOOR) or (u is not None and u["active"] == 0):
            what = f"posterior collapse in {name}: {facts}; it carries almost nothing about x"
        elif u is not None and u["active"] < ACTIVE_SHARE * u["dims"]:
            what = f"{name} is mostly unused: {facts} (fewer than half)"
        else:
            continue
        lines.append(f"{what}. Usual remedies: {remedies(name, likelihood, u, kl_warmup)}")
    return lines


def remedies(name: str, likelihood: str | None, units: dict | None, kl_warmup: float | None = None) -> str:
    """The usual remedies for an unused layer, most specific first (``kl_warmup``: the run's, in
    epochs; a run that had one is told of a longer one)."""
    out = []
    if likelihood == "gaussian":
        out.append("a smaller --sigma (for data in [0, 1] about 0.1) or --likelihood gaussian-learned")
    if kl_warmup:
        out.append(f"a longer KL warm-up (--kl-warmup EPOCHS; this run's was {kl_warmup:g})")
    else:
        out.append("a KL warm-up (--kl-warmup EPOCHS)")
    if units is not None and units["active"] < units["dims"]:
        out.append(f"fewer latent units ({'--z2-dim' if name == 'z2' else '--z-dim'})")
    return "; ".join(out)
