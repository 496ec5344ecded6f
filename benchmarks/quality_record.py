"""What ``benchmarks/quality.py`` records of a run, and how a record is checked: the result JSON
(both commands with ``python`` and relative paths, the environment that decides a curve's last
digits, the fit's summary, the evaluation) and ``--check N``, which reruns the first N epochs of a
recorded command and compares them with the committed curve.

(Imported by ``quality.py``, which puts ``benchmarks/`` on ``sys.path`` first, as ``common`` and
``recipes`` are imported as top-level modules.)
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from common import RESULTS, device_name
from recipes import merged, read_curve, result_path

from ppl_vae.training.runs import best_epoch, read_metrics

REPO = Path(__file__).resolve().parents[1]


def relative(cmd: list[str]) -> list[str]:
    """``cmd`` with ``python`` for the interpreter and absolute paths relative to the repository."""
    return [
        "python",
        *(os.path.relpath(a, REPO) if os.path.isabs(a) and os.path.exists(a) else a for a in cmd[1:]),
    ]


def environment() -> dict:
    """What decides a curve's last digits: the commit (``dirty`` when ppl_vae/ or the scripts
    of benchmarks/ differ from it), torch's thread count (``OMP_NUM_THREADS``; the fit subprocess inherits this
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
        "dirty": bool(git("status", "--porcelain", "--", "ppl_vae", "benchmarks/*.py")),  # not results/
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
    import torch

    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    kind = "cuda" if cuda else "cpu"  # as the run's JSON was named
    result = result_path(recipe, seed, split, kind, RESULTS, out if quick else None)
    if not result.exists():
        sys.exit(f"quality.py: error: --check: no recorded result {result} (--split valid for a candidate)")
    recorded = json.loads(result.read_text())
    if quick:  # the run being checked is --out's own quick run
        curve = read_metrics(out)
    else:
        curve = read_curve(result)
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
