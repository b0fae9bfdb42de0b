"""Property tests (hypothesis): random shapes, broadcast shapes, None arguments,
requires-grad subsets, layouts, reduction, activation and dtype, against native
autograd. Profiles: see conftest.py ("ci" default, HYPOTHESIS_PROFILE=dev)."""
import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import fusedgrad
from problems import DTYPES, LAYOUTS, compare_loss, compare_mlp, make_problem, upstream_grad
from reference import assert_close_rel, ref_mlp, ref_mlp_loss

pytestmark = pytest.mark.usefixtures("single_thread")

# N includes 1 and primes. With widths up to 17 every draw whose operands the any-depth engine reads
# directly (a second layer, biases absent or per column, a target absent or of full shape:
# csrc/ops/engine_path.cpp) takes the engine; the others (full-shape or broadcast biases, per-column
# targets, no second layer) the GEMM path. PATH_CASES below runs the same checks on shapes of this family
# that reach each path, asserted through the dispatch's own test (fusedgrad._C.explain_op), the GEMM path
# of plain operands too (with the engine's crossover moved to 0, as benchmarks/crossover.py does).
# The property tests record each draw's path (hypothesis events: pytest --hypothesis-show-statistics).
ROWS = st.sampled_from([1, 2, 3, 5, 7, 11, 13, 17, 64, 257, 401])
WIDTH = st.integers(1, 17)


@st.composite
def leads(draw):
    kind = draw(st.sampled_from(["1d", "2d", "2d", "3d", "4d"]))
    if kind == "1d":
        return ()
    if kind == "2d":
        return (draw(ROWS),)
    small = st.integers(1, 5)
    return tuple(draw(small) for _ in range(2 if kind == "3d" else 3))


@st.composite
def broadcast_shape(draw, full):
    """A shape that broadcasts to `full` without enlarging it: some number of
    trailing dims of full, each kept or set to 1 (0-dim included)."""
    k = draw(st.integers(0, len(full)))
    return tuple(draw(st.sampled_from([d, 1])) for d in full[len(full) - k:])


@st.composite
def problems(draw, with_target=True):
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(leads())
    D, H = draw(WIDTH), draw(WIDTH)
    has_w2 = draw(st.booleans())
    O = draw(WIDTH) if has_w2 else None
    out = O if has_w2 else H
    layout = draw(st.sampled_from(LAYOUTS))

    def optional(full):
        return draw(st.one_of(st.none(), broadcast_shape(tuple(lead) + (full,))))

    b1 = optional(H)
    b2 = optional(out) if has_w2 else None
    target = optional(out) if with_target else None
    present = ["x", "w1"] + [n for n, s in (("b1", b1), ("w2", O), ("b2", b2), ("target", target)) if s is not None]
    requires_grad = {n for n in present if draw(st.booleans())}
    p = make_problem(lead, D, H, O, b1="none", b2="none", target="none", layout=layout, dtype=dtype,
                     seed=draw(st.integers(0, 2**16)), requires_grad=requires_grad,
                     b1_shape=b1, b2_shape=b2, target_shape=target)
    return p, requires_grad


def path_of(p, loss, activation):
    """The path the loss op (loss=True) or the prediction op takes for problem p."""
    args = [a.detach() if a is not None else None for a in p.loss_args()]
    return fusedgrad._C.explain_op(loss, *args[:5], args[5] if loss else None, activation)


def check_loss(p, requires_grad, reduction, activation):
    loss = fusedgrad.mlp_loss(*p.loss_args(), reduction=reduction, activation=activation)
    assert loss.shape == () and loss.dtype == p.dtype
    assert loss.requires_grad == bool(requires_grad)
    if not requires_grad:
        expected = ref_mlp_loss(*p.loss_args(), reduction=reduction, activation=activation)
        assert_close_rel(loss, expected, 1e-10 if p.dtype == torch.float64 else 1e-5, p.label)
        return
    compare_loss(p, reduction, activation, factor=None)
    # gradients of arguments that do not require grad stay None
    for name, leaf in p.leaves.items():
        if name not in requires_grad:
            assert leaf.grad is None


def check_mlp(p, requires_grad, activation, go_style):
    pred = fusedgrad.mlp(*p.mlp_args(), activation=activation)
    expected = ref_mlp(*p.mlp_args(), activation=activation)
    assert pred.shape == expected.shape and pred.dtype == p.dtype
    assert pred.requires_grad == bool(requires_grad)
    if not requires_grad:
        assert_close_rel(pred, expected.detach(), 1e-10 if p.dtype == torch.float64 else 1e-5, p.label)
        return
    go = None if go_style == "sum" else upstream_grad(pred.shape, p.dtype, 0, go_style)
    compare_mlp(p, go, activation, f"{p.label} {activation} go={go_style}", floor=None)


@given(problems(), st.sampled_from(["mean", "sum"]), st.sampled_from(fusedgrad.ACTIVATIONS))
def test_mlp_loss_matches_autograd(problem, reduction, activation):
    p, requires_grad = problem
    event(f"loss path: {path_of(p, True, activation)}")
    check_loss(p, requires_grad, reduction, activation)


@given(problems(with_target=False), st.sampled_from(fusedgrad.ACTIVATIONS),
       st.sampled_from(["contig", "transposed", "sum"]))
def test_mlp_matches_autograd(problem, activation, go_style):
    p, requires_grad = problem
    event(f"prediction path: {path_of(p, False, activation)}")
    check_mlp(p, requires_grad, activation, go_style)


# Shapes of the family above (N from ROWS or a 3-D lead of dims <= 5, widths <= 17) that reach each
# path of the loss op and of the prediction op: (lead, D, H, O, b1, path, engine crossover: None for the
# default, 0 for the GEMM path always).
PATH_CASES = {
    "engine": ((64,), 5, 7, 3, "vec", "engine", None),
    "engine-17": ((401,), 17, 17, 17, "vec", "engine", None),
    "engine-17-outputs": ((3, 5), 3, 4, 17, "row", "engine", None),
    "gemm": ((401,), 17, 17, 17, "vec", "gemm", 0),
    "gemm-col-bias": ((257,), 9, 12, 5, "col", "gemm", None),  # (N, 1) b1: the engine does not read it
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(PATH_CASES))
def test_each_path_of_the_family(case, dtype, engine_crossover):
    lead, D, H, O, b1, path, macs = PATH_CASES[case]
    loss_path = pred_path = path
    engine_crossover(macs)
    for layout in ("contig", "noncontig"):
        p = make_problem(lead, D, H, O, b1=b1, b2="vec", target="grad", layout=layout, dtype=dtype, seed=D * H)
        requires_grad = set(p.leaves)
        for activation in fusedgrad.ACTIVATIONS:
            assert path_of(p, True, activation) == loss_path, (case, layout, activation)
            assert path_of(p, False, activation) == pred_path, (case, layout, activation)
            for reduction in ("mean", "sum"):
                check_loss(p, requires_grad, reduction, activation)
            check_mlp(p, requires_grad - {"target"}, activation, "transposed")
