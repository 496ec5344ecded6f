"""A mutation probe of the core math and the training loop (issue 23, point 5): do the tests
notice when one line of it is wrong?

    python benchmarks/mutation_probe.py                 # every mutant, then the table (~10-20 min on 2 busy cores)
    python benchmarks/mutation_probe.py --only 5 7      # some of them (by number or name)
    python benchmarks/mutation_probe.py --list          # the mutations, nothing run

Each mutation is one small change of one line (``original`` fragment → ``mutated``) that changes
what the code computes, with the test files that cover that module. It is applied to a scratch
copy of the repository's ``ppl_vae/``, ``tests/`` and ``pyproject.toml`` (the working tree is never
touched, so the probe can run while others edit it), and the listed files' fast tests run on the
copy::

    OMP_NUM_THREADS=1 python -m pytest -q -x -p no:cacheprovider -m "not slow" FILES

with the copy as the working directory and as ``PYTHONPATH`` (so the mutant is what ``import
ppl_vae`` finds, in subprocesses too; checked for each mutant). The outcome of a mutant is

* ``caught``: a test failed (or errored): the mutation is noticed;
* ``missed``: the tests passed: the mutation went unnoticed, a test is owed;
* ``timeout``: the tests ran past ``--timeout`` (counted apart; a hang is noticed, but slowly);
* ``broken``: the mutation did not apply (the fragment is not in the file, or not once): a bug of
  this probe, to be fixed by updating the fragment.

Before the mutants, the unmutated copy runs every listed test file once (``--no-baseline`` skips
it): a test failing there would make every mutant look caught. The table goes to stdout and the
results to ``benchmarks/results/mutation_probe-<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTEST = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not slow"]


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to ppl_vae/
    original: str  # must occur exactly once in the file
    mutated: str
    why: str
    tests: tuple[str, ...]  # files under tests/


MUTATIONS = [
    Mutation(
        "batch-drops-an-index",
        "training/train.py",
        "idx = s.perm[s.step * b : (s.step + 1) * b]",
        "idx = s.perm[s.step * b : (s.step + 1) * b - 1]",
        "each step trains on B − 1 of its B indices: some training points are never seen",
        ("test_training_oracles.py",),
    ),
    Mutation(
        "loss-gets-cfg-beta",
        "training/train.py",
        "self.step_fn(mine, beta_at(cfg, s.epoch, s.step, steps), weight)",
        "self.step_fn(mine, cfg.beta, weight)",
        "the KL warm-up is logged but never applied: the loss always gets the final β",
        ("test_training_oracles.py",),
    ),
    Mutation(
        "no-zero-grad",
        "training/train.py",
        "    optim.zero_grad(set_to_none=True)\n",
        "    pass  # (mutant: optim.zero_grad removed)\n",
        "gradients accumulate over steps: each update uses the sum of all past gradients",
        ("test_training_oracles.py", "test_train_step.py"),
    ),
    Mutation(
        "warmup-off-by-one-step",
        "training/optim.py",
        "t = (epoch * steps_per_epoch + step + 1) / (cfg.kl_warmup * steps_per_epoch)",
        "t = (epoch * steps_per_epoch + step) / (cfg.kl_warmup * steps_per_epoch)",
        "β is one step late: 0 on the very first step, and short of β at the end of the warm-up",
        ("test_training_oracles.py", "test_schedules.py"),
    ),
    Mutation(
        "weight-plus-log-q",
        "inference/replay.py",
        "latent_mc = latent_mc + log_p - log_q",
        "latent_mc = latent_mc + log_p + log_q",
        "log w = log p(x, z) + log q(z|x): every ELBO and IWAE is wrong",
        ("test_estimators.py",),
    ),
    Mutation(
        "per-datapoint-sums-data-dim",
        "inference/replay.py",
        "other = [d for d in range(enum_dims + 1, lp.dim()) if d != n_dim]",
        "other = [d for d in range(enum_dims + 1, lp.dim())]",
        "the data dim is summed too: every datapoint gets the batch's total",
        ("test_estimators.py",),
    ),
    Mutation(
        "per-datapoint-averages-other-plates",
        "inference/replay.py",
        "lp = lp.sum(other, keepdim=True)",
        "lp = lp.mean(other, keepdim=True)",
        "nested plates inside the data plate are averaged, not summed: the density of a "
        "datapoint with several plated parts is divided by their number",
        ("test_estimators.py",),
    ),
    Mutation(
        "iwae-without-log-k",
        "inference/running.py",
        "self.values.update(lse - math.log(self.k))",
        "self.values.update(lse)",
        "IWAE_k = log Σ w_k instead of log (1/k) Σ w_k: too high by log k, no longer a bound",
        ("test_estimators.py",),
    ),
    Mutation(
        "delta-stderr-k-not-k-minus-1",
        "inference/running.py",
        "var = (ratio - 1).clamp_min(0) / (k - 1) if k > 1",
        "var = (ratio - 1).clamp_min(0) / k if k > 1",
        "the delta-method variance divides by K, not K − 1 (the sample variance of the weights is biased)",
        ("test_estimators.py",),
    ),
    Mutation(
        "delta-stderr-no-sqrt",
        "inference/running.py",
        "return Estimate(self.values.mean, torch.as_tensor(self.delta_var).sqrt())",
        "return Estimate(self.values.mean, torch.as_tensor(self.delta_var))",
        "IWAE_K's stderr is the variance, not the standard deviation",
        ("test_estimators.py",),
    ),
    Mutation(
        "iwae-loss-unscaled",
        "inference/objectives.py",
        "return -bound.sum() * ((size or n) / n)",
        "return -bound.sum()",
        "the IWAE loss of a minibatch is no longer scaled to the dataset: size / N off, "
        "e.g. the loss no longer comparable to the ELBOs' and weight decay relatively stronger",
        ("test_objectives.py",),
    ),
    Mutation(
        "khat-threshold-0.8",
        "inference/psis.py",
        "return min(1.0 - 1.0 / math.log10(num_samples), 0.7)",
        "return min(1.0 - 1.0 / math.log10(num_samples), 0.8)",
        "k̂ up to 0.8 passes as reliable at large K (Vehtari et al. cap it at 0.7)",
        ("test_psis.py",),
    ),
    Mutation(
        "bernoulli-softplus-abs",
        "programs/likelihoods.py",
        "softplus = e.add_(1).log_().add_(logits.clamp_min(0))",
        "softplus = e.add_(1).log_().add_(logits.abs())",
        "softplus(l) = log(1 + e^{−|l|}) + |l| instead of + max(l, 0): wrong for every negative logit",
        ("test_likelihoods.py",),
    ),
    Mutation(
        "guide-scale-exp-logvar",
        "programs/guides.py",
        "    def forward(self, z_loc: torch.Tensor, z_logvar: torch.Tensor) -> dist.Distribution:\n"
        "        return dist.Normal(z_loc, torch.exp(0.5 * z_logvar)).to_event(1)",
        "    def forward(self, z_loc: torch.Tensor, z_logvar: torch.Tensor) -> dist.Distribution:\n"
        "        return dist.Normal(z_loc, torch.exp(z_logvar)).to_event(1)",
        "the diagonal guide's σ = exp(log σ²) = σ²: the encoder's log-variance head means something "
        "else than what encode() and the docs say",
        ("test_model.py", "test_programs.py"),
    ),
    Mutation(
        "conditional-prior-scale-exp-logvar",
        "programs/priors.py",
        "scale = torch.exp(0.5 * logvar)",
        "scale = torch.exp(logvar)",
        "p(z1 | z2)'s σ = exp(log σ²) in a two-layer model",
        ("test_programs.py", "test_hierarchies.py"),
    ),
    Mutation(
        "collapse-kl-floor-flipped",
        "reports/collapse.py",
        "(k is not None and k < KL_FLOOR)",
        "(k is not None and k > KL_FLOOR)",
        "a layer paying more than 1 nat is called collapsed, a collapsed one is not",
        ("test_collapse.py",),
    ),
    Mutation(
        "order-rule-superset",
        "inference/checks.py",
        "if not set(shared[:i]) <= set(guide_order[: guide_order.index(s)]):",
        "if not set(shared[:i]) >= set(guide_order[: guide_order.index(s)]):",
        "the order rule tested the wrong way round: a closed-form KL where p(z_s | ·) reads a latent "
        "the guide draws after z_s (a wrong analytic ELBO), Monte Carlo where closed form is valid",
        ("test_generic_programs.py",),
    ),
    Mutation(
        "ais-weight-takes-beta-not-its-increment",
        "inference/ais.py",
        "log_w = log_w + (betas[t] - betas[t - 1]) * pt.ell",
        "log_w = log_w + betas[t] * pt.ell",
        "the AIS weight adds β_t log r instead of (β_t − β_{t−1}) log r: no longer an estimate of p(x)",
        ("test_ais.py",),
    ),
    Mutation(
        "hmc-accepts-the-energy-rise",
        "inference/hmc.py",
        "log_a = h0 - energy(p1, mom)  # (K, N)",
        "log_a = energy(p1, mom) - h0  # (K, N)",
        "the Metropolis test inverted: proposals that lower the energy are rejected (a chain that no "
        "longer leaves its f_β invariant)",
        ("test_ais.py",),
    ),
]


def scratch_copy(dest: Path) -> Path:
    """``ppl_vae/``, ``tests/`` and ``pyproject.toml`` of the repository under ``dest/repo``."""
    root = dest / "repo"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "ppl_vae", root / "ppl_vae", ignore=skip)
    shutil.copytree(REPO / "tests", root / "tests", ignore=skip)
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def apply(root: Path, m: Mutation) -> str | None:
    """Mutate ``root/ppl_vae/m.file``; the reason it could not be, or None."""
    path = root / "ppl_vae" / m.file
    if not path.exists():
        return f"no file ppl_vae/{m.file}"
    text = path.read_text()
    found = text.count(m.original)
    if found != 1:
        return f"the fragment occurs {found} times in ppl_vae/{m.file} (must be once)"
    path.write_text(text.replace(m.original, m.mutated))
    return None


def env_for(root: Path) -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(root), PYTHONDONTWRITEBYTECODE="1")
    return env


def imports_from(root: Path) -> str:
    """Where ``ppl_vae`` is found with the tests' working directory and environment."""
    probe = "import importlib.util; print(importlib.util.find_spec('ppl_vae').origin)"
    r = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, env=env_for(root), capture_output=True, text=True
    )
    return r.stdout.strip()


