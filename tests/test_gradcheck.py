"""torch.autograd.gradcheck of the fused ops (float64, finite differences), and their double backward
(gradgradcheck, and native autograd's create_graph gradients)."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck, gradgradcheck

import fusedgrad
from problems import make_problem

pytestmark = pytest.mark.usefixtures("single_thread")

# (lead, H, O or None, b1 kind/shape, b2 kind/shape, target shape or kind)
CONFIGS = [
    ((4,), 5, 2, "full", "full", "grad"),        # per-sample biases, as in the seeds
    ((4,), 5, 2, "vec", "vec", "grad"),          # nn.Linear biases
    ((4,), 5, 2, "col", "row", "grad"),          # (N, 1) and (1, O)
    ((2, 3), 4, 3, (3, 4), (2, 1, 3), "grad"),   # partial broadcasts against a 3-D x
    ((2, 3), 4, 3, "full", "none", "none"),
    ((), 5, 2, "vec", (), "grad"),               # 1-D x, scalar b2
    ((4,), 5, None, "full", "none", "grad"),     # no second layer
    ((4,), 5, None, "none", "none", "none"),
]


def _ids(cfg):
    lead, H, O, b1, b2, t = cfg
    return f"x{lead}-H{H}-O{O}-b1_{b1}-b2_{b2}-t_{t}"


def _problem(cfg, seed):
    lead, H, O, b1, b2, target = cfg
    kw = {}
    if isinstance(b1, tuple):
        kw["b1_shape"], b1 = b1, "none"
    if isinstance(b2, tuple):
        kw["b2_shape"], b2 = b2, "none"
    return make_problem(lead, 3, H, O, b1=b1, b2=b2, target=target, dtype=torch.float64, seed=seed, **kw)


def _inputs(p, names):
    """The present arguments (every one requires grad) and a function rebuilding the call."""
    present = [n for n in names if p.leaves.get(n) is not None]
    assert all(p.leaves[n].requires_grad for n in present)
    leaves = tuple(p.leaves[n] for n in present)

    def rebuild(*tensors):
        args = dict.fromkeys(names)
        for n, t in zip(present, tensors):
            args[n] = p.makers[n](t)
        return [args[n] for n in names]

    return leaves, rebuild


LOSS_NAMES = ("x", "w1", "b1", "w2", "b2", "target")
MLP_NAMES = LOSS_NAMES[:5]


def _mlp_inputs(cfg, seed):
    """The prediction's arguments of a configuration (its target dropped): leaves and rebuild."""
    lead, H, O, b1, b2, _ = cfg
    return _inputs(_problem((lead, H, O, b1, b2, "none"), seed=seed), MLP_NAMES)


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gradcheck_mlp_loss(cfg, reduction, activation):
    p = _problem(cfg, seed=1)
    leaves, rebuild = _inputs(p, LOSS_NAMES)

    def fn(*tensors):
        return fusedgrad.mlp_loss(*rebuild(*tensors), reduction=reduction, activation=activation)

    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["noncontig", "wT", "expanded"])
def test_gradcheck_mlp_loss_layouts(layout):
    p = make_problem((2, 3), 3, 4, 2, b1="full", b2="col", target="grad", layout=layout,
                     dtype=torch.float64, seed=2)
    leaves, rebuild = _inputs(p, LOSS_NAMES)
    assert gradcheck(lambda *t: fusedgrad.mlp_loss(*rebuild(*t)), leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_mlp_loss_scaled_output():
    """The backward's incoming gradient is not 1 (loss · loss / 3)."""
    p = _problem(CONFIGS[0], seed=3)
    leaves, rebuild = _inputs(p, LOSS_NAMES)

    def fn(*tensors):
        loss = fusedgrad.mlp_loss(*rebuild(*tensors))
        return loss * loss / 3

    assert gradcheck(fn, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gradcheck_mlp(cfg, activation):
    leaves, rebuild = _mlp_inputs(cfg, seed=4)
    assert gradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t), activation=activation), leaves,
                     eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["noncontig", "wT", "expanded"])
def test_gradcheck_mlp_layouts(layout):
    p = make_problem((5,), 3, 4, 2, b1="col", b2="full", layout=layout, dtype=torch.float64, seed=5)
    leaves, rebuild = _inputs(p, MLP_NAMES)
    assert gradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t)), leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------
# Double backward (create_graph=True): the nodes recompute the op in plain torch
# ops from their inputs (csrc/ops/autograd_helpers.h), so second derivatives are
# native autograd's own. gradgradcheck (finite differences of the first backward)
# and, below, equality with native autograd's create_graph gradients.
SMOOTH = ("sigmoid", "tanh", "silu", "gelu", "gelu_tanh")  # relu / identity: second derivative 0, tested below


def _loss_problem():
    return make_problem((4,), 3, 5, 2, b1="vec", b2="vec", target="grad", dtype=torch.float64, seed=6)


@pytest.mark.parametrize("activation", SMOOTH)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gradgradcheck_mlp_loss(cfg, activation):
    p = _problem(cfg, seed=6)
    leaves, rebuild = _inputs(p, LOSS_NAMES)
    assert gradgradcheck(lambda *t: fusedgrad.mlp_loss(*rebuild(*t), activation=activation), leaves,
                         eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("activation", SMOOTH)
@pytest.mark.parametrize("cfg", CONFIGS, ids=_ids)
def test_gradgradcheck_mlp(cfg, activation):
    leaves, rebuild = _mlp_inputs(cfg, seed=7)
    assert gradgradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t), activation=activation), leaves,
                         eps=1e-6, atol=1e-7, rtol=1e-5)


