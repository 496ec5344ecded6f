"""The faults of issue 15, end to end: a second writer on a busy run directory, a full disk while
a checkpoint, ``summary.json``, a figure, ``config.json`` or a metrics line is written, kill -9
inside a save, a damaged ``metrics.jsonl``, a damaged ``config.json``, a lying ``.npy`` header, ``--epochs 0``
(signals outside the training loop: tests/test_signals.py).

Process-level faults (a second process, a kill, a signal, a file-size limit) run the real CLI
in a subprocess, with the fault put in by ``tests/test_reliability.py``'s :func:`inject`; faults
in the files call ``ppl_vae.fit.main`` in process (the same code, without 5-10 s of start-up).
Each test asserts the exit code, one stderr line and no traceback, byte-identical earlier files,
no temporary files left, and the exact metrics after the resume: epochs 1..4 once each, with the
numbers of an uninterrupted run (the training bound to 1e-7 relative). See docs/reliability.md.
"""

import json
import re
import signal
import socket
import zipfile

import numpy as np
import pytest
from test_reliability import (
    FIT,
    TINY,
    assert_exact_metrics,
    assert_one_line,
    bits,  # noqa: F401  (a fixture)
    cli,
    copy_run,
    digest,
    finish,
    in_process,
    inject,
    run2,  # noqa: F401  (a fixture)
    run4,  # noqa: F401  (a fixture)
    snapshot,
    spawn,
    temp_files,
    wait_for,
)

WARNING = f"{FIT}: warning: "


def healed(r, note: str = "") -> None:
    """A --resume that succeeded after saying, on one warning line, that it repaired metrics.jsonl
    (``note``: a part of that line); with ``note=""`` nothing needed repair."""
    assert r.returncode == 0, r.stderr
    if note:
        line = assert_one_line(r, 0, WARNING + "metrics.jsonl")
        assert note in line, line
    else:
        assert r.stderr == "", r.stderr


# --------------------------------------------------------------------------- one writer


def test_a_second_fit_on_a_busy_run_directory_is_refused(bits, run4, tmp_path, capsys):
    """A trains in D (a subprocess) and is held inside its epoch-2 save, its temporary file written
    but not renamed. Meanwhile ``fit --out D`` plain, with ``--resume`` and with ``--overwrite``
    (``fit.main`` in this test's process: a second process to A) each exit 2 with one line naming
    A's pid and host, and touch nothing: not A's files, its lock, or the temporary file of its save
    in flight. Released, A finishes with epochs 1..4 exactly."""
    out, held, release = tmp_path / "D", tmp_path / "held", tmp_path / "release"
    a = spawn(
        "--dataset",
        bits,
        *TINY,
        "--epochs",
        4,
        "--out",
        out,
        fault={"block": "checkpoint.pt", "nth": 2, "marker": str(held), "release": str(release)},
    )
    try:
        wait_for(held, a)
        before = snapshot(out, lock=True)
        assert re.fullmatch(rf"\.checkpoint\.pt\.{a.pid}\.[0-9a-f]{{8}}\.tmp", " ".join(temp_files(out)))
        for argv in (
            ["--dataset", bits, *TINY, "--epochs", 4],
            ["--resume", "--quiet"],
            ["--dataset", bits, *TINY, "--epochs", 4, "--overwrite"],
        ):
            line = assert_one_line(in_process([*argv, "--out", out], capsys), 2)
            assert f"{out} is in use by another fit (pid {a.pid} on {socket.gethostname()})" in line, line
        assert snapshot(out, lock=True) == before
    finally:
        release.touch()
    assert finish(a).returncode == 0
    assert_exact_metrics(out, run4)
    assert not temp_files(out)


def test_a_reader_writing_into_a_busy_run_directory_keeps_its_file(run2, tmp_path):
    """``sample`` writes ``samples-seed0.png`` into a run directory that a fit holds: its temporary
    file is complete, the rename held back while the fit (a Trainer in this process, locked before
    ``sample`` started) trains two epochs and saves. The fit's clean-up of stale temporary files
    must spare a live writer's file newer than the lock (issue 15: remove only those whose writer
    is dead, or which are older than the lock): ``sample`` exits 0 and the figure is there."""
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    run, held, go = copy_run(run2, tmp_path / "run"), tmp_path / "held", tmp_path / "go"
    trainer = Trainer(FitConfig.load(run / "config.json"), run, resume=True, quiet=True)
    trainer.cfg.epochs = 4
    try:
        s = spawn(
            run,
            "--n",
            4,
            module="sample",
            fault={"block": "samples-seed0.png", "marker": str(held), "release": str(go)},
        )
        wait_for(held, s)
        trainer.run()
    finally:
        trainer.close()
        go.touch()
    r = finish(s)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert (run / "samples-seed0.png").exists() and not temp_files(run)


# --------------------------------------------------------------------------- full disk, kill -9


