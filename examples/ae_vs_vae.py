"""Autoencoder vs VAE: why the VAE's latent space can be sampled and the autoencoder's cannot.

Both are Pyro programs with the same networks and the same Bernoulli decoder p_θ(x|z):

* VAE: prior N(0, I), guide q_φ(z|x) = N(μ_φ(x), σ_φ(x)²); objective the ELBO
  E_q[log p(x|z)] − KL(q(z|x) ‖ p(z)).
* Autoencoder (AE): the code z = μ_φ(x), drawn as N(μ_φ(x), (10⁻³)² I) (a point mass
  ``dist.Delta`` has no density, and the estimators refuse it: docs/estimators.md), and the
  prior's term masked out of the objective (``poutine.mask(mask=False)``), so SVI's loss is the
  reconstruction error −log p(x | z ≈ μ_φ(x)) up to a constant. Nothing ties the codes to N(0, I).

Then we treat both as generative models p(z) p_θ(x|z) with z ~ N(0, I) and measure:

* held-out log p(x) (IWAE, nats per image). The AE has no posterior to propose from, so both
  models are scored with the same estimator: the proposal N(c·μ_φ(x), s² I) with the (c, s)
  from a small grid that gives the best bound on validation images. Any proposal gives a
  stochastic lower bound on log p(x); the VAE is also scored with its own trained guide;
* the model's mean image: E_{p(z)} E[x|z] over prior draws must equal the data's mean image
  when the model's p(x) matches the data (RMS difference per pixel);
* completeness: do decoded prior draws look like digits? A logistic-regression digit
  classifier fitted on the training images (when the data have labels) scores each decoded
  draw; we report its mean confidence max_y p(y|x) and the classifier score
  exp(E_x KL(p(y|x) ‖ p(y))) (1 = every image equally ambiguous or all one class, 10 = every
  image confidently one of ten balanced classes), against the same numbers for real test
  images (the AE's prior draws decode to faint ghosts that the classifier cannot place);
* where the codes are: their spread per coordinate, against the prior's 1.

    python examples/ae_vs_vae.py            # 30 epochs each, a few minutes on a CPU
    python examples/ae_vs_vae.py --quick    # seconds

Writes to ``--out``: ``prior_samples.png``, ``interpolations.png``, ``recognisable.png``,
``results.json`` and the runs in ``ae/`` and ``vae/``.
"""

from __future__ import annotations

import _common
import _figures
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from sklearn.linear_model import LogisticRegression

from ppl_vae.programs.model import VAE
from ppl_vae.reports import plots
from ppl_vae.training.config import FitConfig

# The AE's IWAE proposal N(c·μ(x), s² I): under the N(0, I) prior its posterior sits between the
# code and the origin, so shrinking the centre (c < 1) can help.
PROPOSAL_SHRINK = (0.25, 0.5, 0.75, 1.0)
CODE_SCALE = 1e-3  # the AE's "point mass": a Normal this narrow has a density (a Delta has none)
PROPOSAL_SCALES = (0.1, 0.3, 1.0)


