"""The commands ``benchmarks/quality.py`` runs: a recipe's ``python -m ppl_vae.fit`` (whole, or
``--quick``: the same program on 2,000 training images for 128 steps), its ``python -m
ppl_vae.evaluate``, and the continuation of a fit that was cut short (``--resume``).

(Imported by ``quality.py``, which puts ``benchmarks/`` on ``sys.path`` first, as ``common`` and
``recipes`` are imported as top-level modules.)
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from recipes import DATASETS, RECIPES, merged, run_dir, source_of

# --quick: the same programs, small: flags appended after the recipe's (argparse keeps the last)
QUICK = {
    "--epochs": "8",
    "--final-iwae-k": "0",
    "--batch-size": "100",
    "--patience": "1000",
    "--kl-warmup": "3",
    "--pseudo-inputs": "50",
    "--ema": "0.9",
}  # (--ema: a 10-step memory for 128 steps)
QUICK_TRAIN_IMAGES = 2000


def source_run(recipe: str, quick: bool, source: Path | None = None) -> Path:
    """The run an ``--init-from @NAME`` recipe starts from: ``source``, or recipe NAME's own run
    directory (``runs/quality-NAME``, or its ``--quick`` run, relative to the working directory);
    exits with one line (2, as the CLI's refusals) unless it is a finished run with a best.pt."""
    name = source_of(recipe)
    path = source or run_dir(name, 0, quick)
    if not (path / "best.pt").exists() or not (path / "summary.json").exists():
        print(
            f"quality.py: error: recipe {recipe} starts from recipe {name}'s run, and {path} is not a "
            "finished run (no best.pt and summary.json); "
            f"train it first (python benchmarks/quality.py {name}{' --quick' if quick else ''}) or name one "
            "with --from RUN",
            file=sys.stderr,
        )
        sys.exit(2)
    return path


def fit_command(
    recipe: str,
    out: Path,
    data: list[str],
    time_limit: float | None,
    device: str,
    quick: bool,
    seed: int = 0,
    source: Path | None = None,
) -> list[str]:
    """The recipe's ``python -m ppl_vae.fit`` command; ``source`` is the run that ``--init-from
    @NAME`` stands for (:func:`source_run`)."""
    args = list(RECIPES[recipe][1])
    if "--init-from" in args:
        args[args.index("--init-from") + 1] = str(source)
    if quick:
        args += [
            a
            for flag, value in QUICK.items()
            if flag in args or flag == "--final-iwae-k"
            for a in (flag, value)
        ]
    args = [a for flag, value in merged(args).items() for a in (flag, value)]
    limit = [] if time_limit is None else ["--time-limit", f"{time_limit:g}"]
    return [
        sys.executable,
        "-m",
        "ppl_vae.fit",
        *data,
        *args,
        *limit,
        "--device",
        device,
        "--seed",
        str(seed),
        "--out",
        str(out),
    ]


def evaluate_command(
    out: Path,
    data_dir: str | None,
    num_samples: int,
    device: str,
    quick: bool,
    quick_n: int = 200,
    split: str = "test",
) -> list[str]:
    subset = ["--subset", str(min(200, quick_n)), "--ks", "10"] if quick else []
    data = ["--data-dir", data_dir] if data_dir else []
    return [
        sys.executable,
        "-m",
        "ppl_vae.evaluate",
        str(out),
        "--split",
        split,
        "--num-samples",
        str(num_samples),
        *subset,
        *data,
        "--device",
        device,
        "--checkpoint",
        "best",
        "--json",
        str(out / f"{split}-k{num_samples}.json"),
    ]


def data_flags(dataset: str, data_dir: str | None) -> list[str]:
    """The fit flags of a recipe's data set (``--dataset NAME``, its own flags, ``--data-dir``)."""
    return ["--dataset", dataset, *DATASETS[dataset]["flags"]] + (
        ["--data-dir", data_dir] if data_dir else []
    )


def quick_data(dataset: str, data_dir: str | None, out: Path) -> tuple[list[str], dict[str, int]]:
    """The fit flags of ``--quick``: 2,000 random training images of the recipe's data set as an
    ``.npz`` (static binarized MNIST's kept binary with ``--binarize none``; the others with their
    data set's own flags, e.g. ``--binarize dynamic``), and the sizes of its validation and test splits."""
    from ppl_vae import load_dataset

    ds = load_dataset(dataset, data_dir)
    idx = np.random.default_rng(0).permutation(ds.train.shape[0])[:QUICK_TRAIN_IMAGES]
    path = out.parent / f"{out.name}-data.npz"
    np.savez_compressed(path, images=ds.train[idx].numpy().reshape(-1, *ds.image_shape[1:]))  # [n, H, W]
    flags = ["--binarize", "none"] if dataset == "binarized-mnist" else DATASETS[dataset]["flags"]
    quick = load_dataset(str(path))
    return ["--dataset", str(path), *flags], {"valid": quick.valid.shape[0], "test": quick.test.shape[0]}


def run(cmd: list[str]) -> float:
    """Run ``cmd`` (its output goes to ours); its wall seconds, or exit with its status."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    rc = subprocess.call(cmd)
    if rc != 0:
        sys.exit(rc)
    return time.perf_counter() - t0


def resume_fit(out: Path, fit_cmd: list[str], time_limit: float | None) -> tuple[float, list[list[str]]]:
    """Finish a recipe's fit that was cut short (a killed session: ``out`` holds its
    ``checkpoint.pt`` but no ``quality-fit.json``) and return its training seconds and the
    commands this call ran. ``python -m ppl_vae.fit --out OUT --resume`` continues from the last
    checkpoint bit for bit (every RNG state is in it) up to the recipe's ``--epochs``, for what is
    left of ``time_limit`` minutes after the epochs already trained. A fit that has finished since
    (its ``summary.json`` names the last epoch of ``metrics.jsonl``, e.g. resumed by hand) is not
    run again. The training seconds are the sum of every epoch's seconds: one invocation's wall
    clock no longer covers the run. Exits with one line (2) when there is nothing to resume."""
    from ppl_vae.training.runs import read_metrics

    def refuse(why: str):
        print(f"quality.py: error: --resume: {why}", file=sys.stderr)
        sys.exit(2)

    if (out / "quality-fit.json").exists():
        refuse(f"the fit in {out} finished (quality-fit.json); evaluate it with --evaluate-only")
    if not (out / "checkpoint.pt").exists():
        refuse(f"{out} holds no checkpoint.pt to continue; run the recipe without --resume")
    rows = read_metrics(out)
    summary = out / "summary.json"
    finished = summary.exists() and rows and json.loads(summary.read_text())["epochs"] == rows[-1]["epoch"]
    commands = []
    if not finished:
        epochs = fit_cmd[fit_cmd.index("--epochs") + 1] if "--epochs" in fit_cmd else None
        trained = sum(r["epoch_seconds"] for r in rows) / 60
        left = None if time_limit is None else max(time_limit - trained, 0.0)
        commands.append(
            [sys.executable, "-m", "ppl_vae.fit", "--out", str(out), "--resume"]
            + (["--epochs", epochs] if epochs else [])
            + ([] if left is None else ["--time-limit", f"{left:.2f}"])
        )
        run(commands[-1])
        rows = read_metrics(out)
    return sum(r["epoch_seconds"] for r in rows), commands
