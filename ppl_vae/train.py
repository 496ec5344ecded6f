"""The training loop: SVI on Pyro's ELBO as a differentiable loss with one torch optimizer.

Per step: a batch ``x_b = x[idx]`` of B indices drawn from a per-epoch permutation (data
already on the device), ``loss = objective(model, guide, x_b, size=N, beta=β)`` (the data
plate scales it to the full dataset), ``loss.backward()``, one fused Adam step.
The host reads the running loss back only every ``log_every`` steps (progress bar, NaN
check), so a GPU is never stalled per step.

Run directory (``out``): ``config.json``, ``checkpoint.pt`` (latest), ``best.pt`` (best
validation ELBO), ``metrics.jsonl`` (one JSON object per epoch), and figures.

Under ``torchrun`` the same loop is data-parallel (DistributedDataParallel over the loss,
``--batch-size`` the global batch, rank 0 the only writer): see :mod:`ppl_vae.distributed`.
"""
from __future__ import annotations

import json
import math
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.infer.util
import torch
from tqdm.auto import tqdm

from . import __version__, checkpoint, distributed, estimators
from .config import MODEL_KEYS, FitConfig
from .cuda_graph import GraphedStep
from .data import Dataset, load_dataset
from .errors import CheckpointError, UserError
from .likelihoods import make_likelihood
from .model import VAE
from .objectives import make_objective

RUN_FILES = ("config.json", "checkpoint.pt", "best.pt", "metrics.jsonl", "summary.json",
             "reconstructions.png", "samples.png", "training_curve.png")
VALID_SEED = 271828  # validation draws are the same every epoch, so epochs compare fairly


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite."""


class Interrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved. ``exit_code`` = 128 + signal number."""

    def __init__(self, signum: int, path: Path):
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {path}; "
                         f"continue with --resume")
        self.exit_code = 128 + signum


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available; use --device cpu")
    return torch.device(name)


def build_model(cfg: FitConfig) -> VAE:
    likelihood = make_likelihood(cfg.likelihood, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor)
    return VAE(cfg.image_shape, cfg.z_dim, cfg.hidden, likelihood, cfg.arch, cfg.activation)


def make_optimizer(params, cfg: FitConfig, device: torch.device, capturable: bool = False) -> torch.optim.Optimizer:
    """One Adam over all parameters, fused (one kernel over all tensors) on CUDA and CPU: on the
    CPU of docs/benchmarks.md it steps the 784-400-20 VAE in 0.17 ms against 0.44 ms for the
    multi-tensor (foreach) version; elsewhere multi-tensor. ``capturable`` (CUDA graphs): step
    counters and the learning rate live on the device, so a replayed step and the per-epoch lr
    decay need no host values."""
    if device.type == "cpu":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    if device.type != "cuda":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    lr = torch.tensor(cfg.lr, device=device) if capturable else cfg.lr
    return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=True, capturable=capturable)


def beta_at(cfg: FitConfig, epoch: int, step: int, steps_per_epoch: int) -> float:
    """β-VAE weight, linearly warmed up from β/(warm-up steps) to β over ``kl_warmup`` epochs."""
    if cfg.kl_warmup <= 0:
        return cfg.beta
    t = (epoch * steps_per_epoch + step + 1) / (cfg.kl_warmup * steps_per_epoch)
    return cfg.beta * min(1.0, t)


