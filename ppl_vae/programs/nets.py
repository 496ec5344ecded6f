"""Encoder and decoder networks.

An encoder maps a batch of flattened images ``x`` of shape ``(N, D)`` to the parameters
of the Gaussian q(z|x): ``z_loc`` and ``z_logvar`` (log σ², the log-variance head), each
``(N, z_dim)``, followed by the ``extra`` outputs a richer posterior family asks for (the
strictly lower triangle of a Cholesky factor, or an IAF context; :mod:`ppl_vae.programs.guides`).
A conditional program appends a one-hot label ``y (N, C)`` to the encoder's input and to the
decoder's (``label_dim = C``). A decoder maps latents ``z`` of shape ``(..., z_dim)`` to the
likelihood's parameters ``(..., out_dim)`` (logits for a Bernoulli, means for a Gaussian).
Leading sample dimensions are allowed in the decoder so that vectorized particles
``(K, N, z_dim)`` decode in one call.

Three architectures:

* ``mlp``: ``D → hidden → … → 2·z_dim`` and back (the classic 784-400-20 VAE).
* ``conv``: a small convolutional pair for (C, H, W) images, grey or colour, square or not
  (two stride-2 convolutions, 28→14→7 on MNIST, and their transposes; H, W ≥ 4).
* ``broadcast``: the MLP encoder with a spatial broadcast decoder (Watters et al. 2019): z is
  copied to every pixel next to the pixel's coordinates, and a small network shared by all
  pixels (1×1 convolutions) maps (z, i, j) to that pixel's parameters. It suits images made of
  objects at positions (the circles world): position and size need not be entangled to be
  drawn, and the code comes out close to linear in them.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ..core.errors import UserError

ARCHS = ("mlp", "conv", "broadcast")


class GatedLinear(nn.Module):
    """A gated hidden layer, h = (W x + b) ⊙ σ(V x + c) (Dauphin et al. 2017): the ``GatedDense``
    layer of the VampPrior paper's MLPs (Tomczak & Welling 2018). One matmul gives both halves."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gate(self.linear(x))


def gate(h: torch.Tensor) -> torch.Tensor:
    """h ⊙ σ(g) for the two halves ``[h, g]`` of ``h (..., 2·out)``: the gated layer's output ``(..., out)``."""
    h, g = h.chunk(2, dim=-1)
    return h * torch.sigmoid(g)


#: hidden-layer nonlinearities; ``gated`` makes every hidden layer a :class:`GatedLinear`
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "softplus": nn.Softplus, "gated": None}


def mlp(sizes: Sequence[int], activation: str = "relu") -> nn.Sequential:
    """Fully connected layers ``sizes[0] → … → sizes[-1]``, activation between, none last
    (``gated``: gated hidden layers, a plain linear last)."""
    act = ACTIVATIONS[activation]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        hidden = i < len(sizes) - 2
        layers.append(GatedLinear(a, b) if hidden and act is None else nn.Linear(a, b))
        if hidden and act is not None:
            layers.append(act())
    return nn.Sequential(*layers)


class JointInputMLP(nn.Module):
    """``mlp([a_dim + b_dim, *sizes])`` applied to ``cat(a, b)``, for a datapoint's ``a (N, a_dim)``
    shared by the particles of ``b (..., N, b_dim)``. The first layer is written as
    W·cat(a, b) + c = (W_a a + c) + W_b b, so the costly part (a = x, D = 784 inputs) runs once
    per datapoint, not once per particle (K = 5000 at evaluation): the same family of functions;
    each block starts at PyTorch's default for its own fan-in. ``sizes``: hidden widths, then
    outputs (at least one hidden layer)."""

    def __init__(self, a_dim: int, b_dim: int, sizes: Sequence[int], activation: str = "relu"):
        super().__init__()
        if len(sizes) < 2:
            raise ValueError("JointInputMLP needs at least one hidden layer")
        act = ACTIVATIONS[activation]
        width = sizes[0] * (2 if act is None else 1)  # a gated layer: both halves in one matmul
        self.a, self.b = nn.Linear(a_dim, width), nn.Linear(b_dim, width, bias=False)
        self.act = act() if act is not None else None
        self.rest = mlp(sizes, activation)  # hidden → … → outputs

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = self.a(a) + self.b(b)  # (N, width) + (..., N, width) → (..., N, width)
        return self.rest(gate(h) if self.act is None else self.act(h))