def run_tests(root: Path, tests, timeout: float) -> dict:
    """The fast tests of ``tests`` on the copy at ``root``: outcome, seconds, the failing test."""
    cmd = [*PYTEST, *(f"tests/{t}" for t in tests)]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, cwd=root, env=env_for(root), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "outcome": "timeout",
            "seconds": round(time.monotonic() - t0, 1),
            "rc": None,
            "by": None,
            "summary": "",
        }
    seconds = round(time.monotonic() - t0, 1)
    out = r.stdout + r.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    summary = [ln for ln in out.splitlines() if ln.strip()][-1:] or [""]
    return {
        "outcome": "missed" if r.returncode == 0 else "caught",
        "seconds": seconds,
        "rc": r.returncode,
        "by": failed[0] if failed else None,
        "summary": summary[0].strip("= "),
        **({"tail": out[-3000:]} if r.returncode not in (0, 1) else {}),
    }


def select(names) -> list[tuple[int, Mutation]]:
    numbered = list(enumerate(MUTATIONS, 1))
    if not names:
        return numbered
    return [(i, m) for i, m in numbered if str(i) in names or m.name in names]


def table(rows) -> str:
    lines = [f"{'#':>2}  {'mutation':<38} {'file':<24} {'outcome':<8} {'s':>6}  caught by"]
    for r in rows:
        by = r.get("by") or r.get("reason") or ("—" if r["outcome"] == "missed" else "")
        lines.append(
            f"{r['n']:>2}  {r['name']:<38} {r['file']:<24} {r['outcome']:<8} {r.get('seconds', 0):>6.1f}  {by}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", default=None, help="numbers or names of the mutations to run")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for one mutant's tests")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated copy")
    p.add_argument("--no-save", action="store_true", help="print the table, write no JSON")
    p.add_argument("--list", action="store_true", help="list the mutations and exit")
    p.add_argument("--note", default=None, help="a line recorded in the results JSON")
    args = p.parse_args(argv)
    chosen = select(args.only)
    if args.list:
        for i, m in chosen:
            print(f"{i:>2} {m.name} ({m.file}; tests: {', '.join(m.tests)})\n   {m.why}")
        return 0
    started = time.monotonic()
    baseline = None
    with tempfile.TemporaryDirectory(prefix="mutation-probe-") as tmp:
        if not args.no_baseline:
            root = scratch_copy(Path(tmp) / "baseline")
            files = sorted({t for _, m in chosen for t in m.tests})
            baseline = {"tests": files, **run_tests(root, files, args.timeout * len(files))}
            baseline["outcome"] = {"missed": "passed", "caught": "failed"}.get(baseline["outcome"], "timeout")
            print(
                f"baseline (unmutated): {baseline['summary'] or baseline['outcome']} ({baseline['seconds']} s)"
            )
            if baseline["outcome"] != "passed":
                print(baseline.get("tail") or baseline.get("by"), file=sys.stderr)
                print("the unmutated tests do not pass: the probe would mean nothing", file=sys.stderr)
                return 1
        rows = []
        for i, m in chosen:
            root = scratch_copy(Path(tmp) / f"m{i}")
            row = {"n": i, **asdict(m), "tests": list(m.tests)}
            reason = apply(root, m)
            if reason is None and imports_from(root) != str(root / "ppl_vae" / "__init__.py"):
                reason = f"ppl_vae is not imported from the mutated copy ({imports_from(root)})"
            if reason is not None:
                row.update(outcome="broken", reason=reason, seconds=0.0)
            else:
                row.update(run_tests(root, m.tests, args.timeout))
            rows.append(row)
            by = row.get("by") or row.get("reason") or ""
            print(f"{i:>2} {m.name}: {row['outcome']} ({row['seconds']} s) {by}", flush=True)
            shutil.rmtree(root.parent, ignore_errors=True)
    total = round(time.monotonic() - started, 1)
    print()
    print(table(rows))
    counts = {k: sum(r["outcome"] == k for r in rows) for k in ("caught", "missed", "timeout", "broken")}
    print(f"\n{', '.join(f'{v} {k}' for k, v in counts.items())} of {len(rows)}; {total} s in all")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"mutation_probe-{time.strftime('%Y%m%d')}.json"
        payload = {
            "commit": _git("rev-parse", "HEAD"),
            "dirty": bool(_git("status", "--porcelain", "--", "ppl_vae", "tests")),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "command": "python benchmarks/mutation_probe.py"
            + (" " + " ".join(argv or sys.argv[1:])).rstrip(),
            "pytest": " ".join(PYTEST[1:]) + " FILES (OMP_NUM_THREADS=1)",
            "total_seconds": total,
            **({"note": args.note} if args.note else {}),
            "counts": counts,
            "baseline": baseline,
            "mutants": rows,
        }
        path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
        print(f"wrote {path.relative_to(REPO)}")
    return 0 if counts["broken"] == 0 else 1


def _git(*args) -> str:
    r = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
