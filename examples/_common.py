"""Plumbing shared by the example scripts: flags, data with an offline fallback, one fit.

The examples are scripts (``python examples/NAME.py``), so this module is imported as
``_common`` from their folder. Training always goes through :class:`ppl_vae.training.train.Trainer`.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch

from ppl_vae.core.errors import DataError, UserError
from ppl_vae.data.datasets import Dataset, load_dataset, resolve_data_dir
from ppl_vae.inference import estimators
from ppl_vae.programs.likelihoods import make_likelihood
from ppl_vae.training.config import FitConfig
from ppl_vae.training.train import Trainer

REPO = Path(__file__).resolve().parents[1]
SUBSET_SEED = 4321  # seeds every subset below (the binarized-MNIST test file is ordered by class)

# What `--dataset auto` tries, in order: local files first, so an offline machine never waits
# on a download; then
# on MNIST through torchvision's download; last, offline and without any MNIST, scikit-learn's digits.
AUTO_CHAIN = (
    ("mnist", False),
    ("mnist-t10k", False),
    ("binarized-mnist", False),
    ("mnist", True),
    ("digits", False),
)
DESCRIBE = {
    "mnist": "MNIST (50k train / 10k valid / 10k test)",
    "mnist-t10k": "the 10k greyscale MNIST test images alone, split 8k/1k/1k (MNIST's training files "
    "are not in the data folder)",
    "binarized-mnist": "static binarized MNIST (50k / 10k / 10k)",
    "digits": "scikit-learn's 8x8 digits (1,797 images)",
    "circles": "generated circles with known factors",
}
BUNDLED = {"digits": "bundled with scikit-learn", "circles": "generated here"}


def parser(description: str, name: str, dataset: str = "auto") -> argparse.ArgumentParser:
    """The flags every example has: ``--quick``, ``--out``, ``--data-dir``, ``--dataset``, ``--seed``."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="a small, fast version (well under 2 minutes on a CPU)"
    )
    p.add_argument(
        "--out",
        default=str(REPO / "runs" / "examples" / name),
        help=f"output folder for figures, results.json and runs (default: runs/examples/{name})",
    )
    p.add_argument(
        "--data-dir", default=None, help="data folder (default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)"
    )
    chain = (
        "auto = MNIST when present, else the local MNIST test set (mnist-t10k), else binarized MNIST, "
        "else download MNIST, else scikit-learn's digits"
    )
    p.add_argument(
        "--dataset",
        default=None if dataset != "auto" else "auto",
        help=f"dataset name (default: {dataset}"
        + (", else auto when it is not available" if dataset not in ("auto", *BUNDLED) else "")
        + f"; {chain})",
    )
    p.set_defaults(_default_dataset=dataset)
    p.add_argument("--seed", type=int, default=0, help="seed of training and evaluation (default: 0)")
    return p


def sized_option(p: argparse.ArgumentParser, flag: str, full: int, quick: int, help: str) -> None:
    """``flag N`` (an int) whose default is ``full``, or ``quick`` under ``--quick``; the help says
    both. :func:`parse` fills it in."""
    p.add_argument(flag, type=int, default=None, help=f"{help} (default: {full}; --quick: {quick})")
    p.set_defaults(
        _sized={**(p.get_default("_sized") or {}), flag.lstrip("-").replace("-", "_"): (full, quick)}
    )


