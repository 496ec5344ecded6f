"""The kill -9 and two-writer experiments of issue 15 and the consistency cases of issue 28,
rerun; one table each.

    python benchmarks/fault_trials.py          # 20 kill trials + 4 scenarios + 8 cases (6-12 min on 2 busy cores)
    python benchmarks/fault_trials.py --trials 6 --seed 1 --no-consistency

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
loadable at the last epoch, every metrics row equal to the reference's
(``train_objective`` to 1e-7 relative, the rest exactly; ``epoch_seconds`` aside), and
``best.pt`` holding what ``checkpoint.pt`` records (:mod:`ppl_vae.training.best`), as
``summary.json`` says. A trial passes when all of these hold and the resume printed at most one
(warning) line.

**Two writers.** A trains in D and is held inside its epoch-3 checkpoint save; B, a separate
``python -m ppl_vae.fit --out D`` (plain, ``--resume``, ``--overwrite``), must exit 2 naming A's
pid and host; A is then released and must finish with exactly the reference's metrics. In the
fourth scenario A is killed -9 while held, after one refused ``--resume``; a second ``--resume``
must then be allowed (the OS dropped the lock) and finish exactly.

**Consistency (issue 28).** Each case once, on copies of a 2-epoch tiny run (``--epochs 4`` to
finish, checked against the reference's first 4 rows): the write of ``best.pt`` refused by the
kernel (RLIMIT_FSIZE) after ``checkpoint.pt``, then ``evaluate`` (must refuse the stale best.pt)
and ``--resume`` (must rewrite it); a truncated ``best.pt``, the same; the data file replaced by
one of the same shape with other content, and by one with 40 more rows (``--resume`` must refuse
in one line and change nothing, ``evaluate`` warn once and record the fingerprint,
``--accept-changed-data`` continue); ``sample`` held mid-write while ``fit --resume`` starts (its
temporary file must survive, both exit 0); ``evaluate --json FILE`` killed -9 inside that write
(the next ``evaluate --json FILE`` must leave no temporary file); ``--resume --epochs 2`` on the
finished 8-epoch reference (refused, nothing changed, config.json and summary.json agree); a
read-only run directory (one line naming the run lock; as root, run without ``CAP_DAC_OVERRIDE``
through ``setpriv``, else skipped). Posterior-collapse warnings of the tiny runs are not counted.

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
from test_bad_input import OFFLINE  # noqa: E402
from test_reliability import (  # noqa: E402
    TINY,
    cli,
    copy_run,
    finish,
    snapshot,
    spawn,
    temp_files,
    without_collapse,
    write_bits,
)

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


def fit_here(argv, module: str = "fit") -> tuple[int, list[str]]:
    """``ppl_vae.MODULE.main(argv)`` in this process: its exit code and stderr lines."""
    import importlib

    main = importlib.import_module(f"ppl_vae.{module}").main
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
        "best.pt": best_verified(run),
    }


def best_verified(run: Path) -> bool:
    """``best.pt`` holds what ``checkpoint.pt`` records, and ``summary.json`` (when there) says so."""
    from ppl_vae.training import best

    try:
        found = best.check(run, checkpoint.load(run / "checkpoint.pt"))
    except CheckpointError:
        return False
    summary = run / "summary.json"
    said = json.loads(summary.read_text()).get("best_pt") if summary.exists() else None
    return found.problem is None and said in (None, found.summary())


def complete(a: dict) -> bool:
    return (
        a["temps"] == 0
        and not a["lost"]
        and not a["duplicated"]
        and not a["bad_lines"]
        and a["loads"]
        and a["exact"]
        and a["best.pt"]
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


# --------------------------------------------------------------------------- consistency (issue 28)

QUICK_EVAL = ["--num-samples", 2, "--subset", 8, "--device", "cpu", "--quiet"]


def lines(err: list[str]) -> list[str]:
    """stderr lines without the tiny runs' posterior-collapse warnings."""
    return without_collapse("".join(ln + "\n" for ln in err)).splitlines()


