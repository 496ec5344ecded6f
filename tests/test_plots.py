"""Figures show what their captions say: the right z on the right tile, the right numbers on
the right axis, and the sample command writes reproducible grids.

Pixel checks read the image matplotlib was given (``ax.images[0].get_array()``), a
``make_grid`` picture with 1-pixel padding, so tile (r, c) of an H×W image starts at
pixel (1 + r·(H+1), 1 + c·(W+1)).
"""

import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch.distributions import Normal

from ppl_vae import fit, sample
from ppl_vae.reports import plots

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
import _figures  # noqa: E402  (the examples' figures: examples/_figures.py)

SHAPE = (1, 4, 4)  # tiny images: D = 16


def _tile(img: np.ndarray, r: int, c: int, h: int = 4, w: int = 4) -> np.ndarray:
    return img[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + c * (w + 1) : 1 + c * (w + 1) + w]


def _constant_decoder(fn):
    """decode(z) = an image whose every pixel is fn(z) (clamped to [0, 1] by the plots)."""
    return lambda z: fn(z)[:, None].expand(z.shape[0], 16)


def test_prior_draws_are_seeded_scaled_and_leave_global_rng_alone():
    torch.manual_seed(5)
    before = torch.rand(3)
    torch.manual_seed(5)
    a = plots.prior_draws(20000, 2, seed=1, temperature=0.5)
    after = torch.rand(3)
    torch.testing.assert_close(before, after)  # global stream untouched
    torch.testing.assert_close(a, plots.prior_draws(20000, 2, seed=1, temperature=0.5))
    assert a.shape == (20000, 2)
    # std of 40000 N(0, 0.25) draws: standard error ≈ 0.5/√(2·40000) ≈ 0.0018
    assert abs(a.std().item() - 0.5) < 0.01
    assert not torch.equal(a, plots.prior_draws(20000, 2, seed=2, temperature=0.5))


def test_manifold_grid_places_prior_quantiles_with_z2_upwards():
    seen = []

    def decode(z):
        seen.append(z.clone())
        return _constant_decoder(lambda z: Normal(0.0, 1.0).cdf(z[:, 0]))(z)  # brightness = Φ(z₁)

    n, q = 5, 0.9
    fig = _figures.manifold_grid(decode, SHAPE, n=n, quantile=q)
    z = seen[0]  # (n², 2)
    expected = Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, n))
    assert z.shape == (n * n, 2)
    torch.testing.assert_close(z[:n, 0], expected)  # first row: z₁ left → right
    torch.testing.assert_close(z[::n, 1], expected.flip(0))  # first column: z₂ top → bottom decreasing
    img = np.asarray(fig.axes[0].images[0].get_array())
    # Φ(z₁) is the brightness: 0.05 … 0.95 from the left column to the right one, in every row.
    np.testing.assert_allclose(
        [_tile(img, 2, c).mean() for c in range(n)], np.linspace(0.05, 0.95, n), atol=1e-6
    )
    assert fig.axes[0].get_xlabel().startswith("z₁") and fig.axes[0].get_ylabel() == "z₂"
    plt.close(fig)


def test_latent_traversal_varies_one_coordinate_per_row():
    seen = []
    z0 = torch.tensor([0.3, -0.7, 1.1])
    values = torch.tensor([-2.0, 0.0, 2.0])

    def decode(z):
        seen.append(z.clone())
        return torch.zeros(z.shape[0], 16)

    fig = _figures.latent_traversal(decode, z0, SHAPE, values=values)
    z = seen[0].reshape(3, 3, 3)  # (rows = traversed dim, cols = value, z_dim)
    for d in range(3):
        torch.testing.assert_close(z[d, :, d], values)
        others = [j for j in range(3) if j != d]
        torch.testing.assert_close(z[d][:, others], z0[others].expand(3, 2))
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["z1", "z2", "z3"]
    plt.close(fig)


def test_image_panels_table_layout_and_content():
    a = torch.rand(6, 16)
    b = torch.rand(6, 16)
    fig = _figures.image_panels({"row A": {"left": a, "right": b}, "row B": {"left": b}}, SHAPE, nrow=3)
    axes = fig.axes
    assert len(axes) == 4  # 2 rows × 2 columns; the missing panel stays empty
    assert [ax.get_title() for ax in axes[:2]] == ["left", "right"]
    assert axes[0].get_ylabel() == "row A" and axes[2].get_ylabel() == "row B"
    assert len(axes[3].images) == 0
    img = np.asarray(axes[1].images[0].get_array())
    np.testing.assert_allclose(
        _tile(img, 1, 2), b[5].reshape(4, 4).numpy(), atol=1e-6
    )  # image 5 = row 1, col 2
    plt.close(fig)


