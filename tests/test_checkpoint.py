"""Checkpoints in process: atomic writes that survive a full disk, safe loading that refuses
every damaged or crafted file with one clear line, RNG states that round-trip exactly.
See docs/reliability.md."""

import errno
import json
import os
import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from ppl_vae import __version__
from ppl_vae.core.errors import CheckpointError, UserError, WriteError
from ppl_vae.training import checkpoint, runs
from ppl_vae.training.config import FitConfig
from ppl_vae.training.runs import load_run, read_metrics
from ppl_vae.training.train import Trainer


@pytest.fixture(scope="module")
def bits(tmp_path_factory) -> Path:
    """60 binary 4x4 images (N, 16): 48 train points, 3 steps per epoch of batch 16."""
    x = (np.random.default_rng(1).random((60, 16)) < 0.3).astype(np.float32)
    path = tmp_path_factory.mktemp("data") / "bits.npy"
    np.save(path, x)
    return path


def tiny_config(bits, **kw) -> FitConfig:
    return FitConfig(dataset=str(bits), hidden=[8], z_dim=2, batch_size=16, final_iwae_k=0, **kw)


@pytest.fixture(scope="module")
def run(bits, tmp_path_factory) -> Path:
    """A finished 1-epoch run (read only)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    Trainer(tiny_config(bits, epochs=1), out, quiet=True).run()
    return out


class DiskFull:
    """Stands in for ``torch.save``: from call ``fail_from`` on, writes part of the file, then
    raises ENOSPC like a full disk."""

    def __init__(self, fail_from: int):
        self.fail_from, self.calls, self.save = fail_from, 0, torch.save

    def __call__(self, obj, f, *args, **kwargs):
        self.calls += 1
        if self.calls < self.fail_from:
            return self.save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def no_temp_files(folder: Path) -> bool:
    return not [f for f in folder.iterdir() if f.name.endswith(".tmp")]


# --------------------------------------------------------------------------- writing


def test_atomic_save_writes_a_loadable_file_with_the_usual_permissions(tmp_path):
    obj = {"a": torch.arange(5.0), "b": [1, "x", None]}
    checkpoint.atomic_save(obj, tmp_path / "c.pt")
    back = torch.load(tmp_path / "c.pt", weights_only=True)
    assert torch.equal(back["a"], obj["a"]) and back["b"] == obj["b"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "c.pt").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0o600
    assert no_temp_files(tmp_path)


def _torch_zip_enospc(*a, **k):
    """What torch's zip writer raises on a full disk (it wraps the OSError)."""
    raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")


