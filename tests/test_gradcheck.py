"""torch.autograd.gradcheck of the fused ops (float64, finite differences), and
the refusal of double backward."""
import pytest
import torch
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
    lead, H, O, b1, b2, _ = cfg
    p = _problem((lead, H, O, b1, b2, "none"), seed=4)
    leaves, rebuild = _inputs(p, MLP_NAMES)
    assert gradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t), activation=activation), leaves,
                     eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("layout", ["noncontig", "wT", "expanded"])
def test_gradcheck_mlp_layouts(layout):
    p = make_problem((5,), 3, 4, 2, b1="col", b2="full", layout=layout, dtype=torch.float64, seed=5)
    leaves, rebuild = _inputs(p, MLP_NAMES)
    assert gradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t)), leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


# ---------------------------------------------------------------------------
# Double backward is not supported: a clear RuntimeError, never a silently
# wrong second derivative.
DOUBLE = r"double backward"


def _loss_problem():
    return make_problem((4,), 3, 5, 2, b1="vec", b2="vec", target="grad", dtype=torch.float64, seed=6)


@pytest.mark.parametrize("wrt", ["x", "w1", "b1", "w2", "b2", "target"])
def test_mlp_loss_create_graph_raises(wrt):
    p = _loss_problem()
    loss = fusedgrad.mlp_loss(*p.loss_args())
    with pytest.raises(RuntimeError, match=DOUBLE) as info:
        torch.autograd.grad(loss, [p.leaves[wrt]], create_graph=True)
    assert "mlp_loss" in str(info.value)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True:UserWarning")
def test_mlp_loss_backward_create_graph_raises():
    p = _loss_problem()
    loss = fusedgrad.mlp_loss(*p.loss_args())
    with pytest.raises(RuntimeError, match=DOUBLE):
        loss.backward(create_graph=True)


@pytest.mark.parametrize("wrt", ["x", "w1", "b1", "w2", "b2"])
def test_mlp_create_graph_raises(wrt):
    p = _loss_problem()
    pred = fusedgrad.mlp(*p.mlp_args())
    with pytest.raises(RuntimeError, match=DOUBLE) as info:
        torch.autograd.grad(pred.pow(2).sum(), [p.leaves[wrt]], create_graph=True)
    assert "mlp" in str(info.value)


def test_gradgradcheck_raises_clear_error():
    """gradgradcheck runs a double backward: it must stop at the clear error rather
    than compare a wrong second derivative."""
    p = _loss_problem()
    leaves, rebuild = _inputs(p, LOSS_NAMES)
    with pytest.raises(RuntimeError, match=DOUBLE):
        gradgradcheck(lambda *t: fusedgrad.mlp_loss(*rebuild(*t)), leaves)
    leaves, rebuild = _inputs(p, MLP_NAMES)
    with pytest.raises(RuntimeError, match=DOUBLE):
        gradgradcheck(lambda *t: fusedgrad.mlp(*rebuild(*t)), leaves)


def test_hessian_of_loss_raises():
    p = _loss_problem()
    x, _, b1, w2, b2, target = [t.detach() for t in p.loss_args()]
    w1 = p.leaves["w1"].detach().clone()
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.functional.hessian(lambda w: fusedgrad.mlp_loss(x, w, b1, w2, b2, target), w1)


def test_first_order_still_works_after_refusal():
    """The refusal does not poison the graph: a plain backward afterwards works."""
    p = _loss_problem()
    loss = fusedgrad.mlp_loss(*p.loss_args())
    with pytest.raises(RuntimeError, match=DOUBLE):
        torch.autograd.grad(loss, [p.leaves["w1"]], create_graph=True, retain_graph=True)
    p.leaves["w1"].grad = None
    loss.backward()
    assert p.leaves["w1"].grad is not None and p.leaves["w1"].grad.abs().max() > 0
