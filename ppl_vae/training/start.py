"""A :class:`~ppl_vae.training.train.Trainer`'s start: the run directory locked, the settings
merged with a resumed run's, the data loaded (or a :class:`~ppl_vae.data.splits.Dataset` made
elsewhere prepared) and fingerprinted, the model, optimizer, scheduler, objective and step built,
and on ``--resume`` the checkpoint loaded and ``best.pt`` checked against it.

Nothing is written before every refusal is past: a start that fails leaves no half-made run
behind (the lock file and the directory, when it made them). ``t`` is the Trainer being built;
these functions set its attributes (``out``, ``quiet``, ``lock``, ``board``, ``ctx``, ``device``,
``cfg``, ``data``, ``labels``, ``model``, ``optim``, ``scheduler``, ``objective``, ``loss_fn``,
``average``, ``step_fn``, ``state``).
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import pyro
import torch

from ..core import distributed
from ..core.errors import UserError
from ..data.fingerprint import changes, fingerprint
from ..data.prepare import prepare
from ..inference.objectives import make_objective
from ..programs.likelihoods import make_likelihood
from ..reports.tensorboard_log import TensorBoardLog
from . import best, checkpoint, init_from, runs
from .averaging import ParameterAverage
from .config import FitConfig
from .cuda_graph import GraphedStep
from .optim import make_optimizer
from .validation import row_terms


def start(t, cfg: FitConfig, out, resume, overwrite, quiet, dataset, model, accept_changed_data) -> None:
    """Build ``t`` as :class:`~ppl_vae.training.train.Trainer`'s constructor documents; on any
    failure (bad input, a signal) release the lock and remove what this start made, then raise."""
    cfg.validate()
    t.out, t.quiet, t.lock = Path(out), quiet, None
    t.board = TensorBoardLog(cfg.tensorboard) if cfg.tensorboard else None  # (not installed: refused here)
    # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
    t.ctx, t.device = distributed.setup(runs.resolve_device(cfg.device))
    made = [d for d in (t.out, *t.out.parents) if not d.exists()]  # what this start creates
    try:
        if t.ctx.is_main:
            if t.out.exists() and not t.out.is_dir():
                raise UserError(f"--out {t.out} is a file, not a run directory; choose another --out")
            if cfg.init_from and not resume:  # before the lock: --out RUN must not touch RUN
                init_from.check_out(t.out, cfg.init_from)
            t.lock = runs.lock(t.out)  # one writer: refused here while another fit holds it
        setup(t, cfg, resume, overwrite, dataset, model, accept_changed_data)
    except BaseException:  # bad input or a signal during start-up: leave no half-made run behind
        if t.lock is not None:
            t.lock.discard()  # (its file too, when this start made it)
            t.lock = None
        if t.ctx.is_main and made:
            runs.remove_if_empty(t.out, made[1:])
        raise


def setup(t, cfg, resume, overwrite, dataset, model, accept_changed_data=False):
    """Everything of the start but the lock: the settings, the data, the model and its
    optimizer, the checkpoint on ``resume``; then the run directory prepared and ``config.json``."""
    runs.prepare(t.out, resume, overwrite, clear=False)  # cleared below, once the input is valid
    if resume:
        saved = FitConfig.load(t.out / "config.json")
        checkpoint.check_config_matches(
            saved.to_dict(), {**cfg.to_dict(), "image_shape": saved.image_shape}, checkpoint.RESUME_KEYS
        )
        cfg.image_shape = saved.image_shape
    if cfg.batch_size < t.ctx.world_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} is the global batch, split over {t.ctx.world_size} "
            f"processes: give at least {t.ctx.world_size}"
        )
    ckpt = checkpoint.load(t.out / "checkpoint.pt", map_location=t.device) if resume else None
    pyro.set_rng_seed(cfg.seed)
    likelihood = make_likelihood(cfg.likelihood, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor)
    if dataset is None:
        ds = runs.load_run_data(cfg, likelihood)
    elif dataset.binarize == "none":  # a Dataset made elsewhere: prepared and checked as a loaded one
        ds = prepare(dataclasses.replace(dataset), cfg.binarize, likelihood, cfg.dequantize)
    else:
        ds = dataset
    runs.check_image_shape(ds, cfg)
    if resume:  # prepared as the run's data were (before the fingerprint: a digest may be of prepared data)
        resolved = {k: getattr(ds, k) for k in ("binarize", "binarize_seed", "dequantize", "dequantize_seed")}
        checkpoint.check_preparation_matches(saved.to_dict(), resolved, cfg.to_dict())
    notes = []  # said once every refusal is past: a refused start prints one line
    cfg.data_fingerprint = fingerprint(ds, cfg.dataset if dataset is None else None)
    changed = changes(saved.data_fingerprint, cfg.data_fingerprint) if resume else None
    if changed and not accept_changed_data:
        raise UserError(
            f"--resume: the data ({ds.name}) changed since the run started ({changed}); restore "
            f"them, or pass --accept-changed-data to continue on these data knowingly"
        )
    if changed:
        notes.append(
            f"the data ({ds.name}) changed since the run started ({changed}); continuing on them "
            f"(--accept-changed-data), and config.json records their fingerprint"
        )
    cfg = cfg.with_data_defaults(ds.train.shape[0])  # e.g. epochs: enough steps on a small dataset
    cfg.image_shape = list(ds.image_shape)
    cfg.dataset = ds.name if cfg.dataset == "auto" else cfg.dataset
    cfg.binarize, cfg.binarize_seed, cfg.data_split = (
        ds.binarize,
        ds.binarize_seed,
        ds.split_protocol or None,
    )
    cfg.dequantize, cfg.dequantize_seed = ds.dequantize, ds.dequantize_seed
    t.cfg, t.data = cfg, ds.to(t.device)
    t.labels = runs.class_labels(t.data, cfg)  # one-hot (N, C) per split for a conditional program
    t.model = (runs.build_model(cfg) if model is None else model).to(t.device)
    t.model.register_params = False  # one torch optimizer owns the parameters (see VAE)
    if cfg.init_from and not resume:
        # another run's parameters, before θ̄ and the optimizer copy them, scored as an epoch is
        # (finish compares the best epoch with this start; run() puts the model back in train mode)
        cfg.init_record = init_from.load_into(t.model, cfg, t.device)
        cfg.init_record["valid"] = row_terms(t.model, t._valid_args(), cfg, t.ctx)
    # (distributed: eager steps; DDP's all-reduce inside a captured graph is not supported here)
    use_graph = t.device.type == "cuda" and cfg.cuda_graph and not t.ctx.enabled
    t.optim = make_optimizer(t.model.parameters(), cfg, t.device, capturable=use_graph)
    t.scheduler = torch.optim.lr_scheduler.ExponentialLR(t.optim, gamma=cfg.lr_decay)
    t.objective = make_objective(cfg.elbo, cfg.num_particles)
    t.loss_fn = distributed.wrap(t.model, t._objective, t.ctx, t.device)  # DDP when distributed
    t.average = ParameterAverage(t.model, cfg.ema) if cfg.ema else None  # θ̄ (--ema), judged and kept
    t.step_fn = GraphedStep(t._step, t.device) if use_graph else t._step
    t.state = checkpoint.TrainState()
    if t.ctx.rank:  # rank 0 keeps the single-process stream; the others draw their own ε
        pyro.set_rng_seed(distributed.rank_seed(cfg.seed, t.ctx.rank))
    if resume:
        t.load_state_dict(ckpt)
        if t.state.epoch > cfg.epochs:  # config.json would say fewer epochs than were run
            raise UserError(
                f"--epochs {cfg.epochs} is fewer than the {t.state.epoch} epochs this run has "
                f"done; a run is not shortened (its checkpoint, metrics and summary are of epoch "
                f"{t.state.epoch}): give --epochs {t.state.epoch} or more, or start a new --out"
            )
        if t.ctx.is_main:
            for note in notes:
                warnings.warn(note)
            # metrics.jsonl made to agree with the checkpoint (a warning says what changed)
            t.state.rows = runs.resume_metrics(t.out, t.state.rows, t.state.epoch)
            check_best(t, ckpt)
    distributed.barrier(t.ctx)  # every rank has checked the run directory before rank 0 writes
    if t.ctx.is_main:
        t._log(f"data: {ds.describe()}")
        if cfg.init_from and not resume:
            rec = cfg.init_record
            t._log(
                f"starting from {rec['file']} (epoch {rec['epoch']}): "
                + "  ".join(f"{t._label(k)} {v:.3f}" for k, v in rec["valid"].items())
            )
        runs.prepare(t.out, resume, overwrite)
        cfg.save(t.out / "config.json")  # on --resume: the merged settings (e.g. a new --epochs)


def check_best(t, ckpt: dict) -> None:
    """On resume: is ``best.pt`` what the checkpoint records? If not, rewrite it when the
    checkpoint holds those parameters, else say it cannot (one warning line either way).
    A checkpoint of an earlier version records nothing: what best.pt holds becomes the record."""
    found = best.check(t.out, ckpt)
    if "best_digest" not in ckpt and found.digest is not None:
        t.state.best_epoch, t.state.best_digest = found.holds, found.digest
    if found.problem:
        warnings.warn(best.repair(t.out, ckpt, found))