class Encoder(nn.Module):
    """Gaussian parameters from a network: ``x (..., in) → (z_loc, z_logvar[, extra])``, each
    ``(..., z_dim)`` and ``extra (..., extra)`` when ``extra > 0``. The body ends in
    ``2·z_dim + extra`` linear outputs."""

    def __init__(self, body: nn.Module, z_dim: int, extra: int = 0):
        super().__init__()
        self.body = body
        self.z_dim = z_dim
        self.extra = extra
        self.split_sizes = [z_dim, z_dim, extra] if extra else z_dim  # (an int: the plain split op)

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = self.body(*inputs)  # (..., 2·z_dim + extra)
        return h.split(self.split_sizes, dim=-1)  # (..., z_dim), (..., z_dim)[, (..., extra)]

    def zero_extra_outputs(self) -> None:
        """Zero the weights and biases of the ``extra`` outputs (the last linear layer's last rows),
        so that they start at 0 whatever the input; they still get gradients and learn."""
        last = [m for m in self.body.modules() if isinstance(m, nn.Linear)][-1]
        with torch.no_grad():
            last.weight[2 * self.z_dim :].zero_()
            last.bias[2 * self.z_dim :].zero_()


class Decoder(nn.Module):
    """p_θ(x|z) parameters: ``z (..., z_dim) → (..., out_dim)``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(z)


class _ConvEncoderBody(nn.Module):
    """Two stride-2 convolutions, then an MLP to ``out_dim``; a label ``y (N, label_dim)``,
    appended to the flattened image, joins the convolution features before the MLP."""

    def __init__(
        self,
        image_shape: Sequence[int],
        out_dim: int,
        label_dim: int = 0,
        channels: int = 32,
        hidden: int = 256,
    ):
        super().__init__()
        c, h, w = image_shape
        self.image_shape = (c, h, w)
        self.split_sizes = [c * h * w, label_dim]
        self.conv = nn.Sequential(
            nn.Conv2d(c, channels, 4, stride=2, padding=1),
            nn.ReLU(),  # (N, ch, 14, 14)
            nn.Conv2d(channels, 2 * channels, 4, stride=2, padding=1),
            nn.ReLU(),  # (N, 2ch, 7, 7)
        )
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * channels * (h // 4) * (w // 4) + label_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, out_dim),
        )

    def forward(self, x):
        if self.split_sizes[1]:
            x, y = x.split(self.split_sizes, dim=-1)  # (N, D), (N, label_dim)
            h = self.fc[0](self.conv(x.reshape(-1, *self.image_shape)))  # (N, 2ch·H/4·W/4)
            return self.fc[1:](torch.cat([h, y], -1))  # (N, out_dim)
        x = x.reshape(-1, *self.image_shape)  # (N, C, H, W)
        return self.fc(self.conv(x))  # (N, out_dim)


class _ConvDecoderBody(nn.Module):
    """An MLP from z to ``2ch`` maps of ⌈H/4⌉ × ⌈W/4⌉, two stride-2 transposed convolutions to
    4⌈H/4⌉ × 4⌈W/4⌉, cropped to H × W (a no-op when 4 divides H and W)."""

    def __init__(
        self, image_shape: Sequence[int], z_dim: int, out_channels: int, channels: int = 32, hidden: int = 256
    ):
        super().__init__()
        c, h, w = image_shape
        self.hw = (-(-h // 4), -(-w // 4))  # ⌈H/4⌉, ⌈W/4⌉
        self.channels = channels
        self.out_shape = (out_channels, h, w)
        self.fc = nn.Sequential(
            nn.Linear(z_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2 * channels * self.hw[0] * self.hw[1]),
            nn.ReLU(),
        )
        self.deconv = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, stride=2, padding=1),
            nn.ReLU(),  # (·, ch, 14, 14)
            nn.ConvTranspose2d(channels, out_channels, 4, stride=2, padding=1),  # (·, C_out, 28, 28)
        )

    def forward(self, z):
        batch = z.shape[:-1]
        h = self.fc(z.reshape(-1, z.shape[-1]))  # (B, 2ch·7·7) with B = prod(batch)
        h = h.reshape(-1, 2 * self.channels, *self.hw)  # (B, 2ch, 7, 7)
        out = self.deconv(h)[..., : self.out_shape[1], : self.out_shape[2]]  # (B, C_out, H, W)
        return out.reshape(*batch, math.prod(self.out_shape))  # (..., C_out·H·W)


class _BroadcastDecoderBody(nn.Module):
    """Spatial broadcast decoder (Watters et al. 2019) with 1×1 convolutions: z is tiled over the
    H×W pixel grid beside two channels of pixel coordinates c = (i, j) in [-1, 1], and one MLP
    ``z_dim + 2 → channels → … → out_channels`` runs at every pixel. Its first layer is affine
    in (z, c), so it is computed as W_z z + (W_c c + b), broadcast over the grid, without
    building the tiled input. (The paper's 3×3 kernels let a pixel see its neighbours, at 9× the
    cost; the circles world does not need them.)"""

    def __init__(
        self,
        image_shape: Sequence[int],
        z_dim: int,
        out_channels: int,
        channels: int = 32,
        layers: int = 3,
        activation: str = "relu",
    ):
        super().__init__()
        c, h, w = image_shape
        self.out_shape = (out_channels, h, w)
        ii, jj = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        self.register_buffer(
            "coords", torch.stack([ii.flatten(), jj.flatten()], -1), persistent=False
        )  # (HW, 2)
        self.from_z = nn.Linear(z_dim, channels, bias=False)
        self.from_coords = nn.Linear(2, channels)
        self.per_pixel = mlp([channels] * layers + [out_channels], activation)  # on (..., HW, channels)
        self.act = (
            ACTIVATIONS[activation] or nn.ReLU
        )()  # (gated: the pixel MLP gates, its first layer uses ReLU)

    def forward(self, z):
        batch = z.shape[:-1]
        h = self.from_z(z)[..., None, :] + self.from_coords(self.coords)  # (..., HW, ch)
        out = self.per_pixel(self.act(h))  # (..., HW, C_out)
        out = out.transpose(-1, -2)  # (..., C_out, HW): channel-major, as a (C, H, W) image flattens
        return out.reshape(*batch, math.prod(self.out_shape))  # (..., C_out·H·W)


def check_conv_shape(image_shape: Sequence[int]) -> None:
    """The conv pair needs ``(C, H, W)`` images with H, W ≥ 4 (two stride-2 convolutions)."""
    if len(image_shape) != 3 or image_shape[1] < 4 or image_shape[2] < 4:
        raise UserError(  # a ValueError: bad input, reported on one line by the CLI
            f"--arch conv needs images of shape (C, H, W) with H and W at least 4 (e.g. 1x28x28), "
            f"but this dataset has shape {tuple(image_shape)}; use --arch mlp"
        )


def _out_channels(arch: str, image_shape: Sequence[int], out_dim: int) -> int:
    """Channels of an image-shaped decoder output holding ``out_dim`` values for ``(C, H, W)``
    images: C per likelihood parameter per pixel."""
    c, d = image_shape[0], math.prod(image_shape)
    if out_dim % d:
        raise ValueError(f"{arch} decoder cannot emit {out_dim} values for images of {d} pixels")
    return out_dim // d * c


def build_networks(
    arch: str,
    image_shape: Sequence[int],
    z_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    activation: str = "relu",
    extra: int = 0,
    label_dim: int = 0,
) -> tuple[Encoder, Decoder]:
    """Encoder and decoder for images of ``image_shape``; the decoder emits ``out_dim`` values
    per datapoint (the likelihood decides how many it needs, e.g. 2·D for a learned σ). The
    encoder emits ``extra`` outputs after (z_loc, z_logvar); with ``label_dim = C`` both networks
    take a one-hot label as ``C`` more inputs: the encoder ``cat(x, y) (N, D + C)``, the decoder
    ``cat(z, y) (..., z_dim + C)``."""
    d = math.prod(image_shape)
    enc_out, dec_in = 2 * z_dim + extra, z_dim + label_dim
    if arch == "mlp":
        hidden = list(hidden)
        enc = mlp([d + label_dim, *hidden, enc_out], activation)
        dec = mlp([dec_in, *reversed(hidden), out_dim], activation)
    elif arch == "conv":
        check_conv_shape(image_shape)
        enc = _ConvEncoderBody(image_shape, enc_out, label_dim)
        dec = _ConvDecoderBody(image_shape, dec_in, _out_channels(arch, image_shape, out_dim))
    elif arch == "broadcast":
        if len(image_shape) != 3:
            raise UserError(
                f"--arch broadcast needs images of shape (C, H, W), but this dataset has shape "
                f"{tuple(image_shape)}; use --arch mlp"
            )
        enc = mlp([d + label_dim, *hidden, enc_out], activation)
        dec = _BroadcastDecoderBody(
            image_shape, dec_in, _out_channels(arch, image_shape, out_dim), activation=activation
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return Encoder(enc, z_dim, extra), Decoder(dec)
