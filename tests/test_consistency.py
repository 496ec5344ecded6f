"""No silent inconsistency (issue 28): a run directory never disagrees with itself unnoticed.

* ``best.pt`` is verified: a failed or cut-short save of it, a truncated one, are found by
  ``--resume`` (rewritten from ``checkpoint.pt`` when that holds the best epoch, else said so) and
  by ``evaluate``, which refuses it; ``summary.json`` and the final line say what it holds;
* data replaced under a run (the same shape with other content; more rows) are refused by
  ``--resume`` unless ``--accept-changed-data``, and warned about by ``evaluate``;
* a temporary file belongs to its writer: a live reader's survives a fit's start-up, and every
  atomic write removes its own target's temporary files of dead writers;
* ``--resume --epochs`` below the epochs done is refused, so config.json and summary.json agree;
* OS errors name the action and the file; a failed start leaves no ``.lock`` and no directory.

The same tiny runs and helpers as tests/test_reliability.py. See docs/reliability.md.
"""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_reliability import (
    TINY,
    assert_exact_metrics,
    assert_one_line,
    bits,  # noqa: F401  (a fixture)
    cli,
    copy_run,
    digest,
    finish,
    in_process,
    run2,  # noqa: F401  (a fixture)
    run4,  # noqa: F401  (a fixture)
    snapshot,
    spawn,
    temp_files,
    wait_for,
)

EVALUATE = "python -m ppl_vae.evaluate"
QUICK_EVAL = ["--num-samples", 2, "--subset", 8, "--device", "cpu", "--quiet"]


def warnings_of(r) -> list[str]:
    return [ln for ln in r.stderr.splitlines() if ": warning: " in ln]


def summary(run) -> dict:
    return json.loads((run / "summary.json").read_text())


def dead_pid() -> int:
    """The PID of a process that has ended (a child reaped here: not reused this soon)."""
    p = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(p.stdout)


# --------------------------------------------------------------------------- best.pt


def test_a_failed_best_pt_write_is_found_refused_and_rewritten(run2, run4, tmp_path, capsys):
    """The kernel refuses epoch 3's best.pt past 4 KiB (RLIMIT_FSIZE), after checkpoint.pt (which
    records epoch 3 as the best) was written: exit 1, one line naming best.pt and the file-size
    limit. ``evaluate`` then refuses the stale best.pt in one line; ``--resume`` says in one
    warning that it rewrote best.pt from checkpoint.pt, and ends with the uninterrupted run's
    metrics and its best.pt parameters; summary.json and the final line say best.pt holds epoch 4."""
    run = copy_run(run2, tmp_path / "run")
    r = cli("--out", run, "--resume", "--epochs", 4, "--quiet", fault={"fsize": "best.pt", "limit": 4096})
    line = assert_one_line(r, 1)
    assert line.endswith(
        f"could not write {run / 'best.pt'}: file too large (a file-size limit of 4096 bytes); "
        f"the previous best.pt is intact"
    ), line
    assert digest(run / "best.pt") == digest(run2 / "best.pt") and not temp_files(run)

    r = in_process([run, "--checkpoint", "best", *QUICK_EVAL], capsys, module="evaluate")
    line = assert_one_line(r, 2, f"{EVALUATE}: error: ")
    assert f"{run / 'best.pt'} holds epoch 2, but checkpoint.pt records epoch 3 as the best" in line, line
    assert "--resume rewrites it" in line and "--checkpoint checkpoint" in line, line

    r = in_process(["--out", run, "--resume", "--epochs", 4], capsys)
    assert r.returncode == 0, r.stderr
    notes = warnings_of(r)
    assert any("holds epoch 2, not the best epoch 3; rewritten from checkpoint.pt" in n for n in notes), notes
    assert_exact_metrics(run, run4)
    ours, reference = (torch.load(d / "best.pt", weights_only=True) for d in (run, run4))
    assert ours["epoch"] == 4 and all(
        torch.equal(ours["model"][k], reference["model"][k]) for k in ours["model"]
    )
    assert summary(run)["best_pt"] == {"epoch": 4, "verified": True} and summary(run)["best_epoch"] == 4
    assert "(epoch 4, kept in best.pt)" in r.stdout