@torch.no_grad()
def bound_on(vae: VAE, x: torch.Tensor, kind: str = "elbo", k: int = 1, batch: int | None = None,
             seed: int = VALID_SEED, ctx: distributed.Context | None = None) -> float:
    """Mean bound over ``x`` in nats per datapoint: the analytic-KL ELBO (``kind="elbo"``)
    or IWAE_k (``kind="iwae"``), with fixed draws (``seed``) per block of ``batch`` rows
    (default: 10,000 for the ELBO, 100,000 / k for IWAE_k).
    Distributed (``ctx``): rank r computes blocks r, r+P, ...; the block sums are gathered and
    added in block order, so every rank returns the single-process value exactly."""
    batch = batch or (max(1, 100_000 // k) if kind == "iwae" else 10_000)
    starts = range(0, x.shape[0], batch)
    sums = {}
    for i in starts if ctx is None else distributed.strided(starts, ctx):
        xb = x[i:i + batch]
        if kind == "elbo":
            est = estimators.elbo(vae.model, vae.guide, xb, num_samples=k, analytic_kl=True, seed=seed + i)
        else:
            est = estimators.iwae(vae.model, vae.guide, xb, k, seed=seed + i)
        sums[i] = est.value.sum().item()
    if ctx is not None and ctx.enabled:
        sums = {i: v for part in distributed.all_gather_objects(sums, ctx) for i, v in part.items()}
    total = 0.0
    for i in starts:
        total += sums[i]
    return total / x.shape[0]


def prepare_run_dir(out: Path, resume: bool, overwrite: bool, clear: bool = True) -> None:
    """Refuse to write over an earlier run unless ``resume`` or ``overwrite`` says so. With
    ``clear`` (not resuming): delete the earlier run's files under ``overwrite`` and create ``out``;
    ``clear=False`` only checks, so that bad input found later leaves an earlier run untouched."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a run directory; choose another --out")
    existing = [f for f in RUN_FILES if (out / f).exists()]
    if resume:
        if not (out / "checkpoint.pt").exists():
            raise UserError(f"--resume: there is no checkpoint.pt in {out} to resume from")
        return
    if existing and not overwrite:
        raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it, "
                        f"--overwrite to replace it, or choose another --out")
    if not clear:
        return
    try:
        for f in existing:
            (out / f).unlink()
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot prepare run directory {out} ({e.strerror or e}); choose another --out") from None


@contextmanager
def _signals_to_flag(flag: dict):
    """While training, SIGINT/SIGTERM only set ``flag['signum']``; the loop saves and stops at
    the next step boundary. Handlers are installed only in the main thread."""
    import threading
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        flag["signum"] = signum

    for s in old:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@dataclass
class _State:
    epoch: int = 0          # epochs completed
    step: int = 0           # steps done in the current epoch (mid-epoch checkpoint)
    perm: torch.Tensor | None = None
    loss_sum: float = 0.0   # Σ loss over the current epoch's steps so far
    best: float = -math.inf
    bad_epochs: int = 0


class Trainer:
    """Holds model, data, optimizer and run directory; :meth:`run` trains to ``cfg.epochs``."""

    def __init__(self, cfg: FitConfig, out: str | Path, resume: bool = False, overwrite: bool = False,
                 quiet: bool = False, dataset: Dataset | None = None, model: VAE | None = None):
        """``dataset`` replaces loading ``cfg.dataset``; ``model`` replaces ``build_model(cfg)`` (e.g. a
        VAE subclass with another model/guide pair; it must have the parameters ``cfg`` describes)."""
        cfg.validate()
        self.out = Path(out)
        self.quiet = quiet
        prepare_run_dir(self.out, resume, overwrite, clear=False)  # cleared below, once the input is valid
        if resume:
            saved = FitConfig.load(self.out / "config.json")
            checkpoint.check_config_matches(saved.to_dict(), {**cfg.to_dict(), "image_shape": saved.image_shape},
                                            [k for k in MODEL_KEYS if k != "image_shape"] + ["dataset"])
            cfg.image_shape = saved.image_shape
        # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
        self.ctx, self.device = distributed.setup(resolve_device(cfg.device))
        if cfg.batch_size < self.ctx.world_size:
            raise UserError(f"--batch-size {cfg.batch_size} is the global batch, split over {self.ctx.world_size} "
                            f"processes: give at least {self.ctx.world_size}")
        # a bad checkpoint is refused before the data are loaded
        ckpt = checkpoint.load(self.out / "checkpoint.pt", map_location=self.device) if resume else None
        pyro.set_rng_seed(cfg.seed)
        likelihood = make_likelihood(cfg.likelihood, sigma=cfg.sigma, sigma_floor=cfg.sigma_floor)
        ds = dataset or load_dataset(cfg.dataset, cfg.data_dir, cfg.binarize, likelihood)
        if cfg.image_shape is not None and list(ds.image_shape) != list(cfg.image_shape):
            raise CheckpointError(f"the data have image shape {list(ds.image_shape)} but the run was trained on "
                                  f"{cfg.image_shape}")
        cfg.image_shape = list(ds.image_shape)
        if cfg.dataset == "auto":
            cfg.dataset = ds.name
        cfg.binarize = ds.binarize
        self.cfg = cfg
        self.data = ds.to(self.device)
        self.model = (build_model(cfg) if model is None else model).to(self.device)
        self.model.register_params = False  # one torch optimizer owns the parameters (see VAE)
        # (distributed: eager steps; DDP's all-reduce inside a captured graph is not supported here)
        use_graph = self.device.type == "cuda" and cfg.cuda_graph and not self.ctx.enabled
        self.optim = make_optimizer(self.model.parameters(), cfg, self.device, capturable=use_graph)
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optim, gamma=cfg.lr_decay)
        self.objective = make_objective(cfg.elbo, cfg.num_particles)
        self.loss_fn = distributed.wrap(self.model, self._objective, self.ctx, self.device)  # DDP when distributed
        self.step_fn = GraphedStep(self._step, self.device) if use_graph else self._step
        self.state = _State()
        self._saved_at: tuple[int, int] | None = None  # (epoch, step) of the checkpoint on disk
        if self.ctx.rank:  # rank 0 keeps the single-process stream; the others draw their own ε
            pyro.set_rng_seed(distributed.rank_seed(cfg.seed, self.ctx.rank))
        if resume:
            self._restore(ckpt)
        distributed.barrier(self.ctx)  # every rank has checked the run directory before rank 0 writes
        if self.ctx.is_main:
            prepare_run_dir(self.out, resume, overwrite)
            cfg.save(self.out / "config.json")  # on --resume: the merged settings (e.g. a new --epochs)

    # ---- checkpoints

    def _checkpoint(self) -> dict:
        s = self.state
        return {"format_version": checkpoint.FORMAT_VERSION, "package_version": __version__,
                "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "optimizer": self.optim.state_dict(), "scheduler": self.scheduler.state_dict(),
                "epoch": s.epoch, "step": s.step, "perm": s.perm, "loss_sum": s.loss_sum,
                "best_valid_elbo": s.best, "bad_epochs": s.bad_epochs, "rng": checkpoint.rng_state()}

    def _restore(self, ckpt: dict) -> None:
        checkpoint.check_config_matches(ckpt["config"], self.cfg.to_dict(), MODEL_KEYS)
        cfg, saved, perm, n = self.cfg, ckpt["config"], ckpt["perm"], self.data.train.shape[0]
        if perm is not None and perm.numel() != n:
            raise CheckpointError(f"the checkpoint is {ckpt['step']} steps into an epoch over {perm.numel()} "
                                  f"training points, but the data now have {n}; the data changed since the run "
                                  f"started")
        if perm is not None and saved.get("batch_size") != cfg.batch_size:
            raise UserError(f"the checkpoint is {ckpt['step']} steps into an epoch of batches of "
                            f"{saved.get('batch_size')}; resume with that --batch-size (change it at an epoch end)")
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optim.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self._restore_rng(ckpt)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"checkpoint does not fit this model: {str(e).splitlines()[0]}") from None
        # optimizer settings given anew with --resume apply from here on (the loaded state holds the old ones)
        for g in self.optim.param_groups:
            if saved.get("lr") != cfg.lr:
                g["lr"] = g["initial_lr"] = cfg.lr
            g["weight_decay"] = cfg.weight_decay
            # a checkpoint from another device or path (CUDA graph or eager) resumes with this run's
            # optimizer implementation: the loaded groups carry the old one's flags
            for key in ("fused", "foreach", "capturable"):
                g[key] = self.optim.defaults.get(key)
            capturable = bool(g["capturable"])
            if isinstance(g["lr"], torch.Tensor) and not capturable:
                g["lr"] = float(g["lr"])
            elif capturable and not isinstance(g["lr"], torch.Tensor):
                g["lr"] = torch.tensor(g["lr"], device=self.device)
        self.scheduler.gamma = cfg.lr_decay
        self.state = _State(ckpt["epoch"], ckpt["step"], None if perm is None else perm.to(self.device),
                            ckpt["loss_sum"], ckpt["best_valid_elbo"], ckpt["bad_epochs"])
        self._saved_at = (self.state.epoch, self.state.step)
        if self.ctx.is_main:
            self._truncate_metrics(self.state.epoch)

    def _restore_rng(self, ckpt: dict) -> None:
        """Rank r's own saved RNG state when the checkpoint was written by as many ranks
        (``rng_ranks``); else rank 0 takes ``rng`` and rank r > 0 a fresh stream for this point."""
        ranks = ckpt.get("rng_ranks")
        if ranks is not None and len(ranks) == self.ctx.world_size:
            checkpoint.set_rng_state(ranks[self.ctx.rank])
        elif self.ctx.is_main:
            checkpoint.set_rng_state(ckpt["rng"])
        else:
            pyro.set_rng_seed(distributed.rank_seed(self.cfg.seed, self.ctx.rank, ckpt["epoch"], ckpt["step"]))

    def _truncate_metrics(self, epochs_done: int) -> None:
        """Drop metric lines of epochs after the checkpoint (they will be redone), and a line cut
        short by a crash; rewritten atomically."""
        path = self.out / "metrics.jsonl"
        if path.exists():
            keep = []
            for ln in path.read_text().splitlines():
                try:
                    if json.loads(ln)["epoch"] <= epochs_done:
                        keep.append(ln)
                except (ValueError, KeyError, TypeError):
                    pass
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)

    def save(self, best: bool = False) -> None:
        """Write ``checkpoint.pt`` (and ``best.pt``). Distributed: called by every rank (the RNG
        states of all ranks are gathered into ``rng_ranks``), written by rank 0."""
        rngs = distributed.all_gather_objects(checkpoint.rng_state(), self.ctx) if self.ctx.enabled else None
        if self.ctx.is_main:
            ckpt = self._checkpoint()
            if rngs is not None:
                ckpt["rng_ranks"] = rngs
            checkpoint.atomic_save(ckpt, self.out / "checkpoint.pt")
            if best:
                checkpoint.atomic_save(ckpt, self.out / "best.pt")
        self._saved_at = (self.state.epoch, self.state.step)

    def _non_finite(self, what: str, value: float, where: str) -> NonFiniteLoss:
        """The error for a NaN/inf ``what`` (nothing has been saved since the last good checkpoint)."""
        if self._saved_at is None:
            kept = "no checkpoint had been written yet"
        else:
            epoch, step = self._saved_at
            kept = (f"the last good checkpoint {self.out / 'checkpoint.pt'} (after epoch {epoch}"
                    f"{f' and {step} steps' if step else ''}) is kept")
        return NonFiniteLoss(f"the {what} became {value} {where}; {kept}; try a lower --lr or --grad-clip")

    # ---- the loop

    def _log(self, msg: str) -> None:
        if not self.quiet and self.ctx.is_main:
            tqdm.write(msg, file=sys.stderr)

    def run(self) -> dict:
        cfg, s, x = self.cfg, self.state, self.data.train
        n = x.shape[0]
        b = min(cfg.batch_size, n)
        steps = math.ceil(n / b)
        flag: dict = {}
        bar = tqdm(total=steps * cfg.epochs, initial=min(s.epoch * steps + s.step, steps * cfg.epochs),
                   disable=self.quiet or not self.ctx.is_main, unit="step", dynamic_ncols=True, file=sys.stderr)
        validation = pyro.infer.util.is_validation_enabled()
        pyro.enable_validation(False)  # data were validated at load time; keep the hot loop lean
        self.model.train()
        try:
            with _signals_to_flag(flag):
                while s.epoch < cfg.epochs:
                    self._run_epoch(steps, b, n, bar, flag)
                    stop = self._end_epoch(steps)
                    if self._signalled(flag):  # during validation or the save: the epoch's checkpoint holds it all
                        raise Interrupted(self._signum(flag), self.out / "checkpoint.pt")
                    if stop:
                        break
        finally:
            bar.close()
            pyro.enable_validation(validation)
        return self._finish()

    def _objective(self, model, guide, x, size, beta):
        """``self.objective``, looked up at every call (tests replace it on a built Trainer)."""
        return self.objective(model, guide, x, size=size, beta=beta)

    def _step(self, idx: torch.Tensor, beta, weight: float = 1.0) -> torch.Tensor:
        """One SVI update on the batch at ``idx``; returns the (detached) loss. Everything stays on
        the device, so the same function runs eagerly or inside a CUDA graph (``beta`` is then a
        device tensor). Distributed: ``idx`` is this rank's slice and ``weight`` its loss weight
        (:func:`ppl_vae.distributed.shard`); ``loss_fn`` is DDP, whose backward all-reduces."""
        xb = self.data.train_batch(idx)  # (B, D)
        loss = self.loss_fn(xb, self.data.train.shape[0], beta)
        if weight != 1.0:
            loss = loss * weight
        self.optim.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip, foreach=True)
        self.optim.step()
        return loss.detach()

    def _run_epoch(self, steps, b, n, bar, flag):
        cfg, s = self.cfg, self.state
        ctx = self.ctx
        if s.perm is None:
            # rank 0 draws it as a single process does; every rank takes the same one
            perm = torch.randperm(n, device=self.device) if ctx.is_main else \
                torch.empty(n, dtype=torch.long, device=self.device)
            s.perm = distributed.broadcast_tensor(perm, ctx)
            s.step, s.loss_sum = 0, 0.0
        t0 = time.perf_counter()
        running = torch.zeros((), device=self.device)  # Σ loss since the last host sync
        since = 0
        while s.step < steps:
            idx = s.perm[s.step * b:(s.step + 1) * b]
            beta = beta_at(cfg, s.epoch, s.step, steps)
            if ctx.enabled:  # this rank's slice of the global batch, and its loss weight
                mine, weight = distributed.shard(idx, ctx)
                running = running + self.step_fn(mine, beta, weight)
            else:
                running = running + self.step_fn(idx, beta)
            s.step += 1
            since += 1
            # distributed: every rank syncs at the same steps (a signal is acted on at the next interval)
            if since == cfg.log_every or s.step == steps or (flag and not ctx.enabled):
                if ctx.enabled:  # Σ_r w_r·loss_r = P × the global batches' loss; and any rank's signal
                    both = torch.stack([running, torch.full_like(running, len(flag))])
                    total, signals = distributed.all_reduce_sum(both, ctx).tolist()  # the one host sync
                    total, interrupt = total / ctx.world_size, signals > 0
                else:
                    total, interrupt = running.item(), bool(flag)  # the one host sync per log interval
                if not math.isfinite(total):
                    at = f"step {s.step}" if since == 1 else f"steps {s.step - since + 1}-{s.step}"
                    raise self._non_finite("training loss", total, f"at epoch {s.epoch + 1}, {at} of {steps}")
                s.loss_sum += total
                bar.update(since)
                bar.set_postfix(epoch=s.epoch + 1, elbo=f"{-total / since / n:.2f}")
                running = torch.zeros((), device=self.device)
                since = 0
                if interrupt:
                    self.save()
                    raise Interrupted(self._signum(flag), self.out / "checkpoint.pt")
        self._epoch_seconds = time.perf_counter() - t0

    def _signalled(self, flag: dict) -> bool:
        """Whether a signal arrived, on any rank (the same answer on every rank)."""
        if not self.ctx.enabled:
            return bool(flag)
        return distributed.all_reduce_sum(torch.tensor([float(len(flag))], device=self.device), self.ctx).item() > 0

    def _signum(self, flag: dict) -> int:
        """The signal that arrived (distributed: called by every rank; the largest number any rank saw)."""
        if not self.ctx.enabled:
            return flag["signum"]
        return max(distributed.all_gather_objects(flag.get("signum", 0), self.ctx))

    def _end_epoch(self, steps) -> bool:
        """Validate, log, checkpoint; True when early stopping says stop."""
        cfg, s = self.cfg, self.state
        n = self.data.train.shape[0]
        train_elbo = -s.loss_sum / steps / n
        self.model.eval()
        valid_elbo = bound_on(self.model, self.data.valid, ctx=self.ctx)
        # best.pt and early stopping follow the bound being trained: IWAE training lowers the ELBO
        # while it raises IWAE_K, so an IWAE run is selected on its validation IWAE_K
        valid_iwae = bound_on(self.model, self.data.valid, "iwae", cfg.num_particles,
                              ctx=self.ctx) if cfg.elbo == "iwae" else None
        for what, value in (("validation ELBO", valid_elbo), (f"validation IWAE_{cfg.num_particles}", valid_iwae)):
            if value is not None and not math.isfinite(value):  # the last update broke the parameters: keep the old
                raise self._non_finite(what, value, f"at the end of epoch {s.epoch + 1} (step {steps} of {steps})")
        self.model.train()
        s.epoch += 1
        s.perm, s.step, s.loss_sum = None, 0, 0.0
        criterion = valid_elbo if valid_iwae is None else valid_iwae
        improved = criterion > s.best
        if improved:
            s.best, s.bad_epochs = criterion, 0
        else:
            s.bad_epochs += 1
        self.scheduler.step()
        row = {"epoch": s.epoch, "train_elbo": train_elbo, "valid_elbo": valid_elbo,
               "epoch_seconds": self._epoch_seconds, "beta": beta_at(cfg, s.epoch - 1, steps - 1, steps),
               "lr": self.optim.param_groups[0]["lr"]}
        if valid_iwae is not None:
            row["valid_iwae"] = valid_iwae  # IWAE_K with the training K (cfg.num_particles)
        if self.ctx.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self._log(f"epoch {s.epoch:>3}/{cfg.epochs}  train {'IWAE' if valid_iwae is not None else 'ELBO'} "
                  f"{train_elbo:9.3f}  valid ELBO {valid_elbo:9.3f}"
                  + (f"  valid IWAE_{cfg.num_particles} {valid_iwae:9.3f}" if valid_iwae is not None else "")
                  + f"  nats/datapoint  ({self._epoch_seconds:.1f} s)")
        self.save(best=improved)
        return cfg.patience is not None and s.bad_epochs >= cfg.patience

    def _finish(self) -> dict:
        from . import plots

        metrics = read_metrics(self.out) if self.ctx.is_main else []
        best_key = "best_valid_iwae" if self.cfg.elbo == "iwae" else "best_valid_elbo"  # what best.pt maximizes
        summary = {"epochs": self.state.epoch, best_key: self.state.best,
                   "final": metrics[-1] if metrics else None}
        if self.cfg.final_iwae_k and self.state.epoch > 0:
            self.model.eval()
            summary["valid_iwae"] = bound_on(self.model, self.data.valid, "iwae", self.cfg.final_iwae_k, ctx=self.ctx)
            summary["valid_iwae_k"] = self.cfg.final_iwae_k
            self._log(f"validation IWAE bound (K={self.cfg.final_iwae_k}): {summary['valid_iwae']:.3f} nats/datapoint")
        if self.ctx.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plots.run_figures(self.model, self.data, metrics, self.out)
        return summary


def read_metrics(out: Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def load_run(run_dir: str | Path, which: str = "best", device="cpu") -> tuple[VAE, FitConfig]:
    """The trained model of a run directory (``best.pt`` or ``checkpoint.pt``) and its config."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        raise UserError(f"{run_dir} is not a ppl_vae run directory (no config.json); pass the --out of a fit")
    cfg = FitConfig.load(run_dir / "config.json")
    path = run_dir / f"{which}.pt"
    if not path.exists() and which == "best":
        path = run_dir / "checkpoint.pt"
    ckpt = checkpoint.load(path, map_location=device)
    checkpoint.check_config_matches(ckpt["config"], cfg.to_dict(), MODEL_KEYS)
    vae = build_model(cfg)
    try:
        vae.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not fit the model of {run_dir / 'config.json'}: "
                              f"{str(e).splitlines()[0]}") from None
    return vae.to(device).eval(), cfg
