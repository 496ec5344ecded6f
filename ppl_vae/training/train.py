"""The training loop: SVI on a Pyro objective as a differentiable loss, one torch optimizer.

:func:`train_step` is the whole update: loss → backward → (clip) → optimizer step. The
:class:`Trainer` runs it over epochs of minibatches: a batch ``x[idx]`` of B indices from a
per-epoch permutation (data already on the device), ``loss = objective(model, guide, x_b,
size=N, beta=β)`` (the data plate scales it to the full dataset). The host reads the running
loss back only every ``log_every`` steps (progress bar, NaN check), so a GPU is never stalled
per step. After each epoch: the validation bound, early stopping, a checkpoint, a metrics row.

Where things live: the run directory, its lock and metrics in :mod:`ppl_vae.training.runs`; what a
checkpoint holds in :meth:`Trainer.state_dict`, how it is written and checked in
:mod:`ppl_vae.training.checkpoint`; the validation bound in
:mod:`ppl_vae.training.validation`; data-parallel training under ``torchrun`` in
:mod:`ppl_vae.core.distributed`; CUDA-graph replay (``--cuda-graph``) in :mod:`ppl_vae.training.cuda_graph`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import warnings
from pathlib import Path

import pyro
import pyro.infer.util
import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import CheckpointError, UserError
from ..data.datasets import Dataset, load_dataset, prepare
from ..data.fingerprint import changes, fingerprint
from ..inference.objectives import make_objective
from ..programs.likelihoods import make_likelihood
from ..programs.model import VAE
from ..reports.collapse import PosteriorCollapse
from ..reports.tensorboard_log import TensorBoardLog
from . import best, checkpoint, runs
from .averaging import ParameterAverage
from .config import FitConfig
from .cuda_graph import GraphedStep
from .interrupts import Interrupted, NonFiniteLoss, signals_to_flag
from .optim import apply_settings, beta_at, make_optimizer
from .validation import bound_on, elbo_terms_on, latent_use_on, objective_name


def train_step(
    loss_fn,
    optim: torch.optim.Optimizer,
    params,
    batch: tuple,
    size: int,
    beta,
    grad_clip: float | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """One SVI update on the batch ``(x,)`` or ``(x, y)`` (``x (B, D)``, labels ``y (B, C)``);
    returns the detached loss (a device scalar).

    ``loss_fn(batch, size, beta)`` is the negative bound scaled to ``size`` datapoints. No host
    synchronization happens here (tests/test_training.py checks it), so the same step runs
    eagerly or inside a CUDA graph. ``weight``: this rank's loss weight under torchrun."""
    loss = loss_fn(batch, size, beta)
    if weight != 1.0:
        loss = loss * weight
    optim.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    optim.step()
    return loss.detach()


