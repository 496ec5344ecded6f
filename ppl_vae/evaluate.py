"""Held-out log-likelihood of a VAE run: ``python -m ppl_vae.evaluate RUN_DIR``. The command-line
face of :mod:`ppl_vae.reports.evaluation`, whose :func:`evaluate` takes any Pyro model/guide pair (also
importable from here: ``from ppl_vae.evaluate import evaluate``).

For every datapoint: the analytic-KL ELBO, the Monte Carlo ELBO, IWAE_k for the convergence curve
k ∈ ``ks`` and log p(x) ≈ IWAE_K with K = ``num_samples``, each with its Monte Carlo standard error, and
the Pareto k̂ of the importance weights, all from the same K draws; and the active units of every latent
site (:mod:`ppl_vae.reports.latents`). The report (a dict, also the ``--json``) gives dataset means in
nats per datapoint and a table with a verdict on log p(x): a lower bound whose SE cannot be trusted when
k̂ > min(1 − 1/log10 K, 0.7) on over 10 % of the datapoints (:func:`ppl_vae.inference.psis.khat_threshold`).
Bits/dim for discrete data and, as a bound, for 8-bit images under --dequantize uniform.

Examples::

    python -m ppl_vae.evaluate runs/bmnist --split test --num-samples 5000 --json test.json
    python -m ppl_vae.evaluate runs/bmnist --subset 500 --num-samples 1000 --ks 1,10,100,1000
    python -m ppl_vae.evaluate runs/bmnist --subset 100 --ais 1000 --bdmc 50   # AIS, BDMC's bracket

Work is split into fixed blocks of ``--batch-size`` datapoints; block b draws from seeds
derived from (``--seed``, b), so a datapoint's numbers do not depend on which process or in
which order blocks are computed, nor on ``--chunk-size`` (up to float rounding).
``torchrun --nproc_per_node=P -m ppl_vae.evaluate RUN_DIR ...`` gives rank r the blocks
r, r+P, r+2P, ...; rank 0 prints and writes the gathered result: the same numbers as one
process (``docs/scaling.md``).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .core.cli import ArgumentParser, callable_module, int_list, run_command, startup, user_errors
from .core.errors import UserError

PROG = "python -m ppl_vae.evaluate"
with startup(PROG):  # torch loads here: a signal meanwhile is one line, not a traceback
    import numpy as np
    import torch

    from .core import distributed, files
    from .inference import importance
    from .reports import annealing, bits

    # evaluate and evaluate_blocks stay importable from here (docs/estimators.md, examples/)
    from .reports.evaluation import DEFAULT_BLOCK, PER_DATAPOINT, curve_ks, evaluate, evaluate_blocks  # noqa: F401
    from .reports.report import MEAN, Report


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by python -m ppl_vae.fit (--out)")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="(default: test)")
    p.add_argument(
        "--num-samples",
        "-K",
        type=int,
        default=5000,
        metavar="K",
        help="K importance samples per datapoint for log p(x) ≈ IWAE_K (default: 5000)",
    )
    p.add_argument(
        "--ks",
        type=int_list,
        default=None,
        metavar="K1,K2,...",
        help="comma-separated k ≤ K of the convergence curve "
        "IWAE_k (default: those of 1,10,100,1000,5000 that are ≤ K; K is always added)",
    )
    p.add_argument(
        "--subset",
        type=int,
        metavar="N",
        help="evaluate a random subset of N datapoints, drawn "
        "with --seed (the binarized-MNIST files are ordered by class: never take the first N) "
        "(default: the whole split)",
    )
    p.add_argument(
        "--json",
        metavar="FILE",
        help="write the summary (and the run's config) to this JSON file",
    )
    p.add_argument(
        "--per-datapoint",
        default=None,
        metavar="FILE.npz",
        help="write per-datapoint arrays to this .npz file",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help="where the data are (default: the run's, else $PPL_VAE_DATA, else ~/.cache/ppl_vae)",
    )
    p.add_argument(
        "--checkpoint",
        choices=("best", "checkpoint"),
        default="best",
        help="best.pt (best validation bound) or checkpoint.pt (latest) (default: best)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BLOCK,
        metavar="B",
        help=f"datapoints per block; part of the "
        f"protocol, since a block's draws are seeded together (default: {DEFAULT_BLOCK})",
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="C",
        help=f"particles × datapoints per vectorized pass: "
        f"bounds memory, halved on CUDA out-of-memory; does not change results (default: "
        f"{importance.DEFAULT_CHUNK['cpu']} on CPU, {importance.DEFAULT_CHUNK['cuda']} on CUDA). "
        f"Not for flow guides or programs that are not slice-safe: they are weighed on all of a "
        f"block's datapoints at once (100 particles × --batch-size rows per pass), because a flow "
        f"scores a replayed z only through its inverse; lower --batch-size to bound their memory",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the subset and every draw (default: 0)")
    p.add_argument(
        "--ais",
        type=int,
        metavar="T",
        help="also estimate log p(x) by annealed importance sampling with T steps (HMC transitions, "
        "from the guide, or the prior with --ais-init prior; docs/estimators.md) (default: off)",
    )
    p.add_argument(
        "--ais-chains", type=int, default=16, metavar="C", help="AIS chains per datapoint (default: 16)"
    )
    p.add_argument(
        "--ais-leapfrog",
        type=int,
        default=10,
        metavar="L",
        help="leapfrog steps per transition (default: 10)",
    )
    p.add_argument(
        "--ais-init", choices=("guide", "prior"), default="guide", help="from q(z|x) or p(z) (default: guide)"
    )
    p.add_argument(
        "--bdmc",
        type=int,
        metavar="N",
        help="with --ais: bidirectional Monte Carlo on N datapoints simulated from the model, a bracket "
        "lower <= log p(x) <= upper whose width bounds AIS's error (default: off)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def check_args(args) -> list[int]:
    """Validate the flags (``UserError`` on bad input); returns the sorted k of the curve, K included."""
    K = args.num_samples
    if K < 1:
        raise UserError(f"--num-samples K must be >= 1, got {K}")
    if args.ks is not None:
        if not args.ks:
            raise UserError("--ks is empty; give comma-separated integers such as 1,10,100")
        bad = [k for k in args.ks if not 1 <= k <= K]
        if bad:
            raise UserError(f"--ks values must lie in 1..K = {K}, got {bad}")
    for flag, value in (
        ("--batch-size", args.batch_size),
        ("--chunk-size", args.chunk_size),
        ("--subset", args.subset),
        ("--ais", args.ais),
        ("--ais-chains", args.ais_chains),
        ("--ais-leapfrog", args.ais_leapfrog),
        ("--bdmc", args.bdmc),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.bdmc is not None and args.ais is None:
        raise UserError("--bdmc N needs --ais T: the bracket runs AIS forward and in reverse with T steps")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.per_datapoint and not args.per_datapoint.endswith(".npz"):
        raise UserError(f"--per-datapoint must name a .npz file, got {args.per_datapoint!r}")
    return curve_ks(K, args.ks)


def choose_subset(n: int, subset: int | None, seed: int) -> torch.Tensor:
    """Indices into a split of ``n`` points: all, or ``subset`` drawn without replacement with
    ``seed`` (sorted)."""
    if subset is None:
        return torch.arange(n)
    if subset > n:
        raise UserError(f"--subset {subset} is larger than the split ({n} datapoints)")
    g = torch.Generator().manual_seed(importance.derive_seed(seed, 0x5EB5E7))
    return torch.randperm(n, generator=g)[:subset].sort().values


def _binarization(dataset: str, binarize: str) -> str:
    return "static" if dataset == "binarized-mnist" else binarize  # the .amat files are one fixed draw


def main(argv=None) -> int:
    from .data.fingerprint import changes, fingerprint
    from .training.runs import check_image_shape, load_run, load_run_data, resolve_device

    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        ks = check_args(args)
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise UserError(
                f"run directory {run_dir} does not exist; pass the --out of a python -m ppl_vae.fit run"
            )
        # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
        ctx, device = distributed.setup(resolve_device(args.device))
        vae, cfg = load_run(run_dir, which=args.checkpoint, device=device)
        ds = load_run_data(cfg, vae.likelihood, args.data_dir)  # as fitted
        check_image_shape(ds, cfg)
        used = fingerprint(ds, cfg.dataset)  # recorded in the JSON; other data than the run's: a warning
        changed = changes(cfg.data_fingerprint, used, args.split)  # (the split evaluated)
        if changed and ctx.is_main:
            warnings.warn(
                f"the data ({ds.name}) are not those the run was trained on ({changed}); the numbers "
                f"below are on these data"
            )
        x_split = ds.split(args.split)
        index = choose_subset(x_split.shape[0], args.subset, args.seed)
        x = x_split[index]  # (n, D)
        if cfg.conditional:  # the program takes the labels too: (x, y) sliced together
            if args.split not in ds.labels:
                raise UserError(
                    f"this run is class-conditional, and {ds.name} has no labels for the {args.split} split"
                )
            x = (x, ds.labels[args.split][index])  # labels (n,) class indices
        report = evaluate(
            vae.model,
            vae.guide,
            x,
            num_samples=args.num_samples,
            ks=ks,
            seed=args.seed,
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            discrete=vae.likelihood.discrete,  # a probability: Bernoulli on 0/1, discretized logistic
            bits=bits.scale_for(ds, vae.likelihood, args.split),  # which data, which bound (or why none)
            likelihood=vae.likelihood.name,
            kl_warmup=cfg.kl_warmup,  # a collapse line's remedies: a longer warm-up, if it had one
            device=device,
            progress=not args.quiet and ctx.is_main and sys.stderr.isatty(),  # a log: no line per refresh
            ctx=ctx,
            ais_steps=args.ais or 0,
            ais_chains=args.ais_chains,
            ais_leapfrog=args.ais_leapfrog,
            ais_init=args.ais_init,
            bdmc=args.bdmc or 0,
        )
        if not ctx.is_main:
            return 0
        binarization = _binarization(ds.name, ds.binarize)
        s = Report(
            {
                "dataset": ds.name,
                "split": args.split,
                "binarization": binarization,
                "binarize_seed": ds.fixed_seed("binarize", args.split),  # the split's fixed draw (None: none)
                "dequantize": ds.dequantize,  # uniform: the split is scored at y = (x + u)/256
                "dequantize_seed": ds.fixed_seed("dequantize", args.split),  # its one draw of u (uniform)
                "likelihood": vae.likelihood.name,
                **report,
                "subset": args.subset,
                "device": str(device),
                "processes": ctx.world_size,
                "run_dir": str(run_dir),
                "checkpoint": args.checkpoint,
                "config": cfg.to_dict(),
                "data_fingerprint": used,
                "data_changed": changed,
            },
            report.per_datapoint,
        )
        said = "not binarized" if binarization == "none" else f"{binarization} binarization"
        if ds.fixed_seed("binarize", args.split) is not None:  # the fixed draw this run is scored on
            said += f", {args.split} images drawn once with seed {ds.fixed_seed('binarize', args.split)}"
        if ds.dequantize == "uniform":  # y = (x + u)/256: the nats are of this density, on these y
            said += f"; uniform dequantization, (x + u)/256, u drawn once with seed {s['dequantize_seed']}"
        header = (
            f"{ds.name} ({said}), {args.split} split, n = {s['n']}"
            f"{' (random subset, seed ' + str(args.seed) + ')' if args.subset else ''}, K = {args.num_samples}, "
            f"D = {s['dim']}, {vae.likelihood.name} likelihood; nats per datapoint  [{s['seconds']:.0f} s on "
            f"{device}{f' × {ctx.world_size} processes' if ctx.enabled else ''}]"
        )
        print(s.table(header))
        for path in (args.json, args.per_datapoint):
            if path:
                try:
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                except OSError as e:
                    raise UserError(
                        f"could not create the folder {Path(path).parent} for {path}: {files.reason(e)}"
                    ) from None
        if args.json:
            files.write_text(args.json, s.to_json())
        if args.per_datapoint:
            res = report.per_datapoint
            latent = {k.replace(":", "_"): res[k].T for k in res if k.startswith(MEAN)}  # (M, d) per site
            keys = (*PER_DATAPOINT, "iwae_by_k", "iwae_by_k_stderr", *annealing.ARRAYS)  # AIS (M,), BDMC (N,)
            files.atomic_write(
                args.per_datapoint,
                lambda f: np.savez(
                    f,
                    index=index.numpy(),
                    ks=np.asarray(ks),
                    **latent,
                    **{k: res[k] for k in keys if k in res},
                ),
            )
    return 0


callable_module(__name__, "evaluate")  # fit(...) / evaluate(...) from Python: see core.cli.callable_module


if __name__ == "__main__":
    run_command(PROG, main)
