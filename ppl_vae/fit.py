"""``python -m ppl_vae.fit``: train a VAE with SVI and write a run directory.

Examples::

    python -m ppl_vae.fit --elbo=trace                       # MNIST if available, else digits
    python -m ppl_vae.fit --dataset binarized-mnist --epochs 10 --out runs/bmnist
    python -m ppl_vae.fit --dataset mnist --likelihood continuous-bernoulli --arch conv
    python -m ppl_vae.fit --elbo iwae --num-particles 50 --dataset binarized-mnist
    python -m ppl_vae.fit --out runs/bmnist --resume --epochs 20   # continue a run
    python -m ppl_vae.fit --init-from runs/bmnist --elbo iwae --num-particles 5 --out runs/ft  # fine-tune
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from .core.cli import ArgumentParser, callable_module, run_command, startup, user_errors
from .core.errors import UserError

PROG = "python -m ppl_vae.fit"
with startup(PROG):  # torch loads here: a signal meanwhile is one line, not a traceback
    from . import fit_flags
    from .training.config import FitConfig


def build_parser() -> ArgumentParser:
    """The command's parser (its flags: :mod:`ppl_vae.fit_flags`)."""
    return fit_flags.build_parser(PROG, __doc__)


RUN_FLAGS = ("out", "resume", "overwrite", "quiet", "accept_changed_data")


def config_from_args(args: argparse.Namespace, base: FitConfig | None = None) -> FitConfig:
    """``base`` (defaults, or the saved config on --resume) updated with the flags given, validated
    (e.g. argparse's float() accepts "inf" and "nan", which no setting means)."""
    return _config({k: v for k, v in vars(args).items() if k not in RUN_FLAGS}, base)


def _config(options: dict, base: FitConfig | None) -> FitConfig:
    known = {f.name for f in dataclasses.fields(FitConfig)} - {"init_record"}  # (fit records it)
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(
            f"unknown option(s) {unknown} of ppl_vae.fit; the options are FitConfig's fields: "
            f"{sorted(known - {'image_shape', 'num_classes', 'data_fingerprint'})}"
        )
    cfg = dataclasses.replace(base or FitConfig(), **options)
    cfg.validate()
    return cfg


@dataclasses.dataclass
class Run:
    """A finished ``fit``: its directory ``out``, the trained ``model`` (the parameters it is
    judged and kept by: θ̄ under ``ema``; in eval mode), its ``config`` (data-dependent defaults
    fixed), the ``metrics`` rows (one per epoch, as in ``metrics.jsonl``) and the ``summary``
    (``summary.json``)."""

    out: Path
    model: object
    config: FitConfig
    metrics: list
    summary: dict
    main_process: bool = True  # False on ranks > 0 under torchrun


def fit(
    dataset=None,
    out=None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    quiet: bool = True,
    accept_changed_data: bool = False,
    **options,
) -> Run:
    """Train a VAE from Python exactly as ``python -m ppl_vae.fit`` does (the command calls this):
    ``ppl_vae.fit(dataset="binarized-mnist", out="runs/bmnist", epochs=10, prior="vampprior")``.

    ``dataset``: a name or file, as ``--dataset`` (default ``auto``), or a :class:`~ppl_vae.data.Dataset`
    (e.g. from :func:`~ppl_vae.data.load_dataset` or ``dataset_from_array``); ``out``: the run
    directory (default ``runs/<dataset>-<elbo>-<time>``); ``options``: any flag of the command,
    spelled as :class:`~ppl_vae.training.config.FitConfig`'s field (``z_dim=20``, ``kl_warmup=5``,
    ``hidden=[400]``; ``init_from="runs/x"``: start from that run's ``best.pt``, taking its program,
    :mod:`ppl_vae.training.init_from`); ``accept_changed_data``: as ``--accept-changed-data``. Raises
    :class:`~ppl_vae.core.errors.UserError` (one line) on bad input,
    ``Interrupted`` (a checkpoint was saved; ``resume=True`` continues) and ``NonFiniteLoss``."""
    from .training.train import Trainer

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; pick one")
    if resume and not out:
        raise UserError("--resume needs --out, the run directory to continue")
    base = None
    if resume:
        if options.get("init_from") is not None:
            raise UserError(
                "--init-from starts a new run from another's parameters and --resume continues this "
                "run's own; drop --init-from to resume"
            )
        if not (Path(out) / "config.json").exists():
            raise UserError(f"--resume: {out} holds no run (no config.json)")
        base = FitConfig.load(Path(out) / "config.json")
    elif options.get("init_from") is not None:  # the program (and data) of the run started from
        from .training import init_from

        options["init_from"] = str(Path(options["init_from"]).resolve())  # (recorded: checkable anywhere)
        base = init_from.settings(
            options["init_from"], with_data=dataset is None and "dataset" not in options
        )
    data = None if dataset is None or isinstance(dataset, (str, Path)) else dataset
    if dataset is not None:
        options["dataset"] = data.name if data is not None else str(dataset)
    cfg = _config(options, base)
    out = Path(out or f"runs/{Path(cfg.dataset).stem}-{cfg.elbo}-{time.strftime('%Y%m%d-%H%M%S')}")
    trainer = Trainer(
        cfg,
        out,
        resume=resume,
        overwrite=overwrite,
        quiet=quiet,
        dataset=data,
        accept_changed_data=accept_changed_data,
    )
    summary = trainer.run()
    return Run(
        out, trainer.evaluated.eval(), trainer.cfg, list(trainer.state.rows), summary, trainer.ctx.is_main
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        from .training.train import Interrupted, NonFiniteLoss  # (a signal while it loads: one line)

        try:
            run = fit(
                out=args.out,
                resume=args.resume,
                overwrite=args.overwrite,
                quiet=args.quiet,
                accept_changed_data=args.accept_changed_data,
                **{k: v for k, v in vars(args).items() if k not in RUN_FLAGS},
            )
        except Interrupted as e:
            print(f"{PROG}: {e}", file=sys.stderr)
            return e.exit_code
        except NonFiniteLoss as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
    if not run.main_process:  # under torchrun, rank 0 reports
        return 0
    cfg, summary, out = run.config, run.summary, run.out
    best = (
        f"best validation IWAE_{cfg.num_particles} (the bound trained): {summary['best_valid_iwae_k']:.3f}"
        if "best_valid_iwae_k" in summary
        else f"best validation ELBO: {summary['best_valid_elbo']:.3f}"
    )
    at = f" (epoch {summary['best_epoch']}{kept_in_best(summary)})" if summary.get("best_epoch") else ""
    print(
        f"{best} nats per datapoint{at}"
        + (
            f"; validation IWAE_{summary['final_iwae_k']} of the last epoch: {summary['final_valid_iwae']:.3f}"
            if "final_valid_iwae" in summary
            else ""
        )
    )
    print(f"run directory: {out}")
    print(f"figures: {out / 'reconstructions.png'}, {out / 'samples.png'}, {out / 'training_curve.png'}")
    return 0


def kept_in_best(summary: dict) -> str:
    """What the final line says of best.pt: what it really holds (``summary.json``'s ``best_pt``)."""
    held = summary.get("best_pt") or {}
    if held.get("verified", True) and held.get("epoch") in (None, summary["best_epoch"]):
        return ", kept in best.pt"  # (epoch None: a run of an earlier version, nothing recorded to compare)
    problem = held.get("problem") or f"holds epoch {held.get('epoch')}"
    return f"; but best.pt {problem}"


callable_module(__name__, "fit")  # fit(...) / evaluate(...) from Python: see core.cli.callable_module

if __name__ == "__main__":
    run_command(PROG, main)
