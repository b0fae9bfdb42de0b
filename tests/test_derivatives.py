"""Input derivatives (u, ∂u/∂x, ∂²u/∂x²) from the engine's jet pass: the values and the parameter /
input gradients of any loss built from them, against native autograd (``autograd.grad`` with
``create_graph=True``) in float64, over depths, widths, activations, biases, D, O and the order
(hypothesis); double backward, gradgradcheck, torch.func, opcheck, torch.compile, ensembles,
thread independence and the errors."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import deep_net as make_net
from reference import ref_deep_mlp as reference_prediction
from reference import rel_err

import fusedgrad
from fusedgrad import deep

ACTS = list(fusedgrad.ACTIVATIONS)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-10


def reference_derivatives(x, weights, biases, act, order):
    """(u, du, d2u) by native autograd: one autograd.grad(create_graph=True) per output and input."""
    u = reference_prediction(x, weights, biases, act)
    O, D = u.shape[-1], x.shape[-1]
    du, d2u = [], []
    for o in range(O):
        g, = torch.autograd.grad(u[..., o].sum(), x, create_graph=True, materialize_grads=True)
        du.append(g)
        if order == 2:
            cols = [torch.autograd.grad(g[..., d].sum(), x, create_graph=True, materialize_grads=True)[0][..., d]
                    for d in range(D)]
            d2u.append(torch.stack(cols, -1))
    out = (u, torch.stack(du, -2))
    return out + (torch.stack(d2u, -2),) if order == 2 else out


widths_st = st.lists(st.one_of(st.integers(1, 24), st.sampled_from([33, 64])), min_size=1, max_size=5)


@SETTINGS
@given(d=st.integers(1, 4), hidden=widths_st, o=st.integers(1, 3), n=st.integers(1, 300), bias=st.booleans(),
       act=st.sampled_from(ACTS), order=st.sampled_from([1, 2]), seed=st.integers(0, 2**31))
def test_values_and_gradients_match_autograd(d, hidden, o, n, bias, act, order, seed):
    gen = torch.Generator().manual_seed(seed)
    widths = [d, *hidden, o]
    weights, biases = make_net(widths, bias, gen)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen, requires_grad=True)
    got = deep.derivatives(x, weights, biases, activation=act, order=order)
    expected = reference_derivatives(x, weights, biases, act, order)
    assert len(got) == order + 1
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= TOL
    # The gradient of a loss of every output (random cotangents) with respect to x and every parameter.
    cot = [torch.randn(e.shape, dtype=torch.float64, generator=gen) for e in expected]
    inputs = [x, *weights, *[b for b in biases if b is not None]]
    mine = torch.autograd.grad(sum((g * c).sum() for g, c in zip(got, cot)), inputs)
    theirs = torch.autograd.grad(sum((e * c).sum() for e, c in zip(expected, cot)), inputs,
                                 materialize_grads=True)
    for m, t in zip(mine, theirs):
        assert m.shape == t.shape
        assert rel_err(m, t) <= TOL


@SETTINGS
@given(d=st.integers(1, 4), hidden=widths_st, n=st.integers(1, 120), bias=st.booleans(), act=st.sampled_from(ACTS),
       use_du=st.lists(st.booleans(), min_size=4, max_size=4), use_d2u=st.lists(st.booleans(), min_size=4, max_size=4),
       use_u=st.booleans(), seed=st.integers(0, 2**31))
def test_a_loss_of_some_parts_matches_autograd(d, hidden, n, bias, act, use_du, use_d2u, use_u, seed):
    """A loss that reads only some columns of du and d2u (a PDE residual reads u_xx, not u_tt): the
    backward drops the parts whose incoming gradient is zero everywhere; the gradients stay autograd's."""
    use_du, use_d2u = use_du[:d], use_d2u[:d]
    if not (use_u or any(use_du) or any(use_d2u)):
        use_u = True
    gen = torch.Generator().manual_seed(seed)
    weights, biases = make_net([d, *hidden, 2], bias, gen)
    x = torch.randn(n, d, dtype=torch.float64, generator=gen, requires_grad=True)
    cot = [torch.randn(n, 2, *shape, dtype=torch.float64, generator=gen) for shape in ((), (d,), (d,))]

    def loss(u, du, d2u):
        total = (u * cot[0]).sum() if use_u else 0.0
        for k in range(d):
            if use_du[k]:
                total = total + (du[..., k] * cot[1][..., k]).pow(2).sum()
            if use_d2u[k]:
                total = total + (d2u[..., k] * cot[2][..., k]).sum()
        return total

    inputs = [x, *weights, *[b for b in biases if b is not None]]
    mine = torch.autograd.grad(loss(*deep.derivatives(x, weights, biases, activation=act, order=2)), inputs)
    theirs = torch.autograd.grad(loss(*reference_derivatives(x, weights, biases, act, 2)), inputs,
                                 materialize_grads=True)
    for m, t in zip(mine, theirs):
        assert rel_err(m, t) <= TOL


