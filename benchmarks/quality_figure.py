"""The figures of ``benchmarks/quality.py --figure``: per data set, every committed recipe's
validation bound against wall-clock training minutes, with its test number at its best epoch and
the published rows as lines; and the record candidates (issue 27) against their baseline, on the
validation split only.

(Imported by ``quality.py`` and the tests, which put ``benchmarks/`` on ``sys.path`` first, as
``common`` and ``recipes`` are imported as top-level modules.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from common import RESULTS
from recipes import CANDIDATES, DATASETS, dataset_of, read_curve, result_path, source_of

from ppl_vae.training.runs import selection_bound

#: the record's baseline on validation (docs/benchmarks.md, "Towards 83.0"): recipe ``best``'s
#: committed curve with its validation IWAE_1000 as ``quality.py best --evaluate-only --split valid``
#: writes it (``valid-best-KIND.json``), else as ``python -m ppl_vae.evaluate runs/quality-best
#: --split valid --num-samples 1000`` wrote it before that command existed
BASELINE = "best"
RECORD_RECIPE = "best-paper-optimizer-iaf"  # the winner of round 1: round 2's baseline


def label(res: dict) -> str:
    seed, source = res.get("seed", 0), source_of(res["recipe"])
    return f"{res['recipe']}{f' seed {seed}' if seed else ''}{f' from {source}' if source else ''} ({res['device']})"


def kind_of(res: dict) -> str:
    """The device kind of a result (cpu or cuda), as its file is named."""
    return res["device"].split(":")[0]


def start_minutes(res: dict, results: Path) -> float:
    """Where a run's curve starts on the time axis: 0, or for a fine-tuning run the training
    minutes of the recipe it started from (its committed result on the same device): the wall
    clock of the whole recipe, whichever epoch of the source it started from."""
    source = source_of(res["recipe"])
    path = result_path(source, 0, "test", kind_of(res), results) if source else None
    return json.loads(path.read_text())["train_seconds"] / 60 if path and path.exists() else 0.0


def wall_minutes(rows: list[dict], res: dict, results: Path) -> np.ndarray:
    """The wall-clock minute at which each epoch of a run ended ``[epochs]``: its epochs' step
    seconds, stretched to its recorded training seconds (validation, saves), after
    :func:`start_minutes`."""
    minutes = np.cumsum([r["epoch_seconds"] for r in rows]) / 60  # training steps only
    return minutes * (res["train_seconds"] / 60 / minutes[-1]) + start_minutes(res, results)


def _axes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(9, 5))


def _draw(ax, i: int, minutes, bound, name: str, what: str, marker: tuple, err: float, marked: str) -> None:
    """One run: its validation bound per epoch (a line) and one number of best.pt at its epoch's
    time (a marker, ± ``err``), in colour ``C{i}``."""
    ax.plot(minutes, bound, color=f"C{i}", lw=1, alpha=0.7, label=f"{name}: validation {what}")
    ax.errorbar([marker[0]], [marker[1]], yerr=[err], fmt="o", color=f"C{i}", ms=6, label=f"{name}: {marked}")


def _save(fig, ax, path: Path, ylabel: str, title: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_xlabel("training time (minutes, wall clock)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # below the axis and its label, in two columns: the curves stay clear; savefig's tight box keeps it
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote {path}")


def figure(
    path: Path, results: Path = RESULTS, dataset: str = "binarized-mnist"
) -> dict[str, tuple[float, float]]:
    """Every committed recipe of ``dataset`` on one time axis: the validation bound per epoch
    against cumulative training minutes (lines) and the test number of best.pt at its epoch's time
    (markers, ±2 SE), in nats per datapoint (log p(x)) or, for a bits/dim data set, bits per
    dimension (−log p(x) / (D ln 2)). Returns each marker, ``{"recipe (device)": (minutes, y)}``."""
    info = DATASETS[dataset]
    bits = info["unit"] == "bits/dim"
    fig, ax = _axes()
    markers, ys = {}, []
    paths = sorted(results.glob("quality-*-*.json"))
    for i, res_path in enumerate(p for p in paths if dataset_of(json.loads(p.read_text())) == dataset):
        res = json.loads(res_path.read_text())
        rows = read_curve(res_path)  # the run's metrics, committed beside it
        minutes = wall_minutes(rows, res, results)  # [epochs]
        to_y = (lambda nats: -nats / (res["test"]["dim"] * np.log(2))) if bits else (lambda nats: nats)
        bound = [to_y(selection_bound(r)) for r in rows]
        name = label(res)
        best = res["best_epoch"] or len(rows)  # the parameters evaluated: best.pt, chosen on validation
        markers[name] = (minutes[best - 1], to_y(-res["test_nll"]))
        ys += [markers[name][1], bound[best - 1]]
        _draw(
            ax,
            i,
            minutes,
            bound,
            name,
            "IWAE_k" if "valid_iwae_k" in rows[0] else "ELBO",
            markers[name],
            abs(to_y(2 * res["test_nll_stderr"])),
            f"test {'bits/dim' if bits else 'log p(x)'} ≈ IWAE_{res['test']['num_samples']} "
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
    if dataset == "binarized-mnist":
        ax.set_ylim(-100, -82)
    elif ys:  # the markers, the curves at their best epochs and the published rows, with room
        lo, hi = min(ys), max(ys)
        pad = 0.5 * (hi - lo) + (0.05 if bits else 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    what = "test bits/dim" if bits else "test log p(x)"
    ylabel = "bits per dimension (lower is better)" if bits else "nats per datapoint"
    _save(fig, ax, path, ylabel, f"{info['title']}: validation bound while training, {what}")
    return markers


def figure_path(dataset: str, folder: Path = Path("docs/figures")) -> Path:
    """docs/figures/quality.png for static binarized MNIST, quality-DATASET.png for the others."""
    return folder / ("quality.png" if dataset == "binarized-mnist" else f"quality-{dataset}.png")


def baseline(results: Path, kind: str) -> tuple[dict, Path] | None:
    """``best`` as a candidate result and the result file its curve is beside: ``valid-best-KIND.json``,
    else its recipe JSON with ``valid_nll`` and ``valid`` from evaluate's JSON (None when neither
    is committed)."""
    own = result_path(BASELINE, 0, "valid", kind, results)
    if own.exists():
        return json.loads(own.read_text()), own
    recipe = result_path(BASELINE, 0, "test", kind, results)
    evaluated = results / f"eval-quality-{BASELINE}-valid-k1000-{kind}.json"
    if not (recipe.exists() and evaluated.exists()):
        return None
    valid = json.loads(evaluated.read_text())
    extra = {"valid_nll": -valid["log_px"], "valid_nll_stderr": valid["log_px_stderr"], "valid": valid}
    return json.loads(recipe.read_text()) | extra, recipe


def candidates_figure(
    path: Path, results: Path = RESULTS, kind: str = "cpu"
) -> dict[str, tuple[float, float]]:
    """The record candidates of one device ``kind`` (``valid-RECIPE-KIND.json``, recipes in
    ``CANDIDATES``) and their baseline on one time axis: each run's validation ELBO per epoch (lines;
    every run records it, whatever its objective, so the lines share a scale) and its validation
    log p(x) ≈ IWAE_1000 at its best epoch (markers, ±2 SE), the one number the rule compares; a
    dashed line marks the baseline's, a dotted one the record's (round 2's bar). A fine-tuning
    candidate's line starts where its source's training ended (:func:`start_minutes`). Returns
    each marker, ``{"recipe (device)": (minutes, log p(x))}``."""
    runs = [(json.loads(p.read_text()), p) for p in sorted(results.glob(f"valid-*-{kind}.json"))]
    runs = [(res, p) for res, p in runs if res["recipe"] in CANDIDATES]
    base = baseline(results, kind)
    fig, ax = _axes()
    markers = {}
    for i, (res, res_path) in enumerate(([base] if base else []) + runs):
        rows = read_curve(res_path)
        minutes = wall_minutes(rows, res, results)  # [epochs]
        name, best = label(res), res["best_epoch"] or len(rows)
        markers[name] = (minutes[best - 1], -res["valid_nll"])
        _draw(
            ax,
            i,
            minutes,
            [r["valid_elbo"] for r in rows],
            name,
            "ELBO",
            markers[name],
            2 * res["valid_nll_stderr"],
            f"validation log p(x) ≈ IWAE_{res['valid']['num_samples']} of best.pt (epoch {best}), "
            f"{markers[name][1]:.3f}",
        )
        if base and res is base[0]:
            ax.axhline(markers[name][1], color=f"C{i}", ls="--", lw=0.8)
        elif res["recipe"] == RECORD_RECIPE:  # the bar of round 2's candidates
            ax.axhline(markers[name][1], color=f"C{i}", ls=":", lw=0.8)
    ax.set_ylim(-92, -83)
    _save(
        fig,
        ax,
        path,
        "nats per datapoint, validation split",
        "Record candidates on static binarized MNIST, validation only: a candidate wins with its "
        "marker above the dashed line (best's; round 2: the dotted one, the record's)",
    )
    return markers
