"""Record numbers per data set: fit a named recipe, then evaluate it on the test set.

    python benchmarks/quality.py vampprior --data-dir ../shared/data [--time-limit 110]
    python benchmarks/quality.py frey-vae --data-dir ../shared/data --seed 1   # a repeat, another seed
    python benchmarks/quality.py vae --quick --data-dir ../shared/data      # a wiring check in minutes

Each recipe (``benchmarks/recipes.py``) is a ``python -m ppl_vae.fit`` command on one data set's
training split: static binarized MNIST (50k), dynamically binarized MNIST (50k; validation and
test binarized once with recorded seeds) or Frey Faces (1,565 frames, discretized logistic).
Model selection uses the validation split only: ``best.pt`` keeps the parameters of the best
validation bound (ELBO; IWAE_K for an IWAE run), early stopping watches the same bound, and
``--time-limit`` ends training after the epoch that passes the budget. Then ``python -m
ppl_vae.evaluate RUN --split test --num-samples 5000`` estimates log p(x) ≈ IWAE_5000 on the
whole test split, with its standard error (and bits/dim on 8-bit data), the Pareto k̂
diagnostics and the active units.

The result, ``benchmarks/results/quality-<recipe>[-seed<S>]-<device>.json``, holds the data set,
both commands, the environment, the config, training and evaluation seconds, the test ELBO,
log p(x) ± SE, the k̂ summary, the active units and the device; the metrics curve goes beside it
as ``...-metrics.jsonl``. ``--figure`` draws one figure per data set.

A candidate for a record (issue 27) is judged on validation first, so that the test split sees
only the winner: ``--split valid`` evaluates log p(x) ≈ IWAE_1000 on all validation images and
writes ``benchmarks/results/valid-<recipe>-<device>.json`` (and its curve); ``--evaluate-only``
later gives the winner its test number from the same run. A recipe with ``--init-from @NAME``
starts from recipe NAME's run (``runs/quality-NAME``, or ``--from RUN``)::

    python benchmarks/quality.py best-iwae5-from-best --split valid --time-limit 15
    python benchmarks/quality.py best-iwae5-from-best --evaluate-only          # only if it won

``--quick`` runs the same recipe for 128 steps on 2,000 training images (and 50 pseudo-inputs,
100 importance samples on 200 images): it checks the wiring, not the number,
and writes its JSON into the run directory only. The recipes are in docs/benchmarks.md ("Quality").
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, device_name  # noqa: E402
from recipes import CANDIDATES, DATASETS, RECIPES, dataset_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

from ppl_vae.training.runs import best_epoch, read_metrics, selection_bound  # noqa: E402

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


def merged(args: list[str]) -> dict[str, str]:
    """``--flag value`` pairs with a later value replacing an earlier one in place (what argparse
    would do), so that a recorded command names each flag once."""
    return dict(zip(args[::2], args[1::2]))


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


CHECKED = ("train_objective", "valid_elbo", "valid_recon", "valid_kl", "valid_iwae_k", "beta", "lr")


def check(
    recipe: str,
    epochs: int,
    out: Path,
    quick: bool,
    data_dir: str | None,
    device: str,
    seed: int = 0,
    split: str = "test",
) -> int:
    """Rerun the first ``epochs`` epochs of a recorded run, its recorded fit command under its
    recorded thread count, and compare the metrics with the recorded curve epoch by epoch. The same
    commit on the same machine with the same threads gives bit-identical rows; another thread
    count, CPU or library version gives float drift (relative differences of 1e-5 and below);
    above 1e-3 relative is reported as a mismatch (exit 1). A candidate judged on validation only
    is checked with its ``split`` (valid)."""
    kind, stem = "cuda" if device.startswith("cuda") else "cpu", result_stem(recipe, seed, split)
    result = out / f"{stem}-quick.json" if quick else RESULTS / f"{stem}-{kind}.json"
    if not result.exists():
        sys.exit(f"quality.py: error: --check: no recorded result {result} (--split valid for a candidate)")
    recorded = json.loads(result.read_text())
    if quick:  # the run being checked is --out's own quick run
        curve = read_metrics(out)
    else:
        lines = result.with_name(f"{stem}-{kind}-metrics.jsonl").read_text().splitlines()
        curve = [json.loads(line) for line in lines]
    start = recorded["config"].get("init_record")
    if start and not same_start(start):
        print(
            f"quality.py: warning: {start['file']} no longer holds the parameters this run started from "
            "(another digest); the rerun starts elsewhere"
        )
    if epochs > len(curve):
        sys.exit(f"quality.py: error: --check {epochs}: the recorded curve has {len(curve)} epochs")
    args = merged(shlex.split(recorded["fit_command"])[3:])  # after "python -m ppl_vae.fit"
    check_out = Path(tempfile.mkdtemp(prefix=f"quality-{recipe}-check-", dir=out.parent))
    args.update({"--epochs": str(epochs), "--final-iwae-k": "0", "--out": str(check_out)})
    args.pop("--time-limit", None)
    if data_dir and "--data-dir" in args:
        args["--data-dir"] = data_dir
    env, threads = dict(os.environ), recorded.get("environment", {}).get("threads")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    else:
        print(
            "quality.py: warning: the result records no thread count (older run); using this machine's default"
        )
    cmd = [sys.executable, "-m", "ppl_vae.fit", *(a for kv in args.items() for a in kv), "--quiet"]
    print("$", shlex.join(cmd), f"(OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'default')})", flush=True)
    if subprocess.call(cmd, cwd=REPO, env=env) != 0:
        return 1
    rows, worst = read_metrics(check_out), 0.0
    print(f"{'epoch':>5}  {'key':<16}{'recorded':>16}{'rerun':>16}{'|Δ|':>12}")
    for old, new in zip(curve[:epochs], rows):
        for key in (k for k in CHECKED if k in old):
            d = abs(new[key] - old[key])
            worst = max(worst, d / max(abs(old[key]), 1e-12))
            print(f"{old['epoch']:>5}  {key:<16}{old[key]:>16.7f}{new[key]:>16.7f}{d:>12.2e}")
    env_then, env_now = recorded.get("environment", {}), {**environment(), "threads": threads}
    same = [k for k in ("commit", "threads", "torch", "pyro", "cpu") if env_then.get(k) == env_now.get(k)]
    verdict = "bit-identical" if worst == 0 else f"largest relative difference {worst:.1e}"
    print(f"--check {epochs}: {verdict} (same {', '.join(same) or 'nothing'} as the recorded run)")
    return 0 if worst <= 1e-3 else 1


def same_start(record: dict) -> bool:
    """Whether the checkpoint an ``--init-from`` run started from still holds the same parameters."""
    import torch

    from ppl_vae.training.best import digest

    path = Path(record["file"])
    return (
        path.exists()
        and digest(torch.load(path, map_location="cpu", weights_only=False)["model"]) == record["digest"]
    )


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


def relative(cmd: list[str]) -> list[str]:
    """``cmd`` with ``python`` for the interpreter and absolute paths relative to the repository."""
    return [
        "python",
        *(os.path.relpath(a, REPO) if os.path.isabs(a) and os.path.exists(a) else a for a in cmd[1:]),
    ]


def environment() -> dict:
    """What decides a curve's last digits: the commit (``dirty`` when ppl_vae/ or benchmarks/
    differ from it), torch's thread count (``OMP_NUM_THREADS``; the fit subprocess inherits this
    environment), the versions of torch, Pyro and Python, and the CPU."""
    import platform

    import pyro
    import torch

    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    cpu = (
        next(
            (
                ln.split(":", 1)[1].strip()
                for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")
            ),
            platform.processor() or platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.processor() or platform.machine()
    )
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--", "ppl_vae", "benchmarks/quality.py")),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "python": platform.python_version(),
        "cpu": cpu,
    }


def summarize(
    recipe: str, out: Path, fit_cmd, eval_cmd, train_seconds, eval_seconds, quick, split: str = "test"
) -> dict:
    """The result JSON: the recipe, both commands, the environment, the fit's summary and the
    evaluation of ``split`` (``SPLIT_nll`` and ``SPLIT``: test, or valid for a candidate)."""
    test = json.loads(Path(eval_cmd[eval_cmd.index("--json") + 1]).read_text())  # what this evaluate wrote
    fit_summary = json.loads((out / "summary.json").read_text())
    rows = read_metrics(out)
    keep = (
        "n",
        "num_samples",
        "elbo_analytic",
        "elbo_analytic_stderr",
        "elbo_mc",
        "elbo_mc_stderr",
        "log_px",
        "log_px_stderr",
        "log_px_stderr_across_datapoints",
        "gap",
        "gap_elbo",
        "khat_mean",
        "khat_threshold",
        "khat_frac_above_threshold",
        "khat_frac_above_0_7",
        "log_px_reliable",
        "ess_median",
        "active_units",
        "iwae_by_k",
        "bits_per_dim",
        "dim",
        "dataset",
        "binarization",
        "binarize_seed",
        "likelihood",
        "seconds",
    )
    return {
        "recipe": recipe,
        "quick": quick,
        f"{split}_nll": -test["log_px"],
        f"{split}_nll_stderr": test["log_px_stderr"],
        # recorded with "python" and paths relative to the repository (reproducible elsewhere)
        "fit_command": shlex.join(relative(fit_cmd)),
        "evaluate_command": shlex.join(relative(eval_cmd)),
        "environment": environment(),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "epochs": fit_summary["epochs"],
        "stopped_by": fit_summary.get("stopped_by"),
        "best_epoch": best_epoch(rows),  # the epoch of best.pt, the parameters evaluated
        "fit_summary": {k: v for k, v in fit_summary.items() if k != "final"},
        split: {k: test[k] for k in keep if k in test},
        "device": test["device"],
        "device_name": device_name(test["device"]),
        "config": test["config"],
    }


def source_of(recipe: str) -> str | None:
    """The recipe whose run an ``--init-from @NAME`` recipe starts from (None for the others)."""
    flags = RECIPES.get(recipe, ("", []))[1]
    return flags[flags.index("--init-from") + 1][1:] if "--init-from" in flags else None


def _label(res: dict) -> str:
    seed, source = res.get("seed", 0), source_of(res["recipe"])
    return f"{res['recipe']}{f' seed {seed}' if seed else ''}{f' from {source}' if source else ''} ({res['device']})"


def start_minutes(res: dict, results: Path) -> float:
    """Where a run's curve starts on the time axis: 0, or for a fine-tuning run the training
    minutes of the recipe it started from (its committed result on the same device)."""
    source = source_of(res["recipe"])
    path = results / f"{result_stem(source, 0)}-{res['device'].split(':')[0]}.json" if source else None
    return json.loads(path.read_text())["train_seconds"] / 60 if path and path.exists() else 0.0


def figure(
    path: Path, results: Path = RESULTS, dataset: str = "binarized-mnist"
) -> dict[str, tuple[float, float]]:
    """Every committed recipe of ``dataset`` on one time axis: the validation bound per epoch
    against cumulative training minutes (lines) and the test number of best.pt at its epoch's time
    (markers, ±2 SE), in nats per datapoint (log p(x)) or, for a bits/dim data set, bits per
    dimension (−log p(x) / (D ln 2)). Returns each marker, ``{"recipe (device)": (minutes, y)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = DATASETS[dataset]
    bits = info["unit"] == "bits/dim"
    fig, ax = plt.subplots(figsize=(9, 5))
    markers, ys = {}, []
    paths = sorted(results.glob("quality-*-*.json"))
    for i, res_path in enumerate(p for p in paths if dataset_of(json.loads(p.read_text())) == dataset):
        res = json.loads(res_path.read_text())
        curve = res_path.with_name(res_path.stem + "-metrics.jsonl")  # the run's metrics, committed beside it
        rows = [json.loads(line) for line in curve.read_text().splitlines()]
        minutes = np.cumsum([r["epoch_seconds"] for r in rows]) / 60  # training steps only
        scale = res["train_seconds"] / 60 / minutes[-1]  # stretch to the wall clock (validation, saves)
        minutes = minutes * scale + start_minutes(res, results)  # [epochs], wall-clock minutes
        to_y = (lambda nats: -nats / (res["test"]["dim"] * np.log(2))) if bits else (lambda nats: nats)
        bound = [to_y(selection_bound(r)) for r in rows]
        label = _label(res)
        ax.plot(
            minutes,
            bound,
            color=f"C{i}",
            lw=1,
            alpha=0.7,
            label=f"{label}: validation {'IWAE_k' if 'valid_iwae_k' in rows[0] else 'ELBO'}",
        )
        best = res["best_epoch"] or len(rows)  # the parameters evaluated: best.pt, chosen on validation
        markers[label] = (minutes[best - 1], to_y(-res["test_nll"]))
        ys += [markers[label][1], bound[best - 1]]
        ax.errorbar(
            *([v] for v in markers[label]),
            yerr=[abs(to_y(2 * res["test_nll_stderr"]))],
            fmt="o",
            color=f"C{i}",
            ms=6,
            label=f"{label}: test {'bits/dim' if bits else 'log p(x)'} ≈ IWAE_{res['test']['num_samples']} "
            f"of best.pt (epoch {best}), {markers[label][1]:.{3 if bits else 2}f}",
        )
    for j, (name, value) in enumerate(
        info["literature"].items()
    ):  # named on the line, left and right in turn
        y = value if bits else -value
        ax.axhline(y, color="0.4", ls="--", lw=0.8)
        ax.text(
            0.01 + 0.98 * (j % 2),
            y,
            f"{name}: {y:.2f}",
            ha=("left", "right")[j % 2],
            va="bottom",
            transform=ax.get_yaxis_transform(),
            fontsize=7,
            color="0.3",
        )
        ys.append(y)
    ax.set_xlabel("training time (minutes, wall clock)")
    ax.set_ylabel("bits per dimension (lower is better)" if bits else "nats per datapoint")
    if dataset == "binarized-mnist":
        ax.set_ylim(-100, -82)
    elif ys:  # the markers, the curves at their best epochs and the published rows, with room
        lo, hi = min(ys), max(ys)
        pad = 0.5 * (hi - lo) + (0.05 if bits else 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    what = "test bits/dim" if bits else "test log p(x)"
    ax.set_title(f"{info['title']}: validation bound while training, {what}", fontsize=10)
    ax.grid(alpha=0.3)
    # below the axis and its label, in two columns: the curves stay clear; savefig's tight box keeps it
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return markers


def figure_path(dataset: str, folder: Path = Path("docs/figures")) -> Path:
    """docs/figures/quality.png for static binarized MNIST, quality-DATASET.png for the others."""
    return folder / ("quality.png" if dataset == "binarized-mnist" else f"quality-{dataset}.png")


def result_stem(recipe: str, seed: int, split: str = "test") -> str:
    """``quality-RECIPE`` (seed 0, the recipe's number) or ``quality-RECIPE-seedS`` (a repeat);
    ``valid-RECIPE[-seedS]`` for a candidate's validation number (never drawn as a test number)."""
    return f"{'quality' if split == 'test' else split}-{recipe}" + (f"-seed{seed}" if seed else "")


def run_dir(recipe: str, seed: int, quick: bool) -> Path:
    """A recipe's default run directory: ``runs/quality-RECIPE[-seedS][-quick]`` (relative to the
    working directory); an ``--init-from @RECIPE`` candidate looks for its source there."""
    return Path("runs") / f"{result_stem(recipe, seed)}{'-quick' if quick else ''}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "recipe", nargs="?", choices=sorted(RECIPES), help="the recipe to run (omit with --figure)"
    )
    p.add_argument("--data-dir", default=None, help="where the data sets are (default: $PPL_VAE_DATA, ...)")
    p.add_argument(
        "--out", type=Path, default=None, help="run directory (default: runs/quality-RECIPE[-quick])"
    )
    p.add_argument("--time-limit", type=float, default=110.0, help="minutes of training (default: 110)")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="K of log p(x) ≈ IWAE_K (default: 5000 on test, 1000 on valid)",
    )
    p.add_argument(
        "--split",
        choices=("test", "valid"),
        default="test",
        help="valid: judge a candidate on all validation images (IWAE_1000) and leave the test split "
        "unseen, writing benchmarks/results/valid-RECIPE-DEVICE.json (docs/benchmarks.md, 'Towards 83.0'); "
        "the winner then gets --evaluate-only",
    )
    p.add_argument(
        "--from",
        dest="source",
        type=Path,
        default=None,
        metavar="RUN",
        help="the run an '--init-from @NAME' recipe starts from (default: runs/quality-NAME)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="the fit's seed (default 0, the recipe's number; another seed is a repeat, written as "
        "quality-RECIPE-seedS-DEVICE.json, for the spread over seeds)",
    )
    p.add_argument("--evaluate-only", action="store_true", help="evaluate an already trained --out")
    p.add_argument("--quick", action="store_true", help="a few hundred steps on a subset: checks the wiring")
    p.add_argument(
        "--check",
        type=int,
        metavar="N",
        default=None,
        help="rerun the first N epochs of the recorded run (its command and thread count) and compare "
        "them with the recorded curve; exit 1 on a relative difference above 1e-3",
    )
    p.add_argument(
        "--figure",
        type=Path,
        nargs="?",
        const=Path("docs/figures"),
        default=None,
        metavar="FOLDER",
        help="draw the committed results of each data set (FOLDER/quality.png for static binarized MNIST, "
        "FOLDER/quality-DATASET.png for the others; default folder: docs/figures) and exit",
    )
    a = p.parse_args(argv)
    if a.figure is not None:
        done = {dataset_of(json.loads(r.read_text())) for r in RESULTS.glob("quality-*-*.json")}
        for dataset in sorted(done):
            figure(figure_path(dataset, a.figure), dataset=dataset)
        return 0
    if a.recipe is None:
        p.error("name a recipe, or pass --figure")
    out = a.out or run_dir(a.recipe, a.seed, a.quick)
    out.parent.mkdir(parents=True, exist_ok=True)
    if a.check is not None:
        return check(a.recipe, a.check, out, a.quick, a.data_dir, a.device, a.seed, a.split)
    dataset, split = RECIPES[a.recipe][0], a.split
    a.num_samples = a.num_samples or (5000 if split == "test" else 1000)
    if a.source is not None and source_of(a.recipe) is None:
        p.error(f"--from: recipe {a.recipe} does not start from another run (no --init-from @NAME)")
    if a.recipe in CANDIDATES and split == "test" and not (a.evaluate_only or a.quick):
        print(
            f"quality.py: warning: {a.recipe} is a record candidate; the rule judges it on validation "
            "first (--split valid) and gives only the winner a test number (docs/benchmarks.md)",
            file=sys.stderr,
        )
    starts_from = source_of(a.recipe) is not None and not a.evaluate_only
    source = source_run(a.recipe, a.quick, a.source) if starts_from else None
    if a.quick:
        data, sizes = quick_data(dataset, a.data_dir, out)
        a.time_limit, a.num_samples = None, min(a.num_samples, 100)
    else:
        data = data_flags(dataset, a.data_dir)
    fit_cmd = fit_command(a.recipe, out, data, a.time_limit, a.device, a.quick, a.seed, source)
    eval_cmd = evaluate_command(
        out,
        None if a.quick else a.data_dir,
        a.num_samples,
        a.device,
        a.quick,
        sizes[split] if a.quick else 200,
        split,
    )
    train_seconds = None
    if a.evaluate_only:
        fit_cmd = json.loads((out / "quality-fit.json").read_text())["fit_command_argv"]
        train_seconds = json.loads((out / "quality-fit.json").read_text())["train_seconds"]
    else:
        train_seconds = run(fit_cmd)
        (out / "quality-fit.json").write_text(
            json.dumps({"fit_command_argv": fit_cmd, "train_seconds": train_seconds}) + "\n"
        )
    eval_seconds = run(eval_cmd)
    result = summarize(a.recipe, out, fit_cmd, eval_cmd, train_seconds, eval_seconds, a.quick, split)
    result.update(dataset=dataset, seed=a.seed)
    kind, stem = result["device"].split(":")[0], result_stem(a.recipe, a.seed, split)
    path = out / f"{stem}-quick.json" if a.quick else RESULTS / f"{stem}-{kind}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not a.quick:
        shutil.copyfile(out / "metrics.jsonl", RESULTS / f"{stem}-{kind}-metrics.jsonl")
    t, what = result[split], {"test": "test", "valid": "validation"}[split]
    bits = f" = {t['bits_per_dim']:.4f} bits/dim" if "bits_per_dim" in t else ""
    print(
        f"{a.recipe}: {what} NLL {result[f'{split}_nll']:.2f} ± {result[f'{split}_nll_stderr']:.3f} nats "
        f"(Monte Carlo SE){bits} (log p(x) ≈ IWAE_{t['num_samples']} on {t['n']} {what} images; "
        f"{'reliable' if t.get('log_px_reliable') else 'a lower bound; k̂ says the SE is unreliable'}), "
        f"{what} ELBO {t['elbo_mc']:.2f}, k̂ mean {t['khat_mean']:.2f}, trained {train_seconds / 60:.0f} min, "
        f"{result['epochs']} epochs ({result['stopped_by']}) → {path}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