class Trainer:
    """Model, data, optimizer and run directory; :meth:`run` trains to ``cfg.epochs``.

    ``dataset`` replaces loading ``cfg.dataset``; ``model`` replaces ``runs.build_model(cfg)``
    (e.g. another model/guide pair with the parameters ``cfg`` describes). The run directory is
    locked from construction to the end of :meth:`run` (rank 0 only under torchrun); a
    construction that fails leaves nothing behind (the lock file and the directory, when it made
    them). ``accept_changed_data``: resume on data whose fingerprint differs from the run's."""

    def __init__(
        self,
        cfg: FitConfig,
        out: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        quiet: bool = False,
        dataset: Dataset | None = None,
        model: VAE | None = None,
        accept_changed_data: bool = False,
    ):
        cfg.validate()
        self.out, self.quiet, self.lock = Path(out), quiet, None
        self.board = (
            TensorBoardLog(cfg.tensorboard) if cfg.tensorboard else None
        )  # (not installed: refused here)
        # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
        self.ctx, self.device = distributed.setup(runs.resolve_device(cfg.device))
        made = [d for d in (self.out, *self.out.parents) if not d.exists()]  # what this start creates
        try:
            if self.ctx.is_main:
                if self.out.exists() and not self.out.is_dir():
                    raise UserError(f"--out {self.out} is a file, not a run directory; choose another --out")
                self.lock = runs.lock(self.out)  # one writer: refused here while another fit holds it
            self._setup(cfg, resume, overwrite, dataset, model, accept_changed_data)
        except BaseException:  # bad input or a signal during start-up: leave no half-made run behind
            if self.lock is not None:
                self.lock.discard()  # (its file too, when this start made it)
                self.lock = None
            if self.ctx.is_main and made:
                runs.remove_if_empty(self.out, made[1:])
            raise

    def _setup(self, cfg, resume, overwrite, dataset, model, accept_changed_data=False):
        runs.prepare(self.out, resume, overwrite, clear=False)  # cleared below, once the input is valid
        if resume:
            saved = FitConfig.load(self.out / "config.json")
            checkpoint.check_config_matches(
                saved.to_dict(), {**cfg.to_dict(), "image_shape": saved.image_shape}, checkpoint.RESUME_KEYS
            )
            cfg.image_shape = saved.image_shape
        if cfg.batch_size < self.ctx.world_size:
            raise UserError(
                f"--batch-size {cfg.batch_size} is the global batch, split over {self.ctx.world_size} "
                f"processes: give at least {self.ctx.world_size}"
            )
        ckpt = checkpoint.load(self.out / "checkpoint.pt", map_location=self.device) if resume else None
        pyro.set_rng_seed(cfg.seed)
        likelihood = make_likelihood(cfg.likelihood, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor)
        if dataset is None:
            ds = load_dataset(
                cfg.dataset,
                cfg.data_dir,
                cfg.binarize,
                likelihood,
                channels=cfg.channels,
                image_size=cfg.image_size,
                dequantize=cfg.dequantize,
            )
        elif dataset.binarize == "none":  # a Dataset made elsewhere: prepared and checked as a loaded one
            ds = prepare(dataclasses.replace(dataset), cfg.binarize, likelihood, cfg.dequantize)
        else:
            ds = dataset
        if cfg.image_shape is not None and list(ds.image_shape) != list(cfg.image_shape):
            raise CheckpointError(
                f"the data have image shape {list(ds.image_shape)} but the run was trained on "
                f"{cfg.image_shape}"
            )
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
        self.cfg, self.data = cfg, ds.to(self.device)
        self.labels = runs.class_labels(self.data, cfg)  # one-hot (N, C) per split for a conditional program
        self.model = (runs.build_model(cfg) if model is None else model).to(self.device)
        self.model.register_params = False  # one torch optimizer owns the parameters (see VAE)
        # (distributed: eager steps; DDP's all-reduce inside a captured graph is not supported here)
        use_graph = self.device.type == "cuda" and cfg.cuda_graph and not self.ctx.enabled
        self.optim = make_optimizer(self.model.parameters(), cfg, self.device, capturable=use_graph)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optim, gamma=cfg.lr_decay)
        self.objective = make_objective(cfg.elbo, cfg.num_particles)
        self.loss_fn = distributed.wrap(
            self.model, self._objective, self.ctx, self.device
        )  # DDP when distributed
        self.average = (
            ParameterAverage(self.model, cfg.ema) if cfg.ema else None
        )  # θ̄ (--ema), judged and kept
        self.step_fn = GraphedStep(self._step, self.device) if use_graph else self._step
        self.state = checkpoint.TrainState()
        if self.ctx.rank:  # rank 0 keeps the single-process stream; the others draw their own ε
            pyro.set_rng_seed(distributed.rank_seed(cfg.seed, self.ctx.rank))
        if resume:
            self.load_state_dict(ckpt)
            if self.state.epoch > cfg.epochs:  # config.json would say fewer epochs than were run
                raise UserError(
                    f"--epochs {cfg.epochs} is fewer than the {self.state.epoch} epochs this run has "
                    f"done; a run is not shortened (its checkpoint, metrics and summary are of epoch "
                    f"{self.state.epoch}): give --epochs {self.state.epoch} or more, or start a new --out"
                )
            if self.ctx.is_main:
                for note in notes:
                    warnings.warn(note)
                # metrics.jsonl made to agree with the checkpoint (a warning says what changed)
                self.state.rows = runs.resume_metrics(self.out, self.state.rows, self.state.epoch)
                self._check_best(ckpt)
        distributed.barrier(self.ctx)  # every rank has checked the run directory before rank 0 writes
        if self.ctx.is_main:
            self._log(f"data: {ds.describe()}")
            runs.prepare(self.out, resume, overwrite)
            cfg.save(self.out / "config.json")  # on --resume: the merged settings (e.g. a new --epochs)

    def _check_best(self, ckpt: dict) -> None:
        """On resume: is ``best.pt`` what the checkpoint records? If not, rewrite it when the
        checkpoint holds those parameters, else say it cannot (one warning line either way).
        A checkpoint of an earlier version records nothing: what best.pt holds becomes the record."""
        found = best.check(self.out, ckpt)
        if "best_digest" not in ckpt and found.digest is not None:
            self.state.best_epoch, self.state.best_digest = found.holds, found.digest
        if found.problem:
            warnings.warn(best.repair(self.out, ckpt, found))

    @property
    def evaluated(self) -> VAE:
        """The parameters a run is judged and kept by: the average θ̄ under ``--ema``, else the model."""
        return self.model if self.average is None else self.average.model

    def close(self) -> None:
        """Release the run directory's lock (also done at the end of :meth:`run`)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def state_dict(self) -> dict:
        """Everything a resume needs, as tensors and plain values (the fields of
        :data:`ppl_vae.training.checkpoint.FIELDS` but the format's own): the config, the judged
        parameters as ``model`` (θ̄ under ``--ema``, with the trained θ as ``train_model``), the
        optimizer and scheduler, where training stands (:class:`~.checkpoint.TrainState`), and
        this process's RNG states (torch, CUDA, NumPy, Python are global: take the state right
        after :meth:`run`, as the checkpoint does, before another Trainer draws from them)."""
        state = {
            "config": self.cfg.to_dict(),
            "model": self.evaluated.state_dict(),
            "optimizer": self.optim.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **self.state.fields(),
            "rng": checkpoint.rng_state(),
        }
        if self.average is not None:  # "model" is θ̄ (what evaluate loads); θ resumes training
            state["train_model"] = self.model.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a :meth:`state_dict` (a loaded checkpoint): refused in one line when it
        is another model or a mid-epoch state over other data; optimizer settings given anew
        (lr, weight decay, lr decay) apply from here on."""
        cfg = self.cfg
        checkpoint.check_resumable(state, cfg.to_dict(), cfg.batch_size, self.data.train.shape[0])
        try:
            self.model.load_state_dict(state.get("train_model", state["model"]))
            if self.average is not None:  # θ̄ as saved
                self.average.model.load_state_dict(state["model"])
            self.optim.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            checkpoint.restore_rng(state, self.ctx, cfg.seed)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not fit this model: {str(e).splitlines()[0]}") from None
        apply_settings(self.optim, self.scheduler, cfg, state["config"].get("lr"), self.device)
        self.state = checkpoint.TrainState.from_fields(state, self.device)

    def save(self, best: bool = False) -> None:
        """Write ``checkpoint.pt`` (and ``best.pt``) through :func:`ppl_vae.training.checkpoint.write`.
        Distributed: called by every rank (their RNG states are gathered), written by rank 0."""
        rngs = distributed.all_gather_objects(checkpoint.rng_state(), self.ctx) if self.ctx.enabled else None
        if self.ctx.is_main:
            held = checkpoint.write(self.state_dict(), self.out, best, rngs)  # (raises when a write fails)
            self.state.best_epoch, self.state.best_digest = held["best_epoch"], held["best_digest"]
        self.state.saved_at = (self.state.epoch, self.state.step)

    def _log(self, msg: str | None) -> None:
        if msg and not self.quiet and self.ctx.is_main:
            tqdm.write(msg, file=sys.stderr)

    def _non_finite(self, what: str, value: float, where: str) -> NonFiniteLoss:
        """The error for a NaN/inf ``what`` (nothing has been saved since the last good checkpoint)."""
        kept = "no checkpoint had been written yet"
        if self.state.saved_at is not None:
            epoch, step = self.state.saved_at
            kept = (
                f"the last good checkpoint {self.out / 'checkpoint.pt'} (after epoch {epoch}"
                f"{f' and {step} steps' if step else ''}) is kept"
            )
        return NonFiniteLoss(f"the {what} became {value} {where}; {kept}; try a lower --lr or --grad-clip")

    # ---- the loop

    def run(self) -> dict:
        cfg, s, n = self.cfg, self.state, self.data.train.shape[0]
        if self.ctx.is_main and self.lock is None:  # run() again after a finished run()
            self.lock = runs.lock(self.out)
        b = min(cfg.batch_size, n)
        steps = math.ceil(n / b)
        flag: dict = {}
        bar = tqdm(
            total=steps * cfg.epochs,
            initial=min(s.epoch * steps + s.step, steps * cfg.epochs),
            disable=self.quiet
            or not self.ctx.is_main
            or not sys.stderr.isatty(),  # a log gets the epoch lines
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        validation = pyro.infer.util.is_validation_enabled()
        pyro.enable_validation(False)  # data were validated at load time; keep the hot loop lean
        self.model.train()
        started, self.stopped_by = time.monotonic(), "epochs"
        try:
            with signals_to_flag(flag):
                while s.epoch < cfg.epochs:
                    self._run_epoch(steps, b, n, bar, flag)
                    stop = self._end_epoch(steps)
                    if distributed.any_signalled(
                        flag, self.ctx, self.device
                    ):  # during validation or the save: the epoch's checkpoint holds it all
                        raise Interrupted(
                            distributed.signal_number(flag, self.ctx), self.out / "checkpoint.pt"
                        )
                    if stop:
                        self.stopped_by = "patience"
                        break
                    if self._out_of_time(started):
                        self.stopped_by = "time_limit"
                        self._log(
                            f"stopping after epoch {s.epoch}: --time-limit {cfg.time_limit:g} minutes reached"
                        )
                        break
            return self._finish()
        finally:
            bar.close()
            pyro.enable_validation(validation)
            if self.board:
                self.board.close()
            self.close()

    def _out_of_time(self, started: float) -> bool:
        """Whether this invocation has trained for ``--time-limit`` minutes (rank 0's clock decides
        for every rank, so that all stop after the same epoch)."""
        if self.cfg.time_limit is None:
            return False
        over = torch.tensor(float(time.monotonic() - started >= 60 * self.cfg.time_limit), device=self.device)
        return bool(distributed.broadcast_tensor(over, self.ctx).item())

    def _valid_args(self):
        """The validation data as the program takes them: ``x``, or ``(x, y)`` for a conditional run."""
        return self.data.valid if self.labels is None else (self.data.valid, self.labels["valid"])

    def _objective(self, model, guide, *batch, size, beta):
        """``self.objective``, looked up at every call (tests replace it on a built Trainer)."""
        return self.objective(model, guide, *batch, size=size, beta=beta)

    def _step(self, idx: torch.Tensor, beta, weight: float = 1.0) -> torch.Tensor:
        """:func:`train_step` on the training rows ``idx`` (``beta`` is a device tensor under a CUDA
        graph; ``idx`` and ``weight`` are this rank's under torchrun, see ``distributed.shard``)."""
        x = self.data.train_batch(idx)
        batch = (x,) if self.labels is None else (x, self.labels["train"][idx])
        loss = train_step(
            self.loss_fn,
            self.optim,
            self.model.parameters(),
            batch,
            self.data.train.shape[0],
            beta,
            self.cfg.grad_clip,
            weight,
        )
        if self.average is not None:
            self.average.update()
        return loss

    def _run_epoch(self, steps, b, n, bar, flag):
        cfg, s, ctx = self.cfg, self.state, self.ctx
        if s.perm is None:  # rank 0 draws it as a single process does; every rank takes the same one
            perm = (
                torch.randperm(n, device=self.device)
                if ctx.is_main
                else torch.empty(n, dtype=torch.long, device=self.device)
            )
            s.perm = distributed.broadcast_tensor(perm, ctx)
            s.step, s.loss_sum = 0, 0.0
        t0 = time.perf_counter()
        running = torch.zeros((), device=self.device)  # Σ loss since the last host sync
        since = 0
        while s.step < steps:
            idx = s.perm[s.step * b : (s.step + 1) * b]
            mine, weight = distributed.shard(idx, ctx)  # this rank's slice of the global batch
            running = running + self.step_fn(mine, beta_at(cfg, s.epoch, s.step, steps), weight)
            s.step += 1
            since += 1
            # distributed: every rank syncs at the same steps (a signal is acted on at the next interval)
            if since == cfg.log_every or s.step == steps or (flag and not ctx.enabled):
                total, interrupt = distributed.sync_loss(
                    running, flag, self.ctx
                )  # the one host sync per log interval
                if not math.isfinite(total):
                    at = f"step {s.step}" if since == 1 else f"steps {s.step - since + 1}-{s.step}"
                    raise self._non_finite("training loss", total, f"at epoch {s.epoch + 1}, {at} of {steps}")
                s.loss_sum += total
                bar.update(since)
                bar.set_postfix(epoch=s.epoch + 1, bound=f"{-total / since / n:.2f}")
                running, since = torch.zeros((), device=self.device), 0
                if interrupt:
                    self.save()
                    raise Interrupted(distributed.signal_number(flag, self.ctx), self.out / "checkpoint.pt")
        self._epoch_seconds = time.perf_counter() - t0

    def _end_epoch(self, steps) -> bool:
        """Validate, log, checkpoint; True when early stopping says stop."""
        cfg, s, judged = self.cfg, self.state, self.evaluated
        judged.eval()
        x = self._valid_args()
        valid = elbo_terms_on(judged, x, ctx=self.ctx)  # valid_elbo = valid_recon − valid_kl, one pass
        if cfg.elbo == "iwae":  # an IWAE run is selected on its IWAE_K (runs.selection_bound)
            valid["valid_iwae_k"] = bound_on(judged, x, "iwae", cfg.num_particles, ctx=self.ctx)
        for key, value in valid.items():
            if not math.isfinite(value):  # the last update broke the parameters: keep the old checkpoint
                what = f"validation IWAE_{cfg.num_particles}" if key == "valid_iwae_k" else "validation ELBO"
                raise self._non_finite(
                    what, value, f"at the end of epoch {s.epoch + 1} (step {steps} of {steps})"
                )
        self.model.train()
        criterion = runs.selection_bound(valid)
        improved = criterion > s.best
        s.best, s.bad_epochs = (criterion, 0) if improved else (s.best, s.bad_epochs + 1)
        self.scheduler.step()
        row = {
            "epoch": s.epoch + 1,
            "objective": objective_name(cfg, beta_at(cfg, s.epoch, 0, steps)),
            "train_objective": -s.loss_sum / steps / self.data.train.shape[0],
            **valid,
            **({"iwae_k": cfg.num_particles} if cfg.elbo == "iwae" else {}),
            "epoch_seconds": self._epoch_seconds,
            "beta": beta_at(cfg, s.epoch, steps - 1, steps),
            "lr": float(self.optim.param_groups[0]["lr"]),
        }
        s.epoch += 1
        s.perm, s.step, s.loss_sum = None, 0, 0.0
        s.rows.append(row)
        if self.ctx.is_main:
            runs.append_metrics(self.out, row)
        self._log(
            f"epoch {s.epoch:>3}/{cfg.epochs}  train {row['objective']} {row['train_objective']:9.3f}  "
            + "  ".join(f"{self._label(k)} {v:9.3f}" for k, v in valid.items())
            + f"  nats/datapoint  ({self._epoch_seconds:.1f} s)"
        )
        self.save(best=improved)
        if self.board and self.ctx.is_main:  # after the checkpoint: a diagnostic never delays it
            self.board.log_epoch(row, judged, self.data, self.labels)
        return cfg.patience is not None and s.bad_epochs >= cfg.patience

    def _label(self, key: str) -> str:
        """A metric's name on the epoch line, with its K where it has one: ``valid IWAE_5``."""
        return f"valid IWAE_{self.cfg.num_particles}" if key == "valid_iwae_k" else key.replace("_", " ")

    def _finish(self) -> dict:
        from ..core import files
        from ..reports import plots  # (matplotlib: imported only when a run ends)

        bound = "iwae_k" if self.cfg.elbo == "iwae" else "elbo"
        summary = {
            "epochs": self.state.epoch,
            "stopped_by": self.stopped_by,
            f"best_valid_{bound}": self.state.best,
            "best_epoch": runs.best_epoch(self.state.rows),
            # what best.pt really holds, checked against the record (it may lag: ppl_vae.training.best)
            "best_pt": best.check(self.out, self.state.fields()).summary() if self.ctx.is_main else None,
            **({"iwae_k": self.cfg.num_particles} if bound == "iwae_k" else {}),
            "final": self.state.rows[-1] if self.state.rows else None,
        }
        judged = self.evaluated.eval()
        if self.cfg.final_iwae_k and self.state.epoch > 0:
            x = self._valid_args()
            summary["final_valid_iwae"] = bound_on(judged, x, "iwae", self.cfg.final_iwae_k, ctx=self.ctx)
            summary["final_iwae_k"] = self.cfg.final_iwae_k
            self._log(
                f"validation IWAE bound (K={self.cfg.final_iwae_k}): {summary['final_valid_iwae']:.3f} "
                f"nats/datapoint"
            )
        if self.ctx.is_main:
            try:  # a diagnostic: a program it cannot handle must not cost the run its summary
                summary.update(latent_use_on(judged, self._valid_args()))  # a fixed subset, see validation
            except Exception as e:  # noqa: BLE001
                summary["active_units_error"] = f"{type(e).__name__}: {e}"
                warnings.warn(f"active units not computed: {summary['active_units_error']}", RuntimeWarning)
            if summary.get("active_units"):
                self._log(
                    f"active units on {summary['active_units_n']} validation images: "
                    + ", ".join(
                        f"{s} {a} of {summary['active_units_of'][s]}"
                        for s, a in summary["active_units"].items()
                    )
                )
            for line in summary.get("collapse", []):  # said with --quiet too
                warnings.warn(PosteriorCollapse(line), stacklevel=2)
            files.write_text(self.out / "summary.json", json.dumps(summary, indent=2) + "\n")
            plots.run_figures(
                judged,
                self.data,
                self.state.rows,
                self.out,
                valid_labels=None if self.labels is None else self.labels["valid"],
            )
        return summary