class Autoencoder(VAE):
    """A deterministic autoencoder as a Pyro program (same networks and likelihood as :class:`VAE`;
    the encoder's log-variance head is unused). Its ``model`` masks log p(z) out, as the AE's
    objective does; :meth:`generative` is the unmasked p(z) p_θ(x|z) that log p(x) is
    measured under (the estimators honour masks, as Trace_ELBO does)."""

    def generative(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """p(z) p_θ(x|z) with z ~ N(0, I): the AE's decoder as a generative model (the VAE's program)."""
        return VAE.model(self, x, size, beta)

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
        """q(z|x) = N(μ_φ(x), CODE_SCALE² I), the code up to 10⁻³: the loss is −log p(x | z ≈ μ_φ(x))
        plus the constant entropy of q."""
        if self.register_params:  # as in VAE: the Trainer's torch optimizer owns the parameters
            pyro.module("encoder", self.encoder)
        n = x.shape[0]
        z_loc, _ = self.encoder(x)  # (N, z_dim); the log-variance head is ignored
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            return pyro.sample("z", dist.Normal(z_loc, CODE_SCALE).to_event(1))


def gaussian_proposal(vae: VAE, c: float, s: float):
    """A guide N(c·μ_φ(x), s² I) built on ``vae``'s encoder means, for importance sampling log p(x)
    under the prior. Any such proposal gives a stochastic lower bound on log p(x)."""

    def guide(x, size=None, beta=1.0):
        z_loc, _ = vae.encoder(x)  # (N, z_dim)
        with pyro.plate("data", size or x.shape[0], subsample=vae._subsample(x.shape[0], x.device), dim=-1):
            return pyro.sample("z", dist.Normal(c * z_loc, s).to_event(1))

    return guide


def best_proposal_bound(vae: VAE, valid: torch.Tensor, test: torch.Tensor, k: int, seed: int) -> tuple:
    """The (c, s) of :func:`gaussian_proposal` with the best IWAE bound on ``valid`` (K = k/10), and
    the IWAE_k bound it gives on ``test`` (the dict of ``_common.held_out``)."""
    model = getattr(vae, "generative", vae.model)  # the AE: its decoder under the prior, unmasked
    by = {
        (c, s): _common.held_out(
            vae, valid, max(10, k // 10), seed, guide=gaussian_proposal(vae, c, s), model=model
        )["iwae"]
        for c in PROPOSAL_SHRINK
        for s in PROPOSAL_SCALES
    }
    best = max(by, key=by.get)
    return best, _common.held_out(vae, test, k, seed=seed, guide=gaussian_proposal(vae, *best), model=model)


def digit_classifier(x: torch.Tensor, y: torch.Tensor) -> LogisticRegression:
    """A multinomial logistic regression on flattened images ``x (N, D)`` with labels ``y (N,)``."""
    return LogisticRegression(max_iter=300, C=0.05).fit(x.numpy(), y.numpy())


def recognisability(clf: LogisticRegression, x: torch.Tensor) -> dict:
    """How confidently ``clf`` places images ``x (N, D)``: per-image confidence max_y p(y|x) ``(N,)``,
    its mean, and the classifier score exp(E_x KL(p(y|x) ‖ p(y))), p(y) = E_x p(y|x)."""
    p = clf.predict_proba(x.numpy())  # (N, 10)
    py = p.mean(0, keepdims=True)  # (1, 10)
    kl = (p * (np.log(p + 1e-12) - np.log(py + 1e-12))).sum(1)  # (N,)
    return {
        "confidence": p.max(1),
        "mean_confidence": float(p.max(1).mean()),
        "score": float(np.exp(kl.mean())),
    }


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
        # The AE's logged "valid ELBO" is that of its masked program, log p(x|z ≈ μ) plus q's constant
        # entropy (log p(z) masked out): not a bound on log p(x), only a progress signal.
        "autoencoder": _common.fit(data, out / "ae", model=ae, **common)[0],
    }

    n_prior = 300 if args.quick else 2000
    x_te = data.test
    results = {
        "dataset": data.name,
        "z_dim": args.z_dim,
        "epochs": epochs,
        "k": k,
        "models": {},
        "mean_pixel_test_data": x_te.mean().item(),
    }
    labels = data.labels.get("train")
    clf = digit_classifier(data.train, labels) if labels is not None else None
    confidences = {}
    if clf is not None:
        real = recognisability(clf, x_te)
        results["classifier_on_test_images"] = {
            "mean_confidence": real["mean_confidence"],
            "score": real["score"],
            "accuracy": float(clf.score(x_te.numpy(), data.labels["test"].numpy())),
        }
        confidences["real test images"] = real["confidence"]
    prior_grids, interp_rows = {}, {}
    pairs = interpolation_pairs(data.labels.get("test"))
    z_prior = plots.prior_draws(n_prior, args.z_dim, args.seed)  # (n, z_dim): the same draws for both models
    for name, vae in models.items():
        with torch.no_grad():
            x_prior = vae.decode(z_prior)  # (n, D)
            codes = vae.encode(x_te)[0]  # (N, z_dim): μ(x)
        # log p(x) with one estimator for both models (the best Gaussian proposal around the
        # codes), and, for the VAE, with its own trained guide.
        proposal, ll = best_proposal_bound(vae, data.valid, x_te, k, args.seed)
        own = _common.held_out(vae, x_te, k, seed=args.seed) if name == "VAE" else None
        r = results["models"][name] = {
            "test_log_px_grid_proposal": ll["iwae"],
            "test_log_px_grid_proposal_se": ll["iwae_se"],
            "proposal_shrink_and_scale": proposal,
            "test_log_px_own_guide": own and own["iwae"],
            "test_log_px_own_guide_se": own and own["iwae_se"],
            "test_elbo": own and own["elbo"],
            # E_{p(z)} E[x|z] is the model's mean image; it equals the data's when p(x) matches the data
            "mean_image_rms_error": ((x_prior.mean(0) - x_te.mean(0)) ** 2).mean().sqrt().item(),
            "code_std_per_dim": codes.std(0).tolist(),
            "code_norm_mean": codes.norm(dim=-1).mean().item(),
            "prior_norm_mean": z_prior.norm(dim=-1).mean().item(),
            "mean_pixel_prior_samples": x_prior.mean().item(),
        }
        if clf is not None:
            rec = recognisability(clf, x_prior)
            r["classifier_on_prior_samples"] = {
                "mean_confidence": rec["mean_confidence"],
                "score": rec["score"],
            }
            confidences[f"{name}: decoded prior draws"] = rec["confidence"]
        prior_grids[name] = x_prior[:40]
        for j, (a, b) in enumerate(pairs):
            interp_rows.setdefault(f"pair {j + 1}", {})[name] = interpolate(vae, x_te[a], x_te[b])
        std = codes.std(0)
        print(
            f"{name:>11}: test log p(x) ≥ {ll['iwae']:.2f} ± {ll['iwae_se']:.2f} nats (IWAE_{k}, proposal "
            f"N({proposal[0]:g}·μ(x), {proposal[1]:g}² I))"
            + (f", {own['iwae']:.2f} ± {own['iwae_se']:.2f} with its own guide" if own else "")
            + f"; code std per coordinate {std.min():.2f}–{std.max():.2f} (prior: 1); mean image of prior "
            f"samples off the data's by {r['mean_image_rms_error']:.3f} per pixel (RMS)"
            + (
                f"; classifier on prior samples: confidence {rec['mean_confidence']:.3f}, score {rec['score']:.2f}"
                if clf is not None
                else ""
            )
        )
    if clf is not None:
        c = results["classifier_on_test_images"]
        print(
            f"classifier on real test images: confidence {c['mean_confidence']:.3f}, score {c['score']:.2f}, "
            f"accuracy {c['accuracy']:.3f}"
        )
        _figures.histograms(
            confidences,
            "classifier confidence max_y p(y | x)",
            "Do decoded prior draws look like digits?",
            path=out / "recognisable.png",
        )

    _figures.image_panels(
        {"z ~ N(0, I)": prior_grids},
        data.image_shape,
        nrow=8,
        title=f"E[x | z] for the same 40 draws z ~ N(0, I) ({data.name}, z_dim = {args.z_dim})",
        path=out / "prior_samples.png",
    )
    _figures.image_panels(
        interp_rows,
        data.image_shape,
        nrow=10,
        title="Decoded straight lines between the codes of two test images",
        path=out / "interpolations.png",
    )
    _common.save_json(results, out / "results.json")
    return 0


if __name__ == "__main__":
    _common.run(main)
