"""Autoencoder vs VAE: why the VAE's latent space can be sampled and the autoencoder's cannot.

Both are Pyro programs with the same networks and the same Bernoulli decoder p_θ(x|z):

* VAE: prior N(0, I), guide q_φ(z|x) = N(μ_φ(x), σ_φ(x)²); objective the ELBO
  E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)).
* Autoencoder (AE): guide δ(z − μ_φ(x)), a point mass at the code (``dist.Delta``), and the
  prior's term masked out of the objective (``poutine.mask(mask=False)``), so SVI's loss
  is the reconstruction error −log p(x | z = μ_φ(x)) alone. Nothing ties the codes to N(0, I).

Then we treat both as generative models p(z) p_θ(x|z) with z ~ N(0, I) and measure:

* held-out log p(x) (IWAE, nats per image): the VAE's guide is its proposal; the AE has no
  posterior, so its proposal is N(c·μ_φ(x), s² I) with the (c, s) from a grid that gives the
  best bound on validation images. Any proposal gives a stochastic lower bound, so the AE's
  number is a lower bound on its log p(x), not an estimate as tight as the VAE's;
* holes: in each model's own latent space, the distance from each prior draw z ~ N(0, I) to
  the nearest code of a training image, divided by the same distance for the codes of
  held-out images (the median of each). A code is the guide's draw z ~ q(z|x): μ_φ(x) for the
  AE, μ_φ(x) + σ_φ(x)·ε for the VAE. ≈ 1: prior draws land among the data's codes as new data
  do; ≫ 1: N(0, I) puts its mass where no datapoint was encoded, where the decoder was never
  trained. The ratio does not depend on the latent space's scale;
* where the codes are: their mean norm against that of prior draws (≈ √z_dim), and the mean
  pixel of decoded prior draws against the data's.

    python examples/ae_vs_vae.py            # 30 epochs each, a few minutes on a CPU
    python examples/ae_vs_vae.py --quick    # seconds

Writes to ``--out``: ``prior_samples.png``, ``interpolations.png``, ``holes.png``,
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

# The AE's IWAE proposal N(c·μ(x), s² I): under the N(0, I) prior its posterior sits between the
# code and the origin, so shrinking the centre (c < 1) can help.
PROPOSAL_SHRINK = (0.25, 0.5, 0.75, 1.0)
PROPOSAL_SCALES = (0.1, 0.3, 1.0)


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

    def proposal(self, c: float, s: float):
        """A Gaussian guide N(c·μ_φ(x), s² I), for importance sampling log p(x) under the prior."""
        def guide(x, size=None, beta=1.0):
            z_loc, _ = self.encoder(x)  # (N, z_dim)
            with pyro.plate("data", size or x.shape[0], subsample=self._subsample(x.shape[0], x.device), dim=-1):
                return pyro.sample("z", dist.Normal(c * z_loc, s).to_event(1))
        return guide


@torch.no_grad()
def guide_draws(vae: VAE, x: torch.Tensor, seed: int) -> torch.Tensor:
    """One draw z ~ q(z|x) per row of ``x`` from the model's own guide, ``(N, z_dim)``: the code
    μ(x) for the AE's point mass, μ(x) + σ(x)·ε for the VAE. (The VAE's means alone would not
    do: coordinates the VAE leaves unused have μ ≈ 0 and σ ≈ 1, so only the draws fill N(0, I).)"""
    with torch.random.fork_rng(), poutine.block():
        torch.manual_seed(seed)
        return poutine.trace(vae.guide).get_trace(x).nodes["z"]["value"]


@torch.no_grad()
def nearest_distance(x: torch.Tensor, ref: torch.Tensor, chunk: int = 1000) -> torch.Tensor:
    """Euclidean distance from each row of ``x (M, d)`` to its nearest row of ``ref (R, d)``: ``(M,)``."""
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

    n_prior = 300 if args.quick else 2000
    x_te = data.test
    results = {"dataset": data.name, "z_dim": args.z_dim, "epochs": epochs, "k": k, "models": {},
               "mean_pixel_test_data": x_te.mean().item()}
    prior_grids, interp_rows, dists = {}, {}, {}
    pairs = interpolation_pairs(data.labels.get("test"))
    z_prior = plots.prior_draws(n_prior, args.z_dim, args.seed)  # (n, z_dim): the same draws for both models
    for name, vae in models.items():
        with torch.no_grad():
            x_prior = vae.decode(z_prior)  # (n, D)
            codes_train = guide_draws(vae, data.train[:10000], args.seed)  # (R, z_dim)
            codes_test = guide_draws(vae, x_te, args.seed + 1)  # (N, z_dim)
            d_prior = nearest_distance(z_prior, codes_train)  # (n,)
            d_test = nearest_distance(codes_test, codes_train)  # (N,)
        if name == "VAE":
            ll = _common.held_out(vae, x_te, k, seed=args.seed)
            proposal = None
        else:  # choose the proposal on validation images, report on test images
            by = {(c, s): _common.held_out(vae, data.valid, max(10, k // 10), args.seed,
                                           guide=vae.proposal(c, s))["iwae"]
                  for c in PROPOSAL_SHRINK for s in PROPOSAL_SCALES}
            proposal = max(by, key=by.get)
            ll = _common.held_out(vae, x_te, k, seed=args.seed, guide=vae.proposal(*proposal))
        ratio = (d_prior.median() / d_test.median()).item()
        results["models"][name] = {
            "test_log_px_iwae": ll["iwae"], "test_log_px_se": ll["iwae_se"], "test_elbo": ll.get("elbo"),
            "proposal_shrink_and_scale": proposal, "hole_ratio": ratio,
            "code_distance_prior_draws_median": d_prior.median().item(),
            "code_distance_test_codes_median": d_test.median().item(),
            "code_norm_mean": codes_test.norm(dim=-1).mean().item(), "code_std_per_dim": codes_test.std(0).tolist(),
            "prior_norm_mean": z_prior.norm(dim=-1).mean().item(), "mean_pixel_prior_samples": x_prior.mean().item()}
        prior_grids[name] = x_prior[:40]
        for j, (a, b) in enumerate(pairs):
            interp_rows.setdefault(f"pair {j + 1}", {})[name] = interpolate(vae, x_te[a], x_te[b])
        dists[f"{name}: prior draws z ~ N(0, I)"] = d_prior / d_test.median()
        dists[f"{name}: codes of test images"] = d_test / d_test.median()
        r = results["models"][name]
        print(f"{name:>11}: test log p(x) ≥ {ll['iwae']:.2f} ± {ll['iwae_se']:.2f} nats (IWAE_{k}"
              + (f", proposal N({proposal[0]:g}·μ(x), {proposal[1]:g}² I)" if proposal else "")
              + f"); hole ratio {ratio:.2f}; mean ‖code‖ {r['code_norm_mean']:.2f} vs {r['prior_norm_mean']:.2f} "
              f"for z ~ N(0, I); mean pixel of prior samples {r['mean_pixel_prior_samples']:.3f} "
              f"(data {results['mean_pixel_test_data']:.3f})")

    plots.image_panels({"z ~ N(0, I)": prior_grids}, data.image_shape, nrow=8,
                       title=f"E[x | z] for the same 40 draws z ~ N(0, I) ({data.name}, z_dim = {args.z_dim})",
                       path=out / "prior_samples.png")
    plots.image_panels(interp_rows, data.image_shape, nrow=10,
                       title="Decoded straight lines between the codes of two test images",
                       path=out / "interpolations.png")
    plots.histograms(dists, "distance to the nearest training code, in units of the test codes' median",
                     "Holes: do prior draws land among the data's codes?", path=out / "holes.png")
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
