"""Tall data through the one-hidden-layer ops: the any-depth engine at L = 2 (csrc/ops/engine_path.cpp,
csrc/engine/) streams the rows through cache-sized blocks, nothing of size N kept but the outputs asked for.

The engine takes every problem of this file whose operands it reads directly — a second layer, biases absent or
one value per column, a target absent or of the prediction's full shape; the others (a full-shape bias, an
(O,) target, an "Other" broadcast such as an (N, 1) column, no second layer) are the GEMM path's and are
checked here all the same. assert_path checks each through the dispatch's own test
(fusedgrad._C.explain_op). Rows go in blocks of block_rows(...) rows (the engine's own figure,
fusedgrad._C.explain_engine) and the blocks in at most 16 fixed chunks; N is chosen around both boundaries.

Everything is compared with native autograd (tests/reference.py) on the same
leaves: float64 to 1e-12 relative (sums in another order only), float32
against a float64 truth, no worse than native float32 itself.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedgrad
from reference import LOSS_ARGS, assert_close_rel, ref_mlp, ref_mlp_loss

RTOL64 = 1e-12


def block_rows(D, H, O, N=None, dtype=torch.float64):
    """Rows per block of the engine for this network (fixed by the shape, whatever the rows)."""
    return fusedgrad._C.explain_engine([D, H, O or H], N or 1, dtype.itemsize)["block_rows"]


NARROW = (1, 20, 1)
MEDIUM = (8, 32, 4)
WIDER = (16, 64, 4)
CHUNKS = 16


def make(N, D, H, O, *, b1="vec", b2="vec", target="full", dtype=torch.float64, seed=0, scale=1.0):
    """Leaves (all requiring grad) of one problem; b1/b2/target kinds:
    none, vec (H,), row (1, H), full (N, H), percol_target (O,), col (N, 1) ("Other")."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * s).to(dtype).requires_grad_()

    def operand(kind, cols):
        return {"none": None, "vec": lambda: rnd(cols, s=0.5), "row": lambda: rnd(1, cols, s=0.5),
                "full": lambda: rnd(N, cols, s=0.5), "col": lambda: rnd(N, 1, s=0.5)}[kind]

    x = rnd(N, D, s=scale)
    w1 = rnd(H, D, s=D ** -0.5)
    b1_ = operand(b1, H)
    b1_ = b1_() if b1_ else None
    w2 = rnd(O, H, s=H ** -0.5) if O is not None else None
    out = O if O is not None else H
    b2_ = operand(b2, out) if O is not None else None
    b2_ = b2_() if b2_ else None
    t_ = operand(target, out)
    t_ = t_() if t_ else None
    return [x, w1, b1_, w2, b2_, t_]


def native_loss_grads(args, wrt, reduction="mean", activation="sigmoid"):
    loss = ref_mlp_loss(*args, reduction=reduction, activation=activation)
    leaves = [a for a, w in zip(args, wrt) if w]
    grads = torch.autograd.grad(loss, leaves) if leaves else []
    it = iter(grads)
    return loss.detach(), [next(it) if w else None for w in wrt]


def expected_path(args):
    """"engine" where the engine reads every operand directly (a second layer; biases None, (cols,) or
    (1, cols); a target None or of the prediction's shape), else "gemm"."""
    x, w1, b1, w2, b2, t = args
    out = w2.shape[0] if w2 is not None else w1.shape[0]

    def per_column(a, cols):
        return a is None or (a.numel() == cols and a.shape[-1] == cols)

    full_target = t is None or tuple(t.shape) == tuple(x.shape[:-1]) + (out,)
    engine = w2 is not None and per_column(b1, w1.shape[0]) and per_column(b2, out) and full_target
    return "engine" if engine else "gemm"


def assert_path(args, want="engine", loss=True, activation="sigmoid", label=""):
    """The path the loss op (loss=True; args: the six loss arguments) or the prediction op (loss=False;
    the first five) takes, by the dispatch's own test (fusedgrad._C.explain_op)."""
    args = [a.detach() if a is not None else None for a in args]
    target = args[5] if loss else None
    got = fusedgrad._C.explain_op(loss, *args[:5], target, activation)
    assert got == want, f"{label}: the {'loss' if loss else 'prediction'} op takes {got!r}, the test means {want!r}"


