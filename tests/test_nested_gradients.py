"""The prediction's nested gradients (PINN code on ``autograd.grad(create_graph=True)`` with FusedMLP
dropped in): ``J(x)ᵀḡ`` and ``ḡᵀH(x)v`` as autograd nodes whose backward is the engine's directional
jets (csrc/python/deep_autograd.cpp, ``deep_mlp_jvp``), against native autograd in float64 over depths,
widths, activations, biases, D and O (hypothesis); the directional-jet ops themselves against
``torch.func.jvp``; gradgradcheck past the fused levels, the routes taken, and the errors (the ops'
opcheck is tests/test_derivatives.py's, beside the derivatives ops')."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import deep_net as make_net
from reference import ref_deep_mlp as reference
from reference import rel_err

import fusedgrad
from fusedgrad import deep

ACTS = list(fusedgrad.ACTIVATIONS)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-10
jvp_op = torch.ops.fusedgrad.deep_mlp_jvp.default
jvp_backward_op = torch.ops.fusedgrad.deep_mlp_jvp_backward.default


def params_of(weights, biases):
    return list(weights) + [b for b in biases if b is not None]


def second_derivative(model, x0, d):
    """(x, u, g = ∂u/∂x, ∂²u/∂x_d²) as PINN code computes them: autograd.grad(create_graph=True) twice."""
    x = x0.clone().requires_grad_()
    u = model(x)
    g, = torch.autograd.grad(u.sum(), x, create_graph=True)
    return x, u, g, torch.autograd.grad(g[:, d].sum(), x, create_graph=True)[0][:, d]


net_cases = st.fixed_dictionaries({
    "hidden": st.lists(st.integers(1, 9), min_size=1, max_size=4),
    "D": st.integers(1, 4), "O": st.integers(1, 3), "N": st.integers(1, 12),
    "act": st.sampled_from(ACTS), "bias": st.booleans(), "seed": st.integers(0, 2 ** 16),
})


def native_jets(x, weights, biases, act, dirs, pairs):
    """u, the tangents J v_i and the mixed seconds D²u[v_p, v_q] per row, by torch.func.jvp (differentiable)."""
    f = lambda z: reference(z, weights, biases, act)  # noqa: E731
    u = f(x)
    tangents = [torch.func.jvp(f, (x,), (dirs[:, i],))[1] for i in range(dirs.shape[1])]
    seconds = [torch.func.jvp(lambda z: torch.func.jvp(f, (z,), (dirs[:, q],))[1], (x,), (dirs[:, p],))[1]
               for p, q in zip(pairs[::2], pairs[1::2])]
    empty = u.new_zeros(u.shape + (0,))
    return (u, torch.stack(tangents, -1) if tangents else empty, torch.stack(seconds, -1) if seconds else empty)


@SETTINGS
@given(case=net_cases, T=st.integers(1, 3), pair_seed=st.integers(0, 1000))
def test_directional_jets_match_torch_func(case, T, pair_seed):
    gen = torch.Generator().manual_seed(case["seed"])
    widths = [case["D"], *case["hidden"], case["O"]]
    weights, biases = make_net(widths, case["bias"], gen)
    x = torch.randn(case["N"], case["D"], dtype=torch.float64, generator=gen)
    dirs = torch.randn(case["N"], T, case["D"], dtype=torch.float64, generator=gen)
    pg = torch.Generator().manual_seed(pair_seed)
    pairs = torch.randint(0, T, (2 * int(torch.randint(0, 4, (1,), generator=pg)),), generator=pg).tolist()
    w = [t.detach() for t in weights]
    b = [t.detach() if t is not None else None for t in biases]
    got = jvp_op(x, w, b, case["act"], dirs, pairs)
    expected = native_jets(x, w, b, case["act"], dirs, pairs)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        assert rel_err(g, e) <= TOL

    # The backward: every gradient of a random linear function of the three outputs.
    x.requires_grad_()
    dirs.requires_grad_()
    cot = [torch.randn(e.shape, dtype=torch.float64, generator=gen) for e in expected]
    out = jvp_backward_op(cot[0], cot[1], cot[2], x.detach(), w, b, case["act"], dirs.detach(), pairs,
                          [True, True, True])
    L = len(w)
    wanted = [x, dirs, *weights] + [t for t in biases if t is not None]
    ref_outs = native_jets(x, weights, biases, case["act"], dirs, pairs)
    total = sum((o * c).sum() for o, c in zip(ref_outs, cot))
    ref = torch.autograd.grad(total, wanted, allow_unused=True, materialize_grads=True)
    assert rel_err(out[2 * L], ref[0]) <= TOL
    assert rel_err(out[2 * L + 1], ref[1]) <= TOL
    for l in range(L):
        assert rel_err(out[l], ref[2 + l]) <= TOL
    got_db = [out[L + l] for l in range(L) if biases[l] is not None]
    for g, e in zip(got_db, ref[2 + L:]):
        assert rel_err(g, e) <= TOL


def nested_losses(model, x, gbar, v, c):
    """u, g = J(x)ᵀḡ and y = ḡᵀH(x)v by autograd.grad(create_graph=True), and a loss of all three."""
    u = model(x)
    g, = torch.autograd.grad(u, x, gbar, create_graph=True)
    # Identity layers: native g does not depend on x (allow_unused); the fused node gives H v = 0.
    y, = torch.autograd.grad(g, x, v, create_graph=True, allow_unused=True, materialize_grads=True)
    return (u * c[0]).sum() + (g * c[1]).sum() + (y * c[2]).sum() + (g ** 2 * c[3]).sum(), g, y


@SETTINGS
@given(case=net_cases, extras_need_grad=st.booleans())
def test_nested_gradients_match_native(case, extras_need_grad):
    gen = torch.Generator().manual_seed(case["seed"])
    widths = [case["D"], *case["hidden"], case["O"]]
    weights, biases = make_net(widths, case["bias"], gen)
    N, D, O = case["N"], case["D"], case["O"]
    x0 = torch.randn(N, D, dtype=torch.float64, generator=gen)
    gbar0 = torch.randn(N, O, dtype=torch.float64, generator=gen)
    v0 = torch.randn(N, D, dtype=torch.float64, generator=gen)
    c = [torch.randn(N, n, dtype=torch.float64, generator=gen) for n in (O, D, D, D)]
    params = params_of(weights, biases)

    def run(model):
        x = x0.clone().requires_grad_()
        gbar = gbar0.clone().requires_grad_(extras_need_grad)
        v = v0.clone().requires_grad_(extras_need_grad)
        loss, g, y = nested_losses(model, x, gbar, v, c)
        wanted = [x, *params] + ([gbar, v] if extras_need_grad else [])
        return loss, g, y, torch.autograd.grad(loss, wanted, materialize_grads=True)

    fused = lambda z: deep.mlp(z, weights, biases, activation=case["act"])  # noqa: E731
    native = lambda z: reference(z, weights, biases, case["act"])  # noqa: E731
    loss, g, y, grads = run(fused)
    rloss, rg, ry, rgrads = run(native)
    # The route: each nested gradient is a node of the engine's, not a graph of torch ops.
    assert "DeepInputVjpFunction" in g.grad_fn.name()
    assert "DeepHvpFunction" in y.grad_fn.name()
    assert rel_err(g, rg) <= TOL and rel_err(y, ry) <= TOL
    assert rel_err(loss, rloss) <= TOL
    for a, b in zip(grads, rgrads):
        assert rel_err(a, b) <= TOL


def test_burgers_residual_through_the_module_takes_the_nested_nodes():
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(2, 20, 1, activation="tanh", hidden_layers=3, dtype=torch.float64)
    ref = net.to_module(copy=True)
    x0 = torch.rand(50, 2, dtype=torch.float64)

    def step(model):
        x, u, du, u_xx = second_derivative(model, x0, 0)
        loss = ((du[:, 1] + u[:, 0] * du[:, 0] - 0.003 * u_xx) ** 2).mean()
        loss.backward()
        return du, u_xx, loss, x.grad

    got, expected = step(net), step(ref)
    assert "DeepInputVjpFunction" in got[0].grad_fn.name()
    for a, b in zip(got, expected):
        assert rel_err(a, b) <= TOL
    for p, q in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= TOL


@pytest.mark.parametrize("act", ["tanh", "gelu", "relu"])
def test_gradgradcheck_past_the_fused_levels(act):
    # A third nested gradient, and create_graph gradients of the parameters: plain torch beyond the nodes.
    gen = torch.Generator().manual_seed(4)
    weights, biases = make_net([2, 4, 3, 2], True, gen)
    biases[1] = None
    x = torch.randn(5, 2, dtype=torch.float64, generator=gen, requires_grad=True)
    gbar = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    v = torch.randn(5, 2, dtype=torch.float64, generator=gen)
    params = params_of(weights, biases)

    def unpack(p):
        return list(p[:3]), [p[3], None, p[4]]

    def hvp(x, *p):
        u = deep.mlp(x, *unpack(p), activation=act)
        g, = torch.autograd.grad(u, x, gbar, create_graph=True)
        return torch.autograd.grad(g, x, v, create_graph=True)[0]

    def input_vjp(x, *p):
        return torch.autograd.grad(deep.mlp(x, *unpack(p), activation=act), x, gbar, create_graph=True)[0]

    assert torch.autograd.gradcheck(input_vjp, (x, *params))
    assert torch.autograd.gradgradcheck(input_vjp, (x, *params))
    if act != "relu":  # relu's kink: finite differences of its second derivative do not hold at 1e-6
        assert torch.autograd.gradcheck(hvp, (x, *params))
        assert torch.autograd.gradgradcheck(hvp, (x, *params))


def test_directional_jets_bad_arguments_name_the_op_and_the_argument():
    w = [torch.randn(4, 2), torch.randn(1, 4)]
    b = [None, None]
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match=r"fusedgrad.deep_mlp_jvp: argument 'directions' must have shape"):
        jvp_op(x, w, b, "tanh", torch.randn(5, 2), [])
    with pytest.raises(ValueError, match=r"argument 'pairs' holds 2, expected tangent indices in \[0, 1\)"):
        jvp_op(x, w, b, "tanh", torch.randn(5, 1, 2), [0, 2])
    with pytest.raises(ValueError, match=r"argument 'pairs' must hold 2 tangent indices a pair, got 1"):
        jvp_op(x, w, b, "tanh", torch.randn(5, 1, 2), [0])
    with pytest.raises(TypeError, match=r"argument 'directions' has dtype torch.float64, expected the weights' torch.float32"):
        jvp_op(x, w, b, "tanh", torch.randn(5, 1, 2, dtype=torch.float64), [])
    with pytest.raises(ValueError, match=r"argument 'grad_tangents' must have the tangents' shape \(5, 1, 1\)"):
        jvp_backward_op(None, torch.randn(5, 1, 2), None, x, w, b, "tanh", torch.randn(5, 1, 2), [],
                        [True, True, True])


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_one_hidden_layer_module_takes_the_nested_nodes(act, bias):
    # FusedMLP at depth 1 runs the one-hidden-layer op; its create_graph backward hands x's gradient to
    # the same nested nodes (fusedgrad/functional.py, _nested_route).
    torch.manual_seed(1)
    net = fusedgrad.FusedMLP(3, 7, 2, bias=bias, activation=act, dtype=torch.float64)
    ref = net.to_module(copy=True)
    x0 = torch.randn(11, 3, dtype=torch.float64)
    gbar = torch.randn(11, 2, dtype=torch.float64)
    v = torch.randn(11, 3, dtype=torch.float64)
    c = [torch.randn(11, n, dtype=torch.float64) for n in (2, 3, 3, 3)]

    def run(model):
        x = x0.clone().requires_grad_()
        loss, g, y = nested_losses(model, x, gbar, v, c)
        return g, y, loss, torch.autograd.grad(loss, [x, *model.parameters()], materialize_grads=True)

    got, expected = run(net), run(ref)
    assert "DeepInputVjpFunction" in got[0].grad_fn.name()
    assert "DeepHvpFunction" in got[1].grad_fn.name()
    for a, b in zip(got[:3], expected[:3]):
        assert rel_err(a, b) <= TOL
    for a, b in zip(got[3], expected[3]):
        assert rel_err(a, b) <= TOL


def test_hessian_diagonal_takes_the_three_part_jet_and_matches_native():
    # u_xx = grad(u_x, x)[:, d]: v = e_d and w ∥ e_d in every row (common_axis); against native.
    torch.manual_seed(2)
    net = fusedgrad.FusedMLP(3, 6, 2, hidden_layers=2, activation="silu", dtype=torch.float64)
    ref = net.to_module(copy=True)
    x0 = torch.randn(9, 3, dtype=torch.float64)

    def run(model):
        x, u, g, u_zz = second_derivative(model, x0, 2)
        loss = (u_zz * torch.arange(9.0, dtype=torch.float64)).sum() + (g[:, 0] ** 2).sum()
        return [u_zz, loss, *torch.autograd.grad(loss, [x, *model.parameters()], allow_unused=True,
                                                 materialize_grads=True)]

    with torch.profiler.profile() as prof:
        got = run(net)
    assert "fusedgrad::deep_mlp_derivatives_backward" in {e.name for e in prof.events()}  # the 3-part route ran
    for a, b in zip(got, run(ref)):
        assert rel_err(a, b) <= TOL


def test_explain_names_the_create_graph_route():
    x = torch.randn(4, 2)
    for net in (fusedgrad.FusedMLP(2, 5, 1), fusedgrad.FusedMLP(2, 5, 1, hidden_layers=3)):
        info = fusedgrad.explain(net, x)
        assert info["create_graph"] == "nested-jets"
        u = net(x.requires_grad_())
        g, = torch.autograd.grad(u.sum(), x, create_graph=True)
        assert "DeepInputVjpFunction" in g.grad_fn.name()  # what explain said
        x = x.detach()
    ens = fusedgrad.FusedMLPEnsemble(3, 2, 5, 1)
    assert fusedgrad.explain(ens, x)["create_graph"] == "torch-recompute"
    assert "create_graph" not in fusedgrad.explain(fusedgrad.FusedMLP(2, 5, 1), x, torch.randn(4, 1))


def test_leading_dimensions_of_x():
    # x (B, N, D): the nodes take x's leading shape as rows, as the prediction does.
    gen = torch.Generator().manual_seed(5)
    weights, biases = make_net([3, 5, 4, 2], True, gen)
    x0 = torch.randn(2, 6, 3, dtype=torch.float64, generator=gen)
    gbar = torch.randn(2, 6, 2, dtype=torch.float64, generator=gen)
    c = [torch.randn(2, 6, n, dtype=torch.float64, generator=gen) for n in (2, 3, 3, 3)]
    params = params_of(weights, biases)
    axis = torch.zeros(2, 6, 3, dtype=torch.float64).index_fill_(-1, torch.tensor([1]), 1.0)
    # A general v, then v and w along one axis (the 3-part diagonal route: y's loss reads column 1 only).
    for v, c[2] in ((torch.randn(2, 6, 3, dtype=torch.float64, generator=gen), c[2]), (axis, c[2] * axis)):
        results = []
        for model in (lambda z: deep.mlp(z, weights, biases, activation="gelu"),
                      lambda z: reference(z, weights, biases, "gelu")):
            x = x0.clone().requires_grad_()
            loss, g, y = nested_losses(model, x, gbar, v, c)
            with torch.profiler.profile() as prof:
                results.append([g, y, *torch.autograd.grad(loss, [x, *params])])
            ran = "fusedgrad::deep_mlp_derivatives_backward" in {e.name for e in prof.events()}
            assert ran == (v is axis and not results[1:]), "the 3-part route runs exactly for the one-axis case"
        assert "DeepHvpFunction" in results[0][1].grad_fn.name()
        for a, b in zip(*results):
            assert a.shape == b.shape and rel_err(a, b) <= TOL
