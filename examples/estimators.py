"""ELBO, Monte Carlo ELBO and IWAE_K on held-out data: how far each is from log p(x).

With importance weights w = p(x, z) / q(z|x), z ~ q(z|x) (Burda et al. 2016):

    ELBO(x) = E_q[log w] ≤ E[IWAE_K(x)] = E[log (1/K) Σ_k w_k] ≤ log p(x),  E[IWAE_K] ↑ K,

and log p(x) − ELBO(x) = KL(q(z|x) ‖ p(z|x)), the gap the variational posterior leaves.
The analytic-KL ELBO and the Monte Carlo ELBO estimate the same number (the first with less
variance); IWAE_K for K = 1…K_max (all from the same K_max draws) climbs towards log p(x),
so IWAE_{K_max} − ELBO estimates (a lower bound on) the gap.

Two models with the same networks: one trained on the ELBO (``--elbo trace``), one on
IWAE_k (``--elbo iwae --num-particles k``). The IWAE-trained model's bound IWAE_k is
tighter, and it reaches a higher log p(x); its guide is trained as a proposal, not as an
approximation of p(z|x), so its plain ELBO may be lower. The Pareto k̂ of the weights says
for which images the IWAE estimate can be trusted (k̂ < 0.7).

    python examples/estimators.py --dataset binarized-mnist   # the IWAE paper's data; ~15 minutes on 2 CPU cores
    python examples/estimators.py --quick                      # seconds

Writes to ``--out``: ``convergence.png``, ``khat.png``, ``results.json`` and the runs
``elbo/`` and ``iwae/``.
"""

from __future__ import annotations

import _common
import _figures
import torch

from ppl_vae.inference import estimators

KS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two ``(N,)`` tensors (no ties expected: continuous values)."""
    rank = lambda v: v.double().argsort().argsort().double()  # noqa: E731  (N,) ranks 0..N−1
    return torch.corrcoef(torch.stack([rank(a), rank(b)]))[0, 1].item()


def summarize(est: dict) -> dict:
    """Means over datapoints (nats per datapoint) with Monte Carlo standard errors, from the
    dict of :func:`ppl_vae.inference.estimators.estimate_all`."""
    ms = lambda e: {"value": e.mean(), "mc_se": e.mean_stderr()}  # noqa: E731
    k_max = max(est["iwae_by_k"])
    gap = est["iwae"].value - est["elbo_analytic"].value  # (N,) ≈ KL(q ‖ p(z|x)), from below
    khat = est["khat"]
    return {
        "elbo_analytic": ms(est["elbo_analytic"]),
        "elbo_mc": ms(est["elbo_mc"]),
        "k_max": k_max,
        "iwae_by_k": {k: ms(e) for k, e in est["iwae_by_k"].items()},
        "gap_iwae_minus_elbo": {"mean": gap.mean().item(), "median": gap.median().item()},
        "khat_median": khat.median().item(),
        "share_khat_above_0.7": (khat > 0.7).double().mean().item(),
        # Heavier-tailed weights (higher k̂) go with a guide further from p(z|x) (larger gap):
        # across images, the two rank together.
        "khat_gap_rank_correlation": rank_correlation(khat, gap),
    }


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "estimators")
    _common.sized_option(p, "--epochs", 30, 3, "epochs per model")
    p.add_argument("--train-k", type=int, default=5, help="K of the IWAE-trained model (default: 5)")
    _common.sized_option(p, "--k-max", 5000, 500, "largest K evaluated")
    _common.sized_option(p, "--n-test", 500, 100, "held-out images evaluated, a seeded random subset")
    args = _common.parse(p, argv)
    out = _common.setup(args)
    epochs, k_max, n_test = args.epochs, args.k_max, args.n_test
    data = _common.load_data(args.dataset, args.data_dir, "bernoulli")
    data = _common.subset(data, 4000 if args.quick else None, 1000, n_test)
    runs = {
        "ELBO-trained": dict(elbo="trace"),
        f"IWAE_{args.train_k}-trained": dict(elbo="iwae", num_particles=args.train_k),
    }
    results = {
        "dataset": data.name,
        "epochs": epochs,
        "n_test": data.test.shape[0],
        "k_max": k_max,
        "models": {},
    }
    curves, refs, khats = {}, {}, {}
    for label, objective in runs.items():
        vae, summary, _ = _common.fit(
            data, out / objective["elbo"], epochs=epochs, seed=args.seed, final_iwae_k=0, **objective
        )
        ks = sorted({k for k in KS if k <= k_max} | {args.train_k})
        est = estimators.estimate_all(vae.model, vae.guide, data.test, k_max, ks=ks, seed=args.seed)
        r = results["models"][label] = summarize(est)
        # The bound this model was trained on, and how far below IWAE_{k_max} (≈ log p(x)) it sits.
        trained = r["elbo_analytic"] if objective["elbo"] == "trace" else r["iwae_by_k"][args.train_k]
        r["gap_of_trained_bound"] = r["iwae_by_k"][k_max]["value"] - trained["value"]
        curves[label] = {k: (v["value"], v["mc_se"]) for k, v in r["iwae_by_k"].items()}
        refs[f"{label}: analytic-KL ELBO"] = (r["elbo_analytic"]["value"], r["elbo_analytic"]["mc_se"])
        khats[label] = est["khat"]
        print(
            f"{label}: ELBO {r['elbo_analytic']['value']:.2f} (analytic KL) / {r['elbo_mc']['value']:.2f} "
            f"± {r['elbo_mc']['mc_se']:.2f} (Monte Carlo, {k_max} draws); "
            + ", ".join(
                f"IWAE_{k} {r['iwae_by_k'][k]['value']:.2f}"
                for k in (1, 10, 100, k_max)
                if k in r["iwae_by_k"]
            )
            + f"; gap IWAE_{k_max} − ELBO {r['gap_iwae_minus_elbo']['mean']:.2f} nats; "
            f"{100 * r['share_khat_above_0.7']:.0f}% of images with k̂ > 0.7; its training bound is "
            f"{r['gap_of_trained_bound']:.2f} nats below IWAE_{k_max}"
        )
    _figures.iwae_convergence(
        curves,
        refs,
        title=f"Held-out bounds on log p(x) ({data.name}, {data.test.shape[0]} "
        f"test images; bands ±2 MC s.e.)",
        path=out / "convergence.png",
    )
    first = next(iter(khats))
    _figures.khat_histogram(
        khats[first], title=f"PSIS k̂ of IWAE_{k_max}, {first} model", path=out / "khat.png"
    )
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    _common.run(main)
