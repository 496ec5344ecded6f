"""Faults during training: exact resume, SIGINT/SIGTERM, NaN losses, unsafe/corrupt/mismatched
checkpoints on --resume; through the real CLI (``python -m ppl_vae.fit`` in a subprocess) where
the fault needs a process of its own, else through ``ppl_vae.fit.main`` in process.

Every run trains a tiny MLP (16 hidden, z_dim 2) on 300 binary 8x8 images from a .npy file
(15 steps per epoch), so a run costs little more than the imports. The reference runs are made
in process (``ppl_vae.fit.main``; the same numbers as the CLI, without its start-up time).

This module also holds what ``tests/test_faults.py`` and ``benchmarks/fault_trials.py`` share:
the tiny settings, the one subprocess helper (:func:`spawn`, :func:`finish`, :func:`cli`), its
in-process twin (:func:`in_process`), the checks (:func:`assert_one_line`,
:func:`assert_exact_metrics`, :func:`temp_files`), and :func:`inject`, which puts one fault
into ``ppl_vae``; ``python tests/test_reliability.py FAULT_JSON MODULE ARGS...`` runs
``python -m ppl_vae.MODULE ARGS...`` with it. See docs/reliability.md.
"""

import collections
import errno
import importlib
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from test_bad_input import OFFLINE, REPO, digest

TINY = [
    "--hidden",
    "16",
    "--z-dim",
    "2",
    "--batch-size",
    "16",
    "--seed",
    "3",
    "--final-iwae-k",
    "0",
    "--quiet",
]
FIT = "python -m ppl_vae.fit"


# --------------------------------------------------------------------------- running the CLI


def spawn(*args, fault: dict | None = None, module: str = "fit", env: dict | None = None) -> subprocess.Popen:
    """Start ``python -m ppl_vae.MODULE ARGS`` from the repository root, offline, output piped,
    with ``env`` added to the environment; with ``fault``: the same with that fault injected
    (see :func:`inject`)."""
    env = {**os.environ, **OFFLINE, "no_proxy": "", "NO_PROXY": "", **(env or {})}
    head = (
        [sys.executable, "-m", f"ppl_vae.{module}"]
        if fault is None
        else [sys.executable, str(Path(__file__).resolve()), json.dumps(fault), module]
    )
    return subprocess.Popen(
        [*head, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )


def _default_sigint():
    """A suite started in the background (``pytest &`` from a script) inherits SIGINT ignored, and
    so would every child, which then never sees the test's Ctrl-C: the child starts with the
    default disposition, as from a terminal (a user's ``nohup fit &`` keeps ignoring it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def finish(p: subprocess.Popen, timeout: float = 180) -> subprocess.CompletedProcess:
    """Wait for ``p`` (killed after ``timeout`` s) and return its exit code and output."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        raise
    return subprocess.CompletedProcess(p.args, p.returncode, out, without_collapse(err))


def without_collapse(err: str) -> str:
    """stderr without the posterior-collapse warnings of a finished fit: the tiny runs here (a few
    epochs on five prototypes) rightly end with KL < 1 nat and say so; these tests are about
    files, signals and errors (tests/test_collapse.py checks the warning)."""
    return "".join(
        ln
        for ln in err.splitlines(keepends=True)
        if not re.match(r"python -m ppl_vae\.\w+: warning: (posterior collapse|z\d? is mostly)", ln)
    )


def cli(
    *args, fault: dict | None = None, module: str = "fit", timeout: float = 180
) -> subprocess.CompletedProcess:
    """:func:`spawn`, then :func:`finish`."""
    return finish(spawn(*args, fault=fault, module=module), timeout)


def in_process(argv, capsys, module: str = "fit") -> subprocess.CompletedProcess:
    """``ppl_vae.MODULE.main(argv)`` in this process, reported like :func:`cli` (the exit code is
    ``main``'s return value or its ``SystemExit`` code)."""
    main = importlib.import_module(f"ppl_vae.{module}").main
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, out, without_collapse(err))


