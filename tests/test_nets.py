"""Network building blocks against their formulas."""

import pytest
import torch

from ppl_vae.programs.nets import GatedLinear, mlp


def test_gated_linear_is_h_times_sigmoid_gate(device):
    layer = GatedLinear(5, 3).to(device).double()
    x = torch.randn(4, 5, dtype=torch.float64, device=device)
    w, b = layer.linear.weight, layer.linear.bias  # (6, 5), (6,)
    h = x @ w[:3].T + b[:3]
    gate = x @ w[3:].T + b[3:]
    torch.testing.assert_close(layer(x), h * torch.sigmoid(gate), rtol=1e-12, atol=1e-12)


def test_gated_mlp_gates_every_hidden_layer_and_ends_linear():
    net = mlp([784, 300, 300, 80], "gated")
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["GatedLinear", "GatedLinear", "Linear"]
    assert net[0].linear.out_features == 600 and net[2].in_features == 300 and net[2].out_features == 80


@pytest.mark.parametrize("shape", [(1, 28, 20), (3, 12, 12), (3, 9, 7), (1, 4, 5)])
@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized-logistic"])
def test_conv_networks_take_any_image_size_and_channels(shape, likelihood):
    """Non-square (Frey Faces' 28×20), colour, and sizes not divisible by 4: the decoder draws
    4⌈H/4⌉ × 4⌈W/4⌉ and is cropped to H × W; every output pixel depends on z."""
    import math

    from ppl_vae.programs.model import VAE

    vae = VAE(shape, z_dim=3, hidden=[16], arch="conv", likelihood=likelihood)
    d = math.prod(shape)
    x = torch.rand(5, d)
    z_loc, z_logvar = vae.encoder(x)
    assert z_loc.shape == z_logvar.shape == (5, 3)
    z = torch.randn(2, 5, 3, requires_grad=True)  # (K, N, z_dim)
    out = vae.decoder(z)
    assert out.shape == (2, 5, vae.likelihood.params_per_pixel * d)
    assert vae.likelihood.dist(out).log_prob(x).shape == (2, 5)
    out.sum().backward()
    assert z.grad.abs().sum() > 0


def test_conv_refuses_images_smaller_than_4():
    from ppl_vae.core.errors import UserError
    from ppl_vae.programs.model import VAE

    with pytest.raises(UserError, match=r"H and W at least 4 .* \(1, 3, 8\); use --arch mlp"):
        VAE((1, 3, 8), arch="conv")
