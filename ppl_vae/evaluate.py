"""``python -m ppl_vae.evaluate RUN_DIR``: held-out log-likelihood of a trained VAE.

For every datapoint of a split: the analytic-KL ELBO, the Monte Carlo ELBO, IWAE_k for the
convergence curve k ∈ ``--ks`` and log p(x) ≈ IWAE_K with K = ``--num-samples``, each with
its Monte Carlo standard error, and the Pareto k̂ of the importance weights. All estimates
of a datapoint come from the same K draws. Prints one table (nats per datapoint and bits per
dimension) and optionally writes ``--json`` and ``--per-datapoint`` files.

Examples::

    python -m ppl_vae.evaluate runs/bmnist --split test --num-samples 5000 --json test.json
    python -m ppl_vae.evaluate runs/bmnist --subset 500 --num-samples 1000 --ks 1,10,100,1000

Work is split into fixed blocks of ``--batch-size`` datapoints; block b draws from seeds
derived from (``--seed``, b), so a datapoint's numbers do not depend on which process or in
which order blocks are computed, nor on ``--chunk-size`` (up to float rounding).

``torchrun --nproc_per_node=P -m ppl_vae.evaluate RUN_DIR ...`` gives rank r the blocks
r, r+P, r+2P, ...; rank 0 gathers the per-datapoint results, prints and writes them: the same
numbers as one process (see ``docs/scaling.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed, estimators
from .cli import ArgumentParser, int_list, user_errors
from .errors import UserError

PROG = "python -m ppl_vae.evaluate"
DEFAULT_KS = (1, 10, 100, 1000, 5000)
DEFAULT_BLOCK = 100
PER_DATAPOINT = ("elbo_analytic", "elbo_analytic_stderr", "elbo_mc", "elbo_mc_stderr", "log_px",
                 "log_px_stderr", "khat", "ess")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a run directory written by python -m ppl_vae.fit (--out)")
    p.add_argument("--split", choices=("valid", "test"), default="test", help="(default: test)")
    p.add_argument("--num-samples", "-K", type=int, default=5000, metavar="K", help="K importance samples per datapoint for "
                   "log p(x) ≈ IWAE_K (default: 5000)")
    p.add_argument("--ks", type=int_list, default=None, metavar="K1,K2,...", help="comma-separated k ≤ K of the convergence curve "
                   "IWAE_k (default: those of 1,10,100,1000,5000 that are ≤ K; K is always added)")
    p.add_argument("--subset", type=int, default=None, metavar="N", help="evaluate a random subset of N datapoints, drawn "
                   "with --seed (the binarized-MNIST files are ordered by class: never take the first N) "
                   "(default: the whole split)")
    p.add_argument("--json", default=None, metavar="FILE", help="write the summary (and the run's config) to this JSON file")
    p.add_argument("--per-datapoint", default=None, metavar="FILE.npz", help="write per-datapoint arrays to this .npz file")
    p.add_argument("--data-dir", default=None, metavar="DIR", help="where the data are (default: the run's, else "
                   "$PPL_VAE_DATA, else ~/.cache/ppl_vae)")
    p.add_argument("--checkpoint", choices=("best", "checkpoint"), default="best",
                   help="best.pt (best validation ELBO) or checkpoint.pt (latest) (default: best)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: auto)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BLOCK, metavar="B", help=f"datapoints per block; part of the "
                   f"protocol, since a block's draws are seeded together (default: {DEFAULT_BLOCK})")
    p.add_argument("--chunk-size", type=int, default=None, metavar="C", help=f"particles × datapoints per vectorized pass: "
                   f"bounds memory, halved on CUDA out-of-memory; does not change results (default: "
                   f"{estimators.DEFAULT_CHUNK['cpu']} on CPU, {estimators.DEFAULT_CHUNK['cuda']} on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seeds the subset and every draw (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def check_args(args) -> list[int]:
    """Validate the flags (``UserError`` on bad input); returns the sorted k of the curve, K included."""
    K = args.num_samples
    if K < 1:
        raise UserError(f"--num-samples K must be >= 1, got {K}")
    if args.ks is None:
        ks = [k for k in DEFAULT_KS if k <= K]
    else:
        ks = args.ks
        if not ks:
            raise UserError("--ks is empty; give comma-separated integers such as 1,10,100")
        bad = [k for k in ks if not 1 <= k <= K]
        if bad:
            raise UserError(f"--ks values must lie in 1..K = {K}, got {bad}")
    for flag, value in (("--batch-size", args.batch_size), ("--chunk-size", args.chunk_size),
                        ("--subset", args.subset)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if args.seed < 0:
        raise UserError(f"--seed must be >= 0, got {args.seed}")
    if not (args.device in ("auto", "cpu", "cuda") or args.device.startswith("cuda:")):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.per_datapoint and not args.per_datapoint.endswith(".npz"):
        raise UserError(f"--per-datapoint must name a .npz file, got {args.per_datapoint!r}")
    return sorted({*ks, K})


def choose_subset(n: int, subset: int | None, seed: int) -> torch.Tensor:
    """Indices into a split of ``n`` points: all, or ``subset`` drawn without replacement with
    ``seed`` (sorted)."""
    if subset is None:
        return torch.arange(n)
    if subset > n:
        raise UserError(f"--subset {subset} is larger than the split ({n} datapoints)")
    g = torch.Generator().manual_seed(estimators.derive_seed(seed, 0x5EB5E7))
    return torch.randperm(n, generator=g)[:subset].sort().values


def _block(model, guide, xb, num_samples, ks, seed, chunk_size) -> dict[str, np.ndarray]:
    est = estimators.estimate_all(model, guide, xb, num_samples, ks=ks, seed=seed, chunk_size=chunk_size)
    out = {"khat": est["khat"].numpy(), "ess": est["ess"].numpy()}
    for name, key in (("elbo_analytic", "elbo_analytic"), ("elbo_mc", "elbo_mc"), ("log_px", "iwae")):
        out[name] = est[key].value.double().cpu().numpy()
        out[name + "_stderr"] = est[key].stderr.double().cpu().numpy()
    for key, attr in (("iwae_by_k", "value"), ("iwae_by_k_stderr", "stderr")):
        rows = [getattr(est["iwae_by_k"][k], attr).double().cpu().numpy() for k in ks]
        out[key] = np.stack(rows) if rows else np.zeros((0, xb.shape[0]))  # (len(ks), B)
    return out


def evaluate_blocks(model, guide, x: torch.Tensor, block_ids, *, block_size: int = DEFAULT_BLOCK,
                    num_samples: int = 5000, ks=(), seed: int = 0, chunk_size: int | None = None,
                    device=None, progress=None, log=None) -> dict[str, np.ndarray]:
    """Per-datapoint estimates for blocks ``block_ids`` of ``x (N, D)``.

    Block b is ``x[b·block_size : (b+1)·block_size]``, moved to ``device`` and evaluated with
    :func:`ppl_vae.estimators.estimate_all` seeded by ``derive_seed(seed, b)``: any split of the
    block ids over processes gives the same numbers. On CUDA out-of-memory the chunk size is
    halved and the block retried (same draws, so the same results).

    Returns arrays over the M datapoints of the blocks, in block order: ``position (M,)`` (row
    of ``x``), those of :data:`PER_DATAPOINT` ``(M,)``, ``iwae_by_k`` and ``iwae_by_k_stderr``
    ``(len(ks), M)``, and ``chunk_size`` (the one finally used).
    """
    ks = sorted(ks)
    chunk_size = chunk_size or estimators.default_chunk(device if device is not None else x.device)
    parts = []
    for b in block_ids:
        rows = torch.arange(b * block_size, min((b + 1) * block_size, x.shape[0]))
        xb = x[rows].to(device) if device is not None else x[rows]
        while True:
            try:
                res = _block(model, guide, xb, num_samples, ks, estimators.derive_seed(seed, b), chunk_size)
                break
            except torch.cuda.OutOfMemoryError:
                smallest = estimators.SAMPLE_UNIT  # a pass holds at least one unit on one datapoint
                if chunk_size <= smallest:
                    raise UserError(f"out of GPU memory even with the smallest pass ({estimators.SAMPLE_UNIT} "
                                    f"particles × 1 datapoint); the model is too large for this GPU") from None
                chunk_size = max(smallest, chunk_size // 2)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                if log:
                    log(f"CUDA out of memory: retrying block {b} with --chunk-size {chunk_size}")
        res["position"] = rows.numpy()
        parts.append(res)
        if progress is not None:
            progress.update(len(rows))
    if not parts:  # e.g. a process given no blocks
        empty = np.zeros((0,))
        parts = [{**{k: empty for k in (*PER_DATAPOINT, "position")},
                  "iwae_by_k": np.zeros((len(ks), 0)), "iwae_by_k_stderr": np.zeros((len(ks), 0))}]
    out = {key: np.concatenate([p[key] for p in parts], axis=-1) for key in parts[0]}
    out["chunk_size"] = chunk_size
    return out


def gather_blocks(res: dict, ctx: distributed.Context) -> dict[str, np.ndarray]:
    """Every rank's :func:`evaluate_blocks` result merged in row order, as one process over all
    blocks gives it (``chunk_size``: the smallest any rank used). A no-op single-process."""
    if not ctx.enabled:
        return res
    parts = distributed.all_gather_objects(res, ctx)
    position = np.concatenate([p["position"] for p in parts]).astype(np.int64)  # (M,)
    order = np.argsort(position, kind="stable")
    out = {key: np.concatenate([p[key] for p in parts], axis=-1)[..., order]
           for key in parts[0] if key not in ("position", "chunk_size")}
    out["position"] = position[order]
    out["chunk_size"] = min(int(p["chunk_size"]) for p in parts)
    return out


def bits_per_dim(nats: float, dim: int) -> float:
    """−log p / (D ln 2): a log-likelihood per datapoint in nats → bits per dimension."""
    return -nats / (dim * math.log(2))


def summarize(res: dict, ks, dim: int) -> dict:
    """Dataset means with their Monte Carlo standard errors √(Σ se_i²)/n, and, under
    ``*_stderr_across_datapoints``, std_i / √n (the spread of the test set itself)."""
    n = len(res["log_px"])
    mc_se = lambda se: float(np.sqrt(np.sum(se ** 2)) / n)  # noqa: E731
    spread_se = lambda v: float(np.std(v, ddof=1) / math.sqrt(n)) if n > 1 else math.nan  # noqa: E731
    s = {"n": n}
    for name in ("elbo_analytic", "elbo_mc", "log_px"):
        s[name] = float(np.mean(res[name]))
        s[name + "_stderr"] = mc_se(res[name + "_stderr"])
        s[name + "_stderr_across_datapoints"] = spread_se(res[name])
    s["bits_per_dim"] = bits_per_dim(s["log_px"], dim)
    s["elbo_bits_per_dim"] = bits_per_dim(s["elbo_analytic"], dim)
    gap = res["log_px"] - res["elbo_analytic"]
    s["gap"] = float(np.mean(gap))
    s["gap_stderr"] = float(math.hypot(s["log_px_stderr"], s["elbo_analytic_stderr"]))
    s["gap_bits_per_dim"] = s["gap"] / (dim * math.log(2))
    s["iwae_by_k"] = {str(k): float(np.mean(v)) for k, v in zip(ks, res["iwae_by_k"])}
    s["iwae_by_k_stderr"] = {str(k): mc_se(se) for k, se in zip(ks, res["iwae_by_k_stderr"])}
    khat = res["khat"][~np.isnan(res["khat"])]  # NaN: K too small to fit a tail
    finite = khat[np.isfinite(khat)]
    s["khat_mean"] = float(np.mean(finite)) if len(finite) else None  # over finite k̂
    s["khat_frac_above_0_7"] = float(np.mean(khat > 0.7)) if len(khat) else None  # inf counts as > 0.7
    s["khat_frac_above_0_5"] = float(np.mean(khat > 0.5)) if len(khat) else None
    s["ess_median"] = float(np.median(res["ess"]))
    return s


def json_safe(obj):
    """NaN/inf (e.g. the standard error of a single draw) → ``null``: strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def format_table(s: dict, dim: int, header: str) -> str:
    def row(label, value, se):
        return f"{label:<28}{value:>12.3f}{se:>10.3f}{bits_per_dim(value, dim):>12.4f}"
    lines = [header, f"{'':<28}{'nats':>12}{'± MC SE':>10}{'bits/dim':>12}",
             row("ELBO (analytic KL)", s["elbo_analytic"], s["elbo_analytic_stderr"]),
             row("ELBO (Monte Carlo)", s["elbo_mc"], s["elbo_mc_stderr"])]
    for k, v in s["iwae_by_k"].items():
        lines.append(row(f"IWAE k={k}", v, s["iwae_by_k_stderr"][k]))
    lines.append(row(f"log p(x) (IWAE K={s['num_samples']})", s["log_px"], s["log_px_stderr"]))
    lines.append(f"{'gap log p(x) − ELBO':<28}{s['gap']:>12.3f}{s['gap_stderr']:>10.3f}{s['gap_bits_per_dim']:>12.4f}")
    if s["khat_frac_above_0_7"] is None:
        lines.append(f"Pareto k̂: not computed (needs K >= {estimators.PSIS_MIN_SAMPLES}); median ESS "
                     f"{s['ess_median']:.1f} of K")
    else:
        mean = "n/a" if s["khat_mean"] is None else f"{s['khat_mean']:.3f}"
        lines.append(f"Pareto k̂: mean {mean}, fraction > 0.7: {s['khat_frac_above_0_7']:.3f} "
                     f"(> 0.5: {s['khat_frac_above_0_5']:.3f}); median PSIS ESS {s['ess_median']:.1f} of K")
    lines.append(f"across-datapoint SE of log p(x): {s['log_px_stderr_across_datapoints']:.3f} nats "
                 f"(the test set's own spread; the ± column is Monte Carlo error only)")
    return "\n".join(lines)


