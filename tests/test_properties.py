"""Property tests (hypothesis): random shapes, broadcast shapes, None arguments,
requires-grad subsets, layouts, reduction, activation and dtype, against native
autograd. Profiles: see conftest.py ("ci" default, HYPOTHESIS_PROFILE=dev)."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fusedgrad
from problems import DTYPES, LAYOUTS, compare_loss, compare_mlp, make_problem, upstream_grad
from reference import assert_close_rel, ref_mlp, ref_mlp_loss

pytestmark = pytest.mark.usefixtures("single_thread")

# N includes 1 and primes. With widths up to 17 most draws take the streaming path (rows of at most
# 512 multiply-adds: csrc/cpu/stream_path.cpp), the rest (wider rows, broadcast kinds the streaming
# path does not take) the direct-loop or GEMM path; the paths are named and asserted in
# tests/test_activations.py, test_hostile_inputs.py, test_concurrency.py and test_against_autograd.py.
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


@given(problems(), st.sampled_from(["mean", "sum"]), st.sampled_from(fusedgrad.ACTIVATIONS))
def test_mlp_loss_matches_autograd(problem, reduction, activation):
    p, requires_grad = problem
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


@given(problems(with_target=False), st.sampled_from(fusedgrad.ACTIVATIONS),
       st.sampled_from(["contig", "transposed", "sum"]))
def test_mlp_matches_autograd(problem, activation, go_style):
    p, requires_grad = problem
    pred = fusedgrad.mlp(*p.mlp_args(), activation=activation)
    expected = ref_mlp(*p.mlp_args(), activation=activation)
    assert pred.shape == expected.shape and pred.dtype == p.dtype
    assert pred.requires_grad == bool(requires_grad)
    if not requires_grad:
        assert_close_rel(pred, expected.detach(), 1e-10 if p.dtype == torch.float64 else 1e-5, p.label)
        return
    go = None if go_style == "sum" else upstream_grad(pred.shape, p.dtype, 0, go_style)
    compare_mlp(p, go, activation, f"{p.label} {activation} go={go_style}", floor=None)