def test_a_truncated_best_pt_is_found_by_evaluate_and_rewritten_by_resume(run2, tmp_path, capsys):
    """Before: a truncated best.pt passed ``--resume`` silently and ``evaluate`` then exited 2
    with the advice to "use an intact copy (e.g. best.pt)". Now evaluate's line says how to get
    best.pt back, and --resume (here without a better epoch to follow) rewrites it at once."""
    run = copy_run(run2, tmp_path / "run")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    r = in_process([run, *QUICK_EVAL], capsys, module="evaluate")
    line = assert_one_line(r, 2, f"{EVALUATE}: error: ")
    assert f"{run / 'best.pt'} is truncated or corrupt" in line and "e.g. best.pt" not in line, line
    assert "--resume rewrites it" in line, line

    r = in_process(["--out", run, "--resume", "--epochs", 2], capsys)  # no epoch to train: no new best.pt
    assert r.returncode == 0, r.stderr
    assert len(warnings_of(r)) == 1 and "is truncated or corrupt" in r.stderr, r.stderr
    assert "rewritten from checkpoint.pt, which holds epoch 2" in r.stderr, r.stderr
    assert summary(run)["best_pt"] == {"epoch": 2, "verified": True}
    assert in_process([run, *QUICK_EVAL], capsys, module="evaluate").returncode == 0


def test_a_best_pt_that_cannot_be_rewritten_is_never_claimed(run2, tmp_path, capsys):
    """When checkpoint.pt does not hold the best epoch's parameters (here: its record names
    epoch 1, and no later epoch beats the recorded bound), a damaged best.pt cannot be rebuilt:
    --resume says so in one warning, summary.json's ``best_pt`` and the final line say what
    best.pt is, and evaluate refuses it, naming --checkpoint checkpoint."""
    run = copy_run(run2, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt.update(best_epoch=1, best_digest="0" * 32, best_valid_elbo=0.0)  # unbeatable: no new best.pt
    torch.save(ckpt, run / "checkpoint.pt")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[:100])
    r = in_process(["--out", run, "--resume", "--epochs", 3], capsys)
    assert r.returncode == 0, r.stderr
    notes = warnings_of(r)
    assert (
        len(notes) == 1 and "no other file holds epoch 1's parameters, so it cannot be rewritten" in notes[0]
    )
    held = summary(run)["best_pt"]
    assert held["verified"] is False and held["epoch"] is None and "truncated or corrupt" in held["problem"]
    assert "; but best.pt is truncated or corrupt" in r.stdout and "kept in best.pt" not in r.stdout, r.stdout
    r = in_process([run, *QUICK_EVAL], capsys, module="evaluate")
    assert_one_line(r, 2, f"{EVALUATE}: error: ")


# --------------------------------------------------------------------------- data fingerprints


def test_data_of_another_image_shape_are_refused_by_resume_and_evaluate(bits, tmp_path, capsys):
    """A data file replaced by images of another shape: ``--resume`` (even with
    ``--accept-changed-data``) and ``evaluate`` each refuse in one line naming both shapes."""
    data, run = tmp_path / "data.npy", tmp_path / "run"
    x = np.load(bits)
    np.save(data, x)
    assert in_process(["--dataset", data, *TINY, "--epochs", 1, "--out", run], capsys).returncode == 0
    np.save(data, x[:, :-1])  # one row of pixels fewer
    before = snapshot(run)
    shapes = f"the data have image shape [1, {x.shape[1] - 1}, {x.shape[2]}] but the run was trained on [1, {x.shape[1]}, {x.shape[2]}]"
    resume = ["--out", run, "--resume", "--epochs", 2, "--accept-changed-data"]
    assert shapes in assert_one_line(in_process(resume, capsys), 2)
    assert shapes in assert_one_line(in_process([run, *QUICK_EVAL], capsys, module="evaluate"), 2, EVALUATE)
    assert snapshot(run) == before