def _binarization(dataset: str, binarize: str) -> str:
    return "static" if dataset == "binarized-mnist" else binarize  # the .amat files are one fixed draw


def main(argv=None) -> int:
    from .data import load_dataset
    from .train import load_run, resolve_device

    args = build_parser().parse_args(argv)
    with user_errors(PROG):
        ks = check_args(args)
        run_dir = Path(args.run_dir)
        if not run_dir.is_dir():
            raise UserError(f"run directory {run_dir} does not exist; pass the --out of a python -m ppl_vae.fit run")
        # under torchrun: join the process group; this rank's device (cuda:LOCAL_RANK on GPUs)
        ctx, device = distributed.setup(resolve_device(args.device))
        vae, cfg = load_run(run_dir, which=args.checkpoint, device=device)
        ds = load_dataset(cfg.dataset, args.data_dir or cfg.data_dir, cfg.binarize, vae.likelihood)
        if cfg.image_shape is not None and list(ds.image_shape) != list(cfg.image_shape):
            raise UserError(f"the data have image shape {list(ds.image_shape)} but the run was trained on "
                            f"{cfg.image_shape}")
        x_split = ds.split(args.split)
        index = choose_subset(x_split.shape[0], args.subset, args.seed)
        x = x_split[index]  # (n, D)
        n_blocks = math.ceil(x.shape[0] / args.batch_size)
        blocks = distributed.strided(range(n_blocks), ctx)  # this rank's share: blocks r, r+P, ...
        rows = sum(min((b + 1) * args.batch_size, x.shape[0]) - b * args.batch_size for b in blocks)
        t0 = time.perf_counter()
        bar = tqdm(total=rows, unit="datapoint", disable=args.quiet or not ctx.is_main, dynamic_ncols=True,
                   file=sys.stderr)
        log = lambda msg: tqdm.write(msg, file=sys.stderr)  # noqa: E731
        try:
            res = evaluate_blocks(vae.model, vae.guide, x, blocks, block_size=args.batch_size,
                                  num_samples=args.num_samples, ks=ks, seed=args.seed, chunk_size=args.chunk_size,
                                  device=device, progress=bar, log=log)
        finally:
            bar.close()
        res = gather_blocks(res, ctx)
        seconds = time.perf_counter() - t0
        if not ctx.is_main:
            return 0
        dim = vae.x_dim
        binarization = _binarization(ds.name, ds.binarize)
        s = {"dataset": ds.name, "split": args.split, "binarization": binarization,
             "num_samples": args.num_samples, "units": "nats per datapoint (bits_per_dim = -nats / (D ln 2))",
             "dim": dim, **summarize(res, ks, dim), "seed": args.seed, "subset": args.subset,
             "batch_size": args.batch_size, "chunk_size": int(res["chunk_size"]), "device": str(device),
             "processes": ctx.world_size, "seconds": seconds, "run_dir": str(run_dir), "checkpoint": args.checkpoint,
             "config": cfg.to_dict()}
        header = (f"{ds.name} ({binarization} binarization), {args.split} split, n = {s['n']}"
                  f"{' (random subset, seed ' + str(args.seed) + ')' if args.subset else ''}, K = {args.num_samples}, "
                  f"D = {dim}; nats per datapoint  [{seconds:.0f} s on {device}"
                  f"{f' × {ctx.world_size} processes' if ctx.enabled else ''}]")
        print(format_table(s, dim, header))
        for path in (args.json, args.per_datapoint):
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        if args.json:
            Path(args.json).write_text(json.dumps(json_safe(s), indent=2, allow_nan=False) + "\n")
        if args.per_datapoint:
            np.savez(args.per_datapoint, index=index.numpy(), ks=np.asarray(ks),
                     **{k: res[k] for k in (*PER_DATAPOINT, "iwae_by_k", "iwae_by_k_stderr")})
    return 0


if __name__ == "__main__":
    sys.exit(main())