def test_a_file_size_limit_while_saving_a_checkpoint_keeps_the_previous_one(run2, run4, tmp_path, capsys):
    """The kernel refuses the epoch-3 checkpoint past 4 KiB (RLIMIT_FSIZE: a short write, which
    torch's zip writer reports as ``RuntimeError: ... unexpected pos``, as it does a full disk):
    exit 1, one line naming the file and the cause (the file-size limit, found from the process's
    limit, not guessed as a full disk, issue 28); checkpoint.pt and best.pt byte-identical to epoch 2's and
    loadable; no temporary file; --resume drops the epoch-3 metrics line, which has no
    checkpoint, with one warning, and ends exactly."""
    from ppl_vae.training import checkpoint

    run = copy_run(run2, tmp_path / "run")
    r = cli(
        "--out", run, "--resume", "--epochs", 4, "--quiet", fault={"fsize": "checkpoint.pt", "limit": 4096}
    )
    line = assert_one_line(r, 1)
    assert line.endswith(
        f"could not write {run / 'checkpoint.pt'}: file too large (a file-size limit of 4096 bytes); "
        f"the previous checkpoint.pt is intact"
    ), line
    for name in ("checkpoint.pt", "best.pt"):
        assert digest(run / name) == digest(run2 / name)
    assert checkpoint.load(run / "checkpoint.pt")["epoch"] == 2 and not temp_files(run)
    r = in_process(["--out", run, "--resume", "--epochs", 4, "--quiet"], capsys)
    healed(r, "dropped the line(s) after epoch 2")
    assert_exact_metrics(run, run4)
    assert not temp_files(run)


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "summary.json", "samples.png"])
def test_a_full_disk_while_writing_a_run_file_is_one_line(run2, run4, tmp_path, capsys, name):
    """The first fsync of NAME in ``--resume --epochs 4`` fails with ENOSPC: exit 1, one line
    naming NAME and the reason; the previous NAME byte-identical (metrics.jsonl: its lines before);
    no temporary file. A second --resume then ends with exactly the uninterrupted run's metrics."""
    run = copy_run(run2, tmp_path / "run")
    with inject({"enospc": name}):
        r = in_process(["--out", run, "--resume", "--epochs", 4, "--quiet"], capsys)
    assert r.returncode != 0, f"no fsync of {name} happened: it is not written through ppl_vae.core.files"
    line = assert_one_line(r, 1)
    if name == "metrics.jsonl":
        assert line.endswith(
            f"could not append to {run / name}: no space left on device; the lines before are intact"
        ), line
        assert (run / name).read_bytes().startswith((run2 / name).read_bytes())
    else:
        assert line.endswith(
            f"could not write {run / name}: no space left on device; the previous {name} is intact"
        ), line
        assert digest(run / name) == digest(run2 / name)
    assert not temp_files(run)
    r = in_process(["--out", run, "--resume", "--epochs", 4, "--quiet"], capsys)
    healed(r, "dropped the line(s) after epoch 2" if name == "metrics.jsonl" else "")
    assert_exact_metrics(run, run4)
    assert not temp_files(run) and digest(run / name) != digest(run2 / name)  # written anew


def test_kill_9_inside_a_checkpoint_save_then_resume(run2, run4, tmp_path, capsys):
    """kill -9 while the epoch-3 checkpoint's temporary file is complete but not renamed:
    checkpoint.pt and best.pt stay byte-identical (epoch 2); the temporary file remains, named
    after the dead writer; --resume is not blocked by the dead lock, removes that file, drops the
    orphaned epoch-3 metrics line with one warning, and ends exactly."""
    from ppl_vae.training import checkpoint

    run, held = copy_run(run2, tmp_path / "run"), tmp_path / "held"
    p = spawn(
        "--out",
        run,
        "--resume",
        "--epochs",
        4,
        "--quiet",
        fault={"block": "checkpoint.pt", "marker": str(held)},
    )
    wait_for(held, p)
    p.kill()
    assert finish(p).returncode == -signal.SIGKILL
    for name in ("checkpoint.pt", "best.pt"):
        assert digest(run / name) == digest(run2 / name)
    assert checkpoint.load(run / "checkpoint.pt")["epoch"] == 2
    assert re.fullmatch(rf"\.checkpoint\.pt\.{p.pid}\.[0-9a-f]{{8}}\.tmp", " ".join(temp_files(run)))
    healed(in_process(["--out", run, "--resume", "--quiet"], capsys), "dropped the line(s) after epoch 2")
    assert_exact_metrics(run, run4)
    assert not temp_files(run)


# --------------------------------------------------------------------------- damaged files


