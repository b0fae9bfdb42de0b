"""What the autograd route costs: the same fused kernel behind
(a) the C++ torch::autograd::Function on the op's Autograd key (what fusedgrad ships),
(b) a Python torch.autograd.Function around the same op (the route it replaced),
(c) no autograd at all (the floor: one op call).
10×4→4→4 and 100×1→20→1, float32, one forward + backward each."""
import pytest
import torch

import fusedgrad

_op = torch.ops.fusedgrad.mlp_loss_and_grads.default


class PythonRoute(torch.autograd.Function):
    """The alternative: the same one-pass kernel, autograd node in Python."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, target):
        mask = list(ctx.needs_input_grad)
        loss, *grads = _op(x, w1, b1, w2, b2, target, "mean", "sigmoid", mask)
        ctx.save_for_backward(*[g if m else None for g, m in zip(grads, mask)])
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        return tuple(None if g is None else g * grad_loss for g in ctx.saved_tensors)


SHAPES = [(10, 4, 4, 4), (100, 1, 20, 1)]


def _problem(N, D, H, O):
    torch.manual_seed(0)
    x, t = torch.randn(N, D), torch.randn(N, O)
    params = [torch.randn(H, D, requires_grad=True), torch.randn(H, requires_grad=True),
              torch.randn(O, H, requires_grad=True), torch.randn(O, requires_grad=True)]
    return x, t, params


def _zero(params):
    for p in params:
        p.grad = None


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("route", ["cpp_autograd_function", "python_autograd_function", "no_autograd"])
def test_autograd_route(benchmark, shape, route):
    torch.set_num_threads(1)
    x, t, params = _problem(*shape)
    # Same numbers on every route before timing.
    _zero(params)
    fusedgrad.mlp_loss(x, *params, t).backward()
    expected = [p.grad.clone() for p in params]
    _zero(params)
    PythonRoute.apply(x, *params, t).backward()
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)

    def cpp():
        _zero(params)
        fusedgrad.mlp_loss(x, *params, t).backward()

    def python():
        _zero(params)
        PythonRoute.apply(x, *params, t).backward()

    def none():
        _op(x, *params, t, "mean", "sigmoid", [False, True, True, True, True, False])

    benchmark.group = f"autograd route {shape}"
    benchmark({"cpp_autograd_function": cpp, "python_autograd_function": python, "no_autograd": none}[route])