def said(err: list[str], run: Path) -> str:
    text = " / ".join(ln.split(": ", 1)[-1] for ln in lines(err))
    return text.replace(str(run), "D").replace(str(run.parent), "ROOT")[:110]


def here(argv, module: str = "fit") -> tuple[int, list[str]]:
    """:func:`fit_here`, its stderr without the posterior-collapse warnings."""
    code, err = fit_here(argv, module)
    return code, lines(err)


def finished(run: Path, reference: list[dict]) -> dict:
    """:func:`audit` against the reference's first rows, in the consistency table's columns."""
    a = audit(run, reference)
    return {**a, "exact": a["exact"] and a["loads"] and not a["bad_lines"]}


def untouched(before: dict, run: Path) -> dict:
    """The columns of a refused command: nothing changed, no temporary file."""
    return {"temps": len(temp_files(run)), "lost": [], "duplicated": 0, "exact": snapshot(run) == before}


def case_best_write_fails(base, root, ref4, bits):
    run = copy_run(base, root / "c-best-write")
    r = cli("--out", run, "--resume", "--epochs", 4, "--quiet", fault={"fsize": "best.pt", "limit": 4096})
    first = lines(r.stderr.splitlines())
    e_code, e_err = here([run, *QUICK_EVAL], "evaluate")
    code, err = here(["--out", run, "--resume", "--epochs", 4, "--quiet"])
    a = finished(run, ref4)
    ok = (
        r.returncode == 1
        and len(first) == 1
        and "best.pt: file too large (a file-size limit" in first[0]
        and (e_code, len(lines(e_err))) == (2, 1)
        and "holds epoch 2, but checkpoint.pt records epoch 3" in e_err[0]
        and code == 0
        and len(lines(err)) == 1
        and "rewritten from checkpoint.pt" in err[0]
    )
    return {
        "exits": f"{r.returncode}, evaluate {e_code}, resume {code}",
        "says": said(first + err, run),
        **a,
        "ok": ok,
    }


def case_truncated_best(base, root, ref4, bits):
    run = copy_run(base, root / "c-best-truncated")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    e_code, e_err = here([run, *QUICK_EVAL], "evaluate")
    code, err = here(["--out", run, "--resume", "--epochs", 4, "--quiet"])
    a = finished(run, ref4)
    ok = (
        (e_code, len(lines(e_err))) == (2, 1)
        and "truncated or corrupt" in e_err[0]
        and "e.g. best.pt" not in e_err[0]
        and code == 0
        and len(lines(err)) == 1
        and "rewritten from checkpoint.pt" in err[0]
    )
    return {"exits": f"evaluate {e_code}, resume {code}", "says": said(err, run), **a, "ok": ok}


def case_changed_data(how: str):
    def run_case(base, root, ref4, bits):
        import numpy as np

        data, run = root / f"data-{how.replace(' ', '-')}.npy", root / f"c-data-{how.replace(' ', '-')}"
        x = np.load(bits)
        np.save(data, x)
        assert here(["--dataset", data, *TINY, "--epochs", 2, "--out", run])[0] == 0
        if how == "same shape":
            x = x.copy()
            x[:, 0, 0] = 1 - x[:, 0, 0]
        else:
            x = np.concatenate([x, x[:40]])
        np.save(data, x)
        before = snapshot(run)
        code, err = here(["--out", run, "--resume", "--epochs", 4, "--quiet"])
        a = untouched(before, run)
        report = root / f"{run.name}.json"
        e_code, e_err = here([run, *QUICK_EVAL, "--json", report], "evaluate")
        recorded = e_code == 0 and json.loads(report.read_text()).get("data_changed")
        k_code, k_err = here(["--out", run, "--resume", "--epochs", 4, "--quiet", "--accept-changed-data"])
        ok = (
            (code, len(lines(err))) == (2, 1)
            and "changed since the run started" in err[0]
            and a["exact"]
            and e_code == 0
            and len(lines(e_err)) == 1
            and bool(recorded)
            and k_code == 0
            and len(lines(k_err)) == 1
        )
        epochs = [r["epoch"] for r in rows_of(run)[0]]
        a.update(lost=sorted({1, 2, 3, 4} - set(epochs)), duplicated=len(epochs) - len(set(epochs)))
        return {
            "exits": f"resume {code}, evaluate {e_code}, accepted {k_code}",
            "says": said(err, run),
            **a,
            "best.pt": best_verified(run),
            "ok": ok,
        }

    return run_case