def _damage_metrics(lines: list[str], how: str) -> bytes | None:
    """metrics.jsonl of a 2-epoch run (``lines``) damaged as ``how`` says (None: deleted)."""
    extra = [json.dumps({**json.loads(lines[1]), "epoch": e}) for e in (3, 4)]
    text = {
        "partial last line": lines[0] + "\n" + lines[1][:40],
        "empty": "",
        "first line only": lines[0] + "\n",
        "two epochs too many": "\n".join(lines + extra) + "\n",
        "duplicated": "\n".join(lines + lines[1:]) + "\n",
        "reordered": "\n".join(lines[::-1]) + "\n",
        "missing": None,
    }.get(how)
    if how == "garbage":
        return np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes()
    return None if text is None else text.encode()


@pytest.mark.parametrize(
    "how,note",
    [
        ("partial last line", "was damaged or incomplete (2 line(s))"),
        ("empty", "damaged or incomplete (0 line(s))"),
        ("first line only", "damaged or incomplete (1 line(s))"),
        ("missing", "damaged or incomplete (0 line(s))"),
        ("garbage", "rewritten from the checkpoint (epochs 1-2)"),
        ("reordered", "rewritten from the checkpoint"),
        ("two epochs too many", "dropped the line(s) after epoch 2"),
        ("duplicated", "after epoch 2"),
    ],
)
def test_a_damaged_metrics_file_heals_on_resume(run2, run4, tmp_path, capsys, how, note):
    run = copy_run(run2, tmp_path / "run")
    damaged = _damage_metrics((run / "metrics.jsonl").read_text().splitlines(), how)
    if damaged is None:
        (run / "metrics.jsonl").unlink()
    else:
        (run / "metrics.jsonl").write_bytes(damaged)
    healed(in_process(["--out", run, "--resume", "--epochs", 4, "--quiet"], capsys), note)
    assert_exact_metrics(run, run4)


@pytest.mark.parametrize(
    "content",
    [
        "null",
        "[]",
        '"a string"',
        '{"z_dim": "20"}',
        '{"hidden": "16"}',
        '{"lr": "fast"}',
        '{"z_dim": -3}',
        '{"epochs": 2.5}',
        '{"image_shape": "8x8"}',
        '{"zdim": 2}',
        "TRUNCATED",
    ],
)
def test_a_damaged_config_json_is_one_line(run2, tmp_path, capsys, content):
    """config.json replaced (``null``, a list, a string), one field of the real one made ill-typed,
    out of range or unknown, or cut in half: ``fit --resume``, ``evaluate`` and ``sample`` each
    exit 2 with one line naming config.json, and the run stays byte-identical."""
    run = copy_run(run2, tmp_path / "run")
    real = (run / "config.json").read_text()
    text = (
        real[: len(real) // 2]
        if content == "TRUNCATED"
        else json.dumps({**json.loads(real), **json.loads(content)})
        if content.startswith("{")
        else content
    )
    (run / "config.json").write_text(text)
    before = snapshot(run)
    for module, argv in [
        ("fit", ["--out", run, "--resume", "--epochs", 4, "--quiet"]),
        ("evaluate", [run, "--subset", 8, "--num-samples", 2, "--device", "cpu", "--quiet"]),
        ("sample", [run, "--n", 4, "--out", tmp_path / "s.png"]),
    ]:
        line = assert_one_line(in_process(argv, capsys, module), 2, f"python -m ppl_vae.{module}: error: ")
        assert "config.json" in line, line
    assert snapshot(run) == before and not (tmp_path / "s.png").exists()


def _lying_npy(path, shape: tuple, payload: int = 256) -> None:
    """A .npy whose header declares ``shape`` (float32) but which holds ``payload`` bytes; a
    ``.npz`` holds it as its member ``x.npy``."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    data = buf.getvalue() + bytes(payload)
    if str(path).endswith(".npz"):
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("x.npy", data)
    else:
        path.write_bytes(data)


@pytest.mark.parametrize(
    "name,shape", [("huge.npy", (10**12, 64)), ("short.npy", (300, 8, 8)), ("huge.npz", (10**12, 64))]
)
def test_a_lying_npy_header_is_one_line(tmp_path, capsys, name, shape):
    """A header declaring 10^12 x 64 float32 (233 TiB) or 300 x 8 x 8 over 256 bytes: exit 2, one
    line naming the file, no MemoryError, no run directory."""
    _lying_npy(tmp_path / name, shape)
    line = assert_one_line(
        in_process(["--dataset", tmp_path / name, *TINY, "--out", tmp_path / "run"], capsys), 2
    )
    assert str(tmp_path / name) in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_zero_epochs_is_refused(bits, run2, tmp_path, capsys, resume):
    run = copy_run(run2, tmp_path / "run") if resume else tmp_path / "run"
    before = snapshot(run) if resume else None
    argv = ["--out", run, "--resume"] if resume else ["--dataset", bits, *TINY, "--out", run]
    line = assert_one_line(in_process([*argv, "--epochs", 0], capsys), 2)
    assert "--epochs" in line, line
    assert (snapshot(run) == before) if resume else not run.exists()