def test_the_autograd_nodes_are_cpp_outside_transforms():
    """Outside torch.func and torch.compile the prediction and the derivatives get C++ autograd nodes
    (csrc/python/deep_autograd.cpp); double backward through them goes to fusedgrad.deep's torch-op route."""
    gen = torch.Generator().manual_seed(5)
    weights, biases = make_net([2, 6, 5, 1], True, gen)
    x = torch.randn(7, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    assert "DeepMlpFunction" in deep.mlp(x, weights, biases, activation="tanh").grad_fn.name()
    assert "DeepDerivativesFunction" in deep.derivatives(x, weights, biases, activation="tanh")[0].grad_fn.name()
    u, du, d2u = deep.derivatives(x, weights, biases, activation="tanh", order=2)
    g, = torch.autograd.grad(d2u.sum(), x, create_graph=True)
    assert g.grad_fn is not None  # differentiable: the torch-op route of the double backward ran
    ur, dur, d2ur = reference_derivatives(x, weights, biases, "tanh", 2)
    gr, = torch.autograd.grad(d2ur.sum(), x, create_graph=True)
    assert rel_err(g, gr) <= TOL
    mine = torch.autograd.grad(g.pow(2).sum(), weights)
    for m, t in zip(mine, torch.autograd.grad(gr.pow(2).sum(), weights)):
        assert rel_err(m, t) <= TOL


@pytest.mark.parametrize("act", ACTS)
def test_a_burgers_residual_loss_matches_autograd(act):
    """The PINN use: a loss of u, u_x, u_t, u_xx; only some outputs used (the others' gradients are None)."""
    gen = torch.Generator().manual_seed(3)
    weights, biases = make_net([2, 20, 20, 20, 1], True, gen)
    x = torch.rand(257, 2, dtype=torch.float64, generator=gen)
    nu = 0.01 / math.pi

    def residual(u, du, d2u):
        return (du[:, 0, 1] + u[:, 0] * du[:, 0, 0] - nu * d2u[:, 0, 0]).pow(2).mean()

    params = [*weights, *biases]
    loss = residual(*deep.derivatives(x, weights, biases, activation=act, order=2))
    xr = x.clone().requires_grad_()
    expected = residual(*reference_derivatives(xr, weights, biases, act, 2))
    assert abs(loss.item() - expected.item()) <= TOL * max(1.0, abs(expected.item()))
    for g, e in zip(torch.autograd.grad(loss, params), torch.autograd.grad(expected, params)):
        assert rel_err(g, e) <= TOL
    # Only du used: u's and d2u's gradients never reach the kernel.
    loss1 = deep.derivatives(x, weights, biases, activation=act, order=2)[1].sum()
    expected1 = reference_derivatives(xr, weights, biases, act, 1)[1].sum()
    for g, e in zip(torch.autograd.grad(loss1, params),
                    torch.autograd.grad(expected1, params, materialize_grads=True)):
        assert rel_err(g, e) <= TOL


@pytest.mark.parametrize("hidden_layers", [1, 3])
@pytest.mark.parametrize("order", [1, 2])
def test_module_method_any_leading_shape(hidden_layers, order):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(3, 7, 2, hidden_layers=hidden_layers, activation="tanh").double()
    seq = net.to_module(copy=True)
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    got = net.derivatives(x, order=order)
    expected = reference_derivatives(x, [m.weight for m in seq[0::2]], [m.bias for m in seq[0::2]], "tanh", order)
    assert got[0].shape == (4, 5, 2) and got[1].shape == (4, 5, 2, 3)
    for g, e in zip(got, expected):
        assert rel_err(g, e) <= TOL
    got_u = net(x)
    assert torch.equal(got_u, got[0]) or rel_err(got_u, got[0]) <= 1e-14


@pytest.mark.parametrize("per_model_x", [False, True])
def test_ensemble_equals_each_model(per_model_x):
    torch.manual_seed(1)
    ens = fusedgrad.FusedMLPEnsemble(4, 2, [9, 6], 2, activation="silu").double()
    x = torch.randn(4, 11, 2, dtype=torch.float64) if per_model_x else torch.randn(11, 2, dtype=torch.float64)
    x.requires_grad_()
    u, du, d2u = ens.derivatives(x, order=2)
    assert u.shape == (4, 11, 2) and du.shape == (4, 11, 2, 2) and d2u.shape == (4, 11, 2, 2)
    cot = [torch.randn_like(t) for t in (u, du, d2u)]
    loss = sum((t * c).sum() for t, c in zip((u, du, d2u), cot))
    names = [n for n, _ in ens.named_parameters()]
    grads = torch.autograd.grad(loss, [x, *[p for _, p in ens.named_parameters()]])
    expected_x = torch.zeros_like(x)
    for k in range(4):
        net = ens.module(k)
        xk = (x[k] if per_model_x else x).detach().clone().requires_grad_()
        outs = net.derivatives(xk, order=2)
        for t, e in zip((u, du, d2u), outs):
            assert rel_err(t[k], e) <= TOL
        lk = sum((e * c[k]).sum() for e, c in zip(outs, cot))
        module_params = dict(net.named_parameters())
        gk = torch.autograd.grad(lk, [xk, *[module_params[_module_name(n)] for n in names]])
        for name, g, p in zip(names, grads[1:], gk[1:]):
            assert rel_err(g[k], p) <= TOL, name
        if per_model_x:
            expected_x[k] = gk[0]
        else:
            expected_x += gk[0]
    assert rel_err(grads[0], expected_x) <= TOL


def _module_name(ensemble_name):
    """weight2 → linear2.weight: the ensemble's parameter names as the models' state_dict keys."""
    kind, layer = ensemble_name.rstrip("0123456789"), ensemble_name.lstrip("weightbias")
    return f"linear{layer}.{kind}"


def test_double_backward_and_gradgradcheck():
    gen = torch.Generator().manual_seed(5)
    weights, biases = make_net([2, 5, 4, 1], True, gen)
    x = torch.randn(6, 2, dtype=torch.float64, generator=gen, requires_grad=True)

    def f(x, *params):
        return deep.derivatives(x, list(params[:3]), list(params[3:]), activation="tanh", order=2)

    assert torch.autograd.gradcheck(f, (x, *weights, *biases))
    assert torch.autograd.gradgradcheck(f, (x, *weights, *biases))


def test_create_graph_through_the_derivatives_matches_autograd():
    """A gradient-penalty-style use: the parameter gradient of the loss, then a gradient of that."""
    gen = torch.Generator().manual_seed(6)
    weights, biases = make_net([2, 8, 8, 1], True, gen)
    x = torch.randn(20, 2, dtype=torch.float64, generator=gen, requires_grad=True)

    def penalty(outs):
        g = torch.autograd.grad((outs[1] ** 2).sum() + outs[2].sum(), weights, create_graph=True)
        return sum((t ** 2).sum() for t in g)

    # (The output bias reaches neither du nor d2u: its gradient is zero on both sides.)
    mine = torch.autograd.grad(penalty(deep.derivatives(x, weights, biases, activation="sigmoid", order=2)), biases,
                               materialize_grads=True)
    theirs = torch.autograd.grad(penalty(reference_derivatives(x, weights, biases, "sigmoid", 2)), biases,
                                 materialize_grads=True)
    for m, t in zip(mine, theirs):
        assert rel_err(m, t) <= TOL


class DerivativesModule(torch.nn.Module):
    """net.derivatives as a module's forward, for torch.func.functional_call."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net.derivatives(x, order=2)


@pytest.mark.parametrize("transform", ["grad", "vjp"])
def test_torch_func_over_a_pinn_loss(transform):
    """Under torch.func the call runs in plain torch ops (the same propagation), transformable."""
    torch.manual_seed(7)
    net = fusedgrad.FusedMLP(2, 6, 1, hidden_layers=2, activation="tanh").double()
    seq = net.to_module(copy=True)
    wrapper = DerivativesModule(net)
    x = torch.rand(30, 2, dtype=torch.float64)

    def loss_of(params):
        u, du, d2u = torch.func.functional_call(wrapper, params, (x,))
        return (du[:, 0, 1] + u[:, 0] * du[:, 0, 0] - 0.1 * d2u[:, 0, 0]).pow(2).mean()

    params = {k: v.detach() for k, v in wrapper.named_parameters()}
    if transform == "grad":
        got = torch.func.grad(loss_of)(params)
    else:
        _, pullback = torch.func.vjp(loss_of, params)
        got, = pullback(torch.tensor(1.0, dtype=torch.float64))
    xr = x.clone().requires_grad_()
    outs = reference_derivatives(xr, [m.weight for m in seq[0::2]], [m.bias for m in seq[0::2]], "tanh", 2)
    expected = (outs[1][:, 0, 1] + outs[0][:, 0] * outs[1][:, 0, 0] - 0.1 * outs[2][:, 0, 0]).pow(2).mean()
    grads = torch.autograd.grad(expected, list(seq.parameters()))
    assert list(got) == [f"net.{n}" for n in net.state_dict()]
    for (name, g), e in zip(got.items(), grads):
        assert rel_err(g, e) <= TOL, name


def test_bitwise_the_same_for_any_thread_count(restore_threads):
    gen = torch.Generator().manual_seed(8)
    weights, biases = make_net([2, 20, 20, 20, 1], True, gen)
    weights = [w.detach().float() for w in weights]
    biases = [b.detach().float() for b in biases]
    x = torch.rand(5000, 2, generator=gen)
    cot = [torch.randn(s, generator=gen) for s in [(5000, 1), (5000, 1, 2), (5000, 1, 2)]]
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        outs = torch.ops.fusedgrad.deep_mlp_derivatives(x, weights, biases, "tanh", 2)
        grads = torch.ops.fusedgrad.deep_mlp_derivatives_backward(*cot, x, weights, biases, "tanh", 2, [True, True])
        results.append([*outs, *[g for g in grads if g.numel()]])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_opcheck():
    gen = torch.Generator().manual_seed(9)
    weights, biases = make_net([3, 6, 5, 2], True, gen)
    weights = [w.detach() for w in weights]
    biases = [b.detach() for b in biases]
    biases[1] = None
    x = torch.randn(7, 3, dtype=torch.float64, generator=gen)
    for order in (1, 2):
        torch.library.opcheck(torch.ops.fusedgrad.deep_mlp_derivatives.default, (x, weights, biases, "tanh", order))
        outs = torch.ops.fusedgrad.deep_mlp_derivatives(x, weights, biases, "tanh", order)
        cot = [torch.randn_like(t) for t in outs] + [None] * (3 - len(outs))
        torch.library.opcheck(torch.ops.fusedgrad.deep_mlp_derivatives_backward.default,
                              (*cot, x, weights, biases, "tanh", order, [True, True]))
    # The directional jets (the prediction's nested create_graph gradients), with and without mixed pairs.
    dirs = torch.randn(7, 2, 3, dtype=torch.float64, generator=gen)
    for pairs in ([], [0, 1], [1, 1, 0, 1]):
        torch.library.opcheck(torch.ops.fusedgrad.deep_mlp_jvp.default, (x, weights, biases, "tanh", dirs, pairs))
        outs = torch.ops.fusedgrad.deep_mlp_jvp(x, weights, biases, "tanh", dirs, pairs)
        cot = [torch.randn_like(t) for t in outs]
        torch.library.opcheck(torch.ops.fusedgrad.deep_mlp_jvp_backward.default,
                              (*cot, x, weights, biases, "tanh", dirs, pairs, [True, True, True]))


def test_compiled_pinn_step_equals_eager():
    torch.manual_seed(10)
    net = fusedgrad.FusedMLP(2, 8, 1, hidden_layers=2, activation="tanh").double()
    x = torch.rand(40, 2, dtype=torch.float64)

    def pinn_loss():
        u, du, d2u = net.derivatives(x, order=2)
        return (du[:, 0, 1] + u[:, 0] * du[:, 0, 0] - 0.05 * d2u[:, 0, 0]).pow(2).mean()

    params = list(net.parameters())
    eager = pinn_loss()
    compiled = torch.compile(pinn_loss, fullgraph=True, backend="aot_eager")()
    assert rel_err(compiled, eager) <= 1e-13
    for c, e in zip(torch.autograd.grad(compiled, params), torch.autograd.grad(eager, params)):
        assert rel_err(c, e) <= 1e-13


def test_no_grad_returns_plain_tensors():
    net = fusedgrad.FusedMLP(2, 5, 1, hidden_layers=2)
    with torch.no_grad():
        u, du = net.derivatives(torch.randn(3, 2))
    assert not u.requires_grad and du.shape == (3, 1, 2)


@pytest.mark.parametrize("order, exc, text", [
    (3, ValueError, "FusedMLP.derivatives: argument 'order' must be 1 (u, du) or 2 (u, du, d2u), got 3"),
    (True, TypeError, "FusedMLP.derivatives: argument 'order' must be an int, 1 or 2, got bool"),
    (1.0, TypeError, "FusedMLP.derivatives: argument 'order' must be an int, 1 or 2, got float"),
])
def test_bad_order(order, exc, text):
    net = fusedgrad.FusedMLP(2, 5, 1, hidden_layers=2)
    with pytest.raises(exc) as info:
        net.derivatives(torch.randn(3, 2), order=order)
    assert str(info.value) == text


def test_bad_x_names_the_method_and_argument():
    net = fusedgrad.FusedMLP(2, 5, 1, hidden_layers=2)
    with pytest.raises(ValueError, match=r"^FusedMLP.derivatives: argument 'x' must have shape \(\*, in_features\)"):
        net.derivatives(torch.randn(3, 4))
    with pytest.raises(TypeError, match=r"^FusedMLP.derivatives: argument 'x' has dtype torch.float64, expected the weights' torch.float32"):
        net.derivatives(torch.randn(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"^fusedgrad.derivatives \(backward\): argument 'grad_du' must have du's"):
        torch.ops.fusedgrad.deep_mlp_derivatives_backward(
            None, torch.zeros(3, 1, 3), None, torch.zeros(3, 2), [torch.zeros(5, 2), torch.zeros(1, 5)],
            [None, None], "tanh", 1, [True, True])
    with pytest.raises(ValueError, match=r"^fusedgrad.derivatives: argument 'order' must be 1"):
        torch.ops.fusedgrad.deep_mlp_derivatives(torch.zeros(3, 2), [torch.zeros(5, 2), torch.zeros(1, 5)],
                                                 [None, None], "tanh", 0)


def test_zero_rows():
    net = fusedgrad.FusedMLP(2, 5, 3, hidden_layers=2).double()
    x = torch.zeros(0, 2, dtype=torch.float64, requires_grad=True)
    u, du, d2u = net.derivatives(x, order=2)
    assert u.shape == (0, 3) and du.shape == (0, 3, 2) and d2u.shape == (0, 3, 2)
    (u.sum() + du.sum() + d2u.sum()).backward()
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in net.parameters())
