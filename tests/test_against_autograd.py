"""fusedgrad vs native autograd (tests/reference.py): values and every gradient.

The main tests take the full cross product of the argument *semantics* (bias
kinds of b1 and b2, second layer or not, target, reduction, activation, dtype)
as pytest parameters, and inside each test loop over the argument *forms*
(input rank × memory layout), collecting every failing sub-case so that one
report shows them all.
"""
import itertools

import pytest
import torch

import fusedgrad
from problems import (BIAS_KINDS, DTYPES, LAYOUTS, LEADS, RTOL, TARGET_KINDS, compare, compare_loss,
                      compare_mlp, loss_fns, make_problem, run_isolated, upstream_grad)
from reference import LOSS_ARGS, assert_close_rel, grads_of, ref_mlp, ref_mlp_loss

pytestmark = pytest.mark.usefixtures("single_thread")

# (has second layer, b2 kind): b2 only exists with w2.
W2B2 = [(False, "none")] + [(True, k) for k in BIAS_KINDS]
W2B2_IDS = ["no_w2"] + [f"w2-b2_{k}" for k in BIAS_KINDS]
DTYPE_IDS = ["f32", "f64"]
D, H, O = 5, 6, 3


def _run_subcases(subcases):
    """Runs each (label, thunk); fails once at the end listing every failure."""
    failures = []
    for label, thunk in subcases:
        try:
            thunk()
        except Exception as exc:  # noqa: BLE001 — report RuntimeErrors from the op too
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            failures.append(f"[{label}] {type(exc).__name__}: {first[:400]}")
    assert not failures, f"{len(failures)}/{len(subcases)} sub-cases failed:\n" + "\n".join(failures)