def test_iwae_convergence_plots_values_bands_and_matching_reference_colours():
    curves = {"model A": {100: (-90.0, 0.5), 1: (-95.0, 1.0), 10: (-92.0, 0.2)}, "model B": {1: (-99.0, 0.0)}}
    refs = {"model A: ELBO": (-95.5, 0.1), "other": (-100.0, float("nan"))}
    fig = _figures.iwae_convergence(curves, refs)
    ax = fig.axes[0]
    line = ax.get_lines()[0]
    np.testing.assert_array_equal(line.get_xdata(), [1, 10, 100])  # sorted by K
    np.testing.assert_array_equal(line.get_ydata(), [-95.0, -92.0, -90.0])
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(-97.0) and band.max() == pytest.approx(-89.0)  # ±2 s.e.
    assert ax.get_xscale() == "log"
    hlines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label() in refs}
    assert hlines["model A: ELBO"].get_color() == line.get_color()
    assert hlines["other"].get_color() not in (line.get_color(), ax.get_lines()[1].get_color())
    assert "nats" in ax.get_ylabel() and "K" in ax.get_xlabel()
    plt.close(fig)
    # the single-curve form {K: (value, stderr)}
    fig = _figures.iwae_convergence({1: (-3.0, 0.1), 5: (-2.0, 0.1)})
    assert fig.axes[0].get_lines()[0].get_label() == "IWAE_K"
    plt.close(fig)


def test_khat_histogram_reports_share_above_threshold():
    khat = torch.tensor([0.1, 0.2, 0.6, 0.75, 0.9, 1.2, 0.3, 0.4, 0.5, 0.65])  # 3 of 10 above 0.7
    fig = _figures.khat_histogram(khat)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any("30.0% with k̂ > 0.7" in t for t in labels)
    xs = sorted(ln.get_xdata()[0] for ln in fig.axes[0].get_lines())
    assert xs == [0.5, 0.7]
    plt.close(fig)


def test_bar_comparison_heights_are_the_values():
    values = {"β = 1": {"x": 0.95, "y": 0.9}, "β = 4": {"x": 0.7, "y": 0.8}}
    fig = _figures.bar_comparison(values, "R²", hline=0.9)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert heights == pytest.approx([0.95, 0.9, 0.7, 0.8])
    assert fig.axes[0].get_ylim()[1] >= 0.95
    plt.close(fig)


def test_latent_scatter_one_group_per_label_or_a_colour_bar():
    z = torch.randn(60, 3)
    fig = _figures.latent_scatter(z, torch.arange(60) % 3, dims=(0, 2), prior=False)
    assert len(fig.axes[0].collections) == 3  # one scatter per class
    np.testing.assert_allclose(fig.axes[0].collections[0].get_offsets(), z[::3][:, [0, 2]].numpy(), rtol=1e-6)
    plt.close(fig)
    fig = _figures.latent_scatter(z, torch.rand(60), c_label="radius")
    assert len(fig.axes) == 2 and fig.axes[1].get_ylabel() == "radius"  # colour bar
    plt.close(fig)


