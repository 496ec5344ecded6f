"""Evaluation speed: test log p(x) by IWAE with K samples on M test images, in one process.

    python benchmarks/eval_speed.py --data-dir ../shared/data [--k 1000] [--m 1000] [--run RUN_DIR]

Compares, on the same trained 784-400-20 VAE (from ``--run``, else trained here for one epoch):

  (ppl_vae) ``ppl_vae.inference.estimators.iwae``: generic over Pyro programs, batched over datapoints
            and samples, streaming log-sum-exp;
  (e)       a per-datapoint loop in the style of common VAE libraries: one image at a time,
            its K samples in chunks, log-mean-exp at the end;
  (f)       a pure-PyTorch batched reference: hand-written log-weights, the same batching.

Prints seconds, the mean log p(x) of each (they must agree within Monte Carlo error) and the
ratios e/ppl_vae (target ≥ 10) and ppl_vae/f (target ≤ 1.2). It also prints the compute floor:
the decoder's matrix products alone (K·M·(20·400 + 400·784) multiply-adds) at the GEMM rate
measured here. No evaluator can beat it, so e/floor bounds the e/ppl_vae any method could reach
on this device.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import TorchVAE, device_name, save_result, timed  # noqa: E402

from ppl_vae.data.datasets import load_dataset  # noqa: E402
from ppl_vae.inference import estimators, importance  # noqa: E402
from ppl_vae.training.config import FitConfig  # noqa: E402
from ppl_vae.training.runs import load_run  # noqa: E402
from ppl_vae.training.train import Trainer  # noqa: E402


def torch_copy(vae) -> TorchVAE:
    """The same weights in the hand-written module (ppl_vae's MLP is Linear-ReLU-Linear)."""
    ref = TorchVAE(vae.x_dim, vae.encoder.body[0].out_features, vae.z_dim).to(vae.prior_loc.device)
    ref.enc.load_state_dict(vae.encoder.body.state_dict())
    ref.dec.load_state_dict(vae.decoder.body.state_dict())
    return ref.eval()


@torch.no_grad()
def iwae_per_datapoint(ref: TorchVAE, x, k, chunk=500):
    """(e): for each image, its K log-weights in chunks, then log-mean-exp."""
    out = torch.empty(x.shape[0], device=x.device)
    for i in range(x.shape[0]):
        lws = [ref.log_weights(x[i : i + 1], min(chunk, k - j))[:, 0] for j in range(0, k, chunk)]
        lw = torch.cat(lws)  # (K,)
        out[i] = torch.logsumexp(lw, 0) - math.log(k)
    return out


@torch.no_grad()
def iwae_batched_reference(ref: TorchVAE, x, k, chunk_size=None):
    """(f): hand-written log-weights, batched like ppl_vae (≈ chunk_size samples × datapoints per pass)."""
    n = x.shape[0]
    kc = max(1, min(k, (chunk_size or importance.default_chunk(x.device)) // n))
    lse = torch.full((n,), -math.inf, device=x.device)
    for j in range(0, k, kc):
        lse = torch.logaddexp(lse, torch.logsumexp(ref.log_weights(x, min(kc, k - j)), 0))  # (N,)
    return lse - math.log(k)


def gemm_floor_seconds(ref: TorchVAE, rows: int, device, reps: int = 20) -> tuple[float, float]:
    """Seconds the decoder's two matrix products take for ``rows`` latent draws, at the rate
    (GFLOP/s) measured on 4096-row products like those of one pass; and that rate."""
    lin = [m for m in ref.dec if isinstance(m, torch.nn.Linear)]
    flop_per_row = 2 * sum(m.in_features * m.out_features for m in lin)
    h = torch.randn(4096, lin[-1].in_features, device=device)
    with torch.no_grad():
        lin[-1](h)  # warm-up
        t, _ = timed(lambda: [lin[-1](h) for _ in range(reps)], device)
    rate = reps * 2 * 4096 * lin[-1].in_features * lin[-1].out_features / t
    return rows * flop_per_row / rate, rate / 1e9


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--run", default=None, help="a fit run directory (default: train one epoch here)")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--m", type=int, default=1000, help="number of test images (seeded random subset)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    ds = load_dataset("binarized-mnist", args.data_dir)
    if args.run:
        vae, _ = load_run(args.run, device=device)
    else:
        with tempfile.TemporaryDirectory() as out:
            cfg = FitConfig(dataset=ds.name, epochs=1, device=str(device), final_iwae_k=0)
            trainer = Trainer(cfg, out, dataset=ds, quiet=True)
            trainer.run()
            vae = trainer.evaluated.eval()
    idx = torch.randperm(ds.test.shape[0], generator=torch.Generator().manual_seed(0))[: args.m]
    x = ds.test[idx].to(device)  # (M, 784): the test file is ordered by class, so a random subset
    ref = torch_copy(vae)
    results = {}
    t, est = timed(lambda: estimators.iwae(vae.model, vae.guide, x, args.k, seed=0), device)
    results["ppl_vae"] = (t, est.mean())
    torch.manual_seed(0)
    t, v = timed(lambda: iwae_batched_reference(ref, x, args.k), device)
    results["f_batched_torch"] = (t, v.mean().item())
    torch.manual_seed(0)
    t, v = timed(lambda: iwae_per_datapoint(ref, x, args.k), device)
    results["e_per_datapoint"] = (t, v.mean().item())
    for name, (t, v) in results.items():
        print(f"{name:<16} {t:8.3f} s   mean log p(x) = {v:9.3f} nats")
    floor, gflops = gemm_floor_seconds(ref, args.k * args.m, device)
    print(f"{'compute floor':<16} {floor:8.3f} s   (decoder GEMMs alone at {gflops:.0f} GFLOP/s)")
    ratios = {
        "e/ppl_vae": results["e_per_datapoint"][0] / results["ppl_vae"][0],
        "ppl_vae/f": results["ppl_vae"][0] / results["f_batched_torch"][0],
        "e/floor": results["e_per_datapoint"][0] / floor,
        "ppl_vae/floor": results["ppl_vae"][0] / floor,
    }
    for k, v in ratios.items():
        print(f"{k:<16} {v:6.2f}")
    if not args.no_save:
        path = save_result(
            "eval_speed",
            {
                "device": device_name(device),
                "device_kind": device.type,
                "k": args.k,
                "m": args.m,
                "seconds": {k: v[0] for k, v in results.items()},
                "floor_seconds": floor,
                "gemm_gflops": gflops,
                "mean_log_px": {k: v[1] for k, v in results.items()},
                "ratios": ratios,
                "command": "python benchmarks/eval_speed.py " + " ".join(argv or sys.argv[1:]),
            },
        )
        print(f"saved {path}")


if __name__ == "__main__":
    main()
