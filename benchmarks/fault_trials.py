"""The kill -9 and two-writer experiments of issue 15, rerun; one table each.

    python benchmarks/fault_trials.py                  # 20 kill trials + 4 scenarios (5-10 min on 2 busy cores)
    python benchmarks/fault_trials.py --trials 6 --seed 1

**kill -9 trials.** ``python -m ppl_vae.fit`` trains the tiny run of ``tests/test_reliability.py``
(300 binary 8x8 images, 8 epochs of 15 steps) and is killed with SIGKILL either at a random time
or (the aimed trials) inside a chosen save: the test hook ``ppl_vae.core.files._before_replace`` holds
the k-th write of a file once its temporary file is complete, before the rename. A random time
is drawn relative to the run's own progress, so that four runs sharing two cores still spread
their kills over the whole run: an epoch e uniform in 0..8, then a delay uniform in [0, 1.5 x
the reference's time per epoch] after epoch e's metrics line appears (e = 0: after start-up, i.e.
``config.json``); epoch e's checkpoint save follows its metrics line, so the kills fall in the
saves, the training steps, the validation and the final summary and figures. Then
``fit --resume`` (``ppl_vae.fit.main`` in this process; ``--overwrite`` instead when the kill came
before the first checkpoint) runs the run to completion, and the run is audited: temporary files
left, epochs lost or duplicated in ``metrics.jsonl``, lines that do not parse, ``checkpoint.pt``
loadable at the last epoch, and every metrics row equal to the reference's
(``train_objective`` to 1e-7 relative, the rest exactly; ``epoch_seconds`` aside). A trial
passes when all of these hold and the resume printed at most one (warning) line.

**Two writers.** A trains in D and is held inside its epoch-3 checkpoint save; B, a separate
``python -m ppl_vae.fit --out D`` (plain, ``--resume``, ``--overwrite``), must exit 2 naming A's
pid and host; A is then released and must finish with exactly the reference's metrics. In the
fourth scenario A is killed -9 while held, after one refused ``--resume``; a second ``--resume``
must then be allowed (the OS dropped the lock) and finish exactly.

The fault driver, the subprocess helper and the tiny settings are those of
``tests/test_reliability.py``. Results go to ``benchmarks/results/fault_trials-*.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import random
import socket
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))
from common import save_result  # noqa: E402
from test_reliability import TINY, cli, finish, spawn, temp_files, write_bits  # noqa: E402

from ppl_vae.core.errors import CheckpointError  # noqa: E402
from ppl_vae.training import checkpoint  # noqa: E402

EPOCHS = 8
#: saves the aimed trials kill inside: (file, its n-th write in the process)
AIMED = [
    ("checkpoint.pt", 1),
    ("checkpoint.pt", 4),
    ("checkpoint.pt", 8),
    ("best.pt", 2),
    ("config.json", 1),
    ("summary.json", 1),
    ("training_curve.png", 1),
]


def until(cond, p, timeout: float = 300) -> bool:
    """Poll ``cond()`` until true (True) or ``p`` exits (False); raise after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        if p.poll() is not None:
            return False
        if time.monotonic() > deadline:
            p.kill()
            raise TimeoutError(f"nothing after {timeout} s: {p.args}")
        time.sleep(0.002)
    return True


def fit_here(argv) -> tuple[int, list[str]]:
    """``ppl_vae.fit.main(argv)`` in this process: its exit code and stderr lines."""
    from ppl_vae.fit import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:
            code = e.code
    return code, err.getvalue().splitlines()


def rows_of(run: Path) -> tuple[list[dict], int]:
    """The metrics rows that parse, and the number of lines that do not."""
    rows, bad = [], 0
    path = run / "metrics.jsonl"
    for line in path.read_text(errors="replace").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:
            bad += 1
    return rows, bad


def same_row(got: dict, want: dict) -> bool:
    g = {k: v for k, v in got.items() if k != "epoch_seconds"}
    w = {k: v for k, v in want.items() if k != "epoch_seconds"}
    return (
        math.isclose(g.pop("train_objective", math.nan), w.pop("train_objective"), rel_tol=1e-7, abs_tol=0)
        and g == w
    )


def audit(run: Path, reference: list[dict]) -> dict:
    """What a finished run holds against the reference rows (see the module docstring)."""
    rows, bad = rows_of(run)
    epochs = [r.get("epoch") for r in rows]
    want = list(range(1, len(reference) + 1))
    try:
        loads = checkpoint.load(run / "checkpoint.pt")["epoch"] == len(reference)
    except CheckpointError:
        loads = False
    return {
        "temps": len(temp_files(run)),
        "lost": sorted(set(want) - set(epochs)),
        "duplicated": len(epochs) - len(set(epochs)),
        "bad_lines": bad,
        "loads": loads,
        "exact": epochs == want and all(map(same_row, rows, reference)),
    }