def wait_for(path: Path, p: subprocess.Popen, timeout: float = 120) -> None:
    """Poll until ``path`` exists; fail if ``p`` ends first or ``timeout`` s pass."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if p.poll() is not None:
            pytest.fail(f"the process ended (exit {p.returncode}) before {path} appeared: {p.communicate()}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.005)


# --------------------------------------------------------------------------- checks


def assert_one_line(r: subprocess.CompletedProcess, code: int, start: str = f"{FIT}: error: ") -> str:
    """Exit ``code`` and stderr exactly one line beginning with ``start``, no traceback; returns it."""
    lines = r.stderr.splitlines()
    assert (r.returncode, len(lines)) == (code, 1), (r.returncode, r.stderr)
    assert lines[0].startswith(start) and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def temp_files(run: Path) -> list[str]:
    """Names of the temporary files of interrupted writes in ``run`` (should be none)."""
    return sorted(f.name for f in Path(run).iterdir() if f.name.endswith(".tmp"))


def metrics_without_timing(run: Path) -> list[dict]:
    """Every line of ``metrics.jsonl`` parsed strictly (a damaged line fails), ``epoch_seconds`` dropped."""
    text = (Path(run) / "metrics.jsonl").read_text()
    assert text == "" or text.endswith("\n"), f"metrics.jsonl ends in a partial line: {text[-80:]!r}"
    return [{k: v for k, v in json.loads(line).items() if k != "epoch_seconds"} for line in text.splitlines()]


def assert_exact_metrics(run: Path, reference: Path) -> None:
    """``run``'s metrics hold epochs 1..E exactly once, in order, with the reference's numbers:
    ``train_objective`` to 1e-7 relative (float32 partial sums regroup after a mid-epoch resume),
    everything else exactly."""
    got, want = metrics_without_timing(run), metrics_without_timing(reference)
    assert [m["epoch"] for m in got] == list(range(1, len(want) + 1)), [m["epoch"] for m in got]
    for g, w in zip(got, want):
        assert g["train_objective"] == pytest.approx(w["train_objective"], rel=1e-7, abs=0), (g, w)
        assert {**g, "train_objective": 0} == {**w, "train_objective": 0}


def snapshot(run: Path, lock: bool = False) -> dict:
    """Content digest and mtime of every file, to prove a failed command left them alone; the lock
    file ``.lock`` only with ``lock`` (every fit that takes the lock writes its pid there, also
    one that then refuses bad input)."""
    return {
        f.name: (digest(f), f.stat().st_mtime_ns) for f in sorted(run.iterdir()) if lock or f.name != ".lock"
    }


def load_ckpt(run: Path, name="checkpoint.pt") -> dict:
    return torch.load(run / name, weights_only=True)


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# --------------------------------------------------------------------------- faults


@contextmanager
def inject(fault: dict):
    """Put one fault into ``ppl_vae`` while the block runs. NAME is a file name in the run
    directory; ``nth`` (default 1) counts that file's writes in this process.

    * ``{"block": NAME, "nth": k, "marker": PATH, "release": PATH | None}``: the k-th atomic write
      of NAME stops once its temporary file is complete, before the rename
      (``files._before_replace``), creates ``marker`` and waits until ``release`` exists (forever
      when None): where a kill -9 or a second writer meets a save in flight.
    * ``{"fsize": NAME, "nth": k, "limit": BYTES}``: just before the k-th atomic write of NAME the
      file-size limit (RLIMIT_FSIZE) drops to BYTES, so the kernel refuses the write (EFBIG), which
      torch's zip writer reports as "unexpected pos", as it does a full disk.
    * ``{"enospc": NAME, "nth": k}``: the k-th fsync of NAME (its temporary file, or the file itself
      for an append) fails with ENOSPC, as a full disk reports a delayed write (Linux).
    * ``{"pause_data": PATH}``: start-up creates PATH and sleeps while it loads the data, after the
      run directory was made and locked (a signal is sent then).
    """
    from ppl_vae.core import files

    undo, seen = [], collections.Counter()
    kind = next(k for k in ("block", "fsize", "enospc", "pause_data") if k in fault)
    target, nth = fault[kind], fault.get("nth", 1)

    def patch(obj, name, value):
        undo.append(lambda old=getattr(obj, name): setattr(obj, name, old))
        setattr(obj, name, value)

    def hold(tmp):
        Path(fault["marker"]).touch()
        while fault.get("release") is None or not Path(fault["release"]).exists():
            time.sleep(0.01)

    def atomic_write(path, *args, _write=files.atomic_write, **kw):
        seen[Path(path).name] += 1
        if (Path(path).name, seen[Path(path).name]) != (target, nth):
            return _write(path, *args, **kw)
        if kind == "fsize":
            soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            undo.append(lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard)))
            resource.setrlimit(resource.RLIMIT_FSIZE, (fault["limit"], hard))
            return _write(path, *args, **kw)
        files._before_replace = hold
        try:
            return _write(path, *args, **kw)
        finally:
            files._before_replace = None

    def fsync(fd, _fsync=os.fsync):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name == target or (name.startswith(f".{target}.") and name.endswith(".tmp")):
            seen[target] += 1
            if seen[target] == nth:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return _fsync(fd)

    def paused(load):
        def load_run_data(*args, **kw):
            Path(target).touch()
            time.sleep(120)
            return load(*args, **kw)

        return load_run_data

    if kind in ("block", "fsize"):
        patch(files, "atomic_write", atomic_write)
    elif kind == "enospc":
        patch(os, "fsync", fsync)
    else:
        from ppl_vae.training import runs

        patch(runs, "load_run_data", paused(runs.load_run_data))
    try:
        yield
    finally:
        for u in reversed(undo):
            u()


# --------------------------------------------------------------------------- runs


def write_bits(path: Path) -> Path:
    """300 binary 8x8 images: 5 prototypes with 5% of the pixels flipped, (300, 8, 8) float32."""
    rng = np.random.default_rng(0)
    protos = rng.random((5, 8, 8)) < 0.4
    x = protos[rng.integers(0, 5, 300)] ^ (rng.random((300, 8, 8)) < 0.05)
    np.save(path, x.astype(np.float32))
    return path


@pytest.fixture(scope="module")
def bits(tmp_path_factory) -> Path:
    return write_bits(tmp_path_factory.mktemp("data") / "bits.npy")


def finished_run(bits, folder: Path, epochs: int) -> Path:
    """A run of ``epochs`` epochs with the tiny settings, made in process."""
    from ppl_vae.fit import main

    assert main(["--dataset", str(bits), *TINY, "--epochs", str(epochs), "--out", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def run4(bits, tmp_path_factory) -> Path:
    """The reference: 4 epochs in one go."""
    return finished_run(bits, tmp_path_factory.mktemp("runs") / "four", 4)


@pytest.fixture(scope="module")
def run2(bits, tmp_path_factory) -> Path:
    """A finished 2-epoch run with the reference's settings; tests copy it before changing it."""
    return finished_run(bits, tmp_path_factory.mktemp("runs") / "two", 2)


