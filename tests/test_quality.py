"""The record recipes of ``benchmarks/quality.py`` run with ``--quick`` (128 steps on 2,000
binarized-MNIST training images): each is wired as documented: the program it names, the
objective it trains, a validation bound that improves, and a result JSON whose numbers are the
evaluation's. The record numbers themselves are in benchmarks/results/ (docs/benchmarks.md).
"""

import json
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from ppl_vae.training.runs import load_run

REPO = Path(__file__).resolve().parents[1]

# recipe → (program settings its config must hold, the training objective's name in metrics.jsonl)
WIRING = {
    "vae": ({"prior": "normal", "guide": "diagonal", "latent_layers": 1, "elbo": "meanfield"}, "beta-elbo"),
    "iwae5": ({"prior": "normal", "elbo": "iwae", "num_particles": 5}, "beta-iwae-5"),
    "vampprior": ({"prior": "vampprior", "latent_layers": 1, "elbo": "trace"}, "beta-elbo"),
    "hvae-vampprior": (
        {"prior": "vampprior", "latent_layers": 2, "hierarchy": "chain", "guide": "diagonal"},
        "beta-elbo",
    ),
    "best": (
        {"prior": "vampprior", "latent_layers": 2, "hierarchy": "chain", "guide": "diagonal", "ema": 0.9},
        "beta-elbo",
    ),
}


@pytest.fixture(scope="module")
def quick_runs(tmp_path_factory, data_dir) -> dict:
    """Every recipe with ``--quick``, two at a time (each subprocess uses one core)."""
    root = tmp_path_factory.mktemp("quality")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def run(recipe):
        return subprocess.run(
            [
                sys.executable,
                str(REPO / "benchmarks" / "quality.py"),
                recipe,
                "--quick",
                "--data-dir",
                str(data_dir),
                "--out",
                str(root / recipe),
                "--device",
                "cpu",
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )

    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(WIRING, pool.map(run, WIRING)))
    return {recipe: (r, root / recipe) for recipe, r in done.items()}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(WIRING))
def test_quick_recipe_is_wired(recipe, quick_runs):
    r, out = quick_runs[recipe]
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / f"quality-{recipe}-quick.json").read_text())
    settings, objective = WIRING[recipe]
    cfg = result["config"]
    assert {k: cfg[k] for k in settings} == settings
    assert cfg["activation"] == "gated" and cfg["hidden"] == [300, 300] and cfg["z_dim"] == 40

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == result["epochs"] == 8 and rows[-1]["objective"] in (objective, "elbo", "iwae-5")
    assert rows[0]["objective"] == objective  # warm-up (β < 1) or IWAE from the first epoch
    bound = [row.get("valid_iwae_k", row["valid_elbo"]) for row in rows]
    assert max(bound[-3:]) > bound[0] + 5, bound  # the validation bound improves by nats, not noise
    # the epoch reported as best.pt's is the one best.pt holds: the first maximum of that bound
    best = bound.index(max(bound)) + 1
    assert result["best_epoch"] == result["fit_summary"]["best_epoch"] == best
    assert torch.load(out / "best.pt", map_location="cpu", weights_only=False)["epoch"] == best

    test = json.loads((out / "test-k100.json").read_text())  # what evaluate wrote
    assert result["test_nll"] == -test["log_px"] and result["test"]["n"] == 200
    assert result["test"]["num_samples"] == 100 and result["eval_seconds"] > 0 and result["train_seconds"] > 0
    assert result["test"]["log_px"] >= result["test"]["elbo_mc"]  # IWAE_100 above the ELBO on 200 images
    assert recipe in result["fit_command"] and "--quick" not in result["fit_command"]

    vae, _ = load_run(out)
    prior = vae.prior()
    if cfg["prior"] == "vampprior":  # the top site's prior is a mixture of the guide at K = 50 pseudo-inputs
        assert isinstance(prior, torch.distributions.MixtureSameFamily)
        assert prior.mixture_distribution.logits.shape == (50,) and prior.event_shape == (
            cfg["z2_dim"] if cfg["latent_layers"] == 2 else cfg["z_dim"],
        )
    units = result["test"]["active_units"]
    assert set(units) == ({"z1", "z2"} if cfg["latent_layers"] == 2 else {"z"})


def _benchmark_module(name):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def _quality_module():
    return _benchmark_module("quality")


def _recipes():
    return _benchmark_module("recipes")