@pytest.mark.parametrize("where", ["torch.save", "os.fsync", "os.replace", "torch zip writer"])
def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"format_version": 0, "w": torch.ones(3)}, path)
    before = path.read_bytes()

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(
        *{
            "torch.save": (torch, "save", DiskFull(1)),
            "os.fsync": (os, "fsync", enospc),
            "os.replace": (os, "replace", enospc),
            "torch zip writer": (torch, "save", _torch_zip_enospc),
        }[where]
    )
    with pytest.raises(WriteError) as e:
        checkpoint.atomic_save({"format_version": 0, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    why = (
        "the write was cut short (a full disk or a quota)"  # (no file-size limit, and space is free)
        if where == "torch zip writer"
        else "no space left on device"
    )
    assert isinstance(e.value, OSError) and e.value.errno == (
        errno.EIO if where == "torch zip writer" else errno.ENOSPC
    )
    assert str(e.value) == f"could not write {path}: {why}; the previous checkpoint.pt is intact"
    assert path.read_bytes() == before and no_temp_files(tmp_path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))


def test_disk_full_during_training_keeps_the_last_checkpoint_and_resumes(bits, tmp_path, monkeypatch):
    out = tmp_path / "run"
    t = Trainer(tiny_config(bits, epochs=3), out, quiet=True)
    disk = DiskFull(fail_from=3)  # epoch 1 writes checkpoint.pt and best.pt; epoch 2's first write fails
    monkeypatch.setattr(torch, "save", disk)
    with pytest.raises(WriteError, match="no space left on device"):
        t.run()
    monkeypatch.undo()
    ckpt = checkpoint.load(out / "checkpoint.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (1, 0) and no_temp_files(out)
    assert [m["epoch"] for m in read_metrics(out)] == [1, 2]  # epoch 2 was logged, not saved
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_el')  # and a line cut short by the crash
    with pytest.warns(
        UserWarning, match=r"dropped the line\(s\) after epoch 1"
    ):  # healed from the checkpoint
        t2 = Trainer(FitConfig.load(out / "config.json"), out, resume=True, quiet=True)
    assert t2.state.epoch == 1 and [m["epoch"] for m in read_metrics(out)] == [1]
    assert all(torch.equal(v.cpu(), ckpt["model"][k]) for k, v in t2.model.state_dict().items())


def test_disk_full_through_the_cli_is_one_line_and_exit_1(bits, tmp_path, monkeypatch, capsys):
    from ppl_vae.fit import main

    monkeypatch.setattr(torch, "save", DiskFull(fail_from=3))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(
            [
                "--dataset",
                str(bits),
                "--hidden",
                "8",
                "--z-dim",
                "2",
                "--batch-size",
                "16",
                "--epochs",
                "3",
                "--final-iwae-k",
                "0",
                "--quiet",
                "--out",
                str(tmp_path / "run"),
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 1 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("python -m ppl_vae.fit: error: could not write ") and "is intact" in err


# --------------------------------------------------------------------------- reading


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _damaged(run: Path, tmp_path: Path, kind: str) -> Path:
    """A copy of ``run``'s checkpoint damaged in one way."""
    good = (run / "checkpoint.pt").read_bytes()
    path = tmp_path / "checkpoint.pt"
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "junk":
        path.write_bytes(b"hello world" * 10)
    elif kind.startswith("truncated"):
        path.write_bytes(good[: int(len(good) * float(kind.split("-")[1]))])
    elif kind.startswith("flip"):
        member = "data.pkl" if kind == "flip-pickle" else "data/0"
        with zipfile.ZipFile(run / "checkpoint.pt") as z:
            info = next(i for i in z.infolist() if i.filename.endswith(member))
        data = bytearray(good)
        local = (
            info.header_offset
        )  # local header: 30 bytes, then the name and an extra field of its own length
        start = (
            local
            + 30
            + int.from_bytes(good[local + 26 : local + 28], "little")
            + int.from_bytes(good[local + 28 : local + 30], "little")
        )
        data[start + info.file_size // 2] ^= 0x10
        path.write_bytes(data)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif kind == "format":
        torch.save({**ckpt, "format_version": 2, "package_version": "9.9"}, path)
    elif kind == "no-format":
        torch.save({k: v for k, v in ckpt.items() if k != "format_version"}, path)
    elif kind == "incomplete":
        torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer", "rng")}, path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "missing":
        pass
    elif kind == "evil-torch":
        torch.save({**ckpt, "model": Evil(tmp_path / "MARKER")}, path)
    elif kind == "evil-pickle":
        with open(path, "wb") as f:
            pickle.dump({**ckpt, "model": Evil(tmp_path / "MARKER")}, f)
    elif kind == "evil-in-archive":  # a pickle payload swapped into an intact-looking archive
        with zipfile.ZipFile(run / "checkpoint.pt") as src, zipfile.ZipFile(path, "w") as dst:
            for info in src.infolist():
                body = src.read(info)
                if info.filename.endswith("data.pkl"):
                    body = pickle.dumps(Evil(tmp_path / "MARKER"), protocol=2)
                dst.writestr(info, body)
    return path


@pytest.mark.parametrize(
    "kind,message",
    [
        ("empty", "is truncated or corrupt (not a readable PyTorch archive: BadZipFile)"),
        ("junk", "is truncated or corrupt"),
        ("truncated-0.1", "is truncated or corrupt"),
        ("truncated-0.5", "is truncated or corrupt"),
        ("truncated-0.999", "is truncated or corrupt"),
        ("flip-tensor", "/data/0 fails its CRC-32 check)"),
        ("flip-pickle", "/data.pkl fails its CRC-32 check)"),
        ("not-a-dict", "is not a ppl_vae checkpoint (no format_version field)"),
        ("no-format", "is not a ppl_vae checkpoint (no format_version field)"),
        (
            "format",
            "has checkpoint format 2, this ppl_vae reads format 1; use the ppl_vae version that wrote it (9.9)",
        ),
        ("incomplete", "is an incomplete ppl_vae checkpoint (missing or malformed: optimizer, rng)"),
        ("directory", "is a directory, not a checkpoint file"),
        ("missing", "does not exist"),
        ("evil-torch", "refusing to load"),
        ("evil-pickle", "is truncated or corrupt (not a readable PyTorch archive"),
        ("evil-in-archive", "refusing to load"),
    ],
)
def test_every_bad_checkpoint_is_one_clear_error(run, tmp_path, capfd, kind, message):
    path = _damaged(run, tmp_path, kind)
    capfd.readouterr()
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(path)
    text = str(e.value)
    assert message in text and str(path) in text and "\n" not in text, text
    if kind.startswith("evil"):
        assert not (tmp_path / "MARKER").exists()  # the payload never ran
        if kind != "evil-pickle":
            assert "GLOBAL posix.system" in text and "could run code" in text, text
    assert capfd.readouterr().err == ""  # no warnings either: the error is the only output


def test_the_marker_would_appear_if_the_file_were_unpickled(run, tmp_path):
    """Control for the malicious-file cases: the payload is real."""
    path = _damaged(run, tmp_path, "evil-pickle")
    with open(path, "rb") as f:
        pickle.load(f)
    assert (tmp_path / "MARKER").exists()


def test_load_run_refuses_a_checkpoint_of_another_model(run, tmp_path):
    for f in run.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    cfg = FitConfig.load(tmp_path / "config.json")
    cfg.z_dim = 3
    cfg.save(tmp_path / "config.json")
    with pytest.raises(
        CheckpointError,
        match=r"does not match the requested model \(z_dim: checkpoint has 2, "
        r"requested 3\)",
    ):
        load_run(tmp_path)
    with pytest.raises(UserError, match="is not a ppl_vae run directory"):
        load_run(tmp_path / "nowhere")


def test_checkpoint_fields_and_versions(run):
    ckpt = checkpoint.load(run / "checkpoint.pt")
    assert set(checkpoint.FIELDS) <= set(ckpt)
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION and ckpt["package_version"] == __version__
    assert ckpt["config"] == FitConfig.load(run / "config.json").to_dict()
    assert (ckpt["epoch"], ckpt["step"], ckpt["perm"]) == (1, 0, None)
    vae, cfg = load_run(run)
    assert all(torch.equal(v, ckpt["model"][k]) for k, v in vae.state_dict().items())


def test_rng_states_round_trip_exactly_through_a_safe_checkpoint(tmp_path, device):
    """Also when the checkpoint is loaded onto the training device (``map_location``), as
    ``--resume`` does on a GPU: RNG states must go back to the CPU before torch takes them."""
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.normal()  # leaves a cached Gaussian in NumPy's legacy state
    random.gauss(0, 1)  # and in Python's
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "rng.pt")

    def draws():
        return (
            torch.rand(4).tolist(),
            np.random.normal(size=3).tolist(),
            [random.gauss(0, 1), random.random()],
        )

    first = draws()
    draws()
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", map_location=device, weights_only=True)["rng"])
    assert draws() == first


def test_heal_metrics_renames_a_legacy_file_silently_and_reports_damage(tmp_path):
    """A metrics.jsonl of version 0.1 (train_elbo, valid_iwae) is intact: rewritten under the new
    keys without a note. A line cut short is damage: rewritten from the rows, with a note."""
    legacy = [
        {"epoch": 1, "train_elbo": -1.0, "valid_elbo": -2.0},
        {"epoch": 2, "train_elbo": -0.5, "valid_iwae": -1.5},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in legacy))
    rows = read_metrics(tmp_path)
    assert rows == [
        {"epoch": 1, "train_objective": -1.0, "valid_elbo": -2.0},
        {"epoch": 2, "train_objective": -0.5, "valid_iwae_k": -1.5},
    ]
    assert runs.heal_metrics(tmp_path, rows) is None
    assert [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()] == rows
    (tmp_path / "metrics.jsonl").write_text((tmp_path / "metrics.jsonl").read_text()[:-10])
    note = runs.heal_metrics(tmp_path, rows)
    assert (
        note
        == "metrics.jsonl was damaged or incomplete (2 line(s)); rewritten from the checkpoint (epochs 1-2)"
    )
    assert read_metrics(tmp_path) == rows


def test_best_epoch_is_the_first_maximum_of_the_bound_the_run_selects_on():
    """An ELBO run is selected on valid_elbo; an IWAE run on valid_iwae_k, even where its ELBO
    is higher at another epoch; a tie keeps the earlier epoch (the trainer needs a strict gain)."""
    elbo_rows = [
        {"epoch": 1, "valid_elbo": -90.0},
        {"epoch": 2, "valid_elbo": -88.0},
        {"epoch": 3, "valid_elbo": -88.0},
        {"epoch": 4, "valid_elbo": -89.0},
    ]
    assert runs.best_epoch(elbo_rows) == 2
    iwae_rows = [
        {"epoch": 1, "valid_elbo": -88.0, "valid_iwae_k": -87.5},
        {"epoch": 2, "valid_elbo": -89.0, "valid_iwae_k": -86.9},
    ]
    assert runs.best_epoch(iwae_rows) == 2 and runs.selection_bound(iwae_rows[0]) == -87.5
    assert runs.best_epoch([]) is None


@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_trainer_state_dict_continues_a_run_exactly_in_another_directory(bits, tmp_path, ema):
    """Trainer.state_dict() → load_state_dict() on a new Trainer (another run directory, no
    checkpoint file read) continues bit-identically to an uninterrupted 2-epoch run, under
    --ema too (θ and θ̄ both carried)."""
    whole = Trainer(tiny_config(bits, epochs=2, ema=ema), tmp_path / "whole", quiet=True)
    whole.run()
    first = Trainer(tiny_config(bits, epochs=1, ema=ema), tmp_path / "first", quiet=True)
    first.run()
    state = first.state_dict()
    assert set(checkpoint.FIELDS) - set(state) == {"format_version", "package_version"}
    assert ("train_model" in state) == bool(ema)
    second = Trainer(tiny_config(bits, epochs=2, ema=ema), tmp_path / "second", quiet=True)
    second.load_state_dict(state)
    assert second.state.epoch == 1 and len(second.state.rows) == 1
    second.run()
    for a, b in zip(whole.state.rows, second.state.rows):
        assert {k: v for k, v in a.items() if k != "epoch_seconds"} == {
            k: v for k, v in b.items() if k != "epoch_seconds"
        }
    for model_a, model_b in ((whole.model, second.model), (whole.evaluated, second.evaluated)):
        sa, sb = model_a.state_dict(), model_b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_state_dict_refuses_another_model_in_one_line(bits, tmp_path):
    t = Trainer(tiny_config(bits, epochs=1), tmp_path / "a", quiet=True)
    t.run()
    cfg = tiny_config(bits, epochs=1)
    cfg.z_dim = 3
    other = Trainer(cfg, tmp_path / "b", quiet=True)
    with pytest.raises(CheckpointError, match=r"z_dim: checkpoint has 2, requested 3"):
        other.load_state_dict(t.state_dict())
