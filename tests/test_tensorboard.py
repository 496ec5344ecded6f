"""``fit --tensorboard DIR``: the event files hold metrics.jsonl's numbers at step = epoch and the
image grids of the run's figures, a resumed run continues the curves, and without the
tensorboard package the flag is one line and exit code 2 before anything is written."""

import io
import sys

import numpy as np
import pytest
import torch

from ppl_vae.data.datasets import load_dataset
from ppl_vae.fit import PROG, build_parser, config_from_args
from ppl_vae.programs.likelihoods import make_likelihood
from ppl_vae.reports.tensorboard_log import MISSING
from ppl_vae.training.config import FitConfig
from ppl_vae.training.runs import read_metrics
from ppl_vae.training.train import Trainer

pytest.importorskip("tensorboard")  # the `tensorboard` extra (in `test`, so CI runs these)
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

PIXEL = 1.01 / 255  # an image summary stores floor(255 x) as uint8


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", likelihood=make_likelihood("bernoulli"))


def events(logdir) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})  # 0: keep every event
    acc.Reload()
    return acc


def scalars_by_step(acc: EventAccumulator, tag: str) -> dict:
    return {e.step: e.value for e in acc.Scalars(tag)}


def assert_scalars_are_the_metrics(acc: EventAccumulator, rows: list[dict]):
    """Every numeric key of every row, at step = its epoch, to float32 precision (exactly the
    float32 of the JSON number)."""
    keys = {k for r in rows for k, v in r.items() if k != "epoch" and isinstance(v, (int, float))}
    assert {"train_objective", "valid_elbo", "valid_recon", "valid_kl", "beta", "lr", "epoch_seconds"} <= keys
    assert set(acc.Tags()["scalars"]) == keys
    for k in keys:
        assert scalars_by_step(acc, k) == {r["epoch"]: float(np.float32(r[k])) for r in rows}, k


def image_at(acc: EventAccumulator, tag: str, step: int) -> np.ndarray:
    """The image of ``tag`` at ``step`` as floats ``(H, W)`` (first channel; the grid repeats it)."""
    from PIL import Image

    (event,) = [e for e in acc.Images(tag) if e.step == step]
    img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)), dtype=np.float64) / 255
    assert img.shape == (event.height, event.width, 3)
    return img[..., 0]


def tiles(grid: np.ndarray, rows: int, cols: int, h: int = 8, w: int = 8) -> torch.Tensor:
    """The ``rows * cols`` images of a make_grid image (padding 1), ``(rows * cols, h * w)``."""
    assert grid.shape == (rows * (h + 1) + 1, cols * (w + 1) + 1)
    return torch.tensor(
        np.stack(
            [
                grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w]
                for r in range(rows)
                for c in range(cols)
            ]
        ).reshape(rows * cols, h * w)
    )


@pytest.mark.usefixtures("one_thread")
def test_events_hold_the_metrics_and_the_figures_and_a_resume_continues(tmp_path, digits):
    """Two epochs: the scalars are metrics.jsonl's rows at steps 1 and 2; the grids at step 2 are
    the validation images run_figures shows (top row), the final model's reconstructions of them
    (bottom row) and its prior samples from seed 0. A resume to 3 epochs adds step 3 and leaves
    steps 1, 2 as they were."""
    out, tb = tmp_path / "run", tmp_path / "tb"
    cfg = dict(dataset="digits", hidden=[16], z_dim=4, final_iwae_k=0, device="cpu", tensorboard=str(tb))
    trainer = Trainer(FitConfig(epochs=2, **cfg), out, quiet=True, dataset=digits)
    trainer.run()
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1, 2]
    acc = events(tb)
    assert_scalars_are_the_metrics(acc, rows)

    model, valid = trainer.model.eval(), trainer.data.valid
    idx = torch.randperm(valid.shape[0], generator=torch.Generator().manual_seed(0))[
        :10
    ]  # run_figures' choice
    with torch.no_grad():
        recon, samples = model.reconstruct(valid[idx]), model.sample(64, torch.Generator().manual_seed(0))
    assert (
        {e.step for e in acc.Images("reconstructions")} == {e.step for e in acc.Images("samples")} == {1, 2}
    )
    shown = tiles(image_at(acc, "reconstructions", 2), 2, 10)  # (20, 64): inputs, then reconstructions
    torch.testing.assert_close(shown, torch.cat([valid[idx], recon]).double(), atol=PIXEL, rtol=0)
    torch.testing.assert_close(tiles(image_at(acc, "samples", 2), 8, 8), samples.double(), atol=PIXEL, rtol=0)
    assert not np.array_equal(image_at(acc, "samples", 1), image_at(acc, "samples", 2))  # the decoder learned

    Trainer(FitConfig(epochs=3, **cfg), out, resume=True, quiet=True, dataset=digits).run()
    resumed = read_metrics(out)
    assert [r["epoch"] for r in resumed] == [1, 2, 3] and resumed[:2] == rows
    assert_scalars_are_the_metrics(events(tb), resumed)
    assert {e.step for e in events(tb).Images("samples")} == {1, 2, 3}


@pytest.mark.usefixtures("one_thread")
def test_an_overwritten_run_replaces_the_curves_in_the_same_dir(tmp_path, digits):
    """--overwrite into the same DIR starts again at step 1: the earlier run's events are hidden
    (the new writer's purge step), so the curves are the new run's alone."""
    out, tb = tmp_path / "run", tmp_path / "tb"
    cfg = dict(dataset="digits", hidden=[16], z_dim=4, final_iwae_k=0, device="cpu", tensorboard=str(tb))
    Trainer(FitConfig(epochs=2, **cfg), out, quiet=True, dataset=digits).run()
    Trainer(FitConfig(epochs=1, seed=1, **cfg), out, overwrite=True, quiet=True, dataset=digits).run()
    rows = read_metrics(out)
    assert [r["epoch"] for r in rows] == [1]
    assert_scalars_are_the_metrics(events(tb), rows)


def test_the_flag_is_a_setting_that_resume_may_change_or_turn_off():
    parse = build_parser().parse_args
    assert config_from_args(parse([])).tensorboard is None
    assert config_from_args(parse(["--tensorboard", "tb/run1"])).tensorboard == "tb/run1"
    saved = FitConfig(tensorboard="tb/run1")  # what --resume merges the flags into
    assert config_from_args(parse([]), saved).tensorboard == "tb/run1"
    assert config_from_args(parse(["--tensorboard", "none"]), saved).tensorboard is None


def test_without_the_package_the_flag_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """The import fails (as when tensorboard is not installed): the Trainer refuses before it
    creates the run directory or DIR, and the CLI prints one line and exits 2."""
    from ppl_vae import fit

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    out, tb = tmp_path / "run", tmp_path / "tb"
    with pytest.raises(SystemExit) as exit_:
        fit.main(
            ["--dataset", "digits", "--epochs", "1", "--quiet", "--out", str(out), "--tensorboard", str(tb)]
        )
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"{PROG}: error: {MISSING}"]
    assert not out.exists() and not tb.exists()
