"""The end of a :class:`~ppl_vae.training.train.Trainer`'s run: ``summary.json`` (epochs, why
training stopped, the best validation bound and its epoch, what ``best.pt`` really holds, the last
epoch's row; under ``--init-from`` the start's bound, and a warning when no epoch beat it), the final validation IWAE_K bound (``--final-iwae-k``), the active units and
posterior-collapse warnings, and the run's figures (:func:`ppl_vae.reports.plots.run_figures`).
"""

from __future__ import annotations

import json
import warnings

from ..reports.collapse import PosteriorCollapse
from . import best, runs
from .validation import bound_on, latent_use_on


def finish(t) -> dict:
    """The summary of trainer ``t``'s finished run; rank 0 also writes it (``summary.json``) and
    the figures."""
    from ..core import files
    from ..reports import plots  # (matplotlib: imported only when a run ends)

    bound = "iwae_k" if t.cfg.elbo == "iwae" else "elbo"
    summary = {
        "epochs": t.state.epoch,
        "stopped_by": t.stopped_by,
        f"best_valid_{bound}": t.state.best,
        "best_epoch": runs.best_epoch(t.state.rows),
        # what best.pt really holds, checked against the record (it may lag: ppl_vae.training.best)
        "best_pt": best.check(t.out, t.state.fields()).summary() if t.ctx.is_main else None,
        **({"iwae_k": t.cfg.num_particles} if bound == "iwae_k" else {}),
        "final": t.state.rows[-1] if t.state.rows else None,
    }
    start = (t.cfg.init_record or {}).get("valid")  # --init-from: the parameters it started from
    if start is not None:
        summary["init_valid"] = runs.selection_bound(start)
        if t.ctx.is_main and t.state.best < summary["init_valid"] - 1e-3:
            warnings.warn(
                f"--init-from: no epoch of this run beat the parameters it started from on the "
                f"validation {'IWAE_' + str(t.cfg.num_particles) if bound == 'iwae_k' else 'ELBO'}: "
                f"{t.state.best:.3f} at best (epoch {summary['best_epoch']}) against "
                f"{summary['init_valid']:.3f} at the start: {t.cfg.init_record['file']} is the better model"
            )
    judged = t.evaluated.eval()
    if t.cfg.final_iwae_k and t.state.epoch > 0:
        x = t._valid_args()
        summary["final_valid_iwae"] = bound_on(judged, x, "iwae", t.cfg.final_iwae_k, ctx=t.ctx)
        summary["final_iwae_k"] = t.cfg.final_iwae_k
        t._log(
            f"validation IWAE bound (K={t.cfg.final_iwae_k}): {summary['final_valid_iwae']:.3f} "
            f"nats/datapoint"
        )
    if t.ctx.is_main:
        try:  # a diagnostic: a program it cannot handle must not cost the run its summary
            use = latent_use_on(judged, t._valid_args(), kl_warmup=t.cfg.kl_warmup)  # a fixed subset
            summary.update(use)
        except Exception as e:  # noqa: BLE001
            summary["active_units_error"] = f"{type(e).__name__}: {e}"
            warnings.warn(f"active units not computed: {summary['active_units_error']}", RuntimeWarning)
        if summary.get("active_units"):
            t._log(
                f"active units on {summary['active_units_n']} validation images: "
                + ", ".join(
                    f"{s} {a} of {summary['active_units_of'][s]}" for s, a in summary["active_units"].items()
                )
            )
        for line in summary.get("collapse", []):  # said with --quiet too
            warnings.warn(PosteriorCollapse(line), stacklevel=2)
        files.write_text(t.out / "summary.json", json.dumps(summary, indent=2) + "\n")
        plots.run_figures(
            judged,
            t.data,
            t.state.rows,
            t.out,
            valid_labels=None if t.labels is None else t.labels["valid"],
        )
    return summary
