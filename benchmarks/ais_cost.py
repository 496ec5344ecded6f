"""What AIS costs against IWAE on a trained run, in one process (issue 25, point 5):

    python benchmarks/ais_cost.py runs/quality-vae-ema --data-dir ../shared/data [--images 50]

On ``--images`` random test images (seeded) of the run's data set, it times

* one IWAE pass of the AIS batch: the (C, N) log weights of C draws per image, one forward pass
  of guide and model (the training step's path, without the program's probe);
* one AIS transition: (t(AIS, T = 1 + n) − t(AIS, T = 1)) / n, i.e. L leapfrog steps with a
  gradient each, the Metropolis test and the weight update, per transition;
* IWAE_5000 (``--num-samples``), the number it is set beside;

and prints the ratio of one transition to one IWAE pass of the same batch and the seconds per
image of AIS at T = 100, 1,000 and 10,000 (from the measured transition; T − 1 transitions) against
IWAE_5000's. Run it on an idle machine: the JSON goes to ``benchmarks/results/ais_cost-cpu-*.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, save_result, timed  # noqa: E402

from ppl_vae import load_dataset  # noqa: E402
from ppl_vae.inference import estimators as E  # noqa: E402
from ppl_vae.inference.importance import log_importance_weights  # noqa: E402
from ppl_vae.training.runs import load_run  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--images", type=int, default=50, help="test images timed (default 50)")
    p.add_argument("--chains", type=int, default=16, help="AIS chains C (default 16)")
    p.add_argument("--leapfrog", type=int, default=10, help="leapfrog steps L per transition (default 10)")
    p.add_argument("--transitions", type=int, default=20, help="transitions timed (default 20)")
    p.add_argument(
        "--num-samples", type=int, default=5000, help="K of the IWAE it is set beside (default 5000)"
    )
    p.add_argument("--repeats", type=int, default=3, help="best of this many timings (default 3)")
    a = p.parse_args(argv)

    vae, cfg = load_run(a.run)
    ds = load_dataset(cfg.dataset, a.data_dir, cfg.binarize, vae.likelihood, dequantize=cfg.dequantize)
    g = torch.Generator().manual_seed(0)
    x = ds.test[torch.randperm(ds.test.shape[0], generator=g)[: a.images]]  # [N, D]
    n, c, opts = x.shape[0], a.chains, dict(num_chains=a.chains, leapfrog=a.leapfrog, pilot_chains=0, seed=0)

    def best(fn):
        return min(timed(fn, "cpu")[0] for _ in range(a.repeats))

    def one_pass():  # the trusted path of the training step: no probe of the program
        with torch.no_grad():
            return log_importance_weights(vae.model, vae.guide, x, c, seed=0, nesting=1)  # [C, N]

    one_pass()  # warm-up
    t_pass = best(one_pass)
    E.ais(vae.model, vae.guide, x, num_steps=3, **opts)  # warm-up (first calls allocate)
    t_ais1 = best(lambda: E.ais(vae.model, vae.guide, x, num_steps=1, **opts))
    t_aisn = best(lambda: E.ais(vae.model, vae.guide, x, num_steps=1 + a.transitions, **opts))
    t_tr = (t_aisn - t_ais1) / a.transitions
    t0 = time.perf_counter()
    E.iwae(vae.model, vae.guide, x, num_samples=a.num_samples, seed=0)
    t_iwae_k = time.perf_counter() - t0
    per_image = {f"ais_T{t}": (t_ais1 + (t - 1) * t_tr) / n for t in (100, 1000, 10000)}
    per_image[f"iwae_{a.num_samples}"] = t_iwae_k / n
    result = {
        "run": str(a.run),
        "dataset": cfg.dataset,
        "images": n,
        "chains": c,
        "leapfrog": a.leapfrog,
        "transitions_timed": a.transitions,
        "seconds_iwae_pass_of_the_batch": t_pass,
        "seconds_per_transition": t_tr,
        "transition_over_iwae_pass": t_tr / t_pass,
        "seconds_per_image": per_image,
        "device_kind": "cpu",
        "device_name": device_name("cpu"),
        "torch": torch.__version__,
    }
    print(
        f"{a.run} ({cfg.dataset}), {n} test images × {c} chains, L = {a.leapfrog}, {torch.get_num_threads()} threads"
    )
    print(f"one IWAE pass of the batch ({c} × {n} rows): {t_pass * 1e3:.1f} ms")
    print(f"one AIS transition (L = {a.leapfrog}): {t_tr * 1e3:.1f} ms = {t_tr / t_pass:.1f} IWAE passes")
    for k, v in per_image.items():
        print(
            f"  {k:>12}: {v:8.3f} s per image ({v / per_image[f'iwae_{a.num_samples}']:.1f}× IWAE_{a.num_samples})"
        )
    print(f"→ {save_result('ais_cost', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
