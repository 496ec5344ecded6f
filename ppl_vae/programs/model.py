"""VAEs as Pyro programs: ``model`` = p(z) p_θ(x|z), ``guide`` = q_φ(z|x), with swappable parts.

Parts, chosen when the VAE is built (docs/models.md has the math of each):

* the prior of the top latent, ``prior``: ``normal`` N(0, I), ``mog``, ``vampprior``
  (:mod:`ppl_vae.programs.priors`);
* the posterior family of every latent layer, ``posterior``: ``diagonal``, ``full-rank``, ``iaf``
  (:mod:`ppl_vae.programs.guides`);
* ``latent_layers=2``: model z2 ~ p(z2), z1 ~ p(z1 | z2), then ``hierarchy="chain"`` (Burda et
  al. 2016): x ~ p(x | z1), guide q(z1 | x) q(z2 | z1); ``hierarchy="skip"`` (Tomczak & Welling
  2018): x ~ p(x | z1, z2), guide q(z2 | x) q(z1 | x, z2). Sites ``z1``, ``z2``; one layer has ``z``;
* :class:`~ppl_vae.programs.conditional.ConditionalVAE`: p(x | z, y) and q(z | x, y) for a one-hot class
  label y (in :mod:`ppl_vae.programs.conditional`).

Conventions (the estimators in :mod:`ppl_vae.inference.estimators` rely on them, and any other
Pyro model/guide pair that follows them can be evaluated the same way):

* ``model(x)`` and ``guide(x)`` take a batch ``x`` of shape ``(N, D)`` (flattened images); a
  conditional program takes the labels as the second positional argument, ``model(x, y)``;
* every sample site sits inside ``pyro.plate("data", size, subsample=..., dim=-1)``;
* latent sites are reparameterized (z = μ + σ·ε, then any flow) so gradients reach the encoder;
  the default guide is Normal(μ_φ(x), σ_φ(x)) with σ = exp(½ log σ²) from a log-variance head;
* the observed site is ``"x"``; every site declares its event dims, so its ``log_prob`` has
  shape ``(N,)``, or ``(K, N)`` under an outer particle plate;
* minibatch scaling: ``size`` is the full dataset size and the batch is a subsample of it,
  so the plate scales every log-density by ``size / N``. The SVI loss is then an unbiased
  estimate of the full-data negative ELBO −Σ_i ELBO_i, both terms in the plate at their 1 : 1
  ratio (a hand-written ``kld_weight = M / N_total`` on the per-datapoint KL is a β-VAE with
  β = M/N: docs/math.md). We report numbers per datapoint, in nats (loss / size).
* β-VAE: ``beta`` scales every latent site of model and guide (``poutine.scale``), so the
  objective is E_q[log p(x|z)] − β·KL(q(z|x) ‖ p(z)) for ``Trace_ELBO`` (KL by Monte Carlo) and
  ``TraceMeanField_ELBO`` (KL in closed form) alike.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from ..core.errors import UserError
from .guides import make_posterior
from .likelihoods import Likelihood, make_likelihood
from .nets import Decoder, Encoder, JointInputMLP, build_networks, mlp
from .priors import PRIORS, GaussianLayer, MixturePrior, VampPrior, draw

# (z_dim, hidden) when not given: the 784-400-20 VAE; the two-layer IWAE architecture of Burda et
# al. 2016 (784-200-200-100 for z1, then 100-100-50 for z2 with z2_dim=50, hidden2=(100, 100)).
DEFAULT_DIMS = {1: (20, (400,)), 2: (100, (200, 200))}
HIERARCHIES = ("chain", "skip")


def hierarchy_error(hierarchy: str, latent_layers: int, arch: str, hidden) -> str | None:
    """Why ``hierarchy`` cannot be built with these settings, in one line (None: it can).
    ``hidden`` None means the default widths. Checked by :class:`VAE` and by the CLI's config."""
    if hierarchy not in HIERARCHIES:
        return f"--hierarchy must be one of {', '.join(HIERARCHIES)}, got {hierarchy!r}"
    if hierarchy == "skip" and (latent_layers != 2 or arch != "mlp"):
        return (
            "--hierarchy skip is a two-layer program of MLPs: add --latent-layers 2 and --arch mlp "
            f"(got {latent_layers} layer(s), --arch {arch})"
        )
    if hierarchy == "skip" and hidden is not None and not len(hidden):
        return "--hierarchy skip needs at least one --hidden layer (q(z1 | x, z2) joins x and z2 in it)"
    return None


