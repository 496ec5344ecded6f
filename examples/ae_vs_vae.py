"""Autoencoder vs VAE: why the VAE's latent space can be sampled and the autoencoder's cannot.

Both are Pyro programs with the same networks and the same Bernoulli decoder p_θ(x|z):

* VAE: prior N(0, I), guide q_φ(z|x) = N(μ_φ(x), σ_φ(x)²); objective the ELBO
  E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)).
* Autoencoder (AE): guide δ(z − μ_φ(x)), a point mass at the code (``dist.Delta``), and the
  prior's term masked out of the objective (``poutine.mask(mask=False)``), so SVI's loss
  is the reconstruction error −log p(x | z = μ_φ(x)) alone. Nothing ties the codes to N(0, I).

Then we treat both as generative models p(z) p_θ(x|z) with z ~ N(0, I) and measure:

* held-out log p(x) (IWAE, nats per image): the VAE's guide is its proposal; the AE has no
  posterior, so its proposal is N(μ_φ(x), s² I) with the s (from a grid) that gives the best
  bound on validation images (any proposal gives a valid stochastic lower bound);
* holes: the distance from each decoded prior sample to its nearest training image, divided
  by the same distance for decoded codes of held-out images (reconstructions). ≈ 1: prior
  draws decode to what real codes decode to; ≫ 1: N(0, I) puts mass where the decoder never
  saw a code (the AE's codes neither fill nor stay inside the prior's region);
* where the codes are: mean ‖μ_φ(x)‖ against √z_dim (the radius of N(0, I) draws).

    python examples/ae_vs_vae.py            # 30 epochs each, a few minutes on a CPU
    python examples/ae_vs_vae.py --quick    # seconds

Writes to ``--out``: ``prior_samples.png``, ``interpolations.png``, ``nn_distances.png``,
``results.json`` and the runs in ``ae/`` and ``vae/``.
"""
from __future__ import annotations

import sys

import _common
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine

from ppl_vae import plots
from ppl_vae.model import VAE
from ppl_vae.config import FitConfig

PROPOSAL_SCALES = (0.03, 0.1, 0.3, 1.0, 3.0)  # s of the AE's IWAE proposal N(μ(x), s² I)


class Autoencoder(VAE):
    """A deterministic autoencoder as a Pyro program (same networks and likelihood as :class:`VAE`;
    the encoder's log-variance head is unused). ``model`` is still p(z) p_θ(x|z), so the
    estimators (which ignore masks) evaluate the AE's decoder as a generative model."""

    def model(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """p_θ(x|z) with log p(z) masked out of the objective: z is a free code. ``beta`` is unused."""
        if self.register_params:  # as in VAE: the Trainer's torch optimizer owns the parameters
            pyro.module("decoder", self.decoder)
        n = x.shape[0]
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            with poutine.mask(mask=False):  # log p(z) contributes 0 to the ELBO: no pull towards N(0, I)
                z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).to_event(1))  # (N, z_dim)
            return pyro.sample("x", self.likelihood.dist(self.decoder(z)), obs=x)

    def guide(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """q(z|x) = δ(z − μ_φ(x)): log q = 0 at its draw, so the loss is −log p(x | z = μ_φ(x))."""
        if self.register_params:  # as in VAE: the Trainer's torch optimizer owns the parameters
            pyro.module("encoder", self.encoder)
        n = x.shape[0]
        z_loc, _ = self.encoder(x)  # (N, z_dim); the log-variance head is ignored
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            return pyro.sample("z", dist.Delta(z_loc).to_event(1))

    def proposal(self, s: float):
        """A Gaussian guide N(μ_φ(x), s² I) around the codes, for importance sampling log p(x)."""
        def guide(x, size=None, beta=1.0):
            z_loc, _ = self.encoder(x)  # (N, z_dim)
            with pyro.plate("data", size or x.shape[0], subsample=self._subsample(x.shape[0], x.device), dim=-1):
                return pyro.sample("z", dist.Normal(z_loc, s).to_event(1))
        return guide


@torch.no_grad()
def nearest_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 500) -> torch.Tensor:
    """Euclidean pixel distance from each row of ``x (M, D)`` to its nearest row of ``ref (R, D)``: ``(M,)``."""
    return torch.cat([torch.cdist(x[i:i + chunk], ref).min(1).values for i in range(0, x.shape[0], chunk)])


@torch.no_grad()
def interpolate(vae: VAE, xa: torch.Tensor, xb: torch.Tensor, steps: int = 10) -> torch.Tensor:
    """Decode the straight line between the codes μ(xa) and μ(xb): ``(steps, D)``."""
    za, zb = vae.encode(torch.stack([xa, xb]))[0]  # (z_dim,) each
    t = torch.linspace(0, 1, steps)[:, None]  # (steps, 1)
    return vae.decode((1 - t) * za + t * zb)  # (steps, D)


def interpolation_pairs(labels: torch.Tensor | None) -> list[tuple[int, int]]:
    """Test-image index pairs to interpolate between: the first images of digits (1, 0), (3, 8),
    (4, 7) when labels are known, else the first six images."""
    if labels is None:
        return [(0, 1), (2, 3), (4, 5)]
    first = lambda d: int((labels == d).nonzero()[0])  # noqa: E731
    return [(first(a), first(b)) for a, b in ((1, 0), (3, 8), (4, 7))]


