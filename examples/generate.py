"""Generate new images from a trained VAE: decode draws z ~ N(0, I).

A VAE is a generative model p(z) p_θ(x|z): sampling means drawing z from the prior and
decoding it. The grid shows E[x | z] (the decoder's mean, e.g. Bernoulli probabilities), the
usual picture. A second figure varies the prior's temperature τ (z ~ N(0, τ² I)): τ < 1 gives
typical, smoother images, τ > 1 rarer, stranger ones.

    python examples/generate.py --run runs/bmnist          # a run written by python -m ppl_vae.fit
    python examples/generate.py                            # no run given: train one first (minutes)
    python examples/generate.py --quick                    # ...a tiny one (seconds)

The same samples come from the command line: ``python -m ppl_vae.sample RUN_DIR --n 64``.
Writes to ``--out``: ``samples.png``, ``temperatures.png``, ``results.json``.
"""

from __future__ import annotations

from pathlib import Path

import _common
import _figures
import torch

from ppl_vae import sample
from ppl_vae.core.errors import DataError
from ppl_vae.reports import plots
from ppl_vae.training.runs import load_run


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "generate")
    p.add_argument(
        "--run",
        default=None,
        help="run directory of python -m ppl_vae.fit (default: train one into OUT/run first)",
    )
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    run = Path(args.run) if args.run else out / "run"
    if args.run is None:
        data = _common.load_data(args.dataset, args.data_dir, "bernoulli")
        if args.quick:
            data = _common.subset(data, 4000, 500, 500)
        _common.fit(data, run, z_dim=20, epochs=3 if args.quick else 30, seed=args.seed, final_iwae_k=0)
    print(f"sampling from the run in {run}")

    # The command-line module does the grid: one code path for samples.
    sample.main([str(run), "--n", str(args.n), "--seed", str(args.seed), "--out", str(out / "samples.png")])

    vae, cfg = load_run(run)
    temps = (0.5, 0.8, 1.0, 1.5)
    with torch.no_grad():
        rows = {
            f"τ = {t:g}": {
                "E[x | z],  z ~ N(0, τ² I)": vae.decode(plots.prior_draws(16, vae.z_dim, args.seed, t))
            }
            for t in temps
        }  # 16 images (16, D) per τ
        _figures.image_panels(
            rows,
            vae.image_shape,
            nrow=16,
            title=f"Prior temperature ({cfg.dataset}, z_dim = {vae.z_dim})",
            path=out / "temperatures.png",
        )
        # If q's aggregate matches the prior, E_z[E[x|z]] = E[x]: compare the mean pixel of many samples
        # with the data's.
        mean_sample = vae.decode(plots.prior_draws(2000, vae.z_dim, args.seed + 1)).mean().item()
    try:
        data = _common.load_data(cfg.dataset, cfg.data_dir or args.data_dir, cfg.likelihood, announce=False)
        mean_data = data.test.mean().item()
    except DataError:
        mean_data = None
    print(
        f"mean pixel of 2000 samples: {mean_sample:.4f}; of the test data: "
        + ("unknown (data not found)" if mean_data is None else f"{mean_data:.4f}")
    )
    _common.save_json(
        {
            "run": str(run),
            "dataset": cfg.dataset,
            "n": args.n,
            "mean_pixel_samples": mean_sample,
            "mean_pixel_test_data": mean_data,
        },
        out / "results.json",
    )
    return 0


if __name__ == "__main__":
    _common.run(main)
