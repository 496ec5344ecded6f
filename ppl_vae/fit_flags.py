"""The flags of ``python -m ppl_vae.fit``: one argparse call each, in the groups of its ``--help``
(data, model, program, objective, optimization, run directory); :mod:`ppl_vae.fit` parses them.

A flag that is not given is absent from the parsed namespace (``default=argparse.SUPPRESS``), so
that ``--resume`` merges only the flags given into the run's saved settings; the defaults that
``--help`` names are :class:`~ppl_vae.training.config.FitConfig`'s.
"""

from __future__ import annotations

import argparse

from .core.cli import ArgumentParser, int_list
from .data.datasets import BINARIZE, DATASETS
from .data.dequantize import DEQUANTIZE
from .programs.guides import POSTERIORS
from .programs.likelihoods import LIKELIHOODS
from .programs.model import HIERARCHIES
from .programs.nets import ACTIVATIONS, ARCHS
from .programs.priors import PRIORS
from .training.config import DEFAULT_MIN_EPOCHS, DEFAULT_MIN_STEPS, FitConfig
from .training.config_checks import ELBO_CHOICES, OPTIMIZERS

S = argparse.SUPPRESS  # only flags given on the command line appear, so --resume can merge them


def _opt_float(text):
    return None if text.lower() == "none" else float(text)


def _opt_int(text):
    return None if text.lower() == "none" else int(text)


def _opt_str(text):
    return None if text.lower() == "none" else text