def test_training_curve_adds_the_recon_and_kl_panel_when_rows_have_them(tmp_path):
    """Rows of an older run (no valid_recon / valid_kl; train_elbo of version 0.1) give the one
    ELBO panel; rows with the terms add a panel of −valid_recon and valid_kl; comparing the two
    runs, the second panel holds only the newer run's lines, in its colour."""
    old = [{"epoch": e, "train_elbo": -100.0 + e, "valid_elbo": -101.0 + e} for e in (1, 2, 3)]
    new = [
        {
            "epoch": e,
            "objective": "elbo",
            "train_objective": -90.0 + e,
            "valid_elbo": -91.0 + e,
            "valid_recon": -70.0 + 2 * e,
            "valid_kl": 21.0 + e,
        }
        for e in (1, 2, 3)
    ]
    fig = plots.training_curve(old)
    assert len(fig.axes) == 1
    np.testing.assert_array_equal(fig.axes[0].get_lines()[1].get_ydata(), [-100.0, -99.0, -98.0])
    plt.close(fig)
    fig = plots.training_curve(new, path=tmp_path / "curve.png")
    assert len(fig.axes) == 2 and (tmp_path / "curve.png").stat().st_size > 1000
    nll, kl = fig.axes[1].get_lines()
    np.testing.assert_array_equal(nll.get_ydata(), [68.0, 66.0, 64.0])  # −E_q[log p(x|z)]
    np.testing.assert_array_equal(kl.get_ydata(), [22.0, 23.0, 24.0])
    assert "nats" in fig.axes[1].get_ylabel() and "NLL" in nll.get_label() and "KL" in kl.get_label()
    fig = plots.training_curve({"old": old, "new": new})
    lines = fig.axes[1].get_lines()
    assert [ln.get_label()[:5] for ln in lines] == ["new: ", "new: "]
    assert {ln.get_color() for ln in lines} == {fig.axes[0].get_lines()[2].get_color()}  # run 2's colour
    np.testing.assert_array_equal(lines[1].get_ydata(), [22.0, 23.0, 24.0])
    plt.close(fig)


# --------------------------------------------------------------------------- python -m ppl_vae.sample


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One epoch on the 8×8 digits, through the fit command's main (in-process: a second python
    would spend seconds importing torch)."""
    return tiny_fit(tmp_path_factory.mktemp("run"))


def tiny_fit(out, *extra: str):
    """``fit.main`` for one epoch of a tiny VAE on the digits into ``out`` (``extra``: more flags)."""
    argv = "--dataset digits --hidden 16 --z-dim 3 --epochs 1 --final-iwae-k 0 --device cpu --quiet".split()
    assert fit.main([*argv, *extra, "--out", str(out)]) == 0
    return out


def test_sample_cli_writes_a_seeded_grid(tiny_run, tmp_path):
    """One real ``python -m ppl_vae.sample`` process, then the same main() in-process: the same
    seed gives the same picture, at --out or at the default RUN_DIR/samples-seed<seed>.png."""
    a, c = tmp_path / "a.png", tmp_path / "c.png"
    b = tiny_run / "samples-seed3.png"  # the default --out
    r = subprocess.run(
        [sys.executable, "-m", "ppl_vae.sample", str(tiny_run), "--n", "12", "--seed", "3", "--out", str(a)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {a}"
    for seed, extra in ((3, []), (4, ["--out", str(c)])):
        assert sample.main([str(tiny_run), "--n", "12", "--seed", str(seed), *extra]) == 0
    img = plt.imread(a)
    assert img.ndim == 3 and min(img.shape[:2]) > 50 and img[..., :3].std() > 0.01
    assert a.read_bytes() == b.read_bytes()  # same seed: the same draws, the same picture
    assert a.read_bytes() != c.read_bytes()


def test_sample_of_a_label_has_its_own_default_file(tmp_path):
    """``--label L`` writes RUN_DIR/samples-labelL-seedS.png beside, not over, the unlabelled grid."""
    out = tiny_fit(tmp_path / "cond", "--conditional")
    assert sample.main([str(out), "--n", "4"]) == 0
    unlabelled = (out / "samples-seed0.png").read_bytes()
    assert sample.main([str(out), "--n", "4", "--label", "3"]) == 0
    assert (out / "samples-label3-seed0.png").exists()
    assert (out / "samples-seed0.png").read_bytes() == unlabelled


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n", "0"], "--n must be >= 1"),
        (["--out", "x.jpg"], "must name a .png"),
        (["--temperature", "0"], "--temperature must be > 0"),
        (["--out", "no/such/folder/x.png"], "does not exist"),
        (["--device", "gpu0"], "--device must be auto, cpu or cuda"),
    ],
)
def test_sample_cli_rejects_bad_input(tiny_run, args, message, capsys):
    with pytest.raises(SystemExit) as e:  # in-process: the same main() the module runs
        sample.main([str(tiny_run), *args])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert (
        len(lines) == 1 and lines[0].startswith("python -m ppl_vae.sample: error: ") and message in lines[0]
    )


def test_sample_cli_refuses_a_folder_without_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([str(tmp_path)])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "not a ppl_vae run directory" in lines[0]
