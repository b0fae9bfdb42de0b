"""Each error names the function the user called and the argument that is actually wrong."""
import re

import pytest
import torch

import fusedgrad


def raises(exc, pattern):
    return pytest.raises(exc, match="^" + pattern)


def test_meta_x_with_cpu_weights_blames_mlp_loss_and_x():
    x = torch.randn(4, 3, device="meta")
    w1, w2 = torch.randn(5, 3, requires_grad=True), torch.randn(2, 5, requires_grad=True)
    with raises(ValueError, re.escape("fusedgrad.mlp_loss: argument 'x' is on device meta but the weights "
                                      "('w1', 'w2') are on device cpu")):
        fusedgrad.mlp_loss(x, w1, None, w2)
    with raises(ValueError, re.escape("fusedgrad.mlp: argument 'x' is on device meta")):
        fusedgrad.mlp(x, w1, None, w2)
    with raises(ValueError, re.escape("fusedgrad.mlp_loss_and_grads: argument 'x' is on device meta")):
        fusedgrad.mlp_loss_and_grads(x, w1, None, w2)


def test_one_odd_weight_is_still_the_one_named():
    x, w1 = torch.randn(4, 3), torch.randn(5, 3)
    with raises(ValueError, re.escape("fusedgrad.mlp_loss: argument 'w2' is on device meta but x is on device cpu")):
        fusedgrad.mlp_loss(x, w1, None, torch.randn(2, 5, device="meta"))
    with raises(TypeError, re.escape("fusedgrad.mlp_loss: argument 'b1' has dtype torch.float64 but x has dtype")):
        fusedgrad.mlp_loss(x, w1, torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("method", ["forward", "loss", "loss_backward"])
def test_fused_mlp_one_d_x_blames_x(method):
    net = fusedgrad.FusedMLP(1, 20, 1)
    x = torch.linspace(-1, 1, 100)  # forgot .unsqueeze(1)
    call = {"forward": lambda: net(x), "loss": lambda: net.loss(x, x), "loss_backward": lambda: net.loss_backward(x, x)}
    with raises(ValueError, re.escape(f"FusedMLP.{method}: argument 'x' has shape (100,), but this FusedMLP has "
                                      "in_features=1: x must have shape (*, 1)") + r".*x\.unsqueeze\(-1\)"):
        call[method]()


def test_fused_mlp_dtype_and_device_of_x():
    net = fusedgrad.FusedMLP(3, 4, 2)
    with raises(TypeError, re.escape("FusedMLP.loss: argument 'x' has dtype torch.float64 but the weights "
                                     "('linear1.weight', 'linear1.bias', 'linear2.weight', 'linear2.bias') have "
                                     "dtype torch.float32")):
        net.loss(torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64))
    with raises(ValueError, re.escape("FusedMLP.loss_backward: argument 'target' has shape (5,)")):
        net.loss_backward(torch.randn(5, 3), torch.randn(5))
    with raises(ValueError, re.escape("FusedMLP.forward: argument 'x' is on device meta")):
        net(torch.randn(5, 3, device="meta"))
