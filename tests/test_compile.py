"""torch.compile(fullgraph=True) over the fused ops.

Each case compiles one function with the default backend (inductor), runs it
on two batch sizes (the second one recompiles with a dynamic batch dimension),
and checks that
  * Dynamo captured one graph with no break (fullgraph=True raises otherwise)
    and that graph calls the registered fusedgrad op, so the fused kernel runs
    (not a decomposition into aten ops);
  * the loss and every gradient equal those of the same call in eager mode.

Compiling is slow here (~20 s cold for the first case, a few seconds for each
next one), so CI runs one small shape per case; the larger shapes are marked
slow (deselected in CI with -m "not slow").
"""
import pytest
import torch
import torch.nn.functional as F

import fusedgrad

BACKEND = "inductor"
DTYPE = torch.float64
# Both results come from the same fused kernels; the compiled graph only adds
# the surrounding aten ops (l1_loss, the multiplication by the incoming
# gradient), so float64 agreement is to rounding of a few operations.
RTOL, ATOL = 1e-12, 1e-14

# (D, H, O) and the two batch sizes each case runs.
CI_SHAPE = ((3, 5, 2), (8, 13))
SLOW_SHAPES = [((1, 20, 1), (100, 60)), ((32, 64, 8), (256, 100))]


class RecordingBackend:
    """Compiles with BACKEND and keeps the FX graphs Dynamo handed over."""

    def __init__(self):
        self.graphs = []
        self._inner = torch._dynamo.lookup_backend(BACKEND)

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self._inner(gm, example_inputs)

    def fused_ops_called(self):
        return {
            str(node.target)
            for gm in self.graphs
            for node in gm.graph.nodes
            if node.op == "call_function" and str(node.target).startswith("fusedgrad.")
        }


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_data(n, d, o, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=DTYPE)
    t = torch.randn(n, o, generator=gen, dtype=DTYPE)
    return x, t


def make_net(d, h, o):
    torch.manual_seed(0)
    return fusedgrad.FusedMLP(d, h, o, dtype=DTYPE)


def loss_and_grads(fn, leaves, *args):
    for p in leaves:
        p.grad = None
    loss = fn(*args)
    loss.backward()
    grads = [p.grad.clone() for p in leaves]
    for p in leaves:
        p.grad = None
    return loss.detach(), grads


def check_against_eager(fn, params, make_args, batches, expected_op):
    """Compiled vs eager on each batch size: loss and the gradients of params and of every
    argument that requires grad."""
    backend = RecordingBackend()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    for i, n in enumerate(batches):
        args = make_args(n, seed=i)
        leaves = list(params) + [a for a in args if a.requires_grad]
        loss_c, grads_c = loss_and_grads(compiled, leaves, *args)
        loss_e, grads_e = loss_and_grads(fn, leaves, *args)
        torch.testing.assert_close(loss_c, loss_e, rtol=RTOL, atol=ATOL)
        for gc, ge in zip(grads_c, grads_e):
            # atol must be negligible against every gradient, or the comparison means little.
            assert ge.abs().max() > 1e6 * ATOL, "gradient too small for the comparison to mean anything"
            torch.testing.assert_close(gc, ge, rtol=RTOL, atol=ATOL)
    # Dynamo compiled one graph per distinct compile (the second batch size may add
    # one, with a dynamic batch dimension), with no break, calling the fused op.
    assert 1 <= len(backend.graphs) <= len(batches)
    assert expected_op in backend.fused_ops_called()


def _functional_leaves(d, h, o):
    net = make_net(d, h, o)
    l1, l2 = net.linear1, net.linear2
    return [l1.weight, l1.bias, l2.weight, l2.bias]


def run_mlp_loss(shape, batches):
    (d, h, o) = shape
    w1, b1, w2, b2 = leaves = _functional_leaves(d, h, o)

    def fn(x, t):
        return fusedgrad.mlp_loss(x, w1, b1, w2, b2, t, reduction="mean")

    def make_args(n, seed):
        x, t = make_data(n, d, o, seed)
        return x.requires_grad_(), t.requires_grad_()

    # x and the target require grad too: their gradients go through the graph as well.
    check_against_eager(fn, leaves, make_args, batches, "fusedgrad.mlp_loss.default")


def run_mlp_l1(shape, batches):
    (d, h, o) = shape
    w1, b1, w2, b2 = leaves = _functional_leaves(d, h, o)

    def fn(x, t):
        return F.l1_loss(fusedgrad.mlp(x, w1, b1, w2, b2), t)

    check_against_eager(fn, leaves, lambda n, seed: make_data(n, d, o, seed), batches, "fusedgrad.mlp.default")


def run_module_forward(shape, batches):
    (d, h, o) = shape
    net = make_net(d, h, o)

    def fn(x, t):
        return F.l1_loss(net(x), t)

    check_against_eager(
        fn, list(net.parameters()), lambda n, seed: make_data(n, d, o, seed), batches, "fusedgrad.mlp.default")


def run_module_loss(shape, batches):
    (d, h, o) = shape
    net = make_net(d, h, o)
    check_against_eager(
        net.loss, list(net.parameters()), lambda n, seed: make_data(n, d, o, seed), batches,
        "fusedgrad.mlp_loss.default")


def run_mlp_loss_gelu(shape, batches):
    """An activation that saves its input h (the fake kernels give the activations output its shape)."""
    (d, h, o) = shape
    w1, b1, w2, b2 = leaves = _functional_leaves(d, h, o)

    def fn(x, t):
        return F.l1_loss(fusedgrad.mlp(x, w1, b1, w2, b2, activation="gelu"), t) + fusedgrad.mlp_loss(
            x, w1, b1, w2, b2, t, activation="tanh")

    check_against_eager(fn, leaves, lambda n, seed: make_data(n, d, o, seed), batches, "fusedgrad.mlp.default")


CASES = {
    "mlp_loss": run_mlp_loss,
    "mlp(gelu)+mlp_loss(tanh)": run_mlp_loss_gelu,
    "mlp+l1_loss": run_mlp_l1,
    "FusedMLP.forward+l1_loss": run_module_forward,
    "FusedMLP.loss": run_module_loss,
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_small(case):
    CASES[case](*CI_SHAPE)


@pytest.mark.slow
@pytest.mark.parametrize("shape", SLOW_SHAPES, ids=lambda s: "x".join(map(str, s[0])))
@pytest.mark.parametrize("case", list(CASES))
def test_compile_larger(case, shape):
    CASES[case](*shape)
