"""The direct calls of fusedgrad._C (csrc/python/direct_calls.cpp): they take plain
calls and must give exactly what torch.ops gives; everything else they decline
(return None), so tensor subclasses and TorchFunctionModes still see the call."""
import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import fusedgrad
from fusedgrad import _C

pytestmark = pytest.mark.usefixtures("single_thread")


def args(dtype=torch.float64, requires_grad=False):
    gen = torch.Generator().manual_seed(3)
    shapes = {"x": (6, 3), "w1": (5, 3), "b1": (5,), "w2": (2, 5), "b2": (2,), "target": (6, 2)}
    return {k: torch.randn(*s, generator=gen, dtype=dtype).requires_grad_(requires_grad and k not in ("x", "target"))
            for k, s in shapes.items()}


def ordered(a):
    return a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["target"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_numbers_as_torch_ops(dtype):
    a = args(dtype, requires_grad=True)
    fast = _C.mlp_loss(*ordered(a), "mean", "sigmoid")
    fast.backward()
    fast_grads = [a[k].grad.clone() for k in ("w1", "b1", "w2", "b2")]
    for k in ("w1", "b1", "w2", "b2"):
        a[k].grad = None
    slow = torch.ops.fusedgrad.mlp_loss.default(*ordered(a), "mean", "sigmoid")
    slow.backward()
    assert torch.equal(fast, slow)
    for got, k in zip(fast_grads, ("w1", "b1", "w2", "b2")):
        assert torch.equal(got, a[k].grad)
    pred = _C.mlp(*ordered(a)[:5], "sigmoid")
    assert torch.equal(pred, torch.ops.fusedgrad.mlp.default(*ordered(a)[:5], "sigmoid"))
    mask = [True, True, True, True, True, True]
    loss, grads = _C.mlp_loss_and_grads(*ordered(a), "sum", "identity", mask)
    ref = torch.ops.fusedgrad.mlp_loss_and_grads.default(*ordered(a), "sum", "identity", mask)
    assert torch.equal(loss, ref[0]) and all(torch.equal(g, r) for g, r in zip(grads, ref[1:]))


class Tagged(torch.Tensor):
    """A subclass with the default __torch_function__: it must stay a Tagged."""


@pytest.mark.parametrize("call", ["mlp_loss", "mlp"])
def test_subclass_is_declined_and_keeps_its_type(call):
    a = args()
    a["x"] = a["x"].as_subclass(Tagged)
    if call == "mlp_loss":
        assert _C.mlp_loss(*ordered(a), "mean", "sigmoid") is None
        out = fusedgrad.mlp_loss(*ordered(a))
    else:
        assert _C.mlp(*ordered(a)[:5], "sigmoid") is None
        out = fusedgrad.mlp(*ordered(a)[:5])
    assert type(out) is Tagged


def test_torch_function_mode_sees_the_call():
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    a = args()
    with Record():
        assert _C.mlp_loss(*ordered(a), "mean", "sigmoid") is None
        fusedgrad.mlp_loss(*ordered(a))
    assert any("mlp_loss" in name for name in seen), seen


def test_torch_dispatch_mode_sees_the_direct_call():
    """Dispatch modes act inside the dispatcher, which the direct path goes through."""
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    a = args()
    with Record():
        out = _C.mlp_loss(*ordered(a), "mean", "sigmoid")
    assert out is not None
    assert "fusedgrad.mlp_loss.default" in seen


@pytest.mark.parametrize("bad", [
    {"reduction": "none"}, {"reduction": 1}, {"activation": "softplus"}, {"x": [[1.0]]}, {"b1": 3.0},
])
def test_bad_arguments_are_declined_then_raised_by_the_python_path(bad):
    a = args()
    reduction = bad.pop("reduction", "mean")
    activation = bad.pop("activation", "sigmoid")
    a.update(bad)
    assert _C.mlp_loss(*ordered(a), reduction, activation) is None
    with pytest.raises((TypeError, ValueError), match="fusedgrad.mlp_loss: argument"):
        fusedgrad.mlp_loss(*ordered(a), reduction=reduction, activation=activation)


def test_shape_errors_come_from_the_validator_on_the_direct_path():
    a = args()
    a["w2"] = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="'w2'"):
        _C.mlp_loss(*ordered(a), "mean", "sigmoid")


def test_loss_backward_accumulates_like_backward():
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(3, 5, 2, dtype=torch.float64)
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    net.loss(x, y).backward()
    net.loss(x, y).backward()
    want = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    net.loss_backward(x, y)
    net.loss_backward(x, y)
    for p, w in zip(net.parameters(), want):
        torch.testing.assert_close(p.grad, w, rtol=1e-13, atol=0)
    net.linear1.bias.requires_grad_(False)
    net.zero_grad()
    net.loss_backward(x, y)
    assert net.linear1.bias.grad is None and net.linear1.weight.grad is not None


def test_loss_backward_refuses_a_parametrized_weight():
    net = fusedgrad.FusedMLP(3, 5, 2, dtype=torch.float64)

    class Doubled(nn.Module):
        def forward(self, w):
            return 2 * w

    torch.nn.utils.parametrize.register_parametrization(net.linear1, "weight", Doubled())
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="linear1.weight.*not a leaf"):
        net.loss_backward(x, y)
    # The autograd route handles it: the gradient reaches the original weight.
    net.loss(x, y).backward()
    assert net.linear1.parametrizations.weight.original.grad is not None
