"""Swap the prior, the posterior family and the hierarchy: five Pyro programs judged by one evaluator.

Same data, same training budget (epochs), same seed; only the program changes
(``--prior``, ``--guide``, ``--latent-layers`` of ``python -m ppl_vae.fit``, docs/models.md):

=====================  ==============================================================
program                p(z) and q(z|x)
=====================  ==============================================================
normal × diagonal      N(0, I); N(μ(x), diag σ(x)²), the textbook VAE
normal × full-rank     N(0, I); N(μ(x), L(x) L(x)ᵀ), a Cholesky factor from the encoder
normal × iaf           N(0, I); diagonal Gaussian then 2 inverse-autoregressive steps
vampprior × diagonal   (1/K) Σ_k q(z | u_k), K learned pseudo-inputs; diagonal guide
two-layer              z2 ~ N(0, I), z1 ~ p(z1|z2), x ~ p(x|z1); q(z1|x) q(z2|z1)
=====================  ==============================================================

Every program is scored by the same :func:`ppl_vae.evaluate.evaluate` on the same test images:
the Monte Carlo ELBO, IWAE_K ≈ log p(x), the gap log p(x) − ELBO (≈ KL(q(z|x) ‖ p(z|x)): what a
richer posterior can buy), the active units, the Pareto k̂ of the importance weights, and
the training seconds. The gap figure shows IWAE_k against k for each program: the curve starts
at the ELBO (k = 1) and climbs towards log p(x).

    python examples/priors_and_posteriors.py --dataset binarized-mnist   # 20 epochs each, K = 1000 on 2,000 test images
    python examples/priors_and_posteriors.py --quick                      # a minute

Writes to ``--out``: ``results.json``, ``table.md``, ``gaps.png`` (ELBO → log p(x) gap per program),
``iwae_curves.png`` (IWAE_k against k) and one run directory per program.
"""

from __future__ import annotations

import time

import _common
import _figures

from ppl_vae.reports.evaluation import evaluate

# name → the FitConfig fields that make the program (all other settings shared)
PROGRAMS = {
    "normal × diagonal": {},
    "normal × full-rank": {"guide": "full-rank"},
    "normal × iaf": {"guide": "iaf", "flow_steps": 2},
    "vampprior × diagonal": {"prior": "vampprior"},
    "two-layer": {"latent_layers": 2},
}


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "priors_and_posteriors", dataset="binarized-mnist")
    _common.sized_option(p, "--epochs", 20, 2, "epochs per program")
    _common.sized_option(p, "--num-samples", 1000, 100, "K of log p(x) ≈ IWAE_K")
    _common.sized_option(p, "--test-images", 2000, 300, "a seeded random subset of the test split")
    args = _common.parse(p, argv)
    out = _common.setup(args)
    epochs, k, n_test = args.epochs, args.num_samples, args.test_images
    sizes = (2000, 500, n_test) if args.quick else (None, None, n_test)
    data = _common.subset(
        _common.load_data(args.dataset, args.data_dir, default=args._default_dataset), *sizes
    )
    extra = (
        {"pseudo_inputs": 50} if args.quick else {}
    )  # the paper's K = 500 needs more data than --quick has
    results = {
        "data": data.name,
        "epochs": epochs,
        "k": k,
        "n_test": int(data.test.shape[0]),
        "seed": args.seed,
        "programs": {},
    }
    curves, gaps = {}, {}
    for name, program in PROGRAMS.items():
        t0 = time.perf_counter()
        vae, summary, _ = _common.fit(
            data,
            out / name.replace(" × ", "-"),
            epochs=epochs,
            seed=args.seed,
            final_iwae_k=0,
            **program,
            **extra,
        )
        seconds = time.perf_counter() - t0
        rep = evaluate(vae.model, vae.guide, data.test, num_samples=k, seed=args.seed, mean_samples=100)
        r = {
            "program": program,
            "train_seconds": seconds,
            "best_valid_elbo": summary["best_valid_elbo"],
            "elbo": rep["elbo_mc"],
            "elbo_stderr": rep["elbo_mc_stderr"],
            "elbo_analytic": rep["elbo_analytic"],
            "log_px": rep["log_px"],
            "log_px_stderr": rep["log_px_stderr"],
            "gap": rep["log_px"] - rep["elbo_mc"],
            "khat_mean": rep["khat_mean"],
            "khat_frac_above_threshold": rep["khat_frac_above_threshold"],
            "log_px_reliable": rep["log_px_reliable"],
            "active_units": {s: u["active"] for s, u in rep["active_units"].items()},
            "latent_dims": {s: u["dims"] for s, u in rep["active_units"].items()},
        }
        results["programs"][name] = r
        curves[name] = {int(kk): (v, rep["iwae_by_k_stderr"][kk]) for kk, v in rep["iwae_by_k"].items()}
        gaps[name.replace(" × ", " ×\n")] = r["gap"]
        print(
            f"{name:>22}: ELBO {r['elbo']:8.2f}  log p(x) ≥ {r['log_px']:8.2f} (IWAE_{k})  gap {r['gap']:5.2f}  "
            f"k̂ {r['khat_mean']:.2f}  active {r['active_units']}  {seconds:.0f} s",
            flush=True,
        )

    table = markdown_table(results)
    (out / "table.md").write_text(table)
    print("\n" + table)
    title = f"{data.name}, {epochs} epochs, {results['n_test']} test images"
    _figures.bar_comparison(
        {"log p(x) − ELBO": gaps},
        "gap log p(x) − ELBO (nats per datapoint)",
        title=f"ELBO → log p(x) gap per program\n({title})",
        path=out / "gaps.png",
    )
    _figures.iwae_convergence(
        curves,
        title=f"IWAE_k: from the ELBO (k = 1) towards log p(x)\n({title})",
        path=out / "iwae_curves.png",
    )
    _common.save_json(results, out / "results.json")
    return 0


def markdown_table(results: dict) -> str:
    k = results["k"]
    lines = [
        f"| program | ELBO | log p(x) ≈ IWAE_{k} | gap | active units | k̂ mean (share > threshold) | "
        f"train seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["programs"].items():
        units = ", ".join(f"{s} {r['active_units'][s]}/{r['latent_dims'][s]}" for s in r["active_units"])
        lines.append(
            f"| {name} | {r['elbo']:.2f} | {r['log_px']:.2f} ± {r['log_px_stderr']:.2f}"
            f"{'' if r['log_px_reliable'] else ' (lower bound)'} | {r['gap']:.2f} | {units} | "
            f"{r['khat_mean']:.2f} ({100 * r['khat_frac_above_threshold']:.0f} %) | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    _common.run(main)