def _forms():
    """(rank, layout, seed) for every input rank and memory layout."""
    return [(rank, layout, 7 * i + j) for i, rank in enumerate(LEADS) for j, layout in enumerate(LAYOUTS)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("target", TARGET_KINDS)
@pytest.mark.parametrize("w2b2", W2B2, ids=W2B2_IDS)
@pytest.mark.parametrize("b1", BIAS_KINDS)
def test_mlp_loss_matches_autograd(b1, w2b2, target, reduction, activation, dtype):
    has_w2, b2 = w2b2
    subcases = []
    for rank, layout, seed in _forms():
        def case(rank=rank, layout=layout, seed=seed):
            p = make_problem(LEADS[rank], D, H, O if has_w2 else None, b1=b1, b2=b2, target=target,
                             layout=layout, dtype=dtype, seed=seed)

            def check(loss):
                assert loss.dim() == 0 and loss.dtype == dtype and loss.requires_grad

            compare_loss(p, reduction, activation, fused_check=check)
        subcases.append((f"rank={rank} layout={layout}", case))
    _run_subcases(subcases)


# The upstream gradient's form, paired with the layout so that every form meets
# every argument configuration and rank: "contig" random, "transposed" a
# transposed view, "sum" pred.sum().backward() (an expanded stride-0 tensor).
GO_STYLE = {"contig": "contig", "noncontig": "transposed", "wT": "sum", "expanded": "contig"}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("w2b2", W2B2, ids=W2B2_IDS)
@pytest.mark.parametrize("b1", BIAS_KINDS)
def test_mlp_matches_autograd(b1, w2b2, activation, dtype):
    """fusedgrad.mlp: prediction, and pred.backward(go) for a random upstream
    gradient (contiguous, or a transposed view), and pred.sum().backward()."""
    has_w2, b2 = w2b2
    subcases = []
    for rank, layout, seed in _forms():
        style = GO_STYLE[layout]

        def case(rank=rank, layout=layout, seed=seed, style=style):
            p = make_problem(LEADS[rank], D, H, O if has_w2 else None, b1=b1, b2=b2,
                             layout=layout, dtype=dtype, seed=seed)
            out_shape = LEADS[rank] + (p.meta["O"],)
            go = None if style == "sum" else upstream_grad(out_shape, dtype, seed, style)
            pred = fusedgrad.mlp(*p.mlp_args(), activation=activation)
            assert pred.shape == out_shape and pred.dtype == dtype and pred.requires_grad
            compare_mlp(p, go, activation, f"{p.label} {activation} go={style}")
        subcases.append((f"rank={rank} layout={layout} go={style}", case))
    _run_subcases(subcases)


# ---------------------------------------------------------------------------
# Bias / target shapes beyond the five kinds: scalar-like, partial broadcasts,
# 4-D input.
EXTRA_SHAPES = [
    # (lead, H, O, argument, shape)
    ((7,), 6, 3, "b1", ()),
    ((7,), 6, 3, "b1", (1, 1)),
    ((7,), 6, 1, "b2", ()),
    ((7,), 6, 1, "b2", (1,)),
    ((7,), 6, 1, "b2", (1, 1)),
    ((7,), 6, 1, "b2", (7, 1)),
    ((7,), 6, 1, "target", ()),
    ((7,), 6, 1, "target", (1,)),
    ((7,), 6, 1, "target", (7, 1)),
    ((7,), 6, 3, "b2", ()),
    ((7,), 6, 3, "target", ()),
    ((7,), 6, 3, "target", (1, 3)),
    ((7,), 6, 3, "target", (3,)),
    ((7,), 6, 3, "target", (7, 1)),
    ((2, 3), 6, 2, "b1", (3, 6)),
    ((2, 3), 6, 2, "b1", (2, 1, 6)),
    ((2, 3), 6, 2, "b1", (1, 3, 1)),
    ((2, 3), 6, 2, "b1", (2, 1, 1)),
    ((2, 3), 6, 2, "b1", (1, 6)),
    ((2, 3), 6, 2, "b1", (3, 1)),
    ((2, 3), 6, 2, "b1", ()),
    ((2, 3), 6, 2, "b2", (3, 2)),
    ((2, 3), 6, 2, "b2", (2, 1, 2)),
    ((2, 3), 6, 2, "b2", (1, 1, 1)),
    ((2, 3), 6, 2, "target", (3, 2)),
    ((2, 3), 6, 2, "target", (2, 1, 1)),
    ((2, 3), 6, 2, "target", (2,)),
    ((), 6, 2, "b1", ()),
    ((), 6, 2, "b1", (1,)),
    ((), 6, 2, "b2", ()),
    ((), 6, 2, "target", (1,)),
    ((2, 2, 3), 4, 2, "b1", (2, 1, 3, 4)),
    ((2, 2, 3), 4, 2, "b1", (2, 3, 4)),
    ((2, 2, 3), 4, 2, "b2", (1, 2, 1, 1)),
    ((2, 2, 3), 4, 2, "target", (2, 1, 3, 2)),
    ((1, 1, 1), 4, 2, "target", (1, 1, 2)),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead,hidden,out,which,shape", EXTRA_SHAPES,
                         ids=[f"x{lead}-{w}{s}" for lead, _, _, w, s in EXTRA_SHAPES])
def test_other_broadcast_shapes(lead, hidden, out, which, shape, dtype):
    """Every argument requires grad; the gradient comes back in the argument's own shape."""
    kw = {"b1_shape": (hidden,), "b2_shape": (out,), "target_shape": tuple(lead) + (out,)}
    kw[f"{which}_shape"] = shape
    subcases = []
    for layout in LAYOUTS:
        def case(layout=layout):
            p = make_problem(lead, 3, hidden, out, target="grad", layout=layout, dtype=dtype,
                             seed=len(shape), **kw)
            for reduction in ("mean", "sum"):
                compare_loss(p, reduction)
            if which != "target":
                go = upstream_grad(tuple(lead) + (out,), dtype, 3)
                compare_mlp(p, go, "sigmoid")
        subcases.append((f"layout={layout}", case))
    _run_subcases(subcases)


# ---------------------------------------------------------------------------
# Large problems (N·cols > 16384: many row blocks and parallel reductions): per-column biases run the
# any-depth engine, full-shape and (N, 1) biases and a missing second layer the GEMM path
# (csrc/ops/engine_path.cpp; assert_path checks).
def assert_path(p, expected, loss=True, activation="sigmoid"):
    args = [a.detach() if a is not None else None for a in p.loss_args()]
    got = fusedgrad._C.explain_op(loss, *args[:5], args[5] if loss else None, activation)
    assert got == expected, f"{p.label}: the {'loss' if loss else 'prediction'} takes {got!r}, not {expected!r}"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("lead", [(2100,), (30, 70)], ids=["2d", "3d"])
@pytest.mark.parametrize("kinds", [("vec", "vec"), ("full", "full"), ("col", "col"), ("row", "none")],
                         ids=lambda k: f"b1_{k[0]}-b2_{k[1]}")
def test_large_problems(kinds, lead, dtype):
    b1, b2 = kinds
    for layout in ("contig", "noncontig"):
        p = make_problem(lead, 40, 16, 10, b1=b1, b2=b2, target="grad", layout=layout, dtype=dtype, seed=3)
        path = "engine" if kinds in (("vec", "vec"), ("row", "none")) else "gemm"
        assert_path(p, path)
        assert_path(p, path, loss=False)
        for reduction in ("mean", "sum"):
            compare_loss(p, reduction)
        go = upstream_grad(tuple(lead) + (10,), dtype, 5)
        compare_mlp(p, go, "sigmoid")
    p = make_problem(lead, 40, 16, None, b1=b1, b2="none", target="grad", dtype=dtype, seed=4)
    assert_path(p, "gemm", activation="identity")
    compare_loss(p, "mean", "identity")


@pytest.fixture
def two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_large_problems_two_threads(two_threads, dtype):
    """The parallel row loops and block reductions with more than one thread: of the engine
    (per-column biases) and, with an (N, 1) "col" b2 that it does not read, of the GEMM path
    (assert_path checks each)."""
    assert torch.get_num_threads() == 2
    p = make_problem((5000,), 8, 16, 10, b1="vec", b2="vec", target="grad", dtype=dtype, seed=6)
    assert_path(p, "engine")
    assert_path(p, "engine", loss=False)
    compare_loss(p, "mean")
    compare_mlp(p, upstream_grad((5000, 10), dtype, 6), "sigmoid")
    p = make_problem((50, 100), 8, 16, 10, b1="full", b2="col", target="grad", layout="noncontig",
                     dtype=dtype, seed=7)
    assert_path(p, "gemm")
    compare_loss(p, "sum")


# ---------------------------------------------------------------------------
# The backward's incoming gradient ≠ 1: the saved gradients must be scaled.
SCALES = {  # name: (function of the loss, d function / d loss or None if it depends on the loss)
    "times_2.5": (lambda loss: loss * 2.5, 2.5),
    "div_3": (lambda loss: loss / 3, 1 / 3),
    "neg": (lambda loss: -loss, -1.0),
    "square": (lambda loss: loss * loss, None),  # incoming gradient 2·loss
    "tiny": (lambda loss: loss * 1e-3, 1e-3),
    "zero": (lambda loss: loss * 0.0, 0.0),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("config", ["w2_vec", "no_w2_full"])
@pytest.mark.parametrize("scale", list(SCALES))
def test_loss_scaled_before_backward(scale, config, reduction, dtype):
    if config == "w2_vec":
        p = make_problem((7,), D, H, O, b1="vec", b2="vec", target="grad", dtype=dtype, seed=11)
    else:
        p = make_problem((2, 3), D, H, None, b1="full", b2="none", target="grad", dtype=dtype, seed=12)
    fn, factor = SCALES[scale]
    if factor is None:
        factor = 2 * ref_mlp_loss(*p.loss_args(), reduction=reduction).item()
    compare_loss(p, reduction, scale=fn, label=f"{p.label} {reduction} {scale}",
                 factor=factor if factor != 0.0 else None)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_backward_with_explicit_gradient(dtype):
    """loss.backward(gradient=tensor(c)) for c = 1 (the shortcut) and c ≠ 1."""
    p = make_problem((7,), D, H, O, b1="col", b2="row", target="grad", dtype=dtype, seed=13)
    for c in (1.0, 3.0, -0.25):
        for fn, store in ((fusedgrad.mlp_loss, "fused"), (ref_mlp_loss, "native")):
            for leaf in p.leaf_list():
                leaf.grad = None
            fn(*p.loss_args()).backward(torch.tensor(c, dtype=dtype))
            grads = [leaf.grad.clone() for leaf in p.leaf_list()]
            if store == "fused":
                fused_grads = grads
        for name, fg, ng in zip(LOSS_ARGS, fused_grads, grads):
            assert_close_rel(fg, ng, RTOL[dtype], f"c={c} d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_retain_graph_backward_twice_accumulates(dtype):
    p = make_problem((7,), D, H, O, b1="full", b2="full", target="grad", dtype=dtype, seed=14)
    for leaf in p.leaf_list():
        leaf.grad = None
    loss = fusedgrad.mlp_loss(*p.loss_args())
    loss.backward(retain_graph=True)
    once = [leaf.grad.clone() for leaf in p.leaf_list()]
    loss.backward(retain_graph=True)
    (loss * 2).backward()
    for name, leaf, g in zip(LOSS_ARGS, p.leaf_list(), once):
        assert_close_rel(leaf.grad, 4 * g, RTOL[dtype], f"d{name} after 1 + 1 + 2 backward passes")


@pytest.mark.parametrize("op", ["mlp_loss", "mlp"])
def test_returned_gradients_are_independent_tensors(op):
    """Gradients returned by torch.autograd.grad(..., retain_graph=True) belong to the
    caller: modifying them in place must not change what a later backward returns
    (native autograd hands out fresh tensors every time)."""
    p = make_problem((7,), D, H, O, b1="full", b2="full", target="grad", dtype=torch.float64, seed=15)
    names = LOSS_ARGS if op == "mlp_loss" else LOSS_ARGS[:5]
    leaves = p.leaf_list(names)
    if op == "mlp_loss":
        out = fusedgrad.mlp_loss(*p.loss_args())
    else:
        out = fusedgrad.mlp(*p.mlp_args()).pow(2).sum()
    first = torch.autograd.grad(out, leaves, retain_graph=True)
    expected = [g.clone() for g in first]
    for g in first:
        g.mul_(-7.0)
    second = torch.autograd.grad(out, leaves, retain_graph=True)
    for leaf in leaves:
        leaf.grad = None
    out.backward()
    for name, leaf, g2, e in zip(names, leaves, second, expected):
        assert torch.equal(g2, e), f"d{name} from a second autograd.grad changed after editing the first"
        assert torch.equal(leaf.grad, e), f"d{name} from backward changed after editing autograd.grad's result"


# ---------------------------------------------------------------------------
# Subsets of the inputs requiring grad; None arguments in every position.
# (b1 given, w2 given, b2 given, target given)
NONE_PATTERNS = [
    (b1, w2, b2, t)
    for b1 in (False, True) for w2 in (False, True) for b2 in ((False, True) if w2 else (False,))
    for t in (False, True)
]


def _pattern_id(pattern):
    b1, w2, b2, t = pattern
    return "-".join(f"{n}{'' if on else '_None'}" for n, on in (("b1", b1), ("w2", w2), ("b2", b2), ("t", t))
                    if n != "b2" or w2)


def _subsets(names):
    return [set(c) for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", NONE_PATTERNS, ids=[_pattern_id(p) for p in NONE_PATTERNS])
def test_mlp_loss_requires_grad_subsets(pattern, dtype):
    """Every subset of the present arguments requiring grad, through loss.backward()
    and through torch.autograd.grad(loss, requested): gradients not requested stay None."""
    has_b1, has_w2, has_b2, has_t = pattern
    present = [n for n, on in zip(LOSS_ARGS, (True, True, has_b1, has_w2, has_b2, has_t)) if on]
    subcases = []
    for k, requested in enumerate(_subsets(present)):
        def case(requested=requested, k=k):
            p = make_problem((7,), D, H, O if has_w2 else None, b1="vec" if has_b1 else "none",
                             b2="col" if has_b2 else "none", target="full" if has_t else "none",
                             dtype=dtype, seed=k, requires_grad=requested)
            fused, native = loss_fns(p)
            loss = fused()
            assert loss.requires_grad == bool(requested)
            if not requested:
                assert_close_rel(loss.detach(), native().detach(), RTOL[dtype], "value")
                return
            compare_loss(p)
            # torch.autograd.grad for each requested argument alone, then all together
            for name in sorted(requested):
                g_f, = torch.autograd.grad(fused(), [p.leaves[name]])
                g_n, = torch.autograd.grad(native(), [p.leaves[name]])
                assert_close_rel(g_f, g_n, RTOL[dtype], f"autograd.grad d{name}")
                for leaf in p.leaf_list():
                    assert leaf is None or leaf.grad is None, "autograd.grad must not fill .grad"
            names = sorted(requested)
            g_f = torch.autograd.grad(fused(), [p.leaves[n] for n in names])
            g_n = torch.autograd.grad(native(), [p.leaves[n] for n in names])
            for name, a, b in zip(names, g_f, g_n):
                assert_close_rel(a, b, RTOL[dtype], f"autograd.grad(all) d{name}")
        subcases.append((f"requires_grad={sorted(requested)}", case))
    _run_subcases(subcases)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("pattern", [p for p in NONE_PATTERNS if not p[3]],
                         ids=[_pattern_id(p).rsplit("-", 1)[0] for p in NONE_PATTERNS if not p[3]])
def test_mlp_requires_grad_subsets(pattern, dtype):
    has_b1, has_w2, has_b2, _ = pattern
    present = [n for n, on in zip(LOSS_ARGS[:5], (True, True, has_b1, has_w2, has_b2)) if on]
    subcases = []
    for k, requested in enumerate(_subsets(present)):
        def case(requested=requested, k=k):
            p = make_problem((7,), D, H, O if has_w2 else None, b1="vec" if has_b1 else "none",
                             b2="col" if has_b2 else "none", dtype=dtype, seed=k, requires_grad=requested)
            pred = fusedgrad.mlp(*p.mlp_args())
            assert pred.requires_grad == bool(requested)
            if not requested:
                assert_close_rel(pred, ref_mlp(*p.mlp_args()).detach(), RTOL[dtype], "prediction")
                return
            compare_mlp(p, upstream_grad(pred.shape, dtype, k), "sigmoid")
        subcases.append((f"requires_grad={sorted(requested)}", case))
    _run_subcases(subcases)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_no_grad_modes(dtype):
    """Under no_grad / inference_mode the value is unchanged and carries no graph."""
    p = make_problem((2, 3), D, H, O, b1="full", b2="vec", target="grad", dtype=dtype, seed=21)
    expected = ref_mlp_loss(*p.loss_args()).detach()
    expected_pred = ref_mlp(*p.mlp_args()).detach()
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            loss = fusedgrad.mlp_loss(*p.loss_args())
            pred = fusedgrad.mlp(*p.mlp_args())
        assert not loss.requires_grad and loss.grad_fn is None
        assert not pred.requires_grad and pred.grad_fn is None
        assert_close_rel(loss, expected, RTOL[dtype], "loss")
        assert_close_rel(pred, expected_pred, RTOL[dtype], "prediction")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_same_tensor_in_several_arguments(dtype):
    """One tensor passed as b1 and b2 (and x as target): gradients of both uses add up."""
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w1 = (torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    w2 = (torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    leaves = [x, w1, w2, b]
    compare(lambda: fusedgrad.mlp_loss(x, w1, b, w2, b, x), lambda: ref_mlp_loss(x, w1, b, w2, b, x),
            leaves, ["x", "w1", "w2", "b"], dtype, "b1 is b2, target is x")
    compare(lambda: fusedgrad.mlp_loss(x, w1, b, w1, b, reduction="sum"),
            lambda: ref_mlp_loss(x, w1, b, w1, b, reduction="sum"),
            leaves, ["x", "w1", "w2", "b"], dtype, "w2 is w1")


# ---------------------------------------------------------------------------
# Empty dimensions: N = 0 (an empty batch), D = 0, H = 0. Native autograd gives
# loss 0 ("sum") or NaN ("mean", 0/0, as nn.MSELoss), and zero / empty gradients.
# Each case runs in a forked child: a crash must fail this test, not the session.
EMPTY_CASES = [
    # (lead, D, H, O, b1, b2, target)
    ((0,), 3, 5, 2, "vec", "vec", "none"),
    ((0,), 3, 5, 2, "full", "none", "none"),
    ((0,), 3, 5, 2, "none", "full", "none"),
    ((0,), 3, 5, 2, "none", "none", "grad"),
    ((0,), 3, 5, None, "none", "none", "grad"),
    ((2, 0), 3, 5, 2, "full", "full", "grad"),
    ((0,), 3, 5, 2, "col", "col", "grad"),
    ((4,), 0, 5, 2, "full", "vec", "grad"),
    ((4,), 3, 0, 2, "vec", "full", "grad"),
    ((4,), 3, 5, 0, "full", "full", "grad"),
]


def _equal_nan(a, b, what):
    """Same shape, NaN where the other is NaN, equal to 1e-12 relative elsewhere."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN pattern differs: {a} vs {b}"
    ok = ~b.isnan()
    assert_close_rel(a[ok], b[ok], 1e-12, what)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", EMPTY_CASES, ids=lambda c: f"x{c[0] + (c[1],)}-H{c[2]}-O{c[3]}-{c[4]}-{c[5]}-t_{c[6]}")
def test_empty_dimensions(case, reduction):
    lead, d, h, o, b1, b2, target = case

    def check():
        p = make_problem(lead, d, h, o, b1=b1, b2=b2, target=target, dtype=torch.float64, seed=0)
        leaves = p.leaf_list()
        fused, native = loss_fns(p, reduction)
        for fn, slot in ((fused, 0), (native, 1)):
            for leaf in leaves:
                if leaf is not None:
                    leaf.grad = None
            out = fn()
            out.backward()
            got = (out.detach(), [None if t is None else t.grad for t in leaves])
            if slot == 0:
                first = got
        _equal_nan(first[0], got[0], "loss")
        for name, a, b in zip(LOSS_ARGS, first[1], got[1]):
            assert (a is None) == (b is None), name
            if a is not None:
                _equal_nan(a, b, f"d{name}")
        go = None
        pred = fusedgrad.mlp(*p.mlp_args())
        _equal_nan(pred.detach(), ref_mlp(*p.mlp_args()).detach(), "prediction")
        compare_mlp(p, go, "sigmoid", floor=None)

    run_isolated(check)


# ---------------------------------------------------------------------------
# Saturated sigmoids and non-finite inputs.
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("scale", [30.0, 1000.0])
def test_saturated_sigmoid(scale, dtype):
    """|h| up to ~1000: no overflow to NaN/inf (exp(−h) = inf gives σ = 0), values
    and gradients as native autograd's."""
    p = make_problem((7,), D, H, O, b1="vec", b2="vec", target="grad", dtype=dtype, seed=31)
    with torch.no_grad():
        p.leaves["x"].mul_(scale)
    label = f"{p.label} x*{scale:g}"
    _, grads = compare_loss(p, "mean", factor=None, label=label)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    compare_mlp(p, upstream_grad((7, O), dtype, 31), "sigmoid", label=label, floor=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_input_propagates_like_native(bad):
    p = make_problem((4,), D, H, O, b1="vec", b2="vec", target="grad", dtype=torch.float64, seed=32)
    with torch.no_grad():
        p.leaves["x"][0, 0] = bad
    fused, native = loss_fns(p)
    f_val, f_grads = grads_of(fused, p.leaf_list())
    n_val, n_grads = grads_of(native, p.leaf_list())
    _equal_nan(f_val, n_val, "loss")
    for name, a, b in zip(LOSS_ARGS, f_grads, n_grads):
        _equal_nan(a, b, f"d{name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_shared_bias_with_retained_graph(dtype):
    """b1 is b2 (the seeds' "V = U + B"), backward three times through a retained
    graph: the two uses' gradients add up, and every pass adds the same amount."""
    gen = torch.Generator().manual_seed(23)
    x = torch.randn(5, 4, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    w1 = (torch.randn(4, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    b = (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.5).to(dtype).requires_grad_()
    eye = torch.eye(4, dtype=dtype)
    expected = [g.detach() for g in torch.autograd.grad(ref_mlp_loss(x, w1, b, eye, b, reduction="sum"), [x, w1, b])]
    loss = fusedgrad.mlp_loss(x, w1, b, eye, b, reduction="sum")
    for k in (1, 2, 3):
        loss.backward(retain_graph=k < 3)
        for name, t, e in zip(["x", "w1", "b"], [x, w1, b], expected):
            assert_close_rel(t.grad, k * e, RTOL[dtype], f"d{name} after {k} backward passes")