def case_reader_at_start_up(base, root, ref4, bits):
    run, held, go = copy_run(base, root / "c-reader"), root / "c-reader.held", root / "c-reader.go"
    s = spawn(
        run,
        "--n",
        4,
        module="sample",
        fault={"block": "samples-seed0.png", "marker": str(held), "release": str(go)},
    )
    until(held.exists, s)
    code, err = here(["--out", run, "--resume", "--epochs", 4, "--quiet"])
    kept = any(t.startswith(".samples-seed0.png.") for t in temp_files(run))
    go.touch()
    r = finish(s)
    a = finished(run, ref4)
    ok = code == 0 and not lines(err) and kept and r.returncode == 0 and (run / "samples-seed0.png").exists()
    return {
        "exits": f"fit {code}, sample {r.returncode}",
        "says": said(err + r.stderr.splitlines(), run),
        **a,
        "ok": ok,
    }


def case_evaluate_json_killed(base, root, ref4, bits):
    folder, held = root / "c-eval", root / "c-eval.held"
    folder.mkdir()
    out = folder / "e.json"
    p = spawn(
        base, *QUICK_EVAL, "--json", out, module="evaluate", fault={"block": "e.json", "marker": str(held)}
    )
    until(held.exists, p)
    p.kill()
    finish(p)
    left = len(temp_files(folder))
    code, err = here([base, *QUICK_EVAL, "--json", out], "evaluate")
    parsed = code == 0 and isinstance(json.loads(out.read_text()), dict)
    ok = left == 1 and code == 0 and not lines(err) and parsed and not temp_files(folder)
    return {
        "exits": f"-9, then {code}",
        "says": f"{left} temporary file(s) after the kill",
        "temps": len(temp_files(folder)),
        "lost": [],
        "duplicated": 0,
        "exact": parsed,
        "best.pt": True,
        "ok": ok,
    }


def case_fewer_epochs(base, root, ref4, bits):
    run = copy_run(root / "reference", root / "c-epochs")
    before = snapshot(run)
    code, err = here(["--out", run, "--resume", "--epochs", 2, "--quiet"])
    a = untouched(before, run)
    agree = (
        json.loads((run / "config.json").read_text())["epochs"]
        == json.loads((run / "summary.json").read_text())["epochs"]
        == EPOCHS
    )
    ok = (code, len(lines(err))) == (2, 1) and "fewer than the 8 epochs" in err[0] and a["exact"] and agree
    return {"exits": f"{code}", "says": said(err, run), **a, "best.pt": best_verified(run), "ok": ok}


def case_read_only(base, root, ref4, bits):
    import os
    import shutil
    import subprocess

    run = copy_run(base, root / "c-read-only")
    for f in run.iterdir():
        f.chmod(0o444)
    run.chmod(0o555)
    head = []
    if os.geteuid() == 0:  # root writes a read-only folder; without CAP_DAC_OVERRIDE it cannot
        if not shutil.which("setpriv"):
            run.chmod(0o755)
            return {
                "exits": "-",
                "says": "skipped: root, and no setpriv",
                "temps": 0,
                "lost": [],
                "duplicated": 0,
                "exact": True,
                "best.pt": True,
                "ok": None,
            }
        head = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    before = snapshot(run, lock=True)
    try:
        r = subprocess.run(
            [
                *head,
                sys.executable,
                "-m",
                "ppl_vae.fit",
                "--out",
                str(run),
                "--resume",
                "--epochs",
                "4",
                "--quiet",
            ],
            cwd=REPO,
            env={**os.environ, **OFFLINE},
            capture_output=True,
            text=True,
            timeout=300,
        )
        same = snapshot(run, lock=True) == before
    finally:
        run.chmod(0o755)
    err = r.stderr.splitlines()
    ok = r.returncode == 2 and len(err) == 1 and f"could not take the run lock in {run}" in err[0] and same
    return {
        "exits": f"{r.returncode}",
        "says": said(err, run),
        "temps": len(temp_files(run)),
        "lost": [],
        "duplicated": 0,
        "exact": same,
        "best.pt": best_verified(run),
        "ok": ok,
    }


