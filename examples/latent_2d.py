"""A VAE with a 2-D latent space on MNIST: the decoded manifold and the encoded test set.

With z ∈ R², the whole generative model fits in one picture: decode a grid of z values
(through the prior's quantiles, Kingma & Welling 2014, Fig. 4) and every digit class shows
up as a region, with smooth morphs between them; encode the test set and the posterior
means μ_φ(x) fill the N(0, I) disc, clustered by digit although no label was used.

    python examples/latent_2d.py                   # ~30 epochs, a few minutes on a CPU
    python examples/latent_2d.py --quick           # seconds

Writes to ``--out``: ``manifold.png``, ``latent_scatter.png``, ``results.json`` (held-out
ELBO and IWAE bound; how the codes fill the prior: their share inside its 2σ disc and the
aggregate posterior's second moment; how they cluster by digit: the accuracy of a
nearest-neighbour vote among the codes) and the run in ``run/``.
"""

from __future__ import annotations

import _common
import _figures
import torch

from ppl_vae.core.cli import int_list


def knn_accuracy(z: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Leave-one-out accuracy of a ``k``-nearest-neighbour majority vote among codes ``z (N, d)``
    for ``labels (N,)``: how well the code alone separates the classes (chance: 1/classes)."""
    dist = torch.cdist(z, z)  # (N, N)
    dist.fill_diagonal_(float("inf"))  # a code is not its own neighbour
    votes = labels[dist.topk(k, largest=False).indices]  # (N, k)
    return (votes.mode(-1).values == labels).float().mean().item()


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "latent_2d")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: 30; --quick: 5)")
    p.add_argument("--hidden", type=int_list, default=[512, 256], help="MLP widths (default: 512,256)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    data = _common.load_data(args.dataset, args.data_dir, "bernoulli")
    if args.quick:
        data = _common.subset(data, 4000, 500, 1000)
    epochs = args.epochs or (5 if args.quick else 30)
    vae, summary, _ = _common.fit(
        data, out / "run", z_dim=2, hidden=args.hidden, epochs=epochs, seed=args.seed, final_iwae_k=0
    )

    with torch.no_grad():
        z_test, z_scale = vae.encode(data.test)  # (N, 2) each
        labels = data.labels.get("test")
        _figures.manifold_grid(
            vae.decode,
            data.image_shape,
            n=12 if args.quick else 20,
            title=f"Decoded 2-D latent manifold ({data.name})",
            path=out / "manifold.png",
        )
        _figures.latent_scatter(
            z_test,
            labels,
            c_label="digit",
            title=f"Test set encoded: posterior means μ(x) ({data.name})",
            path=out / "latent_scatter.png",
        )
        radius = z_test.norm(dim=-1)  # (N,)
        results = {
            "dataset": data.name,
            "epochs": summary["epochs"],
            "z_dim": 2,
            "test": _common.held_out(vae, data.test, k=100 if args.quick else 1000, seed=args.seed),
            # Under N(0, I) in 2-D, P(‖z‖ ≤ 2) = 1 − e^{−2} ≈ 0.865 (‖z‖² ~ χ²₂).
            "share_of_codes_within_2_sigma": (radius <= 2).float().mean().item(),
            "prior_share_within_2_sigma": 1 - torch.exp(torch.tensor(-2.0)).item(),
            # The aggregate posterior q(z) = E_x q(z|x) has second moment E_x[μμᵀ + diag σ²]; when it
            # matches the prior N(0, I), its trace per dimension is 1.
            "aggregate_posterior_second_moment_per_dim": (z_test.pow(2) + z_scale.pow(2)).mean().item(),
            # "clustered by digit although no label was used"
            "digit_accuracy_10nn_on_codes": None if labels is None else knn_accuracy(z_test, labels),
        }
    t = results["test"]
    print(
        f"test ELBO {t['elbo']:.2f} ± {t['elbo_se']:.2f}, IWAE_{t['k']} {t['iwae']:.2f} ± {t['iwae_se']:.2f} "
        f"nats per image; {100 * results['share_of_codes_within_2_sigma']:.1f}% of test codes within the "
        f"prior's 2σ disc (N(0, I): 86.5%); aggregate posterior second moment per dimension "
        f"{results['aggregate_posterior_second_moment_per_dim']:.2f} (N(0, I): 1)"
        + (
            ""
            if labels is None
            else f"; a 10-NN vote among the codes names the digit of "
            f"{100 * results['digit_accuracy_10nn_on_codes']:.0f}% of test images"
        )
    )
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    _common.run(main)
