"""The training loop: SVI on a Pyro objective as a differentiable loss, one torch optimizer.

:func:`train_step` is the whole update: loss → backward → (normalize, clip) → optimizer step. The
:class:`Trainer` runs it over epochs of minibatches: a batch ``x[idx]`` of B indices from a
per-epoch permutation (data already on the device), ``loss = objective(model, guide, x_b,
size=N, beta=β)`` (the data plate scales it to the full dataset). The host reads the running
loss back only every ``log_every`` steps (progress bar, NaN check), so a GPU is never stalled
per step. After each epoch: the validation bound, early stopping, a checkpoint, a metrics row.

Where things live: a Trainer's construction (lock, data, model, optimizer, resume) in
:mod:`ppl_vae.training.start`, the end of a run (summary, figures) in :mod:`ppl_vae.training.finish`;
the run directory, its lock and metrics in :mod:`ppl_vae.training.runs`; what a checkpoint holds in
:meth:`Trainer.state_dict`, how it is written and checked in :mod:`ppl_vae.training.checkpoint`; the
validation bound in :mod:`ppl_vae.training.validation`; data-parallel training under ``torchrun`` in
:mod:`ppl_vae.core.distributed`; CUDA-graph replay (``--cuda-graph``) in :mod:`ppl_vae.training.cuda_graph`.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import pyro
import pyro.infer.util
import torch
from tqdm.auto import tqdm

from ..core import distributed
from ..core.errors import CheckpointError
from ..data.splits import Dataset
from ..programs.model import VAE
from . import checkpoint, finish, runs, start
from .config import FitConfig
from .interrupts import Interrupted, NonFiniteLoss, signals_to_flag
from .optim import apply_settings, beta_at, normalize_and_clip_grads, patience_grace
from .validation import objective_name, row_terms


def train_step(
    loss_fn,
    optim: torch.optim.Optimizer,
    params,
    batch: tuple,
    size: int,
    beta,
    grad_clip: float | None = None,
    weight: float = 1.0,
    normalize_grad: bool = False,
) -> torch.Tensor:
    """One SVI update on the batch ``(x,)`` or ``(x, y)`` (``x (B, D)``, labels ``y (B, C)``);
    returns the detached loss (a device scalar).

    ``loss_fn(batch, size, beta)`` is the negative bound scaled to ``size`` datapoints. No host
    synchronization happens here (tests/test_training.py checks it), so the same step runs
    eagerly or inside a CUDA graph. ``weight``: this rank's loss weight under torchrun.
    ``normalize_grad``, ``grad_clip``: :func:`~.optim.normalize_and_clip_grads`."""
    loss = loss_fn(batch, size, beta)
    if weight != 1.0:
        loss = loss * weight
    optim.zero_grad(set_to_none=True)
    loss.backward()
    normalize_and_clip_grads(params, normalize_grad, grad_clip)
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
        start.start(self, cfg, out, resume, overwrite, quiet, dataset, model, accept_changed_data)

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
        clip = " or --grad-clip" if self.cfg.optimizer == "adam" else ""
        return NonFiniteLoss(f"the {what} became {value} {where}; {kept}; try a lower --lr{clip}")

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
                    # a signal during validation or the save: the epoch's checkpoint holds it all
                    if distributed.any_signalled(flag, self.ctx, self.device):
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
            return finish.finish(self)
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
            self.cfg.optimizer == "adam-normgrad",
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
        valid = row_terms(judged, self._valid_args(), cfg, self.ctx)
        for key, value in valid.items():
            if not math.isfinite(value):  # the last update broke the parameters: keep the old checkpoint
                what = f"validation IWAE_{cfg.num_particles}" if key == "valid_iwae_k" else "validation ELBO"
                raise self._non_finite(
                    what, value, f"at the end of epoch {s.epoch + 1} (step {steps} of {steps})"
                )
        self.model.train()
        criterion = runs.selection_bound(valid)
        improved = criterion > s.best
        counted = s.epoch + 1 > patience_grace(cfg, steps)  # not in the warm-up (as θ̄ sees it)
        s.best, s.bad_epochs = (criterion, 0) if improved else (s.best, s.bad_epochs + 1 if counted else 0)
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
