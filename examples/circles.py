"""β-VAE on a toy world with known factors: images of one circle at position (x, y), radius r.

Three numbers generate every image, so a VAE with a 3-D latent should find them. We train it
twice, with β = 1 (the ELBO) and β = 4 (β-VAE: E_q[log p(x|z)] − β·KL(q(z|x) ‖ p(z)),
Higgins et al. 2017), and ask how well the true factors can be read off the posterior means
μ_φ(x) of held-out images (read-outs fitted on training images, scored on test images):

* linear R²: a linear fit of each factor on all three latent means: how much of the factor
  the code holds linearly, in any rotation;
* one-latent R²: the best squared correlation of the factor with a single coordinate:
  whether one coordinate holds it (what β-VAE is meant to encourage);
* k-NN R²: a 10-nearest-neighbour regression on the latent means: whether the factor can be
  recovered from the code at all, however it is laid out.

The decoder matters more than β here. The default ``--arch broadcast`` is a spatial broadcast
decoder (Watters et al. 2019): z is copied to every pixel beside the pixel's coordinates and one
small MLP, shared by all pixels, says whether that pixel is inside the circle. A code that is
linear in (x, y, r) is then the easy one to draw from, and the ELBO finds it: every factor has a
linear R² near 0.99. With ``--arch mlp`` (a decoder that must draw all 784 pixels from z at
once) the ELBO lays the code out radially instead: z = 0 decodes to a small centred circle and
the circle grows outwards in every direction while the direction sets its position. Radius is
then an even, not a linear, function of μ: the linear read-out misses much of it, the same fit
with ‖μ‖ as one more feature recovers most of it, and the k-NN read-out nearly all.

    python examples/circles.py                  # 30 epochs for each β, about 10 minutes on a CPU
    python examples/circles.py --arch mlp       # the radial layout of a plain MLP decoder
    python examples/circles.py --quick          # a small subset, seconds

Writes to ``--out``: ``traversals_beta1.png``, ``traversals_beta4.png``,
``latent_radius_beta1.png``, ``r2.png``, ``results.json`` and the runs in ``beta1/``, ``beta4/``.
"""

from __future__ import annotations

import _common
import _figures
import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from sklearn.neighbors import KNeighborsRegressor
from torch.distributions import Normal, kl_divergence

from ppl_vae.core.cli import int_list
from ppl_vae.data.datasets import load_dataset
from ppl_vae.programs.nets import ARCHS

N_FIT = 10000  # training images the read-outs are fitted on


def factor_r2(z_train, f_train, z_test, f_test) -> dict:
    """Held-out R² per factor of four read-outs of the factors ``f (N, F)`` from latent means
    ``z (N, z_dim)``: ``linear`` (f ≈ A z + b), ``one_latent`` (max_j corr(z_j, f)² on the test
    set), ``knn`` (10-nearest-neighbour regression) and ``linear_with_norm`` (f ≈ A z + c‖z‖ + b,
    the read-out a radial layout calls for). Each value is an array ``(F,)``."""

    def held_out(model, feats):
        model.fit(feats(z_train), f_train)
        return r2_score(f_test, model.predict(feats(z_test)), multioutput="raw_values")  # (F,)

    with_norm = lambda z: np.c_[z, np.linalg.norm(z, axis=1)]  # noqa: E731  (N, z_dim + 1)
    zf = np.corrcoef(z_test.T, f_test.T)  # (z_dim + F, z_dim + F)
    d = z_test.shape[1]
    return {
        "linear": held_out(LinearRegression(), lambda z: z),
        "one_latent": (zf[:d, d:] ** 2).max(0),
        "knn": held_out(KNeighborsRegressor(n_neighbors=10), lambda z: z),
        "linear_with_norm": held_out(LinearRegression(), with_norm),
    }


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "circles", dataset="circles")
    p.add_argument("--epochs", type=int, default=None, help="epochs per β (default: 30; --quick: 4)")
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0], help="β values (default: 1 4)")
    p.add_argument(
        "--arch",
        choices=ARCHS,
        default="broadcast",
        help="networks (default: broadcast, the spatial broadcast decoder)",
    )
    p.add_argument("--hidden", type=int_list, default=[400], help="encoder MLP widths (default: 400)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    data = load_dataset(
        args.dataset or args._default_dataset, args.data_dir
    )  # circles are generated: (x, y, radius) known
    if not data.factors:
        p.error(f"dataset {args.dataset} has no known factors; use --dataset circles")
    if args.quick:
        data = _common.subset(data, 5000, 500, 1000)
    names = list(data.factor_names)
    epochs = args.epochs or (4 if args.quick else 30)
    results = {"dataset": data.name, "factors": names, "epochs": epochs, "by_beta": {}}
    bars = {}
    for beta in args.betas:
        tag = f"beta{beta:g}"
        vae, summary, _ = _common.fit(
            data,
            out / tag,
            z_dim=3,
            beta=beta,
            epochs=epochs,
            seed=args.seed,
            arch=args.arch,
            hidden=args.hidden,
            final_iwae_k=0,
        )
        with torch.no_grad():
            z_tr = vae.encode(data.train[:N_FIT])[0].numpy()  # (n, 3)
            loc, scale = vae.encode(data.test)  # (N, 3) each
            # KL(q(z_j|x) ‖ N(0, 1)) per coordinate, averaged over test images: ≈ 0 means an unused latent.
            kl_per_dim = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).mean(0)  # (3,) nats
            _figures.latent_traversal(
                vae.decode,
                torch.zeros(3),
                data.image_shape,
                torch.linspace(-2.5, 2.5, 9),
                title=f"Circles, β = {beta:g}: one latent varied, the others at 0",
                path=out / f"traversals_{tag}.png",
            )
            if beta == args.betas[0]:
                _figures.latent_scatter(
                    loc,
                    data.factors["test"][:, 2],
                    discrete=False,
                    c_label="radius (pixels)",
                    title=f"Circles, β = {beta:g}: test codes μ(x), coloured by radius",
                    path=out / f"latent_radius_{tag}.png",
                )
        r2 = factor_r2(z_tr, data.factors["train"][:N_FIT].numpy(), loc.numpy(), data.factors["test"].numpy())
        test = _common.held_out(vae, data.test, k=50 if args.quick else 200, seed=args.seed)
        results["by_beta"][f"{beta:g}"] = {
            **{f"r2_{kind}": dict(zip(names, v.tolist())) for kind, v in r2.items()},
            "kl_per_latent_dim": kl_per_dim.tolist(),
            "test": test,
            "best_valid_elbo": summary["best_valid_elbo"],
        }
        for kind, label in (("linear", "linear"), ("one_latent", "one latent"), ("knn", "10-NN")):
            bars[f"β = {beta:g}, {label}"] = dict(zip(names, r2[kind].tolist()))
        print(
            f"β = {beta:g}: held-out R² "
            + "; ".join(
                f"{kind} " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, r2[kind])) for kind in r2
            )
            + f"; test ELBO {test['elbo']:.2f}, IWAE_{test['k']} {test['iwae']:.2f} nats"
        )
    _figures.bar_comparison(
        bars,
        "R² on held-out images",
        "How well the latent means predict the true factors",
        hline=0.9,
        path=out / "r2.png",
    )
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    _common.run(main)
