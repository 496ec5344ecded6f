"""Network building blocks against their formulas."""

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
