"""Faults during training, through the real CLI (``python -m ppl_vae.fit`` in a subprocess):
exact resume, SIGINT/SIGTERM, NaN losses, unsafe/corrupt/mismatched checkpoints on --resume.

Every run trains a tiny MLP (16 hidden, z_dim 2) on 300 binary 8x8 images from a .npy file
(15 steps per epoch), so a run costs little more than the imports. See docs/reliability.md.
"""
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from test_bad_input import REPO, assert_cli_error, digest, fit, fit_in_process

TINY = ["--hidden", "16", "--z-dim", "2", "--batch-size", "16", "--seed", "3", "--final-iwae-k", "0", "--quiet"]


@pytest.fixture(scope="module")
def bits(tmp_path_factory) -> Path:
    """300 binary 8x8 images: 5 prototypes with 5% of the pixels flipped, (300, 8, 8) float32."""
    rng = np.random.default_rng(0)
    protos = rng.random((5, 8, 8)) < 0.4
    x = protos[rng.integers(0, 5, 300)] ^ (rng.random((300, 8, 8)) < 0.05)
    path = tmp_path_factory.mktemp("data") / "bits.npy"
    np.save(path, x.astype(np.float32))
    return path


def _finished_run(bits, tmp_path_factory, name: str, epochs: int) -> Path:
    out = tmp_path_factory.mktemp("runs") / name
    r = fit("--dataset", bits, *TINY, "--epochs", str(epochs), "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def run4(bits, tmp_path_factory) -> Path:
    """The reference: 4 epochs in one go."""
    return _finished_run(bits, tmp_path_factory, "four", 4)


@pytest.fixture(scope="module")
def run2(bits, tmp_path_factory) -> Path:
    """A finished 2-epoch run with the reference's settings; tests copy it before changing it."""
    return _finished_run(bits, tmp_path_factory, "two", 2)


def copy_run(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def load_ckpt(run: Path, name="checkpoint.pt") -> dict:
    return torch.load(run / name, weights_only=True)


def max_param_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def metrics_without_timing(run: Path) -> list[dict]:
    from ppl_vae.runs import read_metrics
    return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in read_metrics(run)]


def snapshot(run: Path) -> dict:
    """Content digest and mtime of every file, to prove a failed command left them alone."""
    return {f.name: (digest(f), f.stat().st_mtime_ns) for f in sorted(run.iterdir())}


# --------------------------------------------------------------------------- exact resume

def test_resume_after_two_epochs_equals_four_in_one_go(run4, run2, tmp_path):
    run = copy_run(run2, tmp_path / "resumed")
    r = fit("--out", run, "--resume", "--epochs", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert max_param_diff(load_ckpt(run)["model"], load_ckpt(run4)["model"]) <= 1e-6
    assert metrics_without_timing(run) == metrics_without_timing(run4)  # the same 4 lines, floats exactly equal
    assert [m["epoch"] for m in metrics_without_timing(run)] == [1, 2, 3, 4]
    from ppl_vae.config import FitConfig
    assert FitConfig.load(run / "config.json").epochs == 4  # a later --resume needs no --epochs again


def _interrupt(bits, out: Path, sig: int) -> subprocess.CompletedProcess:
    """Start a long fit, send ``sig`` as soon as the first epoch's last file (best.pt, written
    after checkpoint.pt) exists, so that it lands in epoch 2, and wait for the process."""
    cmd = [sys.executable, "-m", "ppl_vae.fit", "--dataset", str(bits), *TINY, "--epochs", "1000", "--out", str(out)]
    p = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "best.pt").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline, "no checkpoint after 120 s"
        time.sleep(0.002)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def test_sigterm_mid_epoch_then_resume_equals_uninterrupted(bits, run4, tmp_path):
    out = tmp_path / "killed"
    r = _interrupt(bits, out, signal.SIGTERM)
    assert r.returncode == 143, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "checkpoint saved" in lines[0], r.stderr
    ckpt = load_ckpt(out)
    assert 1 <= ckpt["epoch"] < 4, ckpt["epoch"]  # (almost always mid-epoch: ckpt["step"] >= 1)
    r = fit("--out", out, "--resume", "--epochs", "4", "--quiet")
    assert r.returncode == 0, r.stderr
    assert max_param_diff(load_ckpt(out)["model"], load_ckpt(run4)["model"]) <= 1e-6


def test_sigint_saves_a_resumable_checkpoint_and_exits_130(bits, tmp_path):
    from ppl_vae.config import FitConfig
    from ppl_vae.train import Trainer

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
    from ppl_vae.config import FitConfig
    from ppl_vae.errors import UserError
    from ppl_vae.runs import read_metrics
    from ppl_vae.train import Interrupted, Trainer

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
    with pytest.raises(UserError, match="5 steps into an epoch of batches of 16; resume with that --batch-size"):
        Trainer(FitConfig(**{**cfg, "batch_size": 8}), tmp_path / "cut", resume=True, quiet=True)
    Trainer(FitConfig.load(tmp_path / "cut" / "config.json"), tmp_path / "cut", resume=True, quiet=True).run()
    whole, cut = load_ckpt(tmp_path / "whole"), load_ckpt(tmp_path / "cut")
    assert max_param_diff(whole["model"], cut["model"]) == 0
    assert torch.equal(whole["rng"]["torch"], cut["rng"]["torch"])
    for a, b in zip(read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "cut"), strict=True):
        assert a["valid_elbo"] == b["valid_elbo"]
        assert a["train_objective"] == pytest.approx(b["train_objective"], rel=1e-6)  # float32 partial sums regrouped