@pytest.mark.parametrize("change", ["same shape", "more rows"])
def test_changed_data_are_refused_on_resume_and_warned_about_by_evaluate(bits, tmp_path, capsys, change):
    """config.json records the data's fingerprint. Replaced data (the same shape with some pixels
    flipped; 40 rows more): ``--resume`` exits 2 with one line naming the change and
    ``--accept-changed-data``, the run untouched; ``evaluate`` warns in one line and records the
    fingerprint it used in its JSON; ``--resume --accept-changed-data`` continues, says so once
    and records the new fingerprint."""
    data, run = tmp_path / "data.npy", tmp_path / "run"
    x = np.load(bits)
    np.save(data, x)
    assert in_process(["--dataset", data, *TINY, "--epochs", 1, "--out", run], capsys).returncode == 0
    recorded = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert recorded["path"] == str(data.resolve()) and recorded["size"] == data.stat().st_size
    assert recorded["splits"] == [240, 30, 30] and len(recorded["digest"]) == 32
    if change == "same shape":
        x = x.copy()
        x[:, 0, 0] = 1 - x[:, 0, 0]
    else:
        x = np.concatenate([x, x[:40]])
    np.save(data, x)
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 2], capsys), 2)
    assert "the data (" in line and "changed since the run started" in line, line
    assert (
        "--accept-changed-data" in line
        and ("other content" if change == "same shape" else "272/34/34") in line
    )
    assert snapshot(run) == before

    out = tmp_path / "eval.json"
    r = in_process([run, *QUICK_EVAL, "--json", out], capsys, module="evaluate")
    assert r.returncode == 0 and len(warnings_of(r)) == 1, r.stderr
    assert "are not those the run was trained on" in warnings_of(r)[0]
    report = json.loads(out.read_text())
    assert report["data_fingerprint"]["digest"] != recorded["digest"] and report["data_changed"]

    r = in_process(["--out", run, "--resume", "--epochs", 2, "--accept-changed-data"], capsys)
    assert r.returncode == 0 and len(warnings_of(r)) == 1 and "--accept-changed-data" in r.stderr, r.stderr
    now = json.loads((run / "config.json").read_text())["data_fingerprint"]
    assert now == report["data_fingerprint"] and now["digest"] != recorded["digest"]


# --------------------------------------------------------------------------- temporary files


def test_a_readers_temp_file_survives_a_fits_start_up(run2, tmp_path, capsys):
    """``sample`` writes into a run directory and is held after writing its temporary file; then
    ``fit --resume`` starts there (before: its start-up removed every temporary file older than
    its lock, the live reader's too, and sample failed with "no such file or directory"). The
    temporary file belongs to a live writer and stays; sample then exits 0."""
    run, held, go = copy_run(run2, tmp_path / "run"), tmp_path / "held", tmp_path / "go"
    s = spawn(
        run,
        "--n",
        4,
        module="sample",
        fault={"block": "samples-seed0.png", "marker": str(held), "release": str(go)},
    )
    try:
        wait_for(held, s)
        r = in_process(["--out", run, "--resume", "--epochs", 3], capsys)
        assert r.returncode == 0, r.stderr
        assert [t for t in temp_files(run) if t.startswith(".samples-seed0.png.")], temp_files(run)
    finally:
        go.touch()
    r = finish(s)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert (run / "samples-seed0.png").exists() and not temp_files(run)


def test_every_atomic_write_removes_its_targets_dead_temps(run2, tmp_path, capsys):
    """``evaluate --json FILE --per-datapoint FILE.npz`` outside any run directory: the temporary
    files that killed writes to FILE and FILE.npz left (a dead PID in the name) are removed by the
    next write to the same file; a live writer's and another file's stay."""
    dead, live = dead_pid(), subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    out = tmp_path / "out"
    out.mkdir()
    names = {
        f".e.json.{dead}.0123abcd.tmp": False,  # False: must be gone afterwards
        f".p.npz.{dead}.0123abcd.tmp": False,
        f".e.json.{live.pid}.0123abcd.tmp": True,
        f".other.json.{dead}.0123abcd.tmp": True,
    }
    for name in names:
        (out / name).write_text("partial")
    try:
        r = in_process(
            [run2, *QUICK_EVAL, "--json", out / "e.json", "--per-datapoint", out / "p.npz"],
            capsys,
            "evaluate",
        )
    finally:
        live.kill()
        live.wait()
    assert r.returncode == 0, r.stderr
    assert {n: (out / n).exists() for n in names} == names
    assert (out / "e.json").exists() and (out / "p.npz").exists()


# --------------------------------------------------------------------------- the epoch count


def test_resume_with_fewer_epochs_than_done_is_refused(run2, tmp_path, capsys):
    """``--resume --epochs 1`` on a finished 2-epoch run: before, config.json said 1 while
    summary.json said 2. A run is not shortened: exit 2, one line, nothing written. With
    ``--epochs 2`` (nothing left to train) config.json and summary.json agree."""
    run = copy_run(run2, tmp_path / "run")
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 1], capsys), 2)
    assert "--epochs 1 is fewer than the 2 epochs this run has done" in line, line
    assert snapshot(run) == before
    assert in_process(["--out", run, "--resume", "--epochs", 2], capsys).returncode == 0
    assert json.loads((run / "config.json").read_text())["epochs"] == summary(run)["epochs"] == 2


# --------------------------------------------------------------------------- OS errors


