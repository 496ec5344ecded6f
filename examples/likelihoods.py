"""Swap the likelihood: the same VAE with five decoders p_θ(x|z) on MNIST.

* ``bernoulli``: x ∈ {0, 1}; greyscale images are binarized (dynamically) first;
* ``gaussian`` with a fixed σ (0.1, the default for data in [0, 1]; σ = 1, the MSE loss, lets the
  latents collapse): log p(x|z) = −‖x − μ‖²/(2σ²) − (D/2) log 2πσ²;
* ``gaussian-learned``: a per-pixel σ_θ(z) from the decoder, bounded below by a floor;
* ``continuous-bernoulli``: the Bernoulli made a proper density on [0, 1] (Loaiza-Ganem &
  Cunningham 2019);
* ``discretized-logistic``: a probability of the 256 levels of each pixel (IAF, PixelCNN++).

Same networks, same data, same seed: only the likelihood changes (``likelihood=`` in
:class:`~ppl_vae.training.config.FitConfig`, ``--likelihood`` on the command line).

One scale: bits per dimension of the 8-bit images. The discretized logistic gives it directly;
the three densities are fitted to uniformly dequantized images y = (x + u)/256 (``--dequantize``,
on by default for them), and E_u log p(y) − D log 256 ≤ log P(x) makes their number a bound on
the same quantity (docs/likelihoods.md). The Bernoulli's bits/dim are of the *binarized* images:
other data, printed apart. Two more runs explain two warnings:

* the Bernoulli formula at greyscale x is not a density: ∫₀¹ λˣ(1 − λ)¹⁻ˣ dx = 1/C(λ) < 1, so
  the "likelihood" of BCE-on-greyscale VAEs misses Σ_d log C(λ_d) nats of normalization
  (printed below for the trained decoder); the continuous Bernoulli adds exactly that term;
* a learned σ without a floor, fitted to the levels themselves (``--dequantize none``), collapses
  on pixels that are exactly 0 (MNIST's background): the density at x = μ grows like 1/σ without
  bound, so the ELBO climbs by shrinking σ.

    python examples/likelihoods.py            # 30 epochs for each of 6 models: ~20 minutes on 2 CPU cores (full MNIST)
    python examples/likelihoods.py --quick    # seconds

Writes to ``--out``: ``likelihoods.png`` (data, reconstructions and samples per likelihood),
``sigma_floor.png`` (validation ELBO per epoch of the learned σ with and without its floor),
``results.json`` and one run per likelihood.
"""

from __future__ import annotations

import time

import _common
import _figures
import torch
import torch.nn.functional as F
from torch.distributions import ContinuousBernoulli

from ppl_vae.inference import estimators
from ppl_vae.reports import plots
from ppl_vae.reports.bits import BitsScale, scale_for
from ppl_vae.training.runs import read_metrics
from ppl_vae.training.train import NonFiniteLoss

LIKELIHOODS = ("bernoulli", "gaussian", "gaussian-learned", "continuous-bernoulli", "discretized-logistic")


@torch.no_grad()
def bernoulli_mass_missing(logits: torch.Tensor) -> torch.Tensor:
    """log ∫_[0,1]^D Π_d λ_d^x (1 − λ_d)^(1−x) dx = −Σ_d log C(λ_d) per image ``(N,)``, ≤ −D log 2
    since 1/C(λ) ≤ ½: the Bernoulli formula minus the continuous Bernoulli's log-density (which
    differ by log C(λ) at every x; here x = ½). ``logits (N, D)``."""
    x = torch.full_like(logits, 0.5)
    bern = -F.binary_cross_entropy_with_logits(logits, x, reduction="none")  # (N, D)
    cb = ContinuousBernoulli(logits=logits).log_prob(x)  # (N, D) = bern + log C(λ)
    return (bern - cb).sum(-1)  # (N,)