def check_loss(args, wrt=None, reduction="mean", activation="sigmoid", rtol=RTOL64, label="", path=None):
    assert_path(args, path or expected_path(args), activation=activation, label=label)
    if wrt is None:
        wrt = [a is not None for a in args]
    names = [n for n, w in zip(LOSS_ARGS, wrt) if w]
    loss, grads = fusedgrad.mlp_loss_and_grads(*args, reduction=reduction, activation=activation, wrt=names)
    ref_loss, ref_grads = native_loss_grads(args, wrt, reduction, activation)
    assert_close_rel(loss, ref_loss, rtol, f"{label} loss")
    for name, g, r, w in zip(LOSS_ARGS, grads, ref_grads, wrt):
        if w:
            assert g is not None, f"{label} d{name} missing"
            assert_close_rel(g, r, rtol, f"{label} d{name}")
        else:
            assert g is None


def boundary_sizes(D, H, O):
    """N around the block and chunk boundaries, for the block of small N and of large N."""
    sizes = {1, 2, 7919}
    for B in {block_rows(D, H, O, 1), block_rows(D, H, O)}:
        sizes |= {B - 1, B, B + 1, 2 * B + 1, CHUNKS * B - 1, CHUNKS * B, CHUNKS * B + 1, (2 * CHUNKS + 1) * B + 7}
    return sorted(sizes)


@pytest.mark.parametrize("shape", [NARROW, MEDIUM, (3, 7, 2)], ids=lambda s: "x".join(map(str, s)))
def test_block_and_chunk_boundaries(shape):
    for N in boundary_sizes(*shape):
        check_loss(make(N, *shape, seed=N), label=f"N={N} {shape}")


def test_wider_shape_across_blocks_and_chunks():
    B = block_rows(*WIDER)
    for N in (B * CHUNKS - 1, B * CHUNKS + 1, 8 * B * CHUNKS + 1, 32768):
        check_loss(make(N, *WIDER, seed=N), label=f"N={N} {WIDER}")
    check_loss(make(4099, *WIDER, b1="full", seed=3), label="a full-shape b1: the GEMM path")


@pytest.mark.parametrize("b1", ["none", "vec", "row", "full", "col"])
@pytest.mark.parametrize("b2", ["none", "vec", "row", "full", "col"])
@pytest.mark.parametrize("target", ["none", "vec", "full", "col"])
def test_bias_and_target_kinds(b1, b2, target):
    # "col" ((N, 1) against (N, H)) is an "Other" broadcast: the GEMM path, checked all the same.
    N = block_rows(*MEDIUM) + 3
    args = make(N, *MEDIUM, b1=b1, b2=b2, target=target, seed=1)
    check_loss(args, label=f"b1={b1} b2={b2} t={target}")


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_second_layer_activation_reduction(activation, reduction):
    for b1 in ("none", "vec", "full"):
        args = make(2 * block_rows(4, 12, 12) + 5, 4, 12, None, b1=b1, target="full", seed=2)
        check_loss(args, reduction=reduction, activation=activation, label=f"w2=None {activation} b1={b1}")
    args = make(3001, *NARROW, target="full", seed=3)
    check_loss(args, reduction=reduction, activation=activation, label=f"{activation} {reduction}")


@settings(max_examples=40)
@given(
    mask=st.lists(st.booleans(), min_size=6, max_size=6),
    kinds=st.tuples(st.sampled_from(["none", "vec", "full"]), st.sampled_from(["none", "vec", "full"]),
                    st.sampled_from(["none", "vec", "full"])),
    n_extra=st.integers(min_value=-2, max_value=2),
    shape=st.sampled_from([NARROW, MEDIUM, (5, 9, 3), (2, 100, 1)]),
    activation=st.sampled_from(fusedgrad.ACTIVATIONS),
)
def test_requested_gradient_subsets(mask, kinds, n_extra, shape, activation):
    N = max(1, block_rows(*shape) + n_extra)
    b1, b2, target = kinds
    args = make(N, *shape, b1=b1, b2=b2, target=target, seed=N)
    wrt = [m and a is not None for m, a in zip(mask, args)]
    check_loss(args, wrt=wrt, activation=activation, label=f"mask={mask} kinds={kinds} N={N}")


def test_every_gradient_subset_exhaustively():
    """All 64 subsets, full-shape operands (each gradient has its own output)."""
    args = make(block_rows(*MEDIUM) * 2 - 1, *MEDIUM, b1="full", b2="full", target="full", seed=4)
    for mask in itertools.product([False, True], repeat=6):
        check_loss(args, wrt=list(mask), label=f"mask={mask}")