def _kl_weight(beta):
    """β-VAE: scale the latent sites of model and guide by β (nothing to do for a plain float 1)."""
    if isinstance(beta, (int, float)) and beta == 1:
        return nullcontext()
    return poutine.scale(scale=beta)


def _join(a: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """``cat(a, y)`` along the last dim, ``y (N, C)`` broadcast over a's leading particle dims."""
    if y is None:
        return a
    return torch.cat([a, y.expand(*a.shape[:-1], y.shape[-1])], -1)  # (..., N, d + C)


class VAE(nn.Module):
    """A VAE with a pluggable prior, posterior family, depth and likelihood.

    :param image_shape: ``(C, H, W)`` of one datapoint (D = C·H·W).
    :param z_dim: dimension of the latent the decoder reads (z, or z1 of two layers); default
        20 for one layer, 100 for two.
    :param hidden: hidden widths of the x-encoder (the decoder mirrors them); default (400,) for
        one layer, (200, 200) for two.
    :param likelihood: a :class:`~ppl_vae.programs.likelihoods.Likelihood` or its name.
    :param arch: ``"mlp"``, ``"conv"`` or ``"broadcast"`` (:mod:`ppl_vae.programs.nets`).
    :param prior: ``"normal"``, ``"mog"`` or ``"vampprior"``: p of the top latent.
    :param posterior: ``"diagonal"``, ``"full-rank"`` or ``"iaf"``: q of every latent layer.
    :param latent_layers: 1 or 2.
    :param z2_dim, hidden2: the top layer of two: p(z1|z2) is an MLP z2_dim-hidden2-z_dim; the
        chain's q(z2|z1) mirrors it, the skip's q(z2|x) has the x-encoder's widths.
    :param hierarchy: two layers: ``"chain"`` or ``"skip"`` (module docstring; ``skip`` needs ``mlp``).
    :param pseudo_inputs: K of the VampPrior. :param mixture_components: M of the MoG prior.
    :param flow_steps: IAF transforms per latent layer.
    :param num_classes: set by :class:`~ppl_vae.programs.conditional.ConditionalVAE` (0: unconditional).
    """

    conditional = False
    #: Register the networks in Pyro's param store at every call (``pyro.module``), as SVI with a
    #: ``pyro.optim`` optimizer needs. ppl_vae's Trainer optimizes ``vae.parameters()`` with one
    #: torch optimizer and switches this off: it is per-step bookkeeping it does not use.
    register_params = True

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int | None = None,
        hidden: Sequence[int] | None = None,
        likelihood: Likelihood | str = "bernoulli",
        arch: str = "mlp",
        activation: str = "relu",
        *,
        prior: str = "normal",
        posterior: str = "diagonal",
        latent_layers: int = 1,
        z2_dim: int = 50,
        hidden2: Sequence[int] = (100, 100),
        pseudo_inputs: int = 500,
        mixture_components: int = 10,
        flow_steps: int = 2,
        num_classes: int = 0,
        hierarchy: str = "chain",
    ):
        super().__init__()
        if latent_layers not in DEFAULT_DIMS:
            raise UserError(f"--latent-layers must be 1 or 2, got {latent_layers}")
        if prior not in PRIORS:
            raise UserError(f"--prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        why = hierarchy_error(hierarchy, latent_layers, arch, hidden)
        if why:
            raise UserError(why)
        if bool(num_classes) != self.conditional:
            raise ValueError(
                "class labels need ConditionalVAE(num_classes=C), and ConditionalVAE needs C >= 2"
            )
        self.image_shape = tuple(int(s) for s in image_shape)
        self.x_dim = math.prod(self.image_shape)
        self.z_dim = int(z_dim or DEFAULT_DIMS[latent_layers][0])
        hidden = DEFAULT_DIMS[latent_layers][1] if hidden is None else hidden
        self.num_classes = int(num_classes)
        self.likelihood = make_likelihood(likelihood) if isinstance(likelihood, str) else likelihood
        self.skip = hierarchy == "skip"
        self.posterior = make_posterior(posterior, self.z_dim, flow_steps)
        extra, out_dim, xy_dim = (
            self.posterior.extra_outputs,
            self.likelihood.params_per_pixel * self.x_dim,
            self.x_dim + self.num_classes,
        )
        if self.skip:  # q(z1 | x, z2) and p(x | z1, z2): x's part of the first layer once per datapoint
            self.encoder = Encoder(
                JointInputMLP(xy_dim, z2_dim, [*hidden, 2 * self.z_dim + extra], activation),
                self.z_dim,
                extra,
            )
            self.decoder = Decoder(
                mlp([self.z_dim + z2_dim + self.num_classes, *reversed(hidden), out_dim], activation)
            )
        else:
            self.encoder, self.decoder = build_networks(
                arch, self.image_shape, self.z_dim, hidden, out_dim, activation, extra, self.num_classes
            )
        full = self.posterior.full_covariance
        if latent_layers == 2:  # p(z1 | z2) and q(z2 | z1) (chain) or q(z2 | x) (skip)
            self.posterior2 = make_posterior(posterior, z2_dim, flow_steps)
            extra2 = self.posterior2.extra_outputs
            sizes2 = [xy_dim, *hidden] if self.skip else [self.z_dim, *hidden2]
            self.encoder2 = Encoder(mlp([*sizes2, 2 * z2_dim + extra2], activation), z2_dim, extra2)
            self.layer = GaussianLayer(z2_dim, self.z_dim, list(reversed(hidden2)), activation, full)
            self.latent_sites = ("z1", "z2")  # bottom (decoded) first
        else:
            self.posterior2 = self.encoder2 = self.layer = None
            self.latent_sites = ("z",)
        if self.posterior.zero_extra:
            for enc in (self.encoder, self.encoder2):
                if enc is not None:
                    enc.zero_extra_outputs()
        top_dim = z2_dim if latent_layers == 2 else self.z_dim
        self.top_site, self.bottom_site = self.latent_sites[-1], self.latent_sites[0]
        if prior == "normal":
            # buffers on the VAE itself: created once on the module's device (no host copies per
            # step), and a plain VAE's state_dict keeps the keys it always had
            self.register_buffer("prior_loc", torch.zeros(top_dim))
            self.register_buffer("prior_scale", torch.ones(top_dim))
            if full:
                self.register_buffer("prior_scale_tril", torch.eye(top_dim), persistent=False)
            self.prior = self.standard_mvn if full else self.standard_normal
        elif prior == "mog":
            self.prior = MixturePrior(top_dim, mixture_components)
        else:
            self.prior = VampPrior(
                pseudo_inputs, self.x_dim, self.pseudo_posterior, self.likelihood.support, self.num_classes
            )
        self._model_parts = ("decoder", "prior", "layer") + (
            ("encoder", "encoder2") if prior == "vampprior" else ()
        )
        self._guide_parts = ("encoder", "posterior", "encoder2", "posterior2")
        self._aranges: dict = {}

    def _subsample(self, n: int, device) -> torch.Tensor:
        """Indices ``0..n-1`` on ``device``, cached: the batch *is* the subsample, the plate only
        needs their number to scale by size/n (and drawing them itself would sync with the host)."""
        key = (n, str(device))
        idx = self._aranges.get(key)
        if idx is None:
            idx = self._aranges[key] = torch.arange(n, device=device)
        return idx

    def _register(self, parts: Sequence[str]) -> None:
        for name in parts:
            module = getattr(self, name)
            if isinstance(module, nn.Module):  # not the N(0, I) prior (a method) nor an absent layer (None)
                pyro.module(name, module)

    def _labels(self, y, n: int, dtype) -> torch.Tensor | None:
        """One-hot labels ``(n, C)`` from class indices ``(n,)`` or one-hot rows; None when unconditional."""
        if y is None and not self.conditional:
            return None
        if not self.conditional:
            raise ValueError("labels were given to an unconditional VAE; build a ConditionalVAE to use them")
        if y is None:
            raise ValueError(
                f"this conditional VAE needs class labels y: (N,) indices in 0..{self.num_classes - 1} "
                f"or one-hot rows (N, {self.num_classes})"
            )
        if not y.dtype.is_floating_point:  # F.one_hot checks the range (on the host, without a GPU sync)
            if y.shape != (n,):
                raise ValueError(f"labels must be {n} class indices, got shape {tuple(y.shape)}")
            return F.one_hot(y, self.num_classes).to(dtype)
        if y.shape != (n, self.num_classes):
            raise ValueError(
                f"one-hot labels must have shape ({n}, {self.num_classes}), got {tuple(y.shape)}"
            )
        return y

    # ---- the program ----

    def standard_normal(self) -> dist.Distribution:
        """The ``normal`` prior N(0, I) of the top latent, event shape ``(d,)``."""
        return dist.Normal(self.prior_loc, self.prior_scale).to_event(1)

    def standard_mvn(self) -> dist.Distribution:
        """N(0, I) written as a ``MultivariateNormal`` (for a full-rank guide's closed-form KL)."""
        return dist.MultivariateNormal(self.prior_loc, scale_tril=self.prior_scale_tril)

    def pseudo_posterior(self, u: torch.Tensor) -> dist.Distribution:
        """The VampPrior's components q(z_top | u_k) for pseudo-inputs ``u (K, D [+ C])``, batch
        ``(K,)``: the Gaussian part of the guide (an IAF guide's base, without its flow). With two
        layers: the skip hierarchy's q(z2 | u_k) exactly; the chain's q(z2 | z1 = E[z1 | u_k]): the
        mean of q(z1 | u_k) goes through q(z2 | z1), since ∫ q(z1|u) q(z2|z1) dz1 has no closed form."""
        if self.skip:
            return self.posterior2.gaussian(*self.encoder2(u))  # batch (K,), event (z2_dim,)
        q = self.posterior.gaussian(*self.encoder(u))  # batch (K,), event (z_dim,)
        if self.layer is not None:
            q = self.posterior2.gaussian(*self.encoder2(q.mean))  # batch (K,), event (z2_dim,)
        return q

    def _decoded(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """The latents the decoder reads: z1 (chain), ``cat(z1, z2)`` (skip), ``(..., z_dim [+ z2_dim])``."""
        return torch.cat([z1, z2], -1) if self.skip else z1

    def _model(self, x: torch.Tensor, y: torch.Tensor | None, size: int | None, beta) -> torch.Tensor:
        """p(z) p_θ(x|z [, y]) for a batch ``x (N, D)`` (labels ``y (N, C)``) out of ``size`` datapoints."""
        if self.register_params:
            self._register(self._model_parts)
        n = x.shape[0]
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            with _kl_weight(beta):
                z = pyro.sample(
                    self.top_site, self.prior()
                )  # (N, d_top); (K, N, d_top) under a particle plate
                if self.layer is not None:
                    z = self._decoded(pyro.sample("z1", self.layer(z)), z)  # z1 (..., N, z_dim), z2
            out = self.decoder(_join(z, y))  # (..., N, out_dim)
            return pyro.sample("x", self.likelihood.dist(out), obs=x)

    def _guide(self, x: torch.Tensor, y: torch.Tensor | None, size: int | None, beta) -> torch.Tensor:
        """q_φ(z|x [, y]) (two layers: chain q(z1 | x [, y]) q(z2 | z1), skip q(z2 | x [, y])
        q(z1 | x [, y], z2)), reparameterized."""
        if self.register_params:
            self._register(self._guide_parts)
        n, xy = x.shape[0], _join(x, y)
        with pyro.plate("data", size or n, subsample=self._subsample(n, x.device), dim=-1):
            with _kl_weight(beta):
                if self.skip:  # z2: (..., N, z2_dim), then z1 from (x, z2): (..., N, z_dim)
                    z2 = pyro.sample("z2", self.posterior2(*self.encoder2(xy)))
                    return pyro.sample("z1", self.posterior(*self.encoder(xy, z2)))
                params = self.encoder(xy)  # (z_loc, z_logvar[, extra]), each (N, ·)
                # batch (N,), event (z_dim,); the draw is (N, z_dim), or (K, N, z_dim) under a particle plate
                z = pyro.sample(self.bottom_site, self.posterior(*params))
                if self.encoder2 is not None:
                    pyro.sample("z2", self.posterior2(*self.encoder2(z)))  # (..., N, z2_dim)
                return z

    def model(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """p(z) p_θ(x|z) for a batch ``x (N, D)`` out of ``size`` datapoints (default N)."""
        return self._model(x, None, size, beta)

    def guide(self, x: torch.Tensor, size: int | None = None, beta: float = 1.0) -> torch.Tensor:
        """q_φ(z|x), e.g. Normal(μ_φ(x), exp(½ log σ²_φ(x))), reparameterized."""
        return self._guide(x, None, size, beta)

    # ---- plain tensor helpers (no Pyro machinery) for plots and examples ----

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z_loc, z_scale)`` of the Gaussian part of q(z|x) (chain: of q(z1|x)), each
        ``(N, z_dim)``: marginal means and standard deviations. Skip: of q(z1 | x, z2 = E[z2|x])
        and q(z2|x), concatenated ``(N, z_dim + z2_dim)``: what :meth:`decode` reads."""
        xy = _join(x, self._labels(y, x.shape[0], x.dtype))
        if not self.skip:
            return self.posterior.loc_scale(*self.encoder(xy))
        loc2, scale2 = self.posterior2.loc_scale(*self.encoder2(xy))
        loc1, scale1 = self.posterior.loc_scale(*self.encoder(xy, loc2))
        return torch.cat([loc1, loc2], -1), torch.cat([scale1, scale2], -1)

    def decode(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z (, y)] ``(..., D)`` for latents ``(..., z_dim)`` (chain: z1; skip: cat(z1, z2))."""
        y = self._labels(y, z.shape[-2] if z.dim() > 1 else 1, z.dtype)
        return self.likelihood.mean(self.decoder(_join(z, y)))

    def reconstruct(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """E[x|z = μ_φ(x)], ``(N, D)``."""
        return self.decode(self.encode(x, y)[0], y)

    @property
    def device(self) -> torch.device:
        """Where the parameters are."""
        return next(self.parameters()).device

    def sample(
        self, n: int, generator: torch.Generator | None = None, label: int | None = None
    ) -> torch.Tensor:
        """Decoded means E[x|z] of ``n`` draws from the prior (two layers: z2 ~ p(z2), then
        z1 ~ p(z1 | z2)), ``(n, D)``, with every random number from ``generator`` (default: the
        global RNG); the normal prior's z is ``torch.randn(n, d, generator=generator)``. A
        conditional VAE draws class ``label`` (default: classes 0, 1, …, C−1 in turn)."""
        y = None
        if label is not None and not self.conditional:
            raise ValueError("label= needs a conditional VAE (fit with --conditional)")
        if self.conditional:
            if label is not None and not 0 <= label < self.num_classes:
                raise ValueError(f"label must be in 0..{self.num_classes - 1}, got {label}")
            classes = torch.arange(n) % self.num_classes if label is None else torch.full((n,), int(label))
            y = classes.to(self.device)
        z = draw(self.prior(), generator, n)  # (n, d_top)
        if self.layer is not None:
            z = self._decoded(draw(self.layer(z), generator), z)  # z1 (n, z_dim), z2
        return self.decode(z, y)
