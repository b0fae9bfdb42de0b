"""The ops' fake kernels refuse what their CPU kernels refuse, with the same error.

torch.compile, torch.export and meta tensors run an op's fake kernel instead of its CPU kernel. Each
fake kernel runs the C++ argument rules of its op (csrc/ops/deep_checks.h for the any-depth ops,
csrc/ops/op_kernels.h for the one-hidden-layer ones), so a malformed call fails
at trace time with the message the kernel gives, instead of tracing shapes for a call that would fail
(or, worse, be compiled). Every case here is checked three ways: the CPU kernel, the same call on meta
tensors, and under FakeTensorMode (what torch.compile runs).
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode  # what torch.compile traces with

import fusedgrad  # noqa: F401  (registers torch.ops.fusedgrad)

ops = torch.ops.fusedgrad


def net(widths=(2, 5, 4, 1), dtype=torch.float64, bias=True, K=0):
    lead = (K,) if K else ()
    ws = [torch.randn(*lead, b, a, dtype=dtype) for a, b in zip(widths, widths[1:])]
    bs = [torch.randn(*lead, b, dtype=dtype) if bias else None for b in widths[1:]]
    return ws, bs


def x_of(n=6, d=2, dtype=torch.float64, lead=()):
    return torch.randn(*lead, n, d, dtype=dtype)


W, B = net()
WK, BK = net(K=3)
X = x_of()
G1 = torch.randn(6, 1, dtype=torch.float64)
P = torch.randn(6, 1, 2, dtype=torch.float64)

X1, W1, B1, W2, B2 = x_of(d=3), torch.randn(4, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64), \
    torch.randn(2, 4, dtype=torch.float64), torch.randn(2, dtype=torch.float64)
T1 = torch.randn(6, 2, dtype=torch.float64)
S1 = torch.randn(6, 4, dtype=torch.float64)

# K = 3 stacked one-hidden-layer models (the ensemble ops)
EW1, EB1, EW2, EB2 = torch.randn(3, 4, 2, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64), \
    torch.randn(3, 1, 4, dtype=torch.float64), torch.randn(3, 1, dtype=torch.float64)
EG = torch.randn(3, 6, 1, dtype=torch.float64)
EA = torch.randn(3, 6, 4, dtype=torch.float64)

# (name, op, args): each call is refused by the CPU kernel.
BAD = [
    ("K: w2 models", ops.ensemble_mlp, (X, EW1, EB1, EW2[:2], EB2, "tanh")),
    ("K: x models", ops.ensemble_mlp, (x_of(lead=(2,)), EW1, EB1, EW2, EB2, "tanh")),
    ("K: b1 shape", ops.ensemble_mlp, (X, EW1, torch.randn(3, 5, dtype=torch.float64), EW2, EB2, "tanh")),
    ("K: target", ops.ensemble_mlp_loss, (X, EW1, EB1, EW2, EB2, torch.randn(6, 2, dtype=torch.float64),
                                          "mean", "tanh")),
    ("K: reduction", ops.ensemble_mlp_loss_and_grads, (X, EW1, EB1, EW2, EB2, G1, "max", "tanh", [True] * 6)),
    ("K: grad_out", ops.ensemble_mlp_backward, (EG[:, :5], X, EW1, EB1, EW2, EB2, EA, "tanh", [True] * 5)),
    ("K: activations", ops.ensemble_mlp_backward, (EG, X, EW1, EB1, EW2, EB2, EA[..., :3], "tanh", [True] * 5)),
    ("1: w1 width", ops.mlp, (X1, W1[:, :2], B1, W2, B2, "sigmoid")),
    ("1: w2 width", ops.mlp, (X1, W1, B1, W2[:, :3], B2, "sigmoid")),
    ("1: b1 broadcast", ops.mlp, (X1, W1, torch.randn(3, dtype=torch.float64), W2, B2, "sigmoid")),
    ("1: b2 without w2", ops.mlp, (X1, W1, B1, None, B2, "sigmoid")),
    ("1: x integer", ops.mlp, (X1.long(), W1.long(), None, W2.long(), None, "sigmoid")),
    ("1: w1 dtype", ops.mlp_forward, (X1, W1.float(), B1, W2, B2, "tanh")),
    ("1: x 0-dim", ops.mlp, (torch.tensor(1.0, dtype=torch.float64), W1, B1, W2, B2, "tanh")),
    ("1: activation", ops.mlp, (X1, W1, B1, W2, B2, "softplus")),
    ("1: target shape", ops.mlp_loss, (X1, W1, B1, W2, B2, torch.randn(5, 2, dtype=torch.float64), "mean", "tanh")),
    ("1: reduction", ops.mlp_loss_and_grads,
     (X1, W1, B1, W2, B2, T1, "none", "tanh", [True, True, True, True, True, True])),
    ("1: grad_out shape", ops.mlp_backward,
     (torch.randn(6, 3, dtype=torch.float64), X1, W1, B1, W2, B2, S1, "tanh", [True] * 5)),
    ("1: activations size", ops.mlp_backward,
     (T1, X1, W1, B1, W2, B2, torch.randn(6, 3, dtype=torch.float64), "tanh", [True] * 5)),
    ("1: grad_out dtype", ops.mlp_backward, (T1.float(), X1, W1, B1, W2, B2, S1, "tanh", [True] * 5)),
    ("x width", ops.deep_mlp, (x_of(d=3), W, B, "tanh")),
    ("chain", ops.deep_mlp, (X, [W[0], torch.randn(4, 6, dtype=torch.float64), W[2]], B, "tanh")),
    ("activation", ops.deep_mlp, (X, W, B, "tanhh")),
    ("weight dtype", ops.deep_mlp, (X, [W[0].float(), *W[1:]], B, "tanh")),
    ("x dtype", ops.deep_mlp, (X.float(), W, B, "tanh")),
    ("integer", ops.deep_mlp, (X.long(), [w.long() for w in W], [None] * 3, "tanh")),
    ("bias shape", ops.deep_mlp, (X, W, [torch.randn(4, dtype=torch.float64), *B[1:]], "tanh")),
    ("bias count", ops.deep_mlp, (X, W, B[:2], "tanh")),
    ("no layers", ops.deep_mlp, (X, [], [], "tanh")),
    ("weight rank", ops.deep_mlp, (X, [W[0][0], *W[1:]], B, "tanh")),
    ("K models", ops.deep_mlp, (x_of(lead=(2,)), WK, BK, "tanh")),
    ("loss target", ops.deep_mlp_loss_and_grads,
     (X, W, B, torch.randn(5, 1, dtype=torch.float64), "mean", "tanh", [False, True, False])),
    ("loss reduction", ops.deep_mlp_loss_and_grads, (X, W, B, G1, "avg", "tanh", [False, True, False])),
    ("backward grad_out", ops.deep_mlp_backward, (torch.randn(6, 2, dtype=torch.float64), X, W, B, "tanh",
                                                  [True, True])),
    ("order", ops.deep_mlp_derivatives, (X, W, B, "tanh", 3)),
    ("derivatives x", ops.deep_mlp_derivatives, (x_of(d=1), W, B, "tanh", 1)),
    ("grad_du shape", ops.deep_mlp_derivatives_backward,
     (G1, torch.randn(6, 1, 3, dtype=torch.float64), None, X, W, B, "tanh", 1, [True, True])),
    ("grad_d2u dtype", ops.deep_mlp_derivatives_backward,
     (G1, P, P.float(), X, W, B, "tanh", 2, [True, True])),
    ("backward order", ops.deep_mlp_derivatives_backward, (G1, P, None, X, W, B, "tanh", 0, [True, True])),
]


def _map(fn, args):
    return tuple([fn(a) for a in x] if isinstance(x, list) else fn(x) for x in args)


def _meta(t):
    return t.to("meta") if isinstance(t, torch.Tensor) else t


def _error(op, args):
    with pytest.raises((ValueError, TypeError, RuntimeError)) as info:
        op(*args)
    return info.type, str(info.value).splitlines()[0]


@pytest.mark.parametrize("name, op, args", BAD, ids=[b[0] for b in BAD])
def test_fake_and_meta_refuse_what_the_kernel_refuses(name, op, args):
    kind, message = _error(op, args)
    assert message.startswith("fusedgrad"), message
    assert _error(op, _map(_meta, args)) == (kind, message)
    with FakeTensorMode() as mode:
        fake = _map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
        fake_kind, fake_message = _error(op, fake)
    assert fake_kind is kind and message in fake_message


GOOD = [
    (ops.ensemble_mlp, (X, EW1, EB1, EW2, EB2, "tanh")),
    (ops.ensemble_mlp_forward, (x_of(lead=(3,)), EW1, EB1, None, None, "relu")),
    (ops.ensemble_mlp_loss_and_grads, (x_of(lead=(1,)), EW1, EB1, EW2, EB2, G1, "mean", "tanh", [True] * 6)),
    (ops.ensemble_mlp_loss_forward, (X, EW1, EB1, EW2, EB2, EG, "sum", "sigmoid", [True] * 6)),
    (ops.ensemble_mlp_backward, (EG, X, EW1, EB1, EW2, EB2, EA, "tanh", [True] * 5)),
    (ops.mlp, (X1, W1, B1, W2, B2, "sigmoid")),
    (ops.mlp, (x_of(d=3, lead=(2,)), W1, None, None, None, "relu")),
    (ops.mlp_forward, (X1, W1, B1, W2, B2, "tanh")),
    (ops.mlp_loss, (X1, W1, B1, W2, torch.randn(1, 2, dtype=torch.float64), T1, "sum", "tanh")),
    (ops.mlp_loss_and_grads, (X1, W1, B1, W2, B2, T1, "mean", "gelu", [True] * 6)),
    (ops.mlp_backward, (T1, X1, W1, B1, W2, B2, S1, "sigmoid", [True] * 5)),
    (ops.deep_mlp, (X, W, B, "tanh")),
    (ops.deep_mlp, (x_of(lead=(3,)), WK, BK, "relu")),
    (ops.deep_mlp_loss_and_grads, (X, W, B, G1, "sum", "tanh", [True, True, True])),
    (ops.deep_mlp_backward, (G1, X, W, [None] * 3, "sigmoid", [True, True])),
    (ops.deep_mlp_derivatives, (X, W, B, "tanh", 2)),
    (ops.deep_mlp_derivatives_backward, (G1, P, P, X, W, B, "tanh", 2, [True, True])),
    (ops.deep_mlp_derivatives_backward, (None, P, None, X, W, B, "gelu", 1, [False, True])),
]


def _shapes(out):
    if isinstance(out, (list, tuple)):
        return [_shapes(o) for o in out]
    return tuple(out.shape)


@pytest.mark.parametrize("op, args", GOOD)
def test_meta_and_fake_give_the_kernels_shapes(op, args):
    expected = _shapes(op(*args))
    assert _shapes(op(*_map(_meta, args))) == expected
    with FakeTensorMode() as mode:
        fake = _map(lambda t: mode.from_tensor(t) if isinstance(t, torch.Tensor) else t, args)
        assert _shapes(op(*fake)) == expected


def test_dynamic_rows_still_trace_and_still_refuse():
    """Under torch.compile(dynamic=True) the rows are symbolic: the checks run at the traced sizes,
    the graph stays dynamic (four row counts do not make four compiles: torch compiles a static graph
    first, then a dynamic one), and a wrong width still fails at trace time."""
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    f = torch.compile(lambda x, ws, bs: ops.deep_mlp(x, ws, bs, "tanh"), backend=counter, dynamic=True,
                      fullgraph=True)
    for n in (5, 9, 13, 17):
        x = x_of(n=n)
        torch.testing.assert_close(f(x, W, B), ops.deep_mlp(x, W, B, "tanh"))
    assert counter.frame_count <= 2
    with pytest.raises(Exception, match=r"argument 'x' must have shape \(\*, in_features\)"):
        f(x_of(n=7, d=3), W, B)