def parse(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """``p.parse_args(argv)`` with every :func:`sized_option` left unset given its full or quick default."""
    args = p.parse_args(argv)
    for dest, (full, quick) in (args._sized or {}).items():
        if getattr(args, dest) is None:
            setattr(args, dest, quick if args.quick else full)
    return args


def setup(args) -> Path:
    """Make ``--out`` and seed torch's global generator (training seeds itself from the config)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    return out


def load_data(
    name: str | None,
    data_dir=None,
    likelihood: str = "bernoulli",
    announce: bool = True,
    default: str = "auto",
    dequantize: str = "auto",
) -> Dataset:
    """``name`` loaded for ``likelihood`` (greyscale data are binarized dynamically for a Bernoulli,
    8-bit images dequantized uniformly for a density unless ``dequantize`` is ``none``).
    ``auto`` walks :data:`AUTO_CHAIN`, as ``fit`` falls back (offline and without MNIST: the
    digits), and prints one line: which data it used, from where, and why when it fell back.
    ``name=None`` (no ``--dataset`` given): the example's ``default``, else ``auto``."""
    lik = make_likelihood(likelihood)
    why = ""
    if name is None and default != "auto":
        try:
            return load_data(default, data_dir, likelihood, announce, dequantize=dequantize)
        except DataError:
            why = f"; {default}, this example's default, is not in {resolve_data_dir(data_dir)}"
            name = "auto"
    if (name or "auto") != "auto":
        ds = load_dataset(name, data_dir, "auto", lik, dequantize=dequantize)
    else:
        for cand, download in AUTO_CHAIN:
            try:
                ds = load_dataset(cand, data_dir, "auto", lik, download=download, dequantize=dequantize)
                break
            except DataError:
                continue
        if ds.name == "digits":
            why += f"; no MNIST in {resolve_data_dir(data_dir)} and none could be downloaded"
    if announce:
        where = BUNDLED.get(ds.name) or f"from {resolve_data_dir(data_dir)}"
        binary = bool(((ds.train == 0) | (ds.train == 1)).all())
        binarized = (
            ("binary as stored" if binary else "not binarized")
            if ds.binarize == "none"
            else f"{ds.binarize} binarization"
        )
        binarized += "; uniform dequantization, (x + u)/256" if ds.dequantize == "uniform" else ""
        print(f"data: {DESCRIBE.get(ds.name, ds.name)}, {where}; {binarized}{why}")
    return ds


def subset(
    ds: Dataset, n_train: int | None = None, n_valid: int | None = None, n_test: int | None = None
) -> Dataset:
    """A seeded random subset of each split (``None`` keeps the split whole), labels and factors alike."""
    g = torch.Generator().manual_seed(SUBSET_SEED)
    parts, labels, factors = {}, {}, {}
    for split, n in (("train", n_train), ("valid", n_valid), ("test", n_test)):
        x = ds.split(split)
        idx = (
            torch.randperm(x.shape[0], generator=g)[:n]
            if n is not None and n < x.shape[0]
            else torch.arange(x.shape[0])
        )
        parts[split] = x[idx]
        if split in ds.labels:
            labels[split] = ds.labels[split][idx]
        if split in ds.factors:
            factors[split] = ds.factors[split][idx]
    return replace(
        ds, train=parts["train"], valid=parts["valid"], test=parts["test"], labels=labels, factors=factors
    )


def fit(data: Dataset, out: Path, model=None, **cfg) -> tuple:
    """Train with :class:`~ppl_vae.training.train.Trainer` on ``data`` into run directory ``out``
    (replacing an earlier run there). ``cfg`` are :class:`~ppl_vae.training.config.FitConfig` fields;
    ``model`` optionally a VAE subclass to train instead of the plain VAE.
    Returns ``(trained model in eval mode, summary dict, trainer)``."""
    config = FitConfig(dataset=data.name, device="cpu", **cfg)
    trainer = Trainer(config, out, overwrite=True, quiet=True, dataset=data, model=model)
    summary = trainer.run()
    return trainer.evaluated.eval(), summary, trainer  # (the average θ̄ under --ema)


def save_json(obj: dict, path: Path) -> None:
    """Write ``obj`` as indented JSON (NaN → null, so any JSON reader accepts it)."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    Path(path).write_text(json.dumps(clean(obj), indent=2) + "\n")
    print(f"wrote {path}")


@torch.no_grad()
def held_out(vae, x: torch.Tensor, k: int, seed: int = 0, guide=None, model=None) -> dict:
    """Analytic-KL ELBO and IWAE_k of ``x``: means over the N datapoints (nats per datapoint), each
    with its standard error over datapoints (std / √N: how much another test sample would move
    it). ``guide`` replaces ``vae.guide`` as the IWAE proposal (then no ELBO is reported), ``model``
    replaces ``vae.model``."""
    model = model or vae.model
    n = x.shape[0]
    se = lambda est: (est.value.std() / math.sqrt(n)).item()  # noqa: E731
    out = {"n": int(n), "k": k}
    if guide is None:
        e = estimators.elbo(model, vae.guide, x, num_samples=1, analytic_kl=True, seed=seed)
        out["elbo"], out["elbo_se"] = e.mean(), se(e)
    w = estimators.iwae(model, guide or vae.guide, x, k, seed=seed + 1)
    out["iwae"], out["iwae_se"] = w.mean(), se(w)
    return out


def run(main) -> None:
    """Run an example's ``main()`` and exit with its code; bad input or missing data (a
    :class:`~ppl_vae.core.errors.UserError`) is one line and exit 2, never a traceback."""
    import sys

    try:
        code = main()
    except UserError as e:
        print(f"{Path(sys.argv[0]).name}: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