def build_parser(prog: str, description: str) -> ArgumentParser:
    """The parser of the command ``prog``, its ``--help`` opening with ``description``."""
    d = FitConfig()
    p = ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        default=S,
        help=f"one of {', '.join(DATASETS)}; or a folder of PNG/JPEG images (class subfolders give "
        f"labels); or a .npy/.npz file of images in [0, 1] shaped (N, H, W), (N, D), (N, C, H, W) or "
        f"(N, H, W, C) with C = 1 or 3 (a .npz's 'labels' array gives labels); your data are split "
        f"80/10/10 by a seeded permutation (default: auto = MNIST if present or downloadable, else "
        f"binarized MNIST if present, else scikit-learn's 8x8 digits)",
    )
    g.add_argument(
        "--channels",
        type=int,
        choices=(1, 3),
        default=S,
        help="your own images: convert them to 1 (grey) or 3 (RGB) channels (default: as they are; a "
        "folder with any colour image is read as RGB)",
    )
    g.add_argument(
        "--image-size",
        type=int_list,
        default=S,
        metavar="H,W",
        help="a folder of images: resize every image to H×W pixels, needed when their sizes differ "
        "(default: off)",
    )
    g.add_argument(
        "--data-dir",
        default=S,
        help="where datasets are read/downloaded (default: $PPL_VAE_DATA, else ~/.cache/ppl_vae)",
    )
    g.add_argument(
        "--binarize",
        choices=BINARIZE,
        default=S,
        help="greyscale → 0/1 (default: auto = dynamic for "
        "greyscale data under --likelihood bernoulli, none otherwise; binarized-mnist is already 0/1)",
    )
    g.add_argument(
        "--dequantize",
        choices=DEQUANTIZE,
        default=S,
        help="8-bit images under a density (gaussian, gaussian-learned, continuous-bernoulli): uniform "
        "trains on y = (x + u)/256 with u ~ U[0, 1) drawn afresh per batch, scores validation and test "
        "images at one u drawn with a recorded seed, and evaluate reports a bound on the bits/dim of "
        "the 8-bit images (default: auto = uniform for 8-bit images under a density, none otherwise)",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--likelihood", choices=list(LIKELIHOODS), default=S, help=f"p(x|z) (default: {d.likelihood})"
    )
    g.add_argument(
        "--sigma",
        type=float,
        default=S,
        help=f"fixed σ of --likelihood gaussian (default: {d.sigma}; "
        f"for data in [0, 1]; σ = 1, the MSE loss, lets the latents collapse)",
    )
    g.add_argument(
        "--sigma-floor",
        type=float,
        default=S,
        help=f"lower bound on the learned σ of gaussian-learned (default: {d.sigma_floor})",
    )
    g.add_argument(
        "--arch",
        choices=ARCHS,
        default=S,
        help=f"networks (default: {d.arch}; conv: two stride-2 convolutions, any H and W >= 4, "
        f"e.g. 28x28 or Frey Faces' 28x20; broadcast: MLP encoder, spatial broadcast decoder)",
    )
    g.add_argument(
        "--hidden",
        type=int_list,
        default=S,
        help="hidden widths of the MLP, comma-separated (default: 400; 200,200 with two latent layers)",
    )
    g.add_argument(
        "--z-dim",
        type=int,
        default=S,
        help="latent dimension, of z1 with two layers (default: 20; 100 with two layers)",
    )
    g.add_argument("--activation", choices=list(ACTIVATIONS), default=S, help=f"(default: {d.activation})")
    g = p.add_argument_group("program (docs/models.md)")
    g.add_argument(
        "--prior",
        choices=PRIORS,
        default=S,
        help="p(z) of the top latent layer: normal N(0, I), mog (a "
        "learned mixture of Gaussians), vampprior (a mixture of the guide's encodings of learned "
        "pseudo-inputs) (default: normal)",
    )
    g.add_argument(
        "--guide",
        choices=list(POSTERIORS),
        default=S,
        help="posterior family q(z|x): diagonal, "
        "full-rank (Cholesky factor from the encoder) or iaf (inverse autoregressive flow) (default: diagonal)",
    )
    g.add_argument(
        "--latent-layers",
        type=int,
        choices=(1, 2),
        default=S,
        help="2: z2 → z1 → x (--hierarchy "
        "says how), sites z1 and z2 (default: 1; with 2, --z-dim 100 and --hidden 200,200 by default)",
    )
    g.add_argument(
        "--hierarchy",
        choices=HIERARCHIES,
        default=S,
        help="two layers: chain, p(x|z1) with the guide "
        "q(z1|x) q(z2|z1) (Burda et al. 2016); skip, p(x|z1,z2) with the guide q(z2|x) q(z1|x,z2) "
        "(Tomczak & Welling 2018; --arch mlp) (default: chain)",
    )
    g.add_argument(
        "--z2-dim", type=int, default=S, help=f"dimension of z2 with --latent-layers 2 (default: {d.z2_dim})"
    )
    g.add_argument(
        "--hidden2", type=int_list, default=S, help="hidden widths of the z1 ↔ z2 networks (default: 100,100)"
    )
    g.add_argument(
        "--pseudo-inputs",
        type=int,
        default=S,
        help=f"K learned pseudo-inputs of --prior vampprior (default: {d.pseudo_inputs})",
    )
    g.add_argument(
        "--mixture-components",
        type=int,
        default=S,
        help=f"M components of --prior mog (default: {d.mixture_components})",
    )
    g.add_argument(
        "--flow-steps", type=int, default=S, help=f"IAF steps of --guide iaf (default: {d.flow_steps})"
    )
    g.add_argument(
        "--conditional",
        action="store_true",
        default=S,
        help="class-conditional p(x|z,y) and q(z|x,y) "
        "(datasets with labels: digits, mnist, mnist-t10k, fashion-mnist, kmnist, a folder with class "
        "subfolders, a .npz with a labels array)",
    )
    g = p.add_argument_group("objective")
    g.add_argument(
        "--elbo",
        choices=ELBO_CHOICES,
        default=S,
        help="trace = Trace_ELBO (Monte Carlo KL), meanfield = "
        "TraceMeanField_ELBO (analytic KL), iwae = importance-weighted bound (default: trace)",
    )
    g.add_argument(
        "--num-particles", type=int, default=S, help="K particles per datapoint, vectorized (default: 1)"
    )
    g.add_argument("--beta", type=float, default=S, help="β-VAE: weight of the KL term (default: 1)")
    g.add_argument(
        "--kl-warmup",
        type=float,
        default=S,
        help="epochs of linear β warm-up; with --elbo iwae it "
        "tempers log p(z) − log q(z|x) in each weight (default: 0, off, with one latent layer; a tenth of "
        "the epochs with --latent-layers 2; 0 with --init-from)",
    )
    g = p.add_argument_group("optimization")
    g.add_argument(
        "--epochs",
        type=int,
        default=S,
        help=f"(default: enough epochs for {DEFAULT_MIN_STEPS} optimizer "
        f"steps, at least {DEFAULT_MIN_EPOCHS}: 10 on MNIST, 250 on digits)",
    )
    g.add_argument("--batch-size", type=int, default=S, help=f"(default: {d.batch_size})")
    g.add_argument("--lr", type=float, default=S, help=f"Adam learning rate (default: {d.lr})")
    g.add_argument("--weight-decay", type=float, default=S, help="Adam weight decay (default: 0)")
    g.add_argument(
        "--lr-decay", type=float, default=S, help="multiply the lr by this each epoch (default: 1)"
    )
    g.add_argument(
        "--ema",
        type=float,
        default=S,
        metavar="DECAY",
        help="average the parameters, θ̄ ← d·θ̄ + "
        "(1 − d)·θ after every step; validation, best.pt and evaluate use θ̄ (e.g. 0.999; default: 0, off)",
    )
    g.add_argument("--grad-clip", type=_opt_float, default=S, help="clip the gradient norm (default: off)")
    g.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default=S,
        help="adam, or adam-normgrad: Adam on each parameter tensor's gradient scaled to unit L2 norm, "
        "the VampPrior authors' AdamNormGrad (default: adam)",
    )
    g.add_argument(
        "--patience",
        type=_opt_int,
        default=S,
        help="early stop after this many epochs without a "
        "better validation ELBO (IWAE_K bound with --elbo iwae) (default: off)",
    )
    g.add_argument(
        "--time-limit",
        type=_opt_float,
        default=S,
        metavar="MINUTES",
        help="stop after the first "
        "epoch that ends past this many minutes of training in this invocation; best.pt is still "
        "chosen on validation (default: off)",
    )
    g.add_argument("--seed", type=int, default=S, help="(default: 0)")
    g.add_argument("--device", default=S, help="auto, cpu, cuda or cuda:N (default: auto)")
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        default=S,
        help="on CUDA, replay each training step "
        "from a captured CUDA graph: the same numbers as eager steps, faster (docs/benchmarks.md, GPU) "
        "(default: off until every program family passes benchmarks/gpu_check.py; no effect on the CPU)",
    )
    g.add_argument(
        "--no-cuda-graph",
        dest="cuda_graph",
        action="store_false",
        default=S,
        help="eager training steps (the default; switches --cuda-graph off on --resume)",
    )
    g.add_argument(
        "--log-every", type=int, default=S, help=f"steps between progress updates (default: {d.log_every})"
    )
    g.add_argument(
        "--final-iwae-k",
        type=int,
        default=S,
        help=f"K of the validation IWAE bound reported at the end (default: {d.final_iwae_k}; 0 skips it)",
    )
    g = p.add_argument_group("run directory")
    g.add_argument("--out", default=None, help="run directory (default: runs/<dataset>-<elbo>-<time>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint.pt")
    g.add_argument(
        "--init-from",
        default=S,
        metavar="RUN",
        help="start a new run from the parameters of RUN's best.pt (or of RUN/checkpoint.pt): the "
        "program, and unless --dataset is given the data, come from RUN's config.json; the training "
        "settings are this command's, with --kl-warmup defaulting to 0; a fresh optimizer (e.g. IWAE "
        "fine-tuning of an ELBO-trained run: --elbo iwae --num-particles 5)",
    )
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument(
        "--accept-changed-data",
        action="store_true",
        help="with --resume: continue although the data's fingerprint (split sizes, and a content "
        "digest of a file or a folder of images; recorded in config.json) differs from the run's "
        "(default: refuse)",
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    g.add_argument(
        "--tensorboard",
        type=_opt_str,
        default=S,
        metavar="DIR",
        help="also write each epoch's "
        "metrics and image grids (reconstructions, prior samples) as TensorBoard events in DIR, step = "
        "epoch; --resume continues there ('none' turns it off); needs pip install 'ppl_vae[tensorboard]' "
        "(default: off)",
    )
    return p