def test_loss_only_and_autograd_route():
    args = make(5003, *NARROW, seed=5)
    assert_path(args)
    with torch.no_grad():
        loss = fusedgrad.mlp_loss(*args)
    assert_close_rel(loss, ref_mlp_loss(*args).detach(), RTOL64, "no_grad loss")
    # loss.backward() fills .grad exactly as native autograd does
    loss = fusedgrad.mlp_loss(*args)
    loss.backward()
    fused = [a.grad.clone() for a in args]
    for a in args:
        a.grad = None
    ref_mlp_loss(*args).backward()
    for name, f, a in zip(LOSS_ARGS, fused, args):
        assert_close_rel(f, a.grad, RTOL64, f"backward d{name}")


@pytest.mark.parametrize("activation", fusedgrad.ACTIVATIONS)
def test_mlp_op_every_activation(activation):
    """The prediction op's forward saves what act' reads (s, or h), with and without w2 (the GEMM path)."""
    for shape in (NARROW, (3, 10, None)):
        args = make(block_rows(3, 10, 1) + 3, *shape, b1="vec", b2="vec" if shape[2] else "none", target="none",
                    seed=8)[:5]
        assert_path(args, expected_path(args + [None]), loss=False, activation=activation, label=f"{activation} {shape}")
        present = [a for a in args if a is not None]
        pred = fusedgrad.mlp(*args, activation=activation)
        ref = ref_mlp(*args, activation=activation)
        assert_close_rel(pred, ref, RTOL64, f"pred {activation} {shape}")
        go = torch.randn(pred.shape, dtype=pred.dtype, generator=torch.Generator().manual_seed(9))
        for k, (g, w) in enumerate(zip(torch.autograd.grad(pred, present, go), torch.autograd.grad(ref, present, go))):
            assert_close_rel(g, w, RTOL64, f"mlp grad #{k} {activation} {shape}")


@pytest.mark.parametrize("b2", ["none", "vec", "full"])
@pytest.mark.parametrize("b1", ["none", "vec", "full"])
def test_mlp_op_forward_backward(b1, b2):
    """The prediction op on the engine too: forward (prediction and saved s) and backward (a full-shape bias:
    the GEMM path)."""
    for shape in (NARROW, MEDIUM):
        for N in (1, block_rows(*shape) + 1, 4099):
            args = make(N, *shape, b1=b1, b2=b2, target="none", seed=N)[:5]
            assert_path(args, expected_path(args + [None]), loss=False, label=f"{shape} N={N}")
            present = [a for a in args if a is not None]
            pred = fusedgrad.mlp(*args)
            ref = ref_mlp(*args)
            assert_close_rel(pred, ref, RTOL64, f"pred {shape} N={N}")
            go = torch.randn(pred.shape, dtype=pred.dtype, generator=torch.Generator().manual_seed(N))
            got = torch.autograd.grad(pred, present, go)
            want = torch.autograd.grad(ref, present, go)
            for k, (g, w) in enumerate(zip(got, want)):
                assert_close_rel(g, w, RTOL64, f"mlp grad #{k} {shape} N={N} b1={b1} b2={b2}")


def test_mlp_op_no_second_layer_and_strided_grad_out():
    args = make(1500, 3, 10, None, b1="vec", target="none", seed=6)[:5]
    assert_path(args, "gemm", loss=False)
    present = [a for a in args if a is not None]
    pred = fusedgrad.mlp(*args)
    ref = ref_mlp(*args)
    assert_close_rel(pred, ref, RTOL64, "pred w2=None")
    go = torch.randn(10, 1500, dtype=torch.float64).t()  # a transposed (strided) upstream gradient
    for g, w in zip(torch.autograd.grad(pred, present, go), torch.autograd.grad(ref, present, go)):
        assert_close_rel(g, w, RTOL64, "w2=None grads")
    # a sum's upstream gradient is an expanded (stride-0) tensor
    args = make(2000, *NARROW, target="none", seed=7)[:5]
    assert_path(args, loss=False)
    present = [a for a in args if a is not None]
    got = torch.autograd.grad(fusedgrad.mlp(*args).sum(), present)
    want = torch.autograd.grad(ref_mlp(*args).sum(), present)
    for g, w in zip(got, want):
        assert_close_rel(g, w, RTOL64, "sum() grads")