def main(argv=None) -> int:
    p = _common.parser(__doc__.split("\n\n")[0], "ae_vs_vae")
    p.add_argument("--epochs", type=int, default=None, help="epochs of each model (default: 30; --quick: 4)")
    p.add_argument("--z-dim", type=int, default=16, help="latent dimension (default: 16)")
    args = p.parse_args(argv)
    out = _common.setup(args)
    data = _common.load_data(args.dataset, args.data_dir, "bernoulli")
    if args.quick:
        data = _common.subset(data, 4000, 300, 300)
    epochs = args.epochs or (4 if args.quick else 30)
    k = 200 if args.quick else 1000
    common = dict(z_dim=args.z_dim, epochs=epochs, seed=args.seed, final_iwae_k=0)
    cfg = FitConfig(**common)  # the settings both models are built from
    ae = Autoencoder(data.image_shape, cfg.z_dim, cfg.hidden, cfg.likelihood, cfg.arch, cfg.activation)
    models = {
        "VAE": _common.fit(data, out / "vae", **common)[0],
        # The AE's logged "valid ELBO" is log p(x|μ) + log p(μ), the joint at the code (a point-mass
        # guide has no entropy): not a bound, only a progress signal.
        "autoencoder": _common.fit(data, out / "ae", model=ae, **common)[0],
    }

    n_prior = 200 if args.quick else 1000
    ref = data.train[:5000]  # (R, D) training images the distances are measured to
    x_te = data.test
    results = {"dataset": data.name, "z_dim": args.z_dim, "epochs": epochs, "k": k, "models": {}}
    prior_grids, interp_rows, dists = {}, {}, {}
    pairs = interpolation_pairs(data.labels.get("test"))
    for name, vae in models.items():
        with torch.no_grad():
            z_prior = plots.prior_draws(n_prior, args.z_dim, args.seed)  # (n, z_dim) the same draws for both
            x_prior = vae.decode(z_prior)  # (n, D)
            d_prior = nearest_distance(x_prior, ref)  # (n,)
            d_recon = nearest_distance(vae.reconstruct(x_te), ref)  # (N,)
            codes = vae.encode(x_te)[0]  # (N, z_dim)
        if name == "VAE":
            ll = _common.held_out(vae, x_te, k, seed=args.seed)
            scale = None
        else:  # choose the proposal's scale on validation images, report on test images
            by_s = {s: _common.held_out(vae, data.valid, max(10, k // 10), args.seed, guide=vae.proposal(s))["iwae"]
                    for s in PROPOSAL_SCALES}
            scale = max(by_s, key=by_s.get)
            ll = _common.held_out(vae, x_te, k, seed=args.seed, guide=vae.proposal(scale))
        ratio = (d_prior.median() / d_recon.median()).item()
        results["models"][name] = {
            "test_log_px_iwae": ll["iwae"], "test_log_px_se": ll["iwae_se"], "test_elbo": ll.get("elbo"),
            "proposal_scale": scale, "nn_distance_prior_samples_median": d_prior.median().item(),
            "nn_distance_reconstructions_median": d_recon.median().item(), "hole_ratio": ratio,
            "code_norm_mean": codes.norm(dim=-1).mean().item(), "code_std_per_dim": codes.std(0).tolist(),
            "prior_norm_mean": z_prior.norm(dim=-1).mean().item()}
        prior_grids[name] = x_prior[:40]
        for j, (a, b) in enumerate(pairs):
            interp_rows.setdefault(f"pair {j + 1}", {})[name] = interpolate(vae, x_te[a], x_te[b])
        dists[f"{name}: decoded N(0, I) draws"] = d_prior
        dists[f"{name}: reconstructions of test images"] = d_recon
        r = results["models"][name]
        print(f"{name:>11}: test log p(x) ≥ {ll['iwae']:.2f} ± {ll['iwae_se']:.2f} nats (IWAE_{k}"
              + (f", proposal s = {scale:g}" if scale else "") + f"); hole ratio {ratio:.2f} "
              f"(NN distance: prior samples {r['nn_distance_prior_samples_median']:.2f}, reconstructions "
              f"{r['nn_distance_reconstructions_median']:.2f}); mean ‖μ(x)‖ {r['code_norm_mean']:.2f} vs "
              f"{r['prior_norm_mean']:.2f} for z ~ N(0, I)")

    plots.image_panels({"z ~ N(0, I)": prior_grids}, data.image_shape, nrow=8,
                       title=f"E[x | z] for the same 40 draws z ~ N(0, I) ({data.name}, z_dim = {args.z_dim})",
                       path=out / "prior_samples.png")
    plots.image_panels(interp_rows, data.image_shape, nrow=10,
                       title="Decoded straight lines between the codes of two test images",
                       path=out / "interpolations.png")
    plots.histograms(dists, "pixel distance to the nearest training image (L2, pixels in [0, 1])",
                     "Do decoded prior samples look like decoded data?", path=out / "nn_distances.png")
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