def _pinn_loss(net, x):
    """A physics-informed loss as DeepXDE writes it: u, u_x, u_xx by autograd.grad(create_graph=True)."""
    u = net(x)
    du = torch.autograd.grad(u.sum(), x, create_graph=True)[0]
    d2u = torch.autograd.grad(du[:, 0].sum(), x, create_graph=True, materialize_grads=True)[0][:, 0]
    return (du[:, 1] + u[:, 0] * du[:, 0] - 0.01 * d2u).pow(2).mean() + u.pow(2).mean()


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("H,bias", [(1, True), (7, False), (20, True), (33, True)])
def test_create_graph_pinn_loss_matches_autograd(H, bias, activation):
    """FusedMLP(2, H, 1) dropped into a PINN loss: the parameter gradients of a loss of u, u_x and u_xx are
    native autograd's (float64, 1e-10)."""
    torch.manual_seed(H)
    net = fusedgrad.FusedMLP(2, H, 1, bias=bias, activation=activation, dtype=torch.float64)
    ref = net.to_module()
    x = torch.rand(37, 2, dtype=torch.float64) * 2 - 1
    loss = _pinn_loss(net, x.clone().requires_grad_())
    loss.backward()
    ref_loss = _pinn_loss(ref, x.clone().requires_grad_())
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=0)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        scale = max(q.grad.abs().max().item(), 1e-300)
        assert (p.grad - q.grad).abs().max().item() <= 1e-10 * scale, name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(N=st.integers(1, 40), D=st.integers(1, 4), H=st.integers(1, 40), O=st.integers(1, 3),
       bias=st.booleans(), activation=st.sampled_from(fusedgrad.ACTIVATIONS), seed=st.integers(0, 2**16))
def test_create_graph_input_derivatives_match_autograd(N, D, H, O, bias, activation, seed):
    """The loss of u and of its first and second input derivatives (every output, every input, by
    autograd.grad(create_graph=True)) through FusedMLP(D, H, O) and through its nn.Sequential: the same
    loss and parameter gradients in float64 (1e-10 of each gradient's scale), over shapes."""
    gen = torch.Generator().manual_seed(seed)
    net = fusedgrad.FusedMLP(D, H, O, bias=bias, activation=activation, dtype=torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    ref = net.to_module()
    x = torch.randn(N, D, generator=gen, dtype=torch.float64)

    def loss_of(model):
        xx = x.clone().requires_grad_()
        u = model(xx)
        total = u.pow(2).mean()
        for o in range(O):
            du = torch.autograd.grad(u[:, o].sum(), xx, create_graph=True, materialize_grads=True)[0]
            for d in range(D):
                d2 = torch.autograd.grad(du[:, d].sum(), xx, create_graph=True, materialize_grads=True)[0][:, d]
                total = total + (du[:, d] * d2).sin().mean()
        return total

    got, expected = loss_of(net), loss_of(ref)
    got.backward()
    expected.backward()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(net.named_parameters(), ref.parameters()):
        if q.grad is None:  # identity / relu: a parameter u's derivatives do not reach
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        scale = max(q.grad.abs().max().item(), 1e-12)
        assert (p.grad - q.grad).abs().max().item() <= 1e-10 * scale, name


def test_hessian_of_loss_matches_autograd():
    p = _loss_problem()
    x, _, b1, w2, b2, target = [t.detach() for t in p.loss_args()]
    w1 = p.leaves["w1"].detach().clone()
    fused = torch.autograd.functional.hessian(lambda w: fusedgrad.mlp_loss(x, w, b1, w2, b2, target), w1)
    native = torch.autograd.functional.hessian(
        lambda w: fusedgrad.functional._native_loss(x, w, b1, w2, b2, target, "mean", "sigmoid"), w1)
    assert native.abs().max() > 0
    torch.testing.assert_close(fused, native, rtol=1e-10, atol=0)


def test_create_graph_only_differentiates_what_is_asked():
    """autograd.grad(u, x) needs dx alone: the parameters' gradients are not built (they would be graph
    nodes that nothing uses), and the first-order route afterwards is unaffected."""
    p = _loss_problem()
    pred = fusedgrad.mlp(*p.mlp_args())
    dx, = torch.autograd.grad(pred.sum(), [p.leaves["x"]], create_graph=True, retain_graph=True)
    assert dx.requires_grad and all(p.leaves[n].grad is None for n in MLP_NAMES if p.leaves.get(n) is not None)
    pred.pow(2).sum().backward()
    assert p.leaves["w1"].grad is not None and p.leaves["w1"].grad.abs().max() > 0


def test_create_graph_after_in_place_change_raises():
    """The recompute reads the inputs as they are at backward time: one modified in place since the forward
    is refused by name, as autograd refuses a modified saved tensor; a first-order backward, which reads
    only what the forward computed, still works as before."""
    p = _loss_problem()
    loss = fusedgrad.mlp_loss(*p.loss_args())
    with torch.no_grad():
        p.leaves["b2"].add_(1.0)
    with pytest.raises(RuntimeError, match=r"fusedgrad\.mlp_loss: an input of the forward \(argument 4\) was "
                                           r"modified in place"):
        torch.autograd.grad(loss, [p.leaves["w1"]], create_graph=True, retain_graph=True)
    loss.backward()
    assert p.leaves["w1"].grad is not None and p.leaves["w1"].grad.abs().max() > 0