def test_a_read_only_run_directory_is_one_line_naming_the_lock(run2, tmp_path, capsys):
    """A run directory whose files and folder are read-only: ``--resume`` exits 2 with one line
    "could not take the run lock in D: permission denied" (before: "[Errno 13] Permission
    denied: '.../.lock'"), and nothing changes. Skipped where this user (root) writes anyway."""
    run = copy_run(run2, tmp_path / "run")
    for f in run.iterdir():
        f.chmod(0o444)
    run.chmod(0o555)
    try:
        if os.access(run, os.W_OK) or os.access(run / ".lock", os.W_OK):
            pytest.skip("this user (root) can write a read-only folder")
        before = snapshot(run, lock=True)
        line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 3], capsys), 2)
        assert f"could not take the run lock in {run}: permission denied" in line, line
        assert snapshot(run, lock=True) == before
    finally:
        run.chmod(0o755)


def test_a_read_only_file_system_is_one_line_naming_the_lock(run2, tmp_path, capsys, monkeypatch):
    """On a read-only file system (``os.open`` of the lock file made to fail with EROFS, as a
    read-only mount does for root too): one line "could not take the run lock in D: read-only
    file system", exit 2, nothing changed."""
    from ppl_vae.core import files

    run = copy_run(run2, tmp_path / "run")
    lock = str(run / files.LOCK_NAME)

    def read_only(path, flags, *args, _open=os.open):
        if str(path) == lock and flags & (os.O_RDWR | os.O_WRONLY):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return _open(path, flags, *args)

    before = snapshot(run, lock=True)
    monkeypatch.setattr(os, "open", read_only)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 3], capsys), 2)
    assert f"could not take the run lock in {run}: read-only file system" in line, line
    monkeypatch.undo()
    assert snapshot(run, lock=True) == before


def test_a_file_size_limit_is_named_as_one(tmp_path):
    """A plain write past RLIMIT_FSIZE (EFBIG; Python ignores SIGXFSZ) is "file too large (a
    file-size limit)", not a full disk."""
    import resource

    from ppl_vae.core import files
    from ppl_vae.core.errors import WriteError

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1000, hard))
    try:
        with pytest.raises(WriteError) as e:
            files.write_text(tmp_path / "f.txt", "x" * 5000)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert (
        str(e.value)
        == f"could not write {tmp_path / 'f.txt'}: file too large (a file-size limit); no f.txt was written"
    )
    assert not list(tmp_path.iterdir())


def test_a_failed_start_leaves_no_lock_and_no_directory(tmp_path, capsys):
    """Bad data found after the lock was taken: in a user's own (empty) folder the ``.lock`` this
    start made is removed (before: it stayed), and folders it made (``new/run``) are removed."""
    mine, new = tmp_path / "mine", tmp_path / "new" / "run"
    mine.mkdir()
    for out in (mine, new):
        r = in_process(["--dataset", tmp_path / "missing.npy", *TINY, "--out", out], capsys)
        assert "does not exist" in assert_one_line(r, 2)
    assert list(mine.iterdir()) == [] and not (tmp_path / "new").exists()


def test_an_os_error_the_code_did_not_word_still_names_its_file(tmp_path, capsys):
    """The last resort of ``user_errors``: a raw OSError (here opening a file inside a missing
    folder) is "could not read or write F: no such file or directory", not "[Errno 2] ..."."""
    from ppl_vae.core.cli import user_errors

    with pytest.raises(SystemExit) as e, user_errors("prog"):
        open(tmp_path / "missing" / "f", "w")
    err = capsys.readouterr().err
    assert (
        e.value.code == 1
        and err
        == f"prog: error: could not read or write {tmp_path / 'missing' / 'f'}: no such file or directory\n"
    )


def test_a_run_of_an_earlier_version_with_a_damaged_best_pt_resumes_with_one_warning(run2, tmp_path, capsys):
    """A checkpoint written before best.pt's epoch was recorded (no best_epoch / best_digest) and a
    truncated best.pt: --resume says in one warning that best.pt cannot be rewritten (it was a
    KeyError traceback), and the final line does not claim a best.pt it cannot vouch for."""
    run = copy_run(run2, tmp_path / "run")
    ckpt = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    for key in ("best_epoch", "best_digest"):
        ckpt.pop(key, None)
    torch.save(ckpt, run / "checkpoint.pt")
    data = (run / "best.pt").read_bytes()
    (run / "best.pt").write_bytes(data[: len(data) // 2])
    r = in_process(["--out", run, "--resume", "--epochs", 2], capsys)
    assert r.returncode == 0, r.stderr
    assert len(warnings_of(r)) == 1 and "predates the record of best.pt's epoch" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