def test_signals_and_faults_outside_training_are_one_line(capsys):
    """``cli.user_errors`` (every CLI module's body): SIGTERM → 143, Ctrl-C → 130, OSError → 1,
    UserError → 2; one stderr line each, and SIGTERM's previous handler is restored."""
    from ppl_vae.cli import user_errors
    from ppl_vae.errors import UserError

    def body_sigterm():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    def raiser(exc):
        def body():
            raise exc
        return body

    before = signal.getsignal(signal.SIGTERM)
    for body, code, text in [(body_sigterm, 143, "interrupted by SIGTERM"),
                             (raiser(KeyboardInterrupt()), 130, "interrupted by SIGINT"),
                             (raiser(OSError(28, "No space left on device")), 1, "No space left on device"),
                             (raiser(UserError("bad flag")), 2, "prog: error: bad flag")]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e, user_errors("prog"):
            body()
        err = capsys.readouterr().err
        assert e.value.code == code and len(err.splitlines()) == 1 and text in err, (code, err)
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")  # the spy below
def test_grad_clip_bounds_the_gradient_norm(bits, tmp_path):
    from ppl_vae.config import FitConfig
    from ppl_vae.train import Trainer

    norms = {}
    for clip in (None, 0.05):
        cfg = FitConfig(dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, epochs=1, final_iwae_k=0,
                        grad_clip=clip)
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


# --------------------------------------------------------------------------- NaN / inf

def test_non_finite_loss_stops_with_exit_1_and_keeps_the_checkpoint(run2, tmp_path):
    run = copy_run(run2, tmp_path / "diverge")
    before = snapshot(run)
    # --lr on --resume applies from here on; 1e6 makes the loss overflow within epoch 3
    r = fit("--out", run, "--resume", "--epochs", "4", "--lr", "1e6", "--quiet")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "became nan" in lines[0] or "became inf" in lines[0]
    assert "at epoch 3, step" in lines[0] and "(after epoch 2) is kept" in lines[0], lines[0]
    for name in ("checkpoint.pt", "best.pt"):
        assert before[name] == snapshot(run)[name]  # not rewritten
    assert torch.isfinite(torch.cat([p.flatten() for p in load_ckpt(run)["model"].values()])).all()