def complete(a: dict) -> bool:
    return (
        a["temps"] == 0
        and not a["lost"]
        and not a["duplicated"]
        and not a["bad_lines"]
        and a["loads"]
        and a["exact"]
    )


def reference_run(bits: Path, root: Path) -> tuple[list[dict], float]:
    """An uninterrupted run: its metrics rows, and the seconds from the end of start-up to its exit."""
    out = root / "reference"
    p = spawn("--dataset", bits, *TINY, "--epochs", EPOCHS, "--out", out)
    until(lambda: (out / "config.json").exists(), p)
    t0 = time.monotonic()
    r = finish(p)
    assert r.returncode == 0, r.stderr
    return rows_of(out)[0], time.monotonic() - t0


def epochs_logged(out: Path) -> int:
    try:
        return (out / "metrics.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def kill(i: int, bits: Path, root: Path, when: tuple[int, float] | tuple[str, int]) -> dict:
    """Start trial ``i``'s fit and kill it -9: ``when`` = (e, t): t s after epoch e's metrics line
    (epoch 0: the end of start-up), or (NAME, k): inside the k-th save of NAME."""
    out, held = root / f"kill-{i:02d}", root / f"held-{i:02d}"
    aim = when if isinstance(when[0], str) else None
    fault = None if aim is None else {"block": aim[0], "nth": aim[1], "marker": str(held)}
    p = spawn("--dataset", bits, *TINY, "--epochs", EPOCHS, "--out", out, fault=fault)
    if aim is None:
        epoch, delay = when
        reached = until(lambda: (out / "config.json").exists() and epochs_logged(out) >= epoch, p)
        time.sleep(delay)
        when = f"{delay:.2f} s after " + (f"epoch {epoch}'s metrics line" if epoch else "start-up")
    else:
        reached = until(held.exists, p)
        when = f"inside save {aim[1]} of {aim[0]}"
    finished = p.poll() is not None
    p.kill()
    r = finish(p)
    if finished:
        when += (
            f" (it had ended: exit {r.returncode}{', ' + r.stderr.strip()[-80:] if r.stderr.strip() else ''})"
        )
    at_kill = "-"
    if (out / "checkpoint.pt").exists():
        ck = checkpoint.load(out / "checkpoint.pt")
        at_kill = f"{ck['epoch']}" + (f" +{ck['step']} steps" if ck["step"] else "")
    return {
        "trial": i + 1,
        "out": out,
        "kill": when,
        "reached": reached,
        "checkpoint at kill": at_kill,
        "temps after kill": len(temp_files(out)) if out.exists() else 0,
    }


def recover(trial: dict, bits: Path, reference: list[dict]) -> dict:
    """``fit --resume`` (``--overwrite`` when there is no checkpoint yet) in this process, then :func:`audit`."""
    out = trial.pop("out")
    code, err = fit_here(["--out", out, "--resume", "--quiet"])
    how = "--resume"
    if code == 2 and any("no checkpoint.pt" in ln or "holds no run" in ln for ln in err):
        code, err = fit_here(
            ["--dataset", bits, *TINY, "--epochs", EPOCHS, "--out", out, "--overwrite", "--quiet"]
        )
        how = "--overwrite (no checkpoint yet)"
    a = audit(out, reference)
    notes = [ln.split("warning: ", 1)[-1] for ln in err if "warning:" in ln]
    return {
        **trial,
        "recovery": how,
        "exit": code,
        "note": "; ".join(notes)[:70] or "; ".join(err)[:70],
        **a,
        "passed": trial.pop("reached") and code == 0 and complete(a) and len(err) == len(notes) <= 1,
    }


def writers(scenario: str, bits: Path, root: Path, reference: list[dict]) -> dict:
    out = root / f"writers-{scenario.replace(' ', '-')}"
    held, release = root / f"{out.name}.held", root / f"{out.name}.release"
    a = spawn(
        "--dataset",
        bits,
        *TINY,
        "--epochs",
        EPOCHS,
        "--out",
        out,
        fault={"block": "checkpoint.pt", "nth": 3, "marker": str(held), "release": str(release)},
    )
    until(held.exists, a)
    holder = f"pid {a.pid} on {socket.gethostname()}"
    b_args = {
        "plain": ["--dataset", bits, *TINY, "--epochs", EPOCHS, "--out", out, "--quiet"],
        "--overwrite": ["--dataset", bits, *TINY, "--epochs", EPOCHS, "--out", out, "--overwrite", "--quiet"],
    }.get(scenario, ["--out", out, "--resume", "--quiet"])
    b = cli(*b_args)
    refused = b.returncode == 2 and len(b.stderr.splitlines()) == 1 and holder in b.stderr
    if scenario == "--resume after A is killed -9":
        a.kill()
        a_code = finish(a).returncode
        b2 = cli(*b_args)
        ok = refused and b2.returncode == 0 and b2.stderr.count("\n") <= 1
        b_result = f"{b.returncode}, then {b2.returncode}"
    else:
        release.touch()
        a_code = finish(a).returncode
        ok = refused and a_code == 0
        b_result = f"{b.returncode}"
    au = audit(out, reference)
    return {
        "scenario": scenario,
        "B exit": b_result,
        "B says": b.stderr.strip().replace(str(out), "D")[:110],
        "A exit": a_code,
        **au,
        "passed": ok and complete(au),
    }


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "NO"
        if isinstance(v, list):
            return ",".join(map(str, v)) or "0"
        return str(v).replace("|", "/")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20, help="kill -9 trials (default: 20)")
    p.add_argument(
        "--aimed",
        type=int,
        default=len(AIMED),
        help=f"of which aimed at a save through the test hook (default: {len(AIMED)}, at most {len(AIMED)})",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random kill times (default: 0)")
    p.add_argument("--jobs", type=int, default=4, help="fits killed at the same time (default: 4)")
    p.add_argument("--no-writers", action="store_true", help="skip the two-writer scenarios")
    args = p.parse_args(argv)
    warnings.simplefilter("always")  # every trial's repair note is reported, not only the first
    rng = random.Random(args.seed)
    aims = [None] * (args.trials - min(args.aimed, len(AIMED), args.trials)) + AIMED[
        : min(args.aimed, args.trials)
    ]
    rng.shuffle(aims)
    # random kills: after a uniformly drawn epoch's metrics line (the save follows it), by up to 1.5 epochs
    draws = [(rng.randrange(EPOCHS + 1), rng.random()) for _ in aims]
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault_trials-") as tmp:
        root = Path(tmp)
        bits = write_bits(root / "bits.npy")
        reference, window = reference_run(bits, root)
        step = 1.5 * window / (EPOCHS + 1)  # 1.5 times an epoch (and its share of the figures)
        whens = [aim or (e, u * step) for aim, (e, u) in zip(aims, draws)]
        print(f"reference: {EPOCHS} epochs; kill window {window:.2f} s after start-up", flush=True)
        # the kills run --jobs at a time (subprocesses); the resumes one by one, in this process
        with ThreadPoolExecutor(args.jobs) as pool:
            killed = list(pool.map(lambda t: kill(t[0], bits, root, t[1]), enumerate(whens)))
            scenarios = (
                []
                if args.no_writers
                else list(
                    pool.map(
                        lambda s: writers(s, bits, root, reference),
                        ("plain", "--resume", "--overwrite", "--resume after A is killed -9"),
                    )
                )
            )
        kills = [recover(t, bits, reference) for t in killed]
    print()
    print(
        table(
            kills,
            [
                "trial",
                "kill",
                "checkpoint at kill",
                "temps after kill",
                "recovery",
                "exit",
                "temps",
                "lost",
                "duplicated",
                "bad_lines",
                "loads",
                "exact",
                "note",
                "passed",
            ],
        )
    )
    print(
        f"\nkill -9: {sum(k['passed'] for k in kills)}/{len(kills)} passed; temporary files left after the "
        f"resume: {sum(k['temps'] for k in kills)}; epochs lost: {sum(len(k['lost']) for k in kills)}; "
        f"epochs duplicated: {sum(k['duplicated'] for k in kills)}; unparsable lines: "
        f"{sum(k['bad_lines'] for k in kills)}"
    )
    if scenarios:
        print()
        print(
            table(
                scenarios,
                ["scenario", "B exit", "B says", "A exit", "temps", "lost", "duplicated", "exact", "passed"],
            )
        )
        print(f"\ntwo writers: {sum(s['passed'] for s in scenarios)}/{len(scenarios)} passed")
    print(f"({time.monotonic() - t_start:.0f} s)")
    path = save_result(
        "fault_trials", {"epochs": EPOCHS, "seed": args.seed, "kill_trials": kills, "two_writers": scenarios}
    )
    print(f"saved {path}")
    return 0 if all(k["passed"] for k in kills + scenarios) else 1


if __name__ == "__main__":
    sys.exit(main())