def test_figure_puts_each_test_number_at_its_best_epochs_wall_clock_time(tmp_path):
    """10 epochs of 60 s of steps in a run whose wall clock was 20 min: the curve is stretched 2x,
    so best.pt of epoch 5 is drawn at 10 min, at the JSON's test log p(x). A fine-tuning run
    (``--init-from @best``) starts where its source's training ended: best's 20 min plus its own
    epoch 3 of 10 in 5 min, 21.5 min."""
    results = tmp_path / "results"
    results.mkdir()
    rows = [{"epoch": e, "valid_elbo": -100.0 + e, "epoch_seconds": 60.0} for e in range(1, 11)]

    def result(recipe, train_seconds, best_epoch, nll):
        (results / f"quality-{recipe}-cpu-metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
        (results / f"quality-{recipe}-cpu.json").write_text(
            json.dumps(
                {
                    "recipe": recipe,
                    "device": "cpu",
                    "train_seconds": train_seconds,
                    "best_epoch": best_epoch,
                    "test_nll": nll,
                    "test_nll_stderr": 0.004,
                    "test": {"num_samples": 5000},
                }
            )
        )

    result("vae", 1200.0, 5, 88.25)
    markers = _benchmark_module("quality_figure").figure(tmp_path / "q.png", results)
    assert markers == {"vae (cpu)": (pytest.approx(10.0), -88.25)}
    result("best", 1200.0, 5, 83.5)
    result("best-iwae5-from-best", 300.0, 3, 83.25)
    markers = _benchmark_module("quality_figure").figure(tmp_path / "q.png", results)
    assert markers["best-iwae5-from-best from best (cpu)"] == (pytest.approx(21.5), -83.25)
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_candidates_figure_puts_each_validation_number_at_its_best_epoch_beside_the_baseline(tmp_path):
    """The record candidates' figure: the baseline (best's committed curve, with its validation
    IWAE_1000 from evaluate's JSON) and each ``valid-*`` candidate, its validation log p(x) at its best
    epoch's wall-clock minute (a fine-tuning candidate after its source's training); test numbers
    never appear, nor does a ``--split valid`` result of a recipe that is no candidate, and a
    ``valid-best`` result replaces the baseline's evaluate JSON."""
    drawn = _benchmark_module("quality_figure")
    results = tmp_path / "results"
    results.mkdir()

    def write(stem, res, epochs=10):
        rows = [
            {"epoch": e, "valid_elbo": -90.0 + e / 10, "epoch_seconds": 60.0} for e in range(1, epochs + 1)
        ]
        (results / f"{stem}-cpu-metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (results / f"{stem}-cpu.json").write_text(json.dumps({"device": "cpu", **res}))

    write("quality-best", {"recipe": "best", "train_seconds": 1200.0, "best_epoch": 5, "test_nll": 83.5})
    (results / "eval-quality-best-valid-k1000-cpu.json").write_text(
        json.dumps({"log_px": -84.5, "log_px_stderr": 0.003, "num_samples": 1000})
    )
    assert drawn.candidates_figure(tmp_path / "c.png", results) == {
        "best (cpu)": (pytest.approx(10.0), -84.5)
    }
    valid = {"valid_nll_stderr": 0.003, "valid": {"num_samples": 1000}}
    write(
        "valid-best-skip",
        {"recipe": "best-skip", "train_seconds": 600.0, "best_epoch": 4, "valid_nll": 84.4, **valid},
    )
    write(
        "valid-best-iwae5-from-best",
        {
            "recipe": "best-iwae5-from-best",
            "train_seconds": 300.0,
            "best_epoch": 2,
            "valid_nll": 84.45,
            **valid,
        },
    )
    markers = drawn.candidates_figure(tmp_path / "c.png", results)
    assert markers == {
        "best (cpu)": (pytest.approx(10.0), -84.5),
        "best-skip (cpu)": (pytest.approx(4.0), -84.4),  # 4 of 10 one-minute epochs stretched to 10 min
        "best-iwae5-from-best from best (cpu)": (pytest.approx(20.0 + 1.0), -84.45),  # after best's 20 min
    }
    write(
        "valid-dynamic-vae",
        {"recipe": "dynamic-vae", "train_seconds": 60.0, "best_epoch": 1, "valid_nll": 84.0, **valid},
    )
    assert drawn.candidates_figure(tmp_path / "c.png", results) == markers  # not a candidate: not drawn
    write(
        "valid-best",
        {"recipe": "best", "train_seconds": 1200.0, "best_epoch": 5, "valid_nll": 84.48, **valid},
    )
    assert drawn.candidates_figure(tmp_path / "c.png", results)["best (cpu)"] == (pytest.approx(10.0), -84.48)
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_figure_draws_every_committed_result_on_its_data_sets_figure(tmp_path):
    """One figure per data set; every committed result is a marker on its own data set's figure
    (log p(x) in nats, or bits/dim = −log p(x) / (D ln 2) for a bits/dim data set)."""
    quality, drawn = _quality_module(), _benchmark_module("quality_figure")
    committed = [
        json.loads(p.read_text()) for p in sorted((REPO / "benchmarks" / "results").glob("quality-*-*.json"))
    ]
    by_dataset = {}
    for res in committed:
        by_dataset.setdefault(quality.dataset_of(res), []).append(res)
    assert len(by_dataset["binarized-mnist"]) >= 2  # vampprior and vae were run (docs/benchmarks.md)
    for dataset, results in by_dataset.items():
        markers = drawn.figure(tmp_path / f"{dataset}.png", dataset=dataset)
        assert len(markers) == len(results)
        bits = _recipes().DATASETS[dataset]["unit"] == "bits/dim"
        for res in results:
            minutes, y = markers[drawn.label(res)]
            want = res["test_nll"] / (res["test"]["dim"] * math.log(2)) if bits else -res["test_nll"]
            assert y == pytest.approx(want, rel=1e-12) and 0 < minutes <= res["train_seconds"] / 60 + 1e-9


def test_recipes_choose_their_data_set_and_a_seed_names_a_repeat():
    quality = _quality_module()
    cmd = quality.fit_command(
        "frey-vae", Path("runs/x"), quality.data_flags("frey-faces", "d"), 5, "cpu", False, seed=2
    )
    args = _recipes().merged(cmd[3:])
    assert args["--dataset"] == "frey-faces" and args["--likelihood"] == "discretized-logistic"
    assert args["--seed"] == "2" and args["--data-dir"] == "d"
    dyn = _recipes().merged(
        quality.fit_command("dynamic-vae", Path("o"), quality.data_flags("mnist", None), 5, "cpu", False)[3:]
    )
    assert dyn["--dataset"] == "mnist" and dyn["--binarize"] == "dynamic" and dyn["--seed"] == "0"
    recipes = _benchmark_module("recipes")
    assert recipes.result_stem("frey-vae", 0) == "quality-frey-vae"
    assert recipes.result_stem("frey-vae", 2) == "quality-frey-vae-seed2"
    assert recipes.result_path("frey-vae", 2, "valid", "cpu", Path("r")) == Path(
        "r/valid-frey-vae-seed2-cpu.json"
    )
    assert recipes.result_path("vae", 0, "test", "cpu", Path("r"), Path("o")) == Path(
        "o/quality-vae-quick.json"
    )
    # every recipe names a data set the table knows; the static ones keep their recorded commands
    assert all(ds in _recipes().DATASETS for ds, _ in quality.RECIPES.values())
    static = _recipes().merged(
        quality.fit_command(
            "best", Path("o"), quality.data_flags("binarized-mnist", None), 50, "auto", False
        )[3:]
    )
    recorded = json.loads((REPO / "benchmarks" / "results" / "quality-best-cpu.json").read_text())[
        "fit_command"
    ]
    recorded_args = _recipes().merged(shlex.split(recorded)[3:])
    for flag in (
        "--prior",
        "--latent-layers",
        "--ema",
        "--batch-size",
        "--lr",
        "--kl-warmup",
        "--pseudo-inputs",
    ):
        assert static[flag] == recorded_args[flag], flag


@pytest.mark.slow
def test_check_reruns_the_first_epochs_bit_identically_and_flags_a_changed_curve(
    quick_runs, data_dir, tmp_path
):
    """``--check 2`` reruns the recorded fit command under the recorded thread count (1 here) and
    finds the first two epochs bit-identical; against a curve changed by one nat it exits 1."""
    import shutil

    _, out = quick_runs["vae"]
    result = json.loads((out / "quality-vae-quick.json").read_text())
    assert result["environment"]["threads"] == 1 and result["environment"]["commit"]
    assert not result["fit_command"].startswith("/") and " /" not in result["fit_command"]  # relative paths

    def check(run_dir):
        return subprocess.run(
            [sys.executable, "benchmarks/quality.py", "vae", "--quick", "--check", "2", "--out", str(run_dir)]
            + ["--data-dir", str(data_dir), "--device", "cpu"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"},  # the recorded 1 is used
            timeout=600,
        )

    r = check(out)
    assert r.returncode == 0 and "--check 2: bit-identical" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
    changed = tmp_path / "changed"
    changed.mkdir()
    shutil.copy(out / "quality-vae-quick.json", changed)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows[1]["valid_elbo"] += 1.0
    (changed / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    r = check(changed)
    assert r.returncode == 1 and "largest relative difference" in r.stdout, r.stdout[-2000:]


def test_a_candidate_starts_from_its_source_run_or_says_in_one_line_that_there_is_none(
    tmp_path, capsys, monkeypatch
):
    """``--init-from @best`` stands for recipe best's run (or ``--from RUN``), the program comes from
    that run, so the candidate's own flags are training flags only; a missing source is one line,
    exit 2, before anything is trained."""
    quality = _quality_module()
    src = tmp_path / "src"
    cmd = quality.fit_command(
        "best-iwae5-from-best",
        Path("o"),
        quality.data_flags("binarized-mnist", None),
        15,
        "cpu",
        False,
        0,
        src,
    )
    args = _recipes().merged(cmd[3:])
    assert args["--init-from"] == str(src) and args["--elbo"] == "iwae" and args["--num-particles"] == "5"
    assert not {"--prior", "--latent-layers", "--hidden", "--z-dim", "--kl-warmup"} & set(args)
    # the other candidates are `best` with one change each (best-paper: the paper's two)
    best = _recipes().merged(list(quality.RECIPES["best"][1]))
    paper_optimizer = {
        "--optimizer": "adam-normgrad",
        "--batch-size": "100",
        "--lr": "5e-4",
        "--kl-warmup": "100",
    }
    changes = {
        "best-skip": {"--hierarchy": "skip"},
        "best-iaf": {"--guide": "iaf", "--flow-steps": "2"},
        "best-paper-optimizer": paper_optimizer,
        "best-paper": {"--hierarchy": "skip", **paper_optimizer},  # the paper's program and optimizer
        "best-paper-optimizer-iaf": {"--guide": "iaf", "--flow-steps": "2", **paper_optimizer},
        "best-paper-optimizer-iaf-z64": {
            "--guide": "iaf",
            "--flow-steps": "2",
            "--z-dim": "64",
            **paper_optimizer,
        },
        "best-paper-optimizer-iaf-wd": {
            "--guide": "iaf",
            "--flow-steps": "2",
            "--weight-decay": "1e-4",
            **paper_optimizer,
        },
    }
    trained_from_scratch = {c for c in quality.CANDIDATES if quality.source_of(c) is None}
    assert set(changes) == trained_from_scratch  # each one's change is stated
    for name, changed in changes.items():
        cand = _recipes().merged(list(quality.RECIPES[name][1]))
        assert {k: cand.get(k) for k in best.keys() | cand.keys() if best.get(k) != cand.get(k)} == changed, (
            name
        )
    docs = (REPO / "docs" / "benchmarks.md").read_text()
    assert all(f"| `{c}` |" in docs for c in quality.CANDIDATES)  # each has its row in the candidates' table

    def run(recipe, *flags):  # in this process: (exit code, stdout, stderr)
        with pytest.raises(SystemExit) as e:
            quality.main([recipe, "--split", "valid", *flags])
        out, err = capsys.readouterr()
        return e.value.code, out, err

    monkeypatch.chdir(tmp_path)
    (src / "config.json").parent.mkdir()
    (src / "config.json").write_text("{}")  # begun, never finished: no best.pt
    code, out, err = run("best-iwae5-from-best", "--from", str(src), "--out", str(tmp_path / "cand"))
    assert code == 2 and out == "", out + err
    assert err.count("\n") == 1 and f"{src} is not a finished run" in err and "--from RUN" in err
    assert not (tmp_path / "cand").exists()
    code, _, err = run("best-iwae5-from-best", "--quick")  # by default recipe best's own (quick) run
    assert code == 2 and "runs/quality-best-quick is not a finished run" in err, err
    assert "python benchmarks/quality.py best --quick" in err
    code, _, err = run("best-skip", "--from", str(src))  # trained from scratch: --from means nothing there
    assert code == 2 and "does not start from another run" in err, err


@pytest.mark.slow
def test_a_candidate_is_judged_on_validation_and_its_winner_then_on_test(quick_runs, data_dir, tmp_path):
    """``--split valid`` on an ``--init-from`` candidate (from the quick `best`): the fit starts from
    the source's best.pt, validation IWAE is evaluated and recorded as ``valid_nll``, no test
    number is computed; ``--evaluate-only`` then adds the test number of the same best.pt."""
    _, src = quick_runs["best"]
    out = tmp_path / "cand"

    def quality(*flags):
        return subprocess.run(
            [sys.executable, "benchmarks/quality.py", "best-iwae5-from-best", "--quick", "--out", str(out)]
            + ["--from", str(src), "--data-dir", str(data_dir), "--device", "cpu", *flags],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"},
            timeout=600,
        )

    r = quality("--split", "valid")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    result = json.loads((out / "valid-best-iwae5-from-best-quick.json").read_text())
    valid = json.loads((out / "valid-k100.json").read_text())  # what evaluate wrote
    assert result["valid_nll"] == -valid["log_px"] and "test" not in result and "test_nll" not in result
    assert valid["split"] == "valid" and not (out / "test-k100.json").exists()
    config = json.loads((out / "config.json").read_text())
    assert Path(config["init_from"]) == src.resolve() and config["elbo"] == "iwae"
    assert Path(config["init_record"]["file"]) == (src / "best.pt").resolve()
    assert config["prior"] == "vampprior" and config["latent_layers"] == 2  # the source's program
    assert "validation NLL" in r.stdout
    r = quality("--evaluate-only")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    test = json.loads((out / "quality-best-iwae5-from-best-quick.json").read_text())
    assert test["test_nll"] == -json.loads((out / "test-k100.json").read_text())["log_px"]
    recorded = _recipes().merged(shlex.split(test["fit_command"])[3:])  # paths relative to the repository
    assert (REPO / recorded["--init-from"]).resolve() == src.resolve() and test["best_epoch"] == result[
        "best_epoch"
    ]
    assert test["test"]["n"] == 200 and test["config"]["init_record"]["digest"]


def test_ais_table_pairs_runs_image_by_image(tmp_path, capsys, monkeypatch):
    """Two AIS runs of one model on overlapping random subsets (as --subset with one --seed gives),
    every printed number recomputed here by hand from the arrays: each row's paired difference
    AIS − IWAE_5000 (mean ± std/√n); AIS_T' − AIS_T on the common images only; the committed
    full-test NLL less the largest-T difference, measured directly and chained (the gain on the
    larger subset at T = 100 plus the increment), the SEs combined; and --figure writes a PNG."""
    import math

    import numpy as np

    table = _benchmark_module("ais_table")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.setattr(table, "RESULTS", results)
    (results / "quality-toy-cpu.json").write_text(
        json.dumps({"test_nll": 85.5, "test_nll_stderr": 0.004, "test": {"n": 1000}})
    )
    (results / "ais_cost-cpu-1.json").write_text(json.dumps({"transition_over_iwae_pass": 14.8}))
    rng = np.random.default_rng(0)
    index = rng.permutation(1000)
    runs = {}
    for steps, n in ((100, 40), (1000, 15)):
        idx = np.sort(index[:n])  # a prefix of one permutation, sorted (choose_subset)
        log_px = -85 - 0.01 * idx  # each image's own level, shared by both runs
        ais = log_px + 0.3 + 0.1 * (steps == 1000) + rng.normal(0, 0.05, n)
        iwae_by_k = log_px - np.array([[5.0], [1.0]]) + rng.normal(0, 0.1, (2, n))  # k = 1, 100
        d = ais - log_px
        s = {
            "run_dir": "runs/quality-toy", "n": n, "num_samples": 5000, "ais_steps": steps, "ais_chains": 16,
            "log_px": log_px.mean(), "log_px_stderr": 0.01, "khat_frac_above_0_7": 0.9, "ais": ais.mean(),
            "ais_stderr": 0.01, "ais_untrusted_frac": 0.0, "ais_accept": 0.65, "seconds": 10.0,
            "ais_minus_iwae": d.mean(), "ais_minus_iwae_stderr_across_datapoints": d.std(ddof=1) / n**0.5,
        }  # fmt: skip
        (tmp_path / f"t{steps}.json").write_text(json.dumps(s))
        np.savez(
            tmp_path / f"t{steps}.npz", index=idx, ais=ais, log_px=log_px, ks=[1, 100], iwae_by_k=iwae_by_k
        )
        runs[steps] = (idx, ais, d)
    png = tmp_path / "ais.png"
    assert table.main([*map(str, sorted(tmp_path.glob("*.json"))), "--figure", str(png)]) == 0
    out = capsys.readouterr().out
    for steps, n in ((100, 40), (1000, 15)):
        d = runs[steps][2]
        assert out.count(f"| {n} | {steps:,} × 16 |") == 1
        assert f"| **{d.mean():+.3f}** ± {d.std(ddof=1) / n**0.5:.3f} |" in out, out
    (i100, a100, _), (i1000, a1000, d1000) = runs[100], runs[1000]
    pos = np.searchsorted(i100, i1000)  # the 15 images of the smaller run within the larger
    assert (i100[pos] == i1000).all()
    diff = a1000 - a100[pos]
    assert f"on their 15 common images: {diff.mean():+.3f} ± {diff.std(ddof=1) / 15**0.5:.3f} nats" in out
    assert "All 1,000 test images: IWAE_5000 NLL 85.500 ± 0.004; less" in out  # the split's own size
    nll, se = 85.5 - d1000.mean(), math.hypot(0.004, d1000.std(ddof=1) / 15**0.5)
    assert (
        f"(on 15 random images), {d1000.mean():+.3f} ± {d1000.std(ddof=1) / 15**0.5:.3f}: **{nll:.2f} ± {se:.2f}**"
        in out
    )
    # chained: the gain at T = 100 on all 40 images plus the increment to T = 1000 on the common 15
    d100 = runs[100][2]
    g = d100.mean() + diff.mean()
    se_g = math.hypot(d100.std(ddof=1) / 40**0.5, diff.std(ddof=1) / 15**0.5)
    nll, se = 85.5 - g, math.hypot(0.004, se_g)
    assert (
        f"(chained: at T = 100 on 40 images, then the increments), {g:+.3f} ± {se_g:.3f}: **{nll:.2f} ± {se:.2f}**"
        in out
    )
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_resume_finishes_a_cut_short_fit_bit_for_bit_and_records_it(quick_runs, data_dir, tmp_path):
    """A quick `vae` fit stopped after epoch 3 of 8 with no summary.json (a killed session)
    finishes with ``--resume``: epochs 4–8 continue from the checkpoint, and the whole curve equals
    the uninterrupted quick run's in every field but the seconds (the same thread count, 1). The
    JSON names the resume command, and its training seconds are the sum of the epochs' seconds;
    a second ``--resume`` finds the fit finished and says so in one line."""
    _, whole = quick_runs["vae"]
    recorded = json.loads((whole / "quality-vae-quick.json").read_text())
    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    fit = shlex.split(recorded["fit_command"])[1:]  # python → this interpreter; paths relative to REPO
    fit[fit.index("--out") + 1] = str(out)
    r = subprocess.run(
        [sys.executable, *fit, "--epochs", "3", "--quiet"], cwd=REPO, env=env, capture_output=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (out / "summary.json").unlink()  # cut after epoch 3's checkpoint, before the fit's end

    def resume():
        return subprocess.run(
            [sys.executable, "benchmarks/quality.py", "vae", "--quick", "--resume", "--out", str(out)]
            + ["--data-dir", str(data_dir), "--device", "cpu"],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=env,
            timeout=600,
        )

    r = resume()
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]

    def curve(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in row.items() if k != "epoch_seconds"} for row in rows], rows

    (resumed, rows), (uncut, _) = curve(out), curve(whole)
    assert len(resumed) == 8 and resumed == uncut
    result = json.loads((out / "quality-vae-quick.json").read_text())
    (command,) = result["resumed_with"]
    assert "--resume" in command and "--epochs 8" in command
    assert "--time-limit" not in command  # --quick runs have none
    assert result["train_seconds"] == pytest.approx(sum(row["epoch_seconds"] for row in rows), rel=1e-12)
    assert "--epochs 8" in result["fit_command"] and "--resume" not in result["fit_command"]  # the recipe's
    again = resume()
    assert again.returncode == 2 and "finished (quality-fit.json)" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
