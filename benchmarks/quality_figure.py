"""The figures of ``benchmarks/quality.py --figure``: per data set, every committed recipe's
validation bound against wall-clock training minutes, with its test number at its best epoch and
the published rows as lines; and the record candidates (issue 27) against their baseline, on the
validation split only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import RESULTS
from recipes import DATASETS, dataset_of, result_stem, source_of

from ppl_vae.training.runs import selection_bound


def label(res: dict) -> str:
    seed, source = res.get("seed", 0), source_of(res["recipe"])
    return f"{res['recipe']}{f' seed {seed}' if seed else ''}{f' from {source}' if source else ''} ({res['device']})"


def start_minutes(res: dict, results: Path) -> float:
    """Where a run's curve starts on the time axis: 0, or for a fine-tuning run the training
    minutes of the recipe it started from (its committed result on the same device)."""
    source = source_of(res["recipe"])
    path = results / f"{result_stem(source, 0)}-{res['device'].split(':')[0]}.json" if source else None
    return json.loads(path.read_text())["train_seconds"] / 60 if path and path.exists() else 0.0


def wall_minutes(rows: list[dict], res: dict, results: Path) -> np.ndarray:
    """The wall-clock minute at which each epoch of a run ended ``[epochs]``: its epochs' step
    seconds, stretched to its recorded training seconds (validation, saves), after
    :func:`start_minutes`."""
    minutes = np.cumsum([r["epoch_seconds"] for r in rows]) / 60  # training steps only
    return minutes * (res["train_seconds"] / 60 / minutes[-1]) + start_minutes(res, results)


def read_curve(result_path: Path) -> list[dict]:
    """The metrics rows committed beside a result JSON (``...-metrics.jsonl``)."""
    curve = result_path.with_name(result_path.stem + "-metrics.jsonl")
    return [json.loads(line) for line in curve.read_text().splitlines()]


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
        rows = read_curve(res_path)  # the run's metrics, committed beside it
        minutes = wall_minutes(rows, res, results)  # [epochs]
        to_y = (lambda nats: -nats / (res["test"]["dim"] * np.log(2))) if bits else (lambda nats: nats)
        bound = [to_y(selection_bound(r)) for r in rows]
        name = label(res)
        ax.plot(
            minutes,
            bound,
            color=f"C{i}",
            lw=1,
            alpha=0.7,
            label=f"{name}: validation {'IWAE_k' if 'valid_iwae_k' in rows[0] else 'ELBO'}",
        )
        best = res["best_epoch"] or len(rows)  # the parameters evaluated: best.pt, chosen on validation
        markers[name] = (minutes[best - 1], to_y(-res["test_nll"]))
        ys += [markers[name][1], bound[best - 1]]
        ax.errorbar(
            *([v] for v in markers[name]),
            yerr=[abs(to_y(2 * res["test_nll_stderr"]))],
            fmt="o",
            color=f"C{i}",
            ms=6,
            label=f"{name}: test {'bits/dim' if bits else 'log p(x)'} ≈ IWAE_{res['test']['num_samples']} "
            f"of best.pt (epoch {best}), {markers[name][1]:.{3 if bits else 2}f}",
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


#: the record's baseline on validation (docs/benchmarks.md, "Towards 83.0"): recipe ``best``'s
#: committed curve, and its validation IWAE_1000 as ``python -m ppl_vae.evaluate runs/quality-best
#: --split valid --num-samples 1000`` wrote it (``quality.py best --evaluate-only --split valid``
#: writes the same number as ``valid-best-DEVICE.json``, which is preferred when committed)
BASELINE = "best"


def baseline(results: Path, kind: str = "cpu") -> dict | None:
    """``best`` as a candidate result: its recipe JSON with ``valid_nll`` and ``valid`` from its
    validation evaluation (None when either is not committed)."""
    own = results / f"valid-{BASELINE}-{kind}.json"
    if own.exists():
        return json.loads(own.read_text()) | {"_curve": str(results / f"quality-{BASELINE}-{kind}.json")}
    recipe, evaluated = (
        results / f"quality-{BASELINE}-{kind}.json",
        results / f"eval-quality-{BASELINE}-valid-k1000-{kind}.json",
    )
    if not (recipe.exists() and evaluated.exists()):
        return None
    valid = json.loads(evaluated.read_text())
    res = json.loads(recipe.read_text())
    return res | {
        "valid_nll": -valid["log_px"],
        "valid_nll_stderr": valid["log_px_stderr"],
        "valid": valid,
        "_curve": str(recipe),
    }


def candidates_figure(path: Path, results: Path = RESULTS) -> dict[str, tuple[float, float]]:
    """The record candidates (``valid-RECIPE-DEVICE.json``) and their baseline on one time axis:
    each run's validation ELBO per epoch (lines; every run records it, whatever its objective, so
    the lines share a scale) and its validation log p(x) ≈ IWAE_1000 at its best epoch (markers,
    ±2 SE), the one number the rule compares; a dashed line marks the baseline's. A fine-tuning
    candidate's line starts where its source's training ended. Returns each marker,
    ``{"recipe (device)": (minutes, log p(x))}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [json.loads(p.read_text()) | {"_curve": str(p)} for p in sorted(results.glob("valid-*-*.json"))]
    runs = [r for r in runs if r["recipe"] != BASELINE]
    base = baseline(results)
    fig, ax = plt.subplots(figsize=(9, 5))
    markers = {}
    for i, res in enumerate(([base] if base else []) + runs):
        rows = read_curve(Path(res["_curve"]))
        minutes = wall_minutes(rows, res, results)  # [epochs]
        name = label(res)
        ax.plot(
            minutes,
            [r["valid_elbo"] for r in rows],
            color=f"C{i}",
            lw=1,
            alpha=0.7,
            label=f"{name}: validation ELBO",
        )
        best = res["best_epoch"] or len(rows)
        markers[name] = (minutes[best - 1], -res["valid_nll"])
        ax.errorbar(
            [markers[name][0]],
            [markers[name][1]],
            yerr=[2 * res["valid_nll_stderr"]],
            fmt="o",
            color=f"C{i}",
            ms=6,
            label=f"{name}: validation log p(x) ≈ IWAE_{res['valid']['num_samples']} of best.pt (epoch {best}), "
            f"{markers[name][1]:.3f}",
        )
        if res is base:
            ax.axhline(markers[name][1], color=f"C{i}", ls="--", lw=0.8)
    ax.set_xlabel("training time (minutes, wall clock)")
    ax.set_ylabel("nats per datapoint, validation split")
    ax.set_ylim(-92, -83)
    ax.set_title(
        "Record candidates on static binarized MNIST, validation only: a candidate wins with its "
        "marker above the dashed line (best's)",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")
    return markers
