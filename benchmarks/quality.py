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
as ``...-metrics.jsonl``. ``--figure`` draws one figure per data set, and one of the record
candidates on validation.

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

A fit cut short (the session that ran it ended) continues with ``--resume``: from its last
checkpoint, bit for bit, for what is left of ``--time-limit``; then the evaluation and the JSON
follow as usual, with ``resumed_with`` naming the command that finished the fit::

    python benchmarks/quality.py best-paper --split valid --resume --time-limit 110
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402
from quality_commands import (  # noqa: E402
    data_flags,
    evaluate_command,
    fit_command,
    quick_data,
    resume_fit,
    run,
    source_run,
)
from quality_figure import candidates_figure, figure, figure_path  # noqa: E402
from quality_record import check, relative, summarize  # noqa: E402
from recipes import CANDIDATES, RECIPES, dataset_of, result_path, run_dir, source_of  # noqa: E402


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
    p.add_argument(
        "--resume",
        action="store_true",
        help="finish a fit that was cut short (a killed session): continue --out from its checkpoint.pt "
        "for what is left of --time-limit, then evaluate and record it as usual",
    )
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
        "FOLDER/quality-DATASET.png for the others) and the record candidates on validation "
        "(FOLDER/quality-candidates.png); default folder: docs/figures; then exit",
    )
    a = p.parse_args(argv)
    if a.figure is not None:
        done = {dataset_of(json.loads(r.read_text())) for r in RESULTS.glob("quality-*-*.json")}
        for dataset in sorted(done):
            figure(figure_path(dataset, a.figure), dataset=dataset)
        for kind in sorted({p.stem.rsplit("-", 1)[1] for p in RESULTS.glob("valid-*-*.json")}):
            suffix = "" if kind == "cpu" else f"-{kind}"  # the record candidates, validation only
            candidates_figure(a.figure / f"quality-candidates{suffix}.png", kind=kind)
        return 0
    if a.recipe is None:
        p.error("name a recipe, or pass --figure")
    if a.resume and (a.evaluate_only or a.check is not None):
        p.error("--resume finishes a fit; it goes with neither --evaluate-only nor --check")
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
    resumed = None
    if a.evaluate_only:
        fit = json.loads((out / "quality-fit.json").read_text())
        fit_cmd, train_seconds, resumed = fit["fit_command_argv"], fit["train_seconds"], fit.get("resumed")
    else:
        if a.resume:
            train_seconds, resumed = resume_fit(out, fit_cmd, a.time_limit)
        else:
            train_seconds = run(fit_cmd)
        fit = {"fit_command_argv": fit_cmd, "train_seconds": train_seconds, "resumed": resumed}
        (out / "quality-fit.json").write_text(json.dumps(fit) + "\n")
    eval_seconds = run(eval_cmd)
    result = summarize(a.recipe, out, fit_cmd, eval_cmd, train_seconds, eval_seconds, a.quick, split)
    result.update(dataset=dataset, seed=a.seed)
    if resumed is not None:  # the fit was finished by --resume; train_seconds sums the epochs' seconds
        result["resumed_with"] = [shlex.join(relative(c)) for c in resumed]
    kind = result["device"].split(":")[0]
    path = result_path(a.recipe, a.seed, split, kind, RESULTS, out if a.quick else None)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if not a.quick:  # the curve beside it (recipes.read_curve)
        shutil.copyfile(out / "metrics.jsonl", path.with_name(f"{path.stem}-metrics.jsonl"))
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