def test_saturated_and_nonfinite_inputs():
    """The kernel's own exp: saturation gives σ = 0 or 1 (never NaN), NaN stays NaN."""
    for dtype in (torch.float32, torch.float64):
        args = make(3000, *NARROW, dtype=dtype, seed=8, scale=200.0)
        assert_path(args)
        fused = fusedgrad.mlp_loss_and_grads(*args, wrt=LOSS_ARGS)
        ref_loss, ref_grads = native_loss_grads(args, [True] * 6)
        assert torch.isfinite(fused[0])
        rtol = RTOL64 if dtype == torch.float64 else 1e-5
        assert_close_rel(fused[0], ref_loss, rtol, f"saturated loss {dtype}")
        for name, g, r in zip(LOSS_ARGS, fused[1], ref_grads):
            assert torch.isfinite(g).all(), name
            assert_close_rel(g, r, rtol, f"saturated d{name} {dtype}")
    args = make(3000, *NARROW, seed=9)
    with torch.no_grad():
        args[0][17, 0] = float("nan")
    loss, grads = fusedgrad.mlp_loss_and_grads(*args, wrt=LOSS_ARGS)
    assert torch.isnan(loss)
    assert torch.isnan(grads[0][17]).all() and torch.isfinite(grads[0][:17]).all()


def _float32_errors(shape, N, seed):
    """Max relative error of the float32 loss and gradients, fused and native, against float64."""
    args64 = make(N, *shape, seed=seed)
    args32 = [a.detach().float().requires_grad_() for a in args64]
    assert_path(args32)
    _, truth = native_loss_grads(args64, [True] * 6)
    truth = [native_loss_grads(args64, [True] * 6)[0]] + truth
    fused = fusedgrad.mlp_loss_and_grads(*args32, wrt=LOSS_ARGS)
    fused = [fused[0]] + list(fused[1])
    nat = native_loss_grads(args32, [True] * 6)
    nat = [nat[0]] + nat[1]

    def rel(a, t):
        return ((a.double() - t).abs().max() / t.abs().max()).item()

    return [(rel(f, t), rel(n, t)) for f, n, t in zip(fused, nat, truth)]


def test_float32_row_sums_at_a_million_rows():
    """dw1, db1, dw2, db2 and the loss are sums over 10⁶ rows: accumulated per block
    in float32 and across blocks in double, they are no less accurate than native's
    (whose GEMM sums over N in float32)."""
    names = ("loss",) + tuple("d" + n for n in LOSS_ARGS)
    sums = {"loss", "dw1", "db1", "dw2", "db2"}
    for name, (fused, native) in zip(names, _float32_errors(NARROW, 10 ** 6, seed=10)):
        if name in sums:  # measured: fused 2e-8..6e-7, native 3e-8..8e-6
            assert fused <= native + 1e-8, f"{name}: fused float32 error {fused:.2e} > native's {native:.2e}"
        else:  # per-row outputs (dx, dtarget): a few ulp each, as native's
            assert fused <= 4 * native + 1e-7, f"{name}: fused float32 error {fused:.2e} vs native's {native:.2e}"


def test_deterministic_across_thread_counts():
    saved = torch.get_num_threads()
    try:
        results = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = []
            for dtype in (torch.float32, torch.float64):
                for shape in (NARROW, WIDER):
                    N = max(CHUNKS * block_rows(*shape) * 3 + 11, 40_000)  # several blocks per chunk
                    args = make(N, *shape, b1="vec", dtype=dtype, seed=11)
                    assert_path(args, label=f"{shape} N={N}")
                    assert_path(args, loss=False, label=f"{shape} N={N}")
                    loss, grads = fusedgrad.mlp_loss_and_grads(*args, wrt=LOSS_ARGS)
                    out.append([loss] + list(grads))
                    pred = fusedgrad.mlp(*args[:5])
                    present = [a for a in args[:5] if a is not None]
                    out.append([pred.detach()] + list(torch.autograd.grad(pred, present, torch.ones_like(pred))))
            results[threads] = out
        for a_list, b_list in zip(results[1], results[2]):
            for a, b in zip(a_list, b_list):
                assert torch.equal(a, b), "results differ between 1 and 2 threads"
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("target", ["full", "vec"])
def test_empty_batch(target):
    """N = 0: the mean is NaN (as nn.MSELoss), the sums zero, every gradient of the right shape."""
    args = make(0, *NARROW, b1="vec", b2="vec", target=target)
    assert_path(args, expected_path(args))
    loss, grads = fusedgrad.mlp_loss_and_grads(*args, wrt=LOSS_ARGS, reduction="sum")
    ref_loss, ref_grads = native_loss_grads(args, [True] * 6, reduction="sum")
    assert loss.item() == 0.0
    for name, g, r in zip(LOSS_ARGS, grads, ref_grads):
        assert g.shape == r.shape and torch.equal(g, r), name
    assert torch.isnan(fusedgrad.mlp_loss(*args))
