"""How far IWAE_5000 is from log p(x) on a trained model: the table of AIS runs (issue 25).

    python benchmarks/ais_table.py benchmarks/results/ais-*.json

Each input is what one evaluation wrote, the JSON and, beside it with the same stem, its
per-datapoint arrays::

    python -m ppl_vae.evaluate runs/quality-best --split test --subset 1000 --num-samples 5000 \\
        --ais 100 --bdmc 100 --json ais-best-t100-n1000.json --per-datapoint ais-best-t100-n1000.npz

A random ``--subset`` with one ``--seed`` is a prefix of one permutation of the test split, so the
images of a smaller subset are among those of a larger one, and runs pair up image by image
(``index`` in the arrays). Printed, per model (its run directory):

* one row per run: IWAE_5000 and AIS (means ± Monte Carlo SE), the paired difference
  AIS − IWAE_5000 ± its SE across images (std_i / √n of the differences: the SE of the mean
  difference over the whole test split, of which the images are a random sample), acceptance,
  the BDMC bracket's width on simulated data, and the seconds;
* for each pair of runs with different T, AIS_T' − AIS_T on their common images (paired), which
  says whether more steps still move the estimate;
* where ``benchmarks/results/quality-<recipe>-cpu.json`` holds the recipe's IWAE_5000 on its
  whole test split (``test.n`` images: 10,000 on MNIST, 200 on Frey Faces), that NLL less the
  largest-T paired difference: the committed number corrected by AIS, both SEs combined;
  measured directly on the largest-T run's images and, where the lowest-T run has more images,
  chained: its gain plus each paired increment up to the largest T (a smaller SE when the
  increments vary less across images than the gains do).

``--figure F.png`` draws, per model, each estimate less IWAE_5000 on the same images (paired
mean ± SE across images) against its cost per image in passes of the batch through guide and
model: IWAE_k costs k, AIS with T steps × C chains (T − 1) · C · r, r the measured cost of one
transition in passes (``transition_over_iwae_pass`` of the newest ``ais_cost`` result).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def load(path: Path) -> tuple[dict, dict | None]:
    s = json.loads(path.read_text())
    npz = path.with_suffix(".npz")
    return s, (dict(np.load(npz)) if npz.exists() else None)


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
    """mean and std / √n of a − b (per-datapoint arrays of the same images), and n."""
    d = a - b
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan, len(d)


def common(p: dict, q: dict) -> tuple[np.ndarray, np.ndarray]:
    """Positions in p and in q of the images both evaluated (by their index in the split)."""
    _, i, j = np.intersect1d(p["index"], q["index"], return_indices=True)
    return i, j


def row(s: dict) -> str:
    k = s["num_samples"]
    diff = f"**{s['ais_minus_iwae']:+.3f}** ± {s['ais_minus_iwae_stderr_across_datapoints']:.3f}"
    bdmc = f"{s['bdmc_n']}: {max(s['bdmc_gap'], 0.0):.3f}" if s.get("bdmc_n") else "—"
    untrusted = f" ({100 * s['ais_untrusted_frac']:.0f} % flagged)" if s["ais_untrusted_frac"] else ""
    return (
        f"| {s['n']:,} | {s['ais_steps']:,} × {s['ais_chains']} | {'' if k == 5000 else f'(K = {k}) '}"
        f"{s['log_px']:.3f} ± {s['log_px_stderr']:.3f} "
        f"(k̂ > 0.7 on {100 * s['khat_frac_above_0_7']:.0f} %) | {s['ais']:.3f} ± {s['ais_stderr']:.3f}{untrusted} "
        f"| {diff} | {s['ais_accept']:.2f} | {bdmc} | {s['seconds']:.0f} ({s['seconds'] / s['n']:.2f}/image) |"
    )


def transition_cost() -> float:
    """Passes of the batch per AIS transition, as ``benchmarks/ais_cost.py`` last measured it."""
    newest = sorted(RESULTS.glob("ais_cost-*.json"))[-1]
    return json.loads(newest.read_text())["transition_over_iwae_pass"]


def figure(by_model: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = transition_cost()
    fig, axes = plt.subplots(1, len(by_model), figsize=(5.2 * len(by_model), 3.8), squeeze=False)
    for ax, (model, runs) in zip(axes[0], by_model.items()):
        largest = max((x for x in runs if x[1] is not None), key=lambda x: x[0]["n"])
        s, a = largest[0], largest[1]
        ks, ref = a["ks"], a["log_px"]  # IWAE_k on the largest run's images, k = ks, and K = 5000
        d = [paired(a["iwae_by_k"][i], ref) for i in range(len(ks))] + [(0.0, 0.0, s["n"])]
        costs = [*ks, s["num_samples"]]
        ax.errorbar(
            costs,
            [m for m, _, _ in d],
            [se for _, se, _ in d],
            marker="o",
            label=f"IWAE_k ({s['n']:,} images)",
        )
        for s, _, _ in runs:  # the paired gain as evaluate recorded it
            m, se = s["ais_minus_iwae"], s["ais_minus_iwae_stderr_across_datapoints"]
            cost = (s["ais_steps"] - 1) * s["ais_chains"] * r
            ax.errorbar(
                [cost],
                [m],
                [se],
                marker="s",
                ls="",
                label=f"AIS T = {s['ais_steps']:,} × {s['ais_chains']} ({s['n']:,} images)",
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_xscale("log")
        ax.set_title(f"{model}: estimate − IWAE_{largest[0]['num_samples']} (nats, paired)", fontsize=10)
        ax.set_xlabel("passes of guide and model per image")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", type=Path, help="evaluate --ais JSON files (the .npz beside each)")
    p.add_argument("--figure", type=Path, help="also draw the estimates against their cost (PNG)")
    args = p.parse_args(argv)
    by_model: dict[str, list] = {}
    for f in args.files:
        s, per = load(f)
        by_model.setdefault(Path(s["run_dir"]).name.removeprefix("quality-"), []).append((s, per, f))
    for model, runs in by_model.items():
        runs.sort(key=lambda r: (r[0]["ais_steps"], -r[0]["n"]))
        print(f"\n### `{model}`\n")
        print(
            "| images | T × chains | IWAE_5000 | AIS | AIS − IWAE_5000 (paired ± SE across images) "
            "| acceptance | BDMC: simulated images: width | seconds of the whole evaluation (IWAE, AIS, BDMC) |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for s, _, _ in runs:
            print(row(s))
        with_arrays = [r for r in runs if r[1] is not None]
        steps = []  # (mean, se) of each paired increment, in order of T
        for (s1, a, _), (s2, b, _) in zip(with_arrays, with_arrays[1:]):
            if s1["ais_steps"] == s2["ais_steps"]:
                continue
            i, j = common(a, b)
            if len(i):
                m, se, n = paired(b["ais"][j], a["ais"][i])
                steps.append((m, se))
                print(
                    f"\nAIS at T = {s2['ais_steps']:,} − AIS at T = {s1['ais_steps']:,} on their {n:,} common "
                    f"images: {m:+.3f} ± {se:.3f} nats"
                )
        top = max(runs, key=lambda r: (r[0]["ais_steps"], r[0]["n"]))[0]
        gains = [
            (
                top["ais_minus_iwae"],
                top["ais_minus_iwae_stderr_across_datapoints"],
                f"on {top['n']:,} random images",
            )
        ]
        base = with_arrays[0][0] if with_arrays else None
        if base is not None and base["n"] > top["n"] and len(steps) == len(with_arrays) - 1:
            # the gain at the lowest T on the most images, plus each paired increment up to the top T:
            # the SEs of the terms combined as if independent
            g = base["ais_minus_iwae"] + sum(m for m, _ in steps)
            se = math.sqrt(base["ais_minus_iwae_stderr_across_datapoints"] ** 2 + sum(e**2 for _, e in steps))
            gains.append(
                (g, se, f"chained: at T = {base['ais_steps']:,} on {base['n']:,} images, then the increments")
            )
        quality = RESULTS / f"quality-{model}-cpu.json"
        if quality.exists() and top["num_samples"] == 5000:  # the committed number's K
            q = json.loads(quality.read_text())
            print(
                f"\nAll {q['test']['n']:,} test images: IWAE_5000 NLL {q['test_nll']:.3f} ± "
                f"{q['test_nll_stderr']:.3f}; less"
            )
            for g, se_g, how in gains:
                nll, se = q["test_nll"] - g, math.hypot(q["test_nll_stderr"], se_g)
                print(
                    f"- AIS's paired gain at T = {top['ais_steps']:,} ({how}), {g:+.3f} ± {se_g:.3f}: "
                    f"**{nll:.2f} ± {se:.2f}**"
                )
            print("(upper bounds on the NLL still: AIS is a stochastic lower bound on log p(x))")
    if args.figure:
        figure(by_model, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
