"""Run configuration: one dataclass, saved as ``config.json`` in every run directory."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .data import BINARIZE
from .errors import UserError
from .likelihoods import LIKELIHOODS
from .nets import ACTIVATIONS, ARCHS
from .objectives import OBJECTIVES

# Settings that define the model's parameters: a checkpoint only loads into the same ones.
MODEL_KEYS = ("likelihood", "arch", "hidden", "z_dim", "activation", "image_shape")


@dataclass
class FitConfig:
    # data
    dataset: str = "auto"            # a name from ppl_vae.data.DATASETS or a .npy/.npz path
    data_dir: str | None = None      # else $PPL_VAE_DATA, else ~/.cache/ppl_vae
    binarize: str = "auto"           # auto | none | dynamic | static
    # model
    likelihood: str = "bernoulli"
    sigma: float = 1.0               # fixed σ of the `gaussian` likelihood (σ = 1: MSE)
    sigma_floor: float = 0.01        # lower bound on the learned σ of `gaussian-learned`
    arch: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [400])
    z_dim: int = 20
    activation: str = "relu"
    # objective
    elbo: str = "trace"              # trace | meanfield | iwae
    num_particles: int = 1           # K: vectorized particles (IWAE: importance samples)
    beta: float = 1.0                # β-VAE weight of the KL term
    kl_warmup: float = 0.0           # epochs of linear β warm-up (0 = off)
    # optimization
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 1.0            # multiply the learning rate by this after every epoch
    grad_clip: float | None = None   # clip the global gradient norm (None = off)
    patience: int | None = None      # stop after this many epochs without a better valid ELBO (IWAE_K for iwae)
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda
    cuda_graph: bool = True          # on CUDA, replay each training step from a captured CUDA graph
    log_every: int = 50              # steps between host syncs (progress bar, NaN check)
    final_iwae_k: int = 100          # K of the validation IWAE bound reported at the end (0 = skip)
    # filled in by fit()
    image_shape: list[int] | None = None

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise UserError(msg)
        for flag, value, choices in (("--likelihood", self.likelihood, LIKELIHOODS), ("--arch", self.arch, ARCHS),
                                     ("--activation", self.activation, ACTIVATIONS), ("--elbo", self.elbo, OBJECTIVES),
                                     ("--binarize", self.binarize, BINARIZE)):
            need(value in choices, f"{flag} must be one of {', '.join(choices)}, got {value!r}")
        need(self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.lr > 0, f"--lr must be > 0, got {self.lr}")
        need(self.num_particles >= 1, f"--num-particles K must be >= 1, got {self.num_particles}")
        need(self.beta > 0, f"--beta must be > 0, got {self.beta}")
        need(self.kl_warmup >= 0, f"--kl-warmup must be >= 0, got {self.kl_warmup}")
        need(self.z_dim >= 1, f"--z-dim must be >= 1, got {self.z_dim}")
        need(all(h >= 1 for h in self.hidden), f"--hidden sizes must be >= 1, got {self.hidden}")
        need(self.sigma > 0, f"--sigma must be > 0, got {self.sigma}")
        need(self.sigma_floor >= 0, f"--sigma-floor must be >= 0, got {self.sigma_floor}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 < self.lr_decay <= 1, f"--lr-decay must be in (0, 1], got {self.lr_decay}")
        need(self.grad_clip is None or self.grad_clip > 0, f"--grad-clip must be > 0, got {self.grad_clip}")
        need(self.patience is None or self.patience >= 1, f"--patience must be >= 1, got {self.patience}")
        need(self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}")
        need(self.final_iwae_k >= 0, f"--final-iwae-k must be >= 0, got {self.final_iwae_k}")
        need(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
             f"--device must be auto, cpu or cuda, got {self.device!r}")
        need(self.elbo != "iwae" or (self.beta == 1 and self.kl_warmup == 0),
             "--beta and --kl-warmup apply to the ELBO, not to --elbo iwae; drop them or use --elbo trace")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FitConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"unknown configuration keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def save(self, path: Path) -> None:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"cannot read run configuration {path}: {e}") from None