# --------------------------------------------------------------------------- exact resume


def test_resume_after_two_epochs_equals_four_in_one_go(run4, run2, tmp_path):
    run = copy_run(run2, tmp_path / "resumed")
    r = cli("--out", run, "--resume", "--epochs", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert max_param_diff(load_ckpt(run)["model"], load_ckpt(run4)["model"]) <= 1e-6
    assert metrics_without_timing(run) == metrics_without_timing(
        run4
    )  # the same 4 lines, floats exactly equal
    assert [m["epoch"] for m in metrics_without_timing(run)] == [1, 2, 3, 4]
    from ppl_vae.training.config import FitConfig

    assert FitConfig.load(run / "config.json").epochs == 4  # a later --resume needs no --epochs again


def _interrupt(bits, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a long fit, send ``sig`` as soon as the first epoch's last file (best.pt, written
    after checkpoint.pt) exists, so that it lands in epoch 2, and wait for the process."""
    p = spawn("--dataset", bits, *TINY, "--epochs", "1000", "--out", out)
    wait_for(out / "best.pt", p)
    p.send_signal(sig)
    return finish(p)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(bits, run4, tmp_path, capsys):
    out = tmp_path / "killed"
    r = _interrupt(bits, out, signal.SIGTERM)
    assert r.returncode == 143, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "checkpoint saved" in lines[0], r.stderr
    ckpt = load_ckpt(out)
    assert 1 <= ckpt["epoch"] < 4, ckpt["epoch"]  # (almost always mid-epoch: ckpt["step"] >= 1)
    r = in_process(["--out", out, "--resume", "--epochs", "4", "--quiet"], capsys)
    assert (r.returncode, r.stderr) == (0, ""), r.stderr
    assert max_param_diff(load_ckpt(out)["model"], load_ckpt(run4)["model"]) <= 1e-6
    assert_exact_metrics(out, run4)
    assert not temp_files(out)


def test_sigint_saves_a_resumable_checkpoint_and_exits_130(bits, tmp_path):
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    out = tmp_path / "ctrl-c"
    r = _interrupt(bits, out, signal.SIGINT)
    assert r.returncode == 130, r.stderr
    assert "SIGINT" in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    ckpt = load_ckpt(out)
    assert ckpt["epoch"] >= 1
    # resumable: a Trainer on --resume restores the exact mid-epoch state
    t = Trainer(FitConfig.load(out / "config.json"), out, resume=True, quiet=True)
    assert (t.state.epoch, t.state.step) == (ckpt["epoch"], ckpt["step"])
    assert (t.state.perm is None and ckpt["perm"] is None) or torch.equal(t.state.perm, ckpt["perm"])
    assert max_param_diff(t.model.state_dict(), ckpt["model"]) == 0


def test_interrupt_at_a_known_step_then_resume_is_exact(bits, tmp_path):
    """In process and deterministic: SIGINT raised from inside step 5 of epoch 2 is handled at
    that step's end; the mid-epoch checkpoint resumes to the uninterrupted result, bit for bit."""
    from ppl_vae.core.errors import UserError
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.runs import read_metrics
    from ppl_vae.training.train import Interrupted, Trainer

    cfg = dict(dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, epochs=2, final_iwae_k=0, seed=1)
    Trainer(FitConfig(**cfg), tmp_path / "whole", quiet=True).run()
    t = Trainer(FitConfig(**cfg), tmp_path / "cut", quiet=True)
    inner, calls = t.objective, []

    def objective(*args, **kwargs):
        calls.append(1)
        if len(calls) == 15 + 5:
            os.kill(os.getpid(), signal.SIGINT)  # lands inside the step, like a real Ctrl-C
        return inner(*args, **kwargs)

    t.objective = objective
    with pytest.raises(Interrupted, match="interrupted by SIGINT; checkpoint saved to") as e:
        t.run()
    assert e.value.exit_code == 130
    ckpt = load_ckpt(tmp_path / "cut")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 5)
    with pytest.raises(
        UserError, match="5 steps into an epoch of batches of 16; resume with that --batch-size"
    ):
        Trainer(FitConfig(**{**cfg, "batch_size": 8}), tmp_path / "cut", resume=True, quiet=True)
    Trainer(FitConfig.load(tmp_path / "cut" / "config.json"), tmp_path / "cut", resume=True, quiet=True).run()
    whole, cut = load_ckpt(tmp_path / "whole"), load_ckpt(tmp_path / "cut")
    assert max_param_diff(whole["model"], cut["model"]) == 0
    assert torch.equal(whole["rng"]["torch"], cut["rng"]["torch"])
    for a, b in zip(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut"), strict=True):
        assert a["valid_elbo"] == b["valid_elbo"]
        assert a["train_objective"] == pytest.approx(
            b["train_objective"], rel=1e-6
        )  # float32 partial sums regrouped


def test_signals_and_faults_outside_training_are_one_line(capsys):
    """``cli.user_errors`` (every CLI module's body): SIGTERM → 143, Ctrl-C → 130, OSError → 1,
    UserError → 2; one stderr line each, and SIGTERM's previous handler is restored."""
    from ppl_vae.core.cli import user_errors
    from ppl_vae.core.errors import UserError

    def body_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    def raiser(exc):
        def body():
            raise exc

        return body

    before = signal.getsignal(signal.SIGTERM)
    for body, code, text in [
        (body_sigterm, 143, "interrupted by SIGTERM"),
        (raiser(KeyboardInterrupt()), 130, "interrupted by SIGINT"),
        (raiser(OSError(28, "No space left on device")), 1, "No space left on device"),
        (raiser(UserError("bad flag")), 2, "prog: error: bad flag"),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e, user_errors("prog"):
            body()
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.splitlines()) == 1 and text in err, (code, err)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
def test_grad_clip_bounds_the_gradient_norm(bits, tmp_path):
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import Trainer

    norms = {}
    for clip in (None, 0.05):
        cfg = FitConfig(
            dataset=str(bits),
            hidden=[8],
            z_dim=2,
            batch_size=16,
            epochs=1,
            final_iwae_k=0,
            grad_clip=clip,
            cuda_graph=False,
        )  # eager steps: the recorder reads the norm on the host
        t = Trainer(cfg, tmp_path / str(clip), quiet=True)
        step, norms[clip] = t.optim.step, []

        def recording_step(*a, t=t, step=step, clip=clip, **k):
            grads = [p.grad.flatten() for p in t.model.parameters() if p.grad is not None]
            norms[clip].append(torch.cat(grads).norm().item())  # the global L2 norm the step uses
            return step(*a, **k)

        t.optim.step = recording_step
        t.run()
    assert len(norms[0.05]) == 15 and max(norms[0.05]) <= 0.05 * (1 + 1e-5)
    assert min(norms[None]) > 0.05  # without the clip the norms are far larger: the bound is the clip's doing


def test_adam_normgrad_gives_every_update_unit_norm_gradients(bits, tmp_path, capsys, monkeypatch):
    """``fit --optimizer adam-normgrad``: every step's gradients reach the optimizer with an L2 norm of 1 per
    parameter tensor (the update rule itself: test_train_step.py), the run records the setting, and
    with plain Adam they do not. A resume with the other optimizer, an unknown one, and
    ``--grad-clip`` beside it (which it makes a constant factor) are each one line, exit 2."""
    from ppl_vae.training import train

    norms, real = [], train.normalize_and_clip_grads

    def recording(params, normalize=False, clip=None):
        params = list(params)
        real(params, normalize, clip)
        norms.append([p.grad.norm().item() for p in params if p.grad is not None])

    monkeypatch.setattr(train, "normalize_and_clip_grads", recording)
    for name in ("adam-normgrad", "adam"):
        norms.clear()
        out = tmp_path / name
        argv = ["--dataset", bits, *TINY, "--epochs", "1", "--out", out, "--quiet", "--optimizer", name]
        assert in_process(argv, capsys).returncode == 0
        assert json.loads((out / "config.json").read_text())["optimizer"] == name
        flat = [n for step in norms for n in step]
        assert len(norms) >= 10 and len(flat) > 40
        if name == "adam-normgrad":
            assert max(abs(n - 1) for n in flat) < 1e-5
        else:
            assert max(abs(n - 1) for n in flat) > 0.1
    # Adam's moments hold one scale of gradients: the optimizer is fixed for the run's life
    run = tmp_path / "adam-normgrad"
    before = snapshot(run)
    r = in_process(["--out", run, "--resume", "--epochs", "2", "--optimizer", "adam"], capsys)
    assert "optimizer" in assert_one_line(r, 2) and snapshot(run) == before
    r = in_process(["--dataset", bits, *TINY, "--out", tmp_path / "sgd", "--optimizer", "sgd"], capsys)
    assert "argument --optimizer: invalid choice: 'sgd'" in assert_one_line(r, 2)
    argv = [
        "--dataset",
        bits,
        *TINY,
        "--out",
        tmp_path / "clip",
        "--optimizer",
        "adam-normgrad",
        "--grad-clip",
        "1",
    ]
    assert "--grad-clip does nothing" in assert_one_line(in_process(argv, capsys), 2)
    assert not (tmp_path / "clip").exists()


# --------------------------------------------------------------------------- NaN / inf


def test_non_finite_loss_stops_with_exit_1_and_keeps_the_checkpoint(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path / "diverge")
    before = snapshot(run)
    # --lr on --resume applies from here on; 1e6 makes the loss overflow within epoch 3
    line = assert_one_line(
        in_process(["--out", run, "--resume", "--epochs", "4", "--lr", "1e6", "--quiet"], capsys), 1
    )
    assert "became nan" in line or "became inf" in line
    assert "at epoch 3, step" in line and "(after epoch 2) is kept" in line, line
    for name in ("checkpoint.pt", "best.pt"):
        assert before[name] == snapshot(run)[name]  # not rewritten
    assert torch.isfinite(torch.cat([p.flatten() for p in load_ckpt(run)["model"].values()])).all()


def test_non_finite_message_names_epoch_and_exact_step(bits, tmp_path, monkeypatch):
    """In-process: the objective returns NaN at epoch 2, step 7; with --log-every 1 the message
    names exactly that step, and the epoch-1 checkpoint is the one kept, byte for byte."""
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import NonFiniteLoss, Trainer

    cfg = FitConfig(
        dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, epochs=3, log_every=1, final_iwae_k=0
    )
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    inner, calls = t.objective, []

    def objective(*args, **kwargs):
        calls.append(1)
        loss = inner(*args, **kwargs)
        return loss * float("nan") if len(calls) == 15 + 7 else loss  # 15 steps per epoch

    t.objective = objective
    with pytest.raises(
        NonFiniteLoss,
        match=r"training loss became nan at epoch 2, step 7 of 15; the last good "
        r"checkpoint .*checkpoint.pt \(after epoch 1\) is kept",
    ):
        t.run()
    ckpt = load_ckpt(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert (
        len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1
    )  # no line for the NaN epoch


def test_broken_parameters_are_never_saved(bits, tmp_path):
    """An update that turns a parameter into NaN in the last step of an epoch is caught by the
    validation ELBO before the end-of-epoch save."""
    from ppl_vae.training.config import FitConfig
    from ppl_vae.training.train import NonFiniteLoss, Trainer

    cfg = FitConfig(dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, epochs=2, final_iwae_k=0)
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    t.run()
    before = digest(tmp_path / "run" / "checkpoint.pt")
    t.cfg.epochs = 3
    step, calls = t.optim.step, []

    def poisoned_step(*a, **k):
        step(*a, **k)
        calls.append(1)
        if len(calls) == 15:  # the epoch's last step (15 per epoch): its loss was still finite
            with torch.no_grad():
                next(t.model.parameters()).fill_(float("nan"))

    t.optim.step = poisoned_step
    with pytest.raises(NonFiniteLoss, match=r"validation ELBO became nan at the end of epoch 3"):
        t.run()
    assert digest(tmp_path / "run" / "checkpoint.pt") == before


# --------------------------------------------------------------------------- bad checkpoints on --resume


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_runs_no_code_and_is_refused(run2, tmp_path, capsys):
    marker = tmp_path / "MARKER"
    run = copy_run(run2, tmp_path / "evil")
    ckpt = load_ckpt(run)
    ckpt["model"] = Evil(marker)  # a well-formed ppl_vae checkpoint but for one object
    torch.save(ckpt, run / "checkpoint.pt")
    before = snapshot(run)
    line = assert_one_line(cli("--out", run, "--resume", "--epochs", "3"), 2)
    assert "refusing to load" in line and "posix.system" in line and "could run code" in line, line
    assert not marker.exists()
    assert snapshot(run) == before

    # sample and evaluate load through train.load_run: in process, both checkpoint files
    from ppl_vae.evaluate import main as evaluate_main
    from ppl_vae.sample import main as sample_main

    (run / "best.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"format_version": 1, "model": Evil(marker)}, f)  # a bare pickle, not a torch archive
    for which, main, argv in [
        ("best", sample_main, ["--checkpoint", "best", "--out", str(tmp_path / "s.png")]),
        ("checkpoint", sample_main, ["--checkpoint", "checkpoint"]),
        ("best", evaluate_main, ["--checkpoint", "best", "--device", "cpu", "--quiet"]),
        ("checkpoint", evaluate_main, ["--checkpoint", "checkpoint", "--device", "cpu"]),
    ]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(run), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and str(run / f"{which}.pt") in err, err
    assert not marker.exists() and not (tmp_path / "s.png").exists() and not list(run.glob("samples-seed*"))


@pytest.mark.parametrize(
    "damage,match",
    [
        ("truncate", "truncated or corrupt"),
        ("flip", "fails its CRC-32 check"),
        ("format", "has checkpoint format 99, this ppl_vae reads format 1"),
    ],
)
def test_damaged_checkpoint_on_resume(run2, tmp_path, capsys, damage, match):
    """``fit --resume`` (``fit.main`` in process) on a truncated, bit-flipped or other-format checkpoint."""
    run = copy_run(run2, tmp_path / damage)
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[: len(data) * 2 // 3])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
        path.write_bytes(data)
    else:
        ckpt = load_ckpt(run)
        ckpt["format_version"] = 99
        torch.save(ckpt, path)
    before = snapshot(run)
    argv = ["--out", run, "--resume", "--epochs", "3"]
    line = assert_one_line(in_process(argv, capsys), 2)
    assert match in line and str(path) in line, line
    assert snapshot(run) == before


def test_resume_with_another_model_is_refused(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path / "zdim")
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--z-dim", "5"], capsys), 2)
    assert "does not match the requested model" in line and "z_dim: checkpoint has 2, requested 5" in line
    assert snapshot(run) == before


def test_resume_with_another_seed_is_refused_and_older_runs_resume(run2, tmp_path, capsys):
    """A resumed run draws from the RNG states of its checkpoint, so ``--seed`` changes nothing
    there; before, another one passed and config.json then claimed it for the whole run. Now it is
    refused in one line, the run untouched. A config.json of an earlier version, without the data
    preparation's keys (binarize, dequantize and their seeds), still resumes."""
    run = copy_run(run2, tmp_path / "seed")
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 3, "--seed", 4], capsys), 2)
    assert "seed: checkpoint has 3, requested 4" in line and "start a new --out" in line, line
    assert snapshot(run) == before

    saved = json.loads((run / "config.json").read_text())
    for key in ("binarize", "binarize_seed", "dequantize", "dequantize_seed"):
        del saved[key]
    (run / "config.json").write_text(json.dumps(saved))
    r = in_process(["--out", run, "--resume", "--epochs", 3], capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())["binarize"] == "none"  # resolved, recorded


@pytest.mark.parametrize(
    "likelihood,flag,resolved,other",
    [("bernoulli", "--binarize", "dynamic", "static"), ("gaussian", "--dequantize", "uniform", "none")],
)
def test_resume_with_another_data_preparation_is_refused(tmp_path, capsys, likelihood, flag, resolved, other):
    """Greyscale 8-bit images: under a Bernoulli ``--binarize auto`` is dynamic, under a Gaussian
    ``--dequantize auto`` is uniform, and config.json records that resolved value and the seed of
    the fixed draws. Before, ``--resume`` with another value (or a run recording another seed)
    went on training on data prepared otherwise. Now: one line naming the setting, the run's value
    and the requested one, the run untouched; asking for ``auto``, which gives the run's value,
    resumes."""
    data, run, key = tmp_path / "grey.npy", tmp_path / "run", flag[2:]
    np.save(data, (np.random.default_rng(1).integers(0, 256, (300, 8, 8)) / 255).astype(np.float32))
    argv = ["--dataset", data, "--likelihood", likelihood, *TINY, "--epochs", 1, "--out", run]
    assert in_process(argv, capsys).returncode == 0
    text = (run / "config.json").read_text()
    assert (json.loads(text)[key], json.loads(text)[f"{key}_seed"]) == (resolved, 1234)
    before = snapshot(run)
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 2, flag, other], capsys), 2)
    assert f"--resume: the data would be prepared otherwise than the run's ({key}: the run has " in line
    assert f"{resolved!r}, requested {other!r}); " in line and "start a new --out" in line, line
    assert snapshot(run) == before

    (run / "config.json").write_text(text.replace(f'"{key}_seed": 1234', f'"{key}_seed": 99'))
    line = assert_one_line(in_process(["--out", run, "--resume", "--epochs", 2], capsys), 2)
    assert f"({key}_seed: the run has 99, these data 1234)" in line, line
    (run / "config.json").write_text(text)

    r = in_process(["--out", run, "--resume", "--epochs", 2, flag, "auto"], capsys)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "config.json").read_text())[key] == resolved


if (
    __name__ == "__main__"
):  # python tests/test_reliability.py FAULT_JSON MODULE ARGS...: ppl_vae.MODULE with FAULT
    with inject(json.loads(sys.argv[1])):
        sys.exit(importlib.import_module(f"ppl_vae.{sys.argv[2]}").main(sys.argv[3:]))
