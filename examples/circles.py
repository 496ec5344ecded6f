"""β-VAE on a toy world with known factors: images of one circle at position (x, y), radius r.

Three numbers generate every image, so a VAE with a 3-D latent should find them. We train it
twice, with β = 1 (the ELBO) and β = 4 (β-VAE: E_q[log p(x|z)] − β·KL(q(z|x) ‖ p(z)),
Higgins et al. 2017), and ask how well the true factors can be read off the posterior means
μ_φ(x) of held-out images:

* R² of a linear fit of each factor on all three latent means (fit on training images,
  scored on test images): how much of the factor the code holds, in any rotation;
* axis-aligned R²: the best squared correlation of the factor with a single latent
  coordinate: whether one coordinate holds it (what β-VAE is meant to encourage).

Traversals (vary one coordinate, others at 0) show what each coordinate does.

    python examples/circles.py              # 30 epochs for each β, a few minutes on a CPU
    python examples/circles.py --quick      # a args.quick subset, seconds

Writes to ``--out``: ``traversals_beta1.png``, ``traversals_beta4.png``, ``r2.png``,
``results.json`` and the runs in ``beta1/``, ``beta4/``.
"""
from __future__ import annotations

import sys

import _common
import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score
from torch.distributions import Normal, kl_divergence

from ppl_vae import plots
from ppl_vae.cli import int_list
from ppl_vae.nets import ARCHS
from ppl_vae.data import load_dataset

N_FIT = 10000  # training images the linear read-out is fitted on


def factor_r2(z_train, f_train, z_test, f_test) -> tuple[np.ndarray, np.ndarray]:
    """Per factor: held-out R² of a linear fit ``f ≈ A z + b`` (all latents), and the axis-aligned
    R² = max_j corr(z_j, f)² on the test set. Inputs ``(N, z_dim)`` and ``(N, F)``; outputs ``(F,)``."""
    reg = LinearRegression().fit(z_train, f_train)
    r2 = r2_score(f_test, reg.predict(z_test), multioutput="raw_values")  # (F,)
    zf = np.corrcoef(z_test.T, f_test.T)  # (z_dim + F, z_dim + F)
    d = z_test.shape[1]
    axis = (zf[:d, d:] ** 2).max(0)  # (F,)
    return r2, axis


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "circles", dataset="circles")
    p.add_argument("--epochs", type=int, default=None, help="epochs per β (default: 30; --quick: 4)")
    p.add_argument("--betas", type=float, nargs="+", default=[1.0, 4.0], help="β values (default: 1 4)")
    p.add_argument("--arch", choices=ARCHS, default="mlp", help="networks (default: mlp)")
    p.add_argument("--hidden", type=int_list, default=[400], help="MLP widths (default: 400)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    data = load_dataset(args.dataset, args.data_dir)  # circles are generated: (x, y, radius) known
    if not data.factors:
        p.error(f"dataset {args.dataset} has no known factors; use --dataset circles")
    if args.quick:
        data = _common.subset(data, 5000, 500, 1000)
    names = list(data.factor_names)
    epochs = args.epochs or (4 if args.quick else 30)
    results = {"dataset": data.name, "factors": names, "epochs": epochs, "by_beta": {}}
    bars_linear, bars_axis = {}, {}
    for beta in args.betas:
        tag = f"beta{beta:g}"
        vae, summary, _ = _common.fit(data, out / tag, z_dim=3, beta=beta, epochs=epochs, seed=args.seed,
                                      arch=args.arch, hidden=args.hidden, final_iwae_k=0)
        with torch.no_grad():
            z_tr = vae.encode(data.train[:N_FIT])[0].numpy()  # (n, 3)
            loc, scale = vae.encode(data.test)  # (N, 3) each
            z_te = loc.numpy()
            # KL(q(z_j|x) ‖ N(0, 1)) per coordinate, averaged over test images: ≈ 0 means an unused latent.
            kl_per_dim = kl_divergence(Normal(loc, scale), Normal(0.0, 1.0)).mean(0)  # (3,) nats
            plots.latent_traversal(vae.decode, torch.zeros(3), data.image_shape, torch.linspace(-2.5, 2.5, 9),
                                   title=f"Circles, β = {beta:g}: one latent varied, the others at 0",
                                   path=out / f"traversals_{tag}.png")
        r2, axis = factor_r2(z_tr, data.factors["train"][:N_FIT].numpy(), z_te, data.factors["test"].numpy())
        test = _common.held_out(vae, data.test, k=100 if args.quick else 1000, seed=args.seed)
        results["by_beta"][f"{beta:g}"] = {
            "r2_linear": dict(zip(names, r2.tolist())), "r2_axis_aligned": dict(zip(names, axis.tolist())),
            "kl_per_latent_dim": kl_per_dim.tolist(), "test": test, "best_valid_elbo": summary["best_valid_elbo"]}
        bars_linear[f"β = {beta:g}"] = dict(zip(names, r2.tolist()))
        bars_axis[f"β = {beta:g}, one latent"] = dict(zip(names, axis.tolist()))
        print(f"β = {beta:g}: R² (linear, held out) " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, r2))
              + "; axis-aligned " + ", ".join(f"{n} {v:.3f}" for n, v in zip(names, axis))
              + f"; test ELBO {test['elbo']:.2f}, IWAE_{test['k']} {test['iwae']:.2f} nats")
    plots.bar_comparison({**bars_linear, **bars_axis}, "R² on held-out images",
                         "How well the latent means predict the true factors", hline=0.9, path=out / "r2.png")
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