@torch.no_grad()
def sigma_stats(vae, x: torch.Tensor) -> dict:
    """Decoded σ_θ(z = μ(x)) of a learned-σ Gaussian decoder over images ``x (N, D)``."""
    sigma = vae.likelihood.split(vae.decoder(vae.encode(x)[0]))[1]  # (N, D)
    return {
        "sigma_min": sigma.min().item(),
        "sigma_median": sigma.median().item(),
        "share_of_pixels_sigma_below_0.02": (sigma < 0.02).float().mean().item(),
    }


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "likelihoods")
    p.add_argument("--epochs", type=int, default=None, help="epochs per model (default: 30; --quick: 3)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    epochs = args.epochs or (3 if args.quick else 30)
    k = 100 if args.quick else 1000
    sizes = (4000, 500, 500) if args.quick else (None, None, None)
    results = {"epochs": epochs, "k": k, "models": {}}
    panels = {"data": {}, "reconstructions": {}, "samples": {}}  # rows of the figure
    for name in LIKELIHOODS:
        data = _common.subset(
            _common.load_data(args.dataset, args.data_dir, name, announce=name == "bernoulli"), *sizes
        )
        t0 = time.perf_counter()
        vae, summary, _ = _common.fit(
            data, out / name, likelihood=name, epochs=epochs, seed=args.seed, final_iwae_k=0
        )
        train_seconds, t0 = time.perf_counter() - t0, time.perf_counter()
        x = data.test
        with torch.no_grad():
            codes = vae.encode(x)[0]  # (N, z_dim)
            panels["data"][name] = x[:16]  # as the model sees it (binarized for the Bernoulli)
            panels["reconstructions"][name] = vae.reconstruct(x[:16])  # E[x | z = μ(x)]
            panels["samples"][name] = vae.decode(
                plots.prior_draws(16, vae.z_dim, args.seed)
            )  # E[x | z], z ~ N(0, I)
        scale = scale_for(data, vae.likelihood)  # which bits/dim: of which data, through which bound
        r = {
            "data": data.name,
            "binarize": data.binarize,
            "dequantize": data.dequantize,
            "test": _common.held_out(vae, x, k, seed=args.seed),
            # Burda et al. 2016: latent j is active when Var_x(E_q[z_j | x]) > 0.01
            "active_units": int((codes.var(0) > 0.01).sum()),
            "z_dim": vae.z_dim,
            "sizes": {split: int(data.split(split).shape[0]) for split in ("train", "valid", "test")},
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t0,  # the test ELBO and IWAE_k, the figure's panels
            "valid_elbo_by_epoch": [m["valid_elbo"] for m in read_metrics(out / name)],
        }
        if isinstance(scale, BitsScale):  # from IWAE_k: an upper bound in expectation
            r["bits_per_dim"], r["bits_per_dim_label"] = (
                scale.bits(r["test"]["iwae"], x.shape[1]),
                scale.label,
            )
        if name == "gaussian-learned":
            r.update(sigma_stats(vae, x))
        if name == "bernoulli":
            grey = _common.subset(
                _common.load_data(args.dataset, args.data_dir, "continuous-bernoulli", announce=False), *sizes
            ).test
            with torch.no_grad():
                logits = vae.decoder(vae.encode(grey)[0])  # (N, D) at the codes of the greyscale images
            r["bernoulli_log_mass_on_greyscale"] = bernoulli_mass_missing(logits).mean().item()
        results["models"][name] = r
        t = r["test"]
        print(
            f"{name:>20}: test log p(x) ≥ {t['iwae']:8.2f} ± {t['iwae_se']:.2f} nats (IWAE_{k}), ELBO "
            f"{t['elbo']:8.2f}; {r['active_units']}/{r['z_dim']} active latents"
            + (f"; {r['bits_per_dim_label']}: {r['bits_per_dim']:.4f}" if "bits_per_dim" in r else "")
        )

    # The learned σ without a floor, fitted to the levels themselves (dequantization bounds the density).
    data = _common.subset(
        _common.load_data(args.dataset, args.data_dir, "gaussian-learned", announce=False, dequantize="none"),
        *sizes,
    )
    try:
        vae, summary, _ = _common.fit(
            data,
            out / "gaussian-learned-nofloor",
            likelihood="gaussian-learned",
            sigma_floor=0.0,
            dequantize="none",
            epochs=epochs,
            seed=args.seed,
            final_iwae_k=0,
        )
        test_elbo = estimators.elbo(vae.model, vae.guide, data.test, analytic_kl=True, seed=args.seed).mean()
        nofloor = {"finished": True, "test_elbo": test_elbo, **sigma_stats(vae, data.test)}
    except NonFiniteLoss as e:
        nofloor = {"finished": False, "error": str(e)}
    floored, bare = "σ ≥ 0.01, dequantized", "σ ≥ 0, on the levels"
    curves = {
        label: read_metrics(out / run)
        for label, run in ((floored, "gaussian-learned"), (bare, "gaussian-learned-nofloor"))
    }
    nofloor["valid_elbo_by_epoch"] = [m["valid_elbo"] for m in curves[bare]]
    results["gaussian_learned_without_floor"] = nofloor
    plots.training_curve(curves, title="Learned σ with and without a floor", path=out / "sigma_floor.png")
    print(
        "gaussian-learned without a σ floor: "
        + (
            f"test ELBO {nofloor['test_elbo']:.1f} nats on the levels (with the floor, of the dequantized images: "
            f"{results['models']['gaussian-learned']['test']['elbo']:.1f}), smallest σ {nofloor['sigma_min']:.2g}, "
            f"{100 * nofloor['share_of_pixels_sigma_below_0.02']:.0f}% of pixels with σ < 0.02"
            if nofloor["finished"]
            else f"training failed: {nofloor['error']}"
        )
    )
    print("bits/dim of the test images (binarized and 8-bit images are different data: never compared):")
    for name, r in results["models"].items():
        if "bits_per_dim" in r:
            print(f"  {name:>20}: {r['bits_per_dim']:.4f} {r['bits_per_dim_label']}")
    mass = results["models"]["bernoulli"]["bernoulli_log_mass_on_greyscale"]
    print(f"Bernoulli formula at greyscale x integrates to exp({mass:.1f}) over [0, 1]^D: not a density")

    _figures.image_panels(
        panels,
        data.image_shape,
        nrow=8,
        title=f"One VAE, five likelihoods ({data.name}, {epochs} epochs): test images, "
        f"reconstructions E[x | z = μ(x)], samples E[x | z] with z ~ N(0, I)",
        path=out / "likelihoods.png",
    )
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    _common.run(main)
