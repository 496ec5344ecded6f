"""``python -m ppl_vae.sample RUN_DIR``: decode new draws z ~ the run's prior p(z) (N(0, I) for
--prior normal) of a trained run into a grid.

Examples::

    python -m ppl_vae.sample runs/bmnist                          # 64 samples → runs/bmnist/samples-seed0.png
    python -m ppl_vae.sample runs/bmnist --n 100 --seed 3 --out new.png
    python -m ppl_vae.sample runs/bmnist --temperature 0.7        # z ~ N(0, 0.7² I): typical, less varied

Each image is the decoder's mean E[x | z] (the likelihood's mean: Bernoulli probabilities,
Gaussian means, continuous-Bernoulli means), the usual way to show samples of an image VAE.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .core.cli import ArgumentParser, run_command, user_errors
from .core.errors import UserError

PROG = "python -m ppl_vae.sample"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory written by python -m ppl_vae.fit (--out)"
    )
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--nrow", type=int, default=None, help="images per row (default: ⌈√n⌉)")
    p.add_argument("--seed", type=int, default=0, help="seed of the draws z ~ p(z) (default: 0)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="draw z ~ N(0, τ² I) with this τ; only for --prior normal with one latent layer (default: 1)",
    )
    p.add_argument(
        "--label",
        type=int,
        default=None,
        help="class to draw, for a run fitted with --conditional (default: every class in turn)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="PNG file to write (default: RUN_DIR/samples-seed<seed>.png, "
        "with --label RUN_DIR/samples-label<label>-seed<seed>.png)",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "checkpoint"),
        default="best",
        help="best.pt (best validation bound) or checkpoint.pt (latest) (default: best)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        from .reports import plots  # (torch loads here: a signal meanwhile is one line)
        from .training.runs import load_run, resolve_device

        if args.n < 1:
            raise UserError(f"--n must be >= 1, got {args.n}")
        if args.nrow is not None and args.nrow < 1:
            raise UserError(f"--nrow must be >= 1, got {args.nrow}")
        if not args.temperature > 0:
            raise UserError(f"--temperature must be > 0, got {args.temperature}")
        if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
            raise UserError(f"--device must be auto, cpu or cuda, got {args.device!r}")
        label = "" if args.label is None else f"-label{args.label}"
        out = Path(args.out) if args.out else Path(args.run_dir) / f"samples{label}-seed{args.seed}.png"
        if out.suffix.lower() != ".png":
            raise UserError(f"--out must name a .png file, got {out}")
        vae, cfg = load_run(args.run_dir, args.checkpoint, resolve_device(args.device))
        if not out.parent.is_dir():
            raise UserError(f"--out: folder {out.parent} does not exist")
        if args.label is not None and not cfg.conditional:
            raise UserError(
                f"--label needs a run fitted with --conditional; {args.run_dir} is not conditional"
            )
        if args.label is not None and not 0 <= args.label < cfg.num_classes:
            raise UserError(f"--label must be a class in 0..{cfg.num_classes - 1}, got {args.label}")
        normal = cfg.prior == "normal" and cfg.latent_layers == 1
        if args.temperature != 1 and not normal:
            raise UserError(
                "--temperature needs the N(0, I) prior of one latent layer; this run has "
                f"--prior {cfg.prior} with {cfg.latent_layers} latent layer(s)"
            )
        prior = (
            "p(z)" if not normal else "N(0, I)" if args.temperature == 1 else f"N(0, {args.temperature:g}² I)"
        )
        what = "" if args.label is None else f", class {args.label}"
        plots.prior_sample_grid(
            vae,
            args.n,
            args.nrow,
            args.seed,
            args.temperature,
            title=f"{args.n} samples of {Path(args.run_dir).name} ({cfg.dataset}, "
            f"{cfg.likelihood}{what}): E[x | z], z ~ {prior}",
            path=out,
            label=args.label,
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    run_command(PROG, main)