CASES = {
    "best.pt write fails (file-size limit)": case_best_write_fails,
    "truncated best.pt": case_truncated_best,
    "data changed: same shape": case_changed_data("same shape"),
    "data changed: more rows": case_changed_data("more rows"),
    "a reader's temp file during a fit's start-up": case_reader_at_start_up,
    "evaluate --json killed -9 mid-write": case_evaluate_json_killed,
    "--resume --epochs 2 on a finished 8-epoch run": case_fewer_epochs,
    "read-only run directory": case_read_only,
}


def consistency(bits: Path, root: Path, reference: list[dict]) -> list[dict]:
    """Every case of :data:`CASES`, one after the other (in this process)."""
    base = root / "base2"
    assert fit_here(["--dataset", bits, *TINY, "--epochs", 2, "--out", base])[0] == 0
    results = []
    for name, case in CASES.items():
        r = case(base, root, reference[:4], bits)
        ok = r.pop("ok")
        results.append(
            {
                "case": name,
                **r,
                "passed": "skipped"
                if ok is None
                else bool(
                    ok
                    and r["temps"] == 0
                    and not r["lost"]
                    and not r["duplicated"]
                    and r["exact"]
                    and r["best.pt"]
                ),
            }
        )
        print(f"  {name}: {results[-1]['passed']}", flush=True)
    return results


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


def commit() -> str | None:
    """The commit measured: ``$PPL_VAE_COMMIT`` (a run from an exported tree), else git's HEAD."""
    import os
    import subprocess

    if os.environ.get("PPL_VAE_COMMIT"):
        return os.environ["PPL_VAE_COMMIT"]
    r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return r.stdout.strip() or None


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
    p.add_argument("--no-consistency", action="store_true", help="skip the consistency cases of issue 28")
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
        cases = [] if args.no_consistency else consistency(bits, root, reference)
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
                "best.pt",
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
                [
                    "scenario",
                    "B exit",
                    "B says",
                    "A exit",
                    "temps",
                    "lost",
                    "duplicated",
                    "exact",
                    "best.pt",
                    "passed",
                ],
            )
        )
        print(f"\ntwo writers: {sum(s['passed'] for s in scenarios)}/{len(scenarios)} passed")
    if cases:
        print()
        print(
            table(
                cases,
                ["case", "exits", "says", "temps", "lost", "duplicated", "exact", "best.pt", "passed"],
            )
        )
        skipped = sum(c["passed"] == "skipped" for c in cases)
        print(
            f"\nconsistency: {sum(c['passed'] is True for c in cases)}/{len(cases) - skipped} passed"
            + (f" ({skipped} skipped)" if skipped else "")
            + f"; temporary files left: {sum(c['temps'] for c in cases)}; epochs lost: "
            f"{sum(len(c['lost']) for c in cases)}; epochs duplicated: {sum(c['duplicated'] for c in cases)}"
        )
    print(f"({time.monotonic() - t_start:.0f} s)")
    path = save_result(
        "fault_trials",
        {
            "commit": commit(),
            "epochs": EPOCHS,
            "seed": args.seed,
            "kill_trials": kills,
            "two_writers": scenarios,
            "consistency": cases,
        },
    )
    print(f"saved {path}")
    return 0 if all(k["passed"] for k in kills + scenarios + cases) else 1


if __name__ == "__main__":
    sys.exit(main())