def test_non_finite_message_names_epoch_and_exact_step(bits, tmp_path, monkeypatch):
    """In-process: the objective returns NaN at epoch 2, step 7; with --log-every 1 the message
    names exactly that step, and the epoch-1 checkpoint is the one kept, byte for byte."""
    from ppl_vae.config import FitConfig
    from ppl_vae.train import NonFiniteLoss, Trainer

    cfg = FitConfig(dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, epochs=3, log_every=1, final_iwae_k=0)
    t = Trainer(cfg, tmp_path / "run", quiet=True)
    inner, calls = t.objective, []

    def objective(*args, **kwargs):
        calls.append(1)
        loss = inner(*args, **kwargs)
        return loss * float("nan") if len(calls) == 15 + 7 else loss  # 15 steps per epoch

    t.objective = objective
    with pytest.raises(NonFiniteLoss, match=r"training loss became nan at epoch 2, step 7 of 15; the last good "
                                            r"checkpoint .*checkpoint.pt \(after epoch 1\) is kept"):
        t.run()
    ckpt = load_ckpt(tmp_path / "run")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0)
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # no line for the NaN epoch


def test_broken_parameters_are_never_saved(bits, tmp_path):
    """An update that turns a parameter into NaN in the last step of an epoch is caught by the
    validation ELBO before the end-of-epoch save."""
    from ppl_vae.config import FitConfig
    from ppl_vae.train import NonFiniteLoss, Trainer

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
    r = fit("--out", run, "--resume", "--epochs", "3")
    line = assert_cli_error(r)
    assert "refusing to load" in line and "posix.system" in line and "could run code" in line, line
    assert not marker.exists()
    assert snapshot(run) == before

    # sample and evaluate load through train.load_run: in process, both checkpoint files
    from ppl_vae.evaluate import main as evaluate_main
    from ppl_vae.sample import main as sample_main
    (run / "best.pt").write_bytes((run / "checkpoint.pt").read_bytes())
    with open(run / "checkpoint.pt", "wb") as f:
        pickle.dump({"format_version": 1, "model": Evil(marker)}, f)  # a bare pickle, not a torch archive
    for which, main, argv in [("best", sample_main, ["--checkpoint", "best", "--out", str(tmp_path / "s.png")]),
                              ("checkpoint", sample_main, ["--checkpoint", "checkpoint"]),
                              ("best", evaluate_main, ["--checkpoint", "best", "--device", "cpu", "--quiet"]),
                              ("checkpoint", evaluate_main, ["--checkpoint", "checkpoint", "--device", "cpu"])]:
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main([str(run), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and len(err.splitlines()) == 1 and str(run / f"{which}.pt") in err, err
    assert not marker.exists() and not (tmp_path / "s.png").exists() and not list(run.glob("samples-seed*"))


@pytest.mark.parametrize("damage,match", [
    ("truncate", "truncated or corrupt"),
    ("flip", "fails its CRC-32 check"),
    ("format", "has checkpoint format 99, this ppl_vae reads format 1"),
])
def test_damaged_checkpoint_on_resume(run2, tmp_path, capsys, damage, match):
    """The real CLI for a truncated file; ``fit.main`` in process for the others."""
    run = copy_run(run2, tmp_path / damage)
    path = run / "checkpoint.pt"
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(data[:len(data) * 2 // 3])
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF  # inside a tensor: torch.load alone would not notice
        path.write_bytes(data)
    else:
        ckpt = load_ckpt(run)
        ckpt["format_version"] = 99
        torch.save(ckpt, path)
    before = snapshot(run)
    argv = ["--out", run, "--resume", "--epochs", "3"]
    line = assert_cli_error(fit(*argv)) if damage == "truncate" else fit_in_process(argv, capsys)
    assert match in line and str(path) in line, line
    assert snapshot(run) == before


def test_resume_with_another_model_is_refused(run2, tmp_path, capsys):
    run = copy_run(run2, tmp_path / "zdim")
    before = snapshot(run)
    line = fit_in_process(["--out", run, "--resume", "--z-dim", "5"], capsys)
    assert "does not match the requested model" in line and "z_dim: checkpoint has 2, requested 5" in line
    assert snapshot(run) == before
