"""Run configuration: one dataclass, saved as ``config.json`` in every run directory.

Settings come from flags (:mod:`ppl_vae.fit`), from Python, or from a run's ``config.json``
(``--resume``, ``evaluate``, ``sample``). :meth:`FitConfig.validate` checks every field's type and
range whichever way it came; a bad value from a file is one :class:`UserError` line naming the
file and the field. Settings that depend on the data (``epochs`` = None) are fixed by
:meth:`FitConfig.with_data_defaults` once the data are loaded, and ``config.json`` records the
fixed value.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..core import files
from ..core.errors import UserError
from ..programs.model import DEFAULT_DIMS, hierarchy_error
from .config_checks import check_fields, field_types, is_int, is_number, json_type

# Settings that define the model's parameters: a checkpoint only loads into the same ones.
MODEL_KEYS = (
    "likelihood",
    "arch",
    "hidden",
    "z_dim",
    "activation",
    "image_shape",
    "prior",
    "guide",
    "latent_layers",
    "hierarchy",
    "z2_dim",
    "hidden2",
    "pseudo_inputs",
    "mixture_components",
    "flow_steps",
    "conditional",
    "num_classes",
)
# The default length of a run: at least this many epochs and optimizer steps. Ten epochs of
# MNIST (391 steps each at batch 128) already give recognisable digits; a small dataset needs
# more epochs for as many steps (scikit-learn's digits: 250 epochs of 12 steps).
DEFAULT_MIN_EPOCHS, DEFAULT_MIN_STEPS = 10, 3000


def default_epochs(n_train: int, batch_size: int) -> int:
    """max(10, ⌈3000 / steps per epoch⌉), with ⌈n_train / min(batch_size, n_train)⌉ steps per epoch."""
    steps_per_epoch = math.ceil(n_train / min(batch_size, n_train))
    return max(DEFAULT_MIN_EPOCHS, math.ceil(DEFAULT_MIN_STEPS / steps_per_epoch))


def default_kl_warmup(latent_layers: int, epochs: int) -> float:
    """0 (off) for one latent layer; for two, a tenth of the epochs (at least 1): without it the
    upper layers of a hierarchy tend to collapse early (docs/models.md)."""
    return 0.0 if latent_layers == 1 else float(max(1, round(epochs / 10)))


@dataclass
class FitConfig:
    # data
    dataset: str = "auto"  # a name from data.datasets.DATASETS, a folder of images, a .npy/.npz path
    data_dir: str | None = None  # else $PPL_VAE_DATA, else ~/.cache/ppl_vae
    binarize: str = "auto"  # auto | none | dynamic | static
    dequantize: str = "auto"  # auto | uniform | none: 8-bit images as (x + u)/256 under a density
    channels: int | None = None  # (users' images) 1 or 3: convert to; None: as the data are
    image_size: list[int] | None = None  # (a folder of images) [H, W] to resize every image to
    # model
    likelihood: str = "bernoulli"
    sigma: float = 0.1  # fixed σ of the `gaussian` likelihood, for data in [0, 1] (σ = 1 collapses)
    sigma_floor: float = 0.01  # lower bound on the learned σ of `gaussian-learned`
    arch: str = "mlp"
    hidden: list[int] | None = None  # None: [400] with one latent layer, [200, 200] with two
    z_dim: int | None = None  # None: 20 with one latent layer, 100 (z1) with two
    activation: str = "relu"  # or gated (gated hidden layers, as the VampPrior paper's MLPs)
    # the program (docs/models.md)
    prior: str = "normal"  # normal | mog | vampprior: p(z) of the top latent layer
    guide: str = "diagonal"  # diagonal | full-rank | iaf: the posterior family of every layer
    latent_layers: int = 1  # 1: z; 2: z2 → z1 → x (docs/models.md)
    hierarchy: str = (
        "chain"  # (two layers) chain: p(x|z1), q(z1|x) q(z2|z1); skip: p(x|z1,z2), q(z2|x) q(z1|x,z2)
    )
    z2_dim: int = 50  # (two layers) dimension of z2
    hidden2: list[int] = field(default_factory=lambda: [100, 100])  # (two layers) the z1 ↔ z2 networks
    pseudo_inputs: int = 500  # (vampprior) K learned pseudo-inputs
    mixture_components: int = 10  # (mog) M components
    flow_steps: int = 2  # (iaf) inverse-autoregressive steps
    conditional: bool = False  # class-conditional p(x|z,y), q(z|x,y) (datasets with labels)
    num_classes: int | None = None  # (conditional) filled in from the dataset's labels
    # objective
    elbo: str = "trace"  # trace | meanfield | iwae
    num_particles: int = 1  # K: vectorized particles (IWAE: importance samples)
    beta: float = 1.0  # β-VAE weight of the KL term
    kl_warmup: float | None = (
        None  # epochs of linear β warm-up (0 = off; None: 0 with one latent layer, a tenth of the epochs with two)
    )
    # optimization
    epochs: int | None = None  # None: default_epochs(N, batch_size), fixed once the data are loaded
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    lr_decay: float = 1.0  # multiply the learning rate by this after every epoch
    ema: float = 0.0  # parameter averaging θ̄ ← d·θ̄ + (1 − d)·θ per step (0 = off); θ̄ is judged and kept
    grad_clip: float | None = None  # clip the global gradient norm (None = off)
    optimizer: str = "adam"  # adam | adam-normgrad: Adam on each tensor's gradient at unit L2 norm
    patience: int | None = None  # stop after this many epochs without a better valid ELBO (IWAE_K for iwae)
    time_limit: float | None = (
        None  # stop after the epoch that ends past this many minutes of this invocation
    )
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    cuda_graph: bool = (
        False  # on CUDA, replay each step from a captured CUDA graph (opt-in; docs/benchmarks.md)
    )
    log_every: int = 50  # steps between host syncs (progress bar, NaN check)
    final_iwae_k: int = 100  # K of the validation IWAE bound reported at the end (0 = skip)
    init_from: str | None = None  # a run (its best.pt) or a checkpoint file to start from (resolved path)
    tensorboard: str | None = (
        None  # also write each epoch's metrics and image grids as TensorBoard events here
    )
    # filled in by fit()
    image_shape: list[int] | None = None
    data_fingerprint: dict | None = None  # the data's identity: checked by --resume and evaluate
    binarize_seed: int | None = None  # seed of the fixed binarization of valid/test (dynamic) or all (static)
    data_split: str | None = None  # how the train/valid/test splits were made
    dequantize_seed: int | None = None  # seed of the one draw of u for valid/test (uniform dequantization)
    init_record: dict | None = None  # (--init-from) file, epoch, parameter digest, validation terms

    def validate(self, source: str | None = None) -> None:
        """Raise a one-line :class:`UserError` for a value of the wrong type or out of range.
        Fields are named as flags (``--z-dim``), or as ``"z_dim"`` of the file ``source``."""
        check_fields(self, source)  # each field's type and range (config_checks)
        if self.elbo == "meanfield" and self.latent_layers == 2:
            raise UserError(
                (f"{source}: " if source else "") + "--elbo meanfield (Pyro's TraceMeanField_ELBO) "
                "needs a mean-field guide, which the two-layer guides q(z2|z1) and q(z1|x,z2) are not; "
                "use --elbo trace or iwae"
            )
        why = hierarchy_error(self.hierarchy, self.latent_layers, self.arch, self.hidden)
        if why:
            raise UserError((f"{source}: " if source else "") + why)
        if self.optimizer == "adam-normgrad" and self.grad_clip:
            raise UserError(
                (f"{source}: " if source else "")
                + "--grad-clip does nothing under --optimizer adam-normgrad "
                "(every step's gradients have the same global norm, √(number of tensors), and Adam cancels a "
                "constant scale); drop one of them"
            )
        if self.elbo == "iwae" and self.beta != 1:  # (--kl-warmup is fine: it ramps β up to 1)
            raise UserError(
                (f"{source}: " if source else "") + "--beta ≠ 1 makes --elbo iwae no bound on log p(x); "
                "drop it (--kl-warmup may ramp β to 1) or use --elbo trace"
            )

    def with_data_defaults(self, n_train: int) -> "FitConfig":
        """This config with the settings that depend on the data fixed, for ``n_train`` training
        datapoints: ``epochs`` = None becomes :func:`default_epochs`, ``kl_warmup`` = None
        :func:`default_kl_warmup` (0 from ``--init-from``: a trained model needs no warm-up).
        Call it once the data are loaded, before the config is saved (``config.json`` records
        the fixed values)."""
        z_dim, hidden = DEFAULT_DIMS[self.latent_layers]
        epochs = self.epochs or default_epochs(n_train, self.batch_size)
        return dataclasses.replace(
            self,
            epochs=epochs,
            z_dim=self.z_dim or z_dim,
            hidden=list(hidden) if self.hidden is None else self.hidden,
            kl_warmup=self.kl_warmup
            if self.kl_warmup is not None
            else 0.0
            if self.init_from
            else default_kl_warmup(self.latent_layers, epochs),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d, source: str | None = None) -> "FitConfig":
        """A validated config from a JSON object ``d``; missing keys take their defaults (runs of
        earlier versions), unknown keys are refused. ``source`` names ``d``'s file in errors."""
        what = source or "the configuration"
        if not isinstance(d, dict):
            raise UserError(f"{what} must hold a JSON object of settings, got {json_type(d)}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise UserError(f"{what}: unknown keys {unknown}; known keys: {sorted(names)}")
        # JSON writes 1.0 as 1; a float field takes an integer (but not true/false)
        types = field_types(cls)
        d = {
            k: float(v) if types[k] in (float, float | None) and is_int(v) and is_number(v) else v
            for k, v in d.items()
        }
        if "dequantize" not in d and d.get("image_shape") is not None:
            d["dequantize"] = "none"  # a run of an earlier version: trained on the levels themselves
        cfg = cls(**d)
        cfg.validate(source)
        return cfg

    def save(self, path: Path) -> None:
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        files.atomic_write(path, lambda f: f.write(text), binary=False)

    @classmethod
    def load(cls, path: Path) -> "FitConfig":
        """The config in the file ``path``, validated; any problem is one :class:`UserError` line."""
        source = f"run configuration {path}"
        try:
            d = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise UserError(f"cannot read {source}: {e.strerror or e}") from None
        except json.JSONDecodeError as e:
            raise UserError(
                f"{source} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                f"restore or correct the file"
            ) from None
        except (ValueError, RecursionError) as e:  # not UTF-8 text, or absurdly nested
            raise UserError(
                f"{source} is not a JSON text file ({e.__class__.__name__}); restore or correct the file"
            ) from None
        return cls.from_dict(d, source)
