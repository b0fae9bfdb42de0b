"""Reusable problem builders for the fusedgrad tests.

A *problem* is a set of leaf tensors (what requires grad and receives ``.grad``)
plus a function that turns them into the arguments of ``fusedgrad.mlp_loss`` /
``fusedgrad.mlp``: possibly non-contiguous slices, transposed views or
stride-0 expansions of the leaves. The fused op and the native reference
(tests/reference.py) are both called on freshly made views of the *same*
leaves, so every gradient is compared on the leaves, exactly as a user sees it.

Values are drawn in float64 from a seeded generator and then cast, so the
float32 and float64 versions of a problem hold the same numbers. Scales keep
h = x w1ᵀ + b1 around N(0, 1): the sigmoid is not saturated and every gradient
is large compared with the tolerance (see ``assert_nontrivial``).
"""
import math
from dataclasses import dataclass, field

import torch

import fusedgrad
from reference import LOSS_ARGS, assert_close_rel, grads_of, ref_mlp, ref_mlp_loss

DTYPES = (torch.float32, torch.float64)

# Relative tolerances of a whole tensor (max |a − e| ≤ rtol · max |e|, see
# reference.assert_close_rel). float64: both sides are within a few ulps of the
# exact value, 1e-10 leaves room for accumulation-order differences only.
# float32: see check_close (anchored on the float64 truth where needed). Fused
# (direct loops, or GEMMs with another association; loss accumulated in double)
# and native float32 each carry errors of order k·eps32 (eps32 ≈ 6e-8, k the
# length of the longest sum: ≤ ~40 in the cross product, a few thousand in the
# large and property tests; the worst case is rarely reached). Measured over the
# ~33k float32 comparisons of test_against_autograd + test_properties: 99.6 % are
# below 5e-7; the 20 above 2e-6 are gradients of biases broadcast over many
# entries (one sum of up to N·H terms of mixed sign: ill-conditioned), sums over
# thousands of rows, and the deliberately saturated sigmoids (x·1000).
# 1e-5 (~170 eps32) is tight without flaking; the worst ratio observed in a run
# is reported at its end.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

BIAS_KINDS = ("none", "vec", "row", "full", "col")
LAYOUTS = ("contig", "noncontig", "wT", "expanded")
TARGET_KINDS = ("none", "full", "grad")

# Leading dims of x for each input rank (N = their product).
LEADS = {1: (), 2: (7,), 3: (2, 3)}

# Worst relative error seen per dtype, filled by compare_* and reported by
# conftest.pytest_terminal_summary.
WORST = {torch.float32: (0.0, ""), torch.float64: (0.0, "")}


def record(dtype, rel, label):
    if rel > WORST[dtype][0]:
        WORST[dtype] = (rel, label)


def bias_shape(kind, lead, cols):
    """Shape of a bias / target of the given kind against a (*lead, cols) result."""
    if kind == "none":
        return None
    if kind == "vec":
        return (cols,)
    if kind == "full":
        return tuple(lead) + (cols,)
    if kind == "row":  # (1, cols), (1, 1, cols), ...; for a 1-D x a 0-dim scalar
        return (1,) * len(lead) + (cols,) if lead else ()
    if kind == "col":  # (N, 1), (B, T, 1); for a 1-D x (1,)
        return tuple(lead) + (1,)
    raise ValueError(kind)


@dataclass
class Problem:
    """Leaves and the recipe that turns them into arguments."""

    leaves: dict            # name -> leaf tensor (or absent)
    makers: dict            # name -> function(leaf) -> argument tensor
    dtype: torch.dtype
    label: str = ""
    meta: dict = field(default_factory=dict)

    def arg(self, name):
        leaf = self.leaves.get(name)
        return None if leaf is None else self.makers[name](leaf)

    def loss_args(self):
        return [self.arg(n) for n in LOSS_ARGS]

    def mlp_args(self):
        return [self.arg(n) for n in LOSS_ARGS[:5]]

    def leaf_list(self, names=LOSS_ARGS):
        return [self.leaves.get(n) for n in names]

    def twin(self, dtype):
        """The same problem (same values, views, requires_grad) in another dtype."""
        leaves = {n: t.detach().to(dtype).requires_grad_(t.requires_grad) for n, t in self.leaves.items()}
        return Problem(leaves, self.makers, dtype, self.label, self.meta)


def _identity(t):
    return t


def _make_leaf(gen, shape, scale, dtype):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _operand(gen, shape, scale, dtype, layout):
    """(leaf, maker) for a bias/target of `shape` in the given layout."""
    shape = tuple(shape)
    if layout == "noncontig" and len(shape) >= 2 and shape[-1] > 1 and shape[-2] > 1:
        # transposed storage: the argument is a transposed view of the leaf
        swapped = shape[:-2] + (shape[-1], shape[-2])
        return _make_leaf(gen, swapped, scale, dtype), lambda t: t.transpose(-1, -2)
    if layout == "noncontig" and len(shape) >= 1:
        # every other element of a leaf twice as long in the last dim
        wide = shape[:-1] + (2 * shape[-1],)
        return _make_leaf(gen, wide, scale, dtype), lambda t: t[..., ::2]
    if layout == "expanded" and len(shape) >= 1 and any(s > 1 for s in shape):
        # stride-0 broadcast: (N, H) from a (1, H) leaf (rows of stride 0), or where
        # the leading dims are already 1, (H,) / (1, H) from (1,) / (1, 1) (stride-0 columns)
        base = (1,) * (len(shape) - 1) + shape[-1:]
        if base == shape:
            base = (1,) * len(shape)
        return _make_leaf(gen, base, scale, dtype), lambda t: t.expand(shape)
    return _make_leaf(gen, shape, scale, dtype), _identity


def _weight(gen, rows, cols, dtype, layout):
    scale = 1.0 / math.sqrt(max(cols, 1))
    if layout == "wT":  # (rows, cols) argument = transposed view of a (cols, rows) leaf
        return _make_leaf(gen, (cols, rows), scale, dtype), lambda t: t.t()
    if layout == "noncontig":
        return _make_leaf(gen, (rows, 2 * cols), scale, dtype), lambda t: t[:, ::2]
    return _make_leaf(gen, (rows, cols), scale, dtype), _identity


def _input(gen, lead, D, dtype, layout):
    shape = tuple(lead) + (D,)
    if layout == "noncontig":
        if len(lead) == 2:  # (B, T, D) as a permuted view of a (B, D, T) leaf
            B, T = lead
            return _make_leaf(gen, (B, D, T), 1.0, dtype), lambda t: t.transpose(1, 2)
        wide = tuple(lead) + (2 * D,)  # x[:, ::2] / x[::2]
        return _make_leaf(gen, wide, 1.0, dtype), lambda t: t[..., ::2]
    return _make_leaf(gen, shape, 1.0, dtype), _identity


def make_problem(lead=(7,), D=5, H=6, O=3, *, b1="vec", b2="vec", target="none", layout="contig",
                 dtype=torch.float64, seed=0, requires_grad=None, b1_shape=None, b2_shape=None,
                 target_shape=None):
    """Builds a Problem.

    lead: leading dims of x ((), (N,), (B, T), ...); D, H: widths; O: output
    width, or None for no second layer (then b2 must be "none" and O = H).
    b1 / b2: a BIAS_KINDS name; b1_shape / b2_shape override it with an
    explicit shape. target: "none", "full" (given, no grad) or "grad" (given,
    requires grad), or target_shape for an explicit shape. layout: one of
    LAYOUTS. requires_grad: names of the leaves that require grad (default:
    every present argument except a "full" target).
    """
    gen = torch.Generator().manual_seed(seed)
    has_w2 = O is not None
    if not has_w2:
        assert b2 == "none" and b2_shape is None, "b2 needs w2"
    out = O if has_w2 else H
    leaves, makers = {}, {}

    leaves["x"], makers["x"] = _input(gen, lead, D, dtype, layout)
    leaves["w1"], makers["w1"] = _weight(gen, H, D, dtype, layout)
    shape = b1_shape if b1_shape is not None else bias_shape(b1, lead, H)
    if shape is not None:
        leaves["b1"], makers["b1"] = _operand(gen, shape, 0.5, dtype, layout)
    if has_w2:
        leaves["w2"], makers["w2"] = _weight(gen, O, H, dtype, layout)
        shape = b2_shape if b2_shape is not None else bias_shape(b2, lead, O)
        if shape is not None:
            leaves["b2"], makers["b2"] = _operand(gen, shape, 0.5, dtype, layout)
    if target_shape is not None:
        shape = target_shape
    else:
        shape = None if target == "none" else tuple(lead) + (out,)
    if shape is not None:
        leaves["target"], makers["target"] = _operand(gen, shape, 1.0, dtype, layout)

    if requires_grad is None:
        requires_grad = {n for n in leaves if not (n == "target" and target == "full")}
    for name, leaf in leaves.items():
        leaf.requires_grad_(name in requires_grad)
    def _name(shape, kind):
        return kind if shape is None else shape
    label = (f"lead={tuple(lead)} D={D} H={H} O={O} b1={_name(b1_shape, b1)} b2={_name(b2_shape, b2)} "
             f"target={_name(target_shape, target)} layout={layout} {str(dtype)[6:]} rg={sorted(requires_grad)}")
    return Problem(leaves, makers, dtype, label, {"lead": tuple(lead), "D": D, "H": H, "O": out})


def assert_nontrivial(grad, name, label, floor=1e-4):
    """A gradient that is ~0 everywhere (a saturated sigmoid, a dead problem) would make
    a relative comparison vacuous. ``floor`` is 1e-4 times the size the gradient has
    for an unsaturated problem of this scale (see compare_loss)."""
    scale = grad.abs().max().item() if grad.numel() else 0.0
    assert scale > floor, f"{label}: d{name} is trivial (max |grad| = {scale:.2e}); problem too saturated"


def check_close(actual, native, truth, dtype, what):
    """One tensor of fusedgrad against native autograd.

    float64: max |fused − native| ≤ 1e-10 · max |native|.
    float32: max |fused − native| ≤ 1e-5 · max |native|; where that fails and
    ``truth`` (a thunk giving the float64 answer: native autograd on a float64
    twin of the problem) is available, fused float32 passes if it is within
    1e-5 of the truth or, where the problem itself is ill-conditioned in float32
    (a bias gradient that sums many terms to a small number), no worse than 8×
    native float32's own error: max |fused − truth| ≤ max(1e-5 · max |truth|,
    8 · max |native32 − truth|). Two float32 summations in different orders have
    rounding errors of the same size but random ratio (observed up to ~3.3), hence 8.
    Returns the relative error that is recorded for the report.
    """
    rtol = RTOL[dtype]
    if dtype == torch.float64 or truth is None:
        rel = assert_close_rel(actual, native, rtol, what)
        record(dtype, rel, what)
        return rel
    assert actual.shape == native.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(native.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    if native.numel() == 0:
        return 0.0
    scale = native.abs().max().item()
    err = (actual - native).abs().max().item()
    if err <= rtol * scale:
        rel = err / scale if scale else 0.0
        record(dtype, rel, what)
        return rel
    exact = truth()
    scale = exact.abs().max().item()
    err_f = (actual.double() - exact).abs().max().item()
    err_n = (native.double() - exact).abs().max().item()
    bound = max(rtol * scale, 8 * err_n)
    assert err_f <= bound, (
        f"{what}: float32 max abs err vs float64 truth {err_f:.3e} > bound {bound:.3e} "
        f"(1e-5 × scale {scale:.3e}; native float32's own error {err_n:.3e}; fused vs native {err:.3e})")
    rel = err_f / scale if scale else 0.0
    record(dtype, rel, what)
    if err_f > rtol * scale:
        ILL_CONDITIONED.append((rel, err_n / scale, what))
    return rel


# float32 comparisons that passed only through the "no worse than native" clause.
ILL_CONDITIONED = []


class _Lazy:
    """Computes (value, grads) of the float64 twin once, on first use."""

    def __init__(self, compute):
        self._compute, self._result = compute, None

    def get(self):
        if self._result is None:
            self._result = self._compute()
        return self._result


def _check_grads(label, names, leaves, f_grads, n_grads, lazy_truth, dtype, floor):
    for k, (name, leaf, fg, ng) in enumerate(zip(names, leaves, f_grads, n_grads)):
        if leaf is None:
            continue
        assert (fg is None) == (ng is None), (
            f"{label}: d{name} is {'None' if fg is None else 'set'} with fusedgrad but "
            f"{'None' if ng is None else 'set'} natively")
        if ng is None:
            continue
        if floor is not None:
            assert_nontrivial(ng, name, label, floor)
        truth = None if lazy_truth is None else (lambda k=k: lazy_truth.get()[1][k])
        check_close(fg, ng, truth, dtype, f"{label}: d{name}")


def compare(fused_fn, native_fn, leaves, names, dtype, label, *, truth=None, floor=1e-4):
    """Runs both scalar functions through backward on the same leaves and compares
    the value and every leaf gradient (None where native gives None). ``truth`` =
    (fn, leaves) of a float64 twin, used for float32 (see check_close). Every
    gradient must exceed ``floor`` somewhere (None: not checked)."""
    f_val, f_grads = grads_of(fused_fn, leaves)
    n_val, n_grads = grads_of(native_fn, leaves)
    lazy = None
    if truth is not None and dtype == torch.float32:
        lazy = _Lazy(lambda: grads_of(*truth))
    check_close(f_val, n_val, None if lazy is None else (lambda: lazy.get()[0]), dtype, f"{label}: value")
    _check_grads(label, names, leaves, f_grads, n_grads, lazy, dtype, floor)
    return f_val, f_grads


def loss_fns(p, reduction="mean", activation="sigmoid", scale=None):
    """(fused, native) scalar functions of the problem's mlp_loss."""
    def fused():
        loss = fusedgrad.mlp_loss(*p.loss_args(), reduction=reduction, activation=activation)
        return loss if scale is None else scale(loss)

    def native():
        loss = ref_mlp_loss(*p.loss_args(), reduction=reduction, activation=activation)
        return loss if scale is None else scale(loss)

    return fused, native


def compare_loss(p, reduction="mean", activation="sigmoid", *, scale=None, label=None,
                 factor=1.0, fused_check=None):
    """fusedgrad.mlp_loss (optionally scale(loss)) vs native autograd on problem p.
    factor: the size of d scale(loss) / d loss, for the non-triviality floor (None:
    no floor). fused_check(loss) may assert extra properties of the fused loss tensor."""
    label = label or f"{p.label} {reduction} {activation}"
    fused, native = loss_fns(p, reduction, activation, scale)
    if fused_check is not None:
        plain = fused

        def fused():
            out = plain()
            fused_check(out)
            return out
    truth = None
    if p.dtype == torch.float32:
        twin = p.twin(torch.float64)  # cheap: the float64 answer is only computed if needed
        truth = (loss_fns(twin, reduction, activation, scale)[1], twin.leaf_list())
    floor = None
    if factor is not None:
        numel = math.prod(p.meta["lead"]) * p.meta["O"]
        floor = 1e-4 * abs(factor) * (1.0 if reduction == "sum" else 1.0 / numel)
    return compare(fused, native, p.leaf_list(), LOSS_ARGS, p.dtype, label, truth=truth, floor=floor)


def mlp_grads(fn, p, go, activation="sigmoid"):
    """pred = fn(*args); pred.backward(go) — or pred.sum().backward() when go is None,
    which hands the prediction's backward an expanded (stride-0) tensor of ones.
    Returns (pred, [leaf grads]) and leaves .grad clean."""
    leaves = p.leaf_list(LOSS_ARGS[:5])
    for t in leaves:
        if t is not None:
            t.grad = None
    pred = fn(*p.mlp_args(), activation=activation)
    if go is None:
        pred.sum().backward()
    else:
        pred.backward(go)
    grads = [None if t is None or t.grad is None else t.grad.clone() for t in leaves]
    for t in leaves:
        if t is not None:
            t.grad = None
    return pred.detach(), grads


def compare_mlp(p, go, activation, label=None, floor=1e-4):
    """fusedgrad.mlp vs the native prediction: the prediction and every leaf gradient
    after pred.backward(go) (pred.sum().backward() when go is None)."""
    label = label or f"{p.label} {activation}"
    f_pred, f_grads = mlp_grads(fusedgrad.mlp, p, go, activation)
    n_pred, n_grads = mlp_grads(ref_mlp, p, go, activation)
    lazy = None
    if p.dtype == torch.float32:
        lazy = _Lazy(lambda: mlp_grads(ref_mlp, p.twin(torch.float64), None if go is None else go.double(),
                                       activation))
    check_close(f_pred, n_pred, None if lazy is None else (lambda: lazy.get()[0]), p.dtype,
                f"{label}: prediction")
    _check_grads(label, LOSS_ARGS[:5], p.leaf_list(LOSS_ARGS[:5]), f_grads, n_grads, lazy, p.dtype, floor)


def upstream_grad(shape, dtype, seed, style="contig"):
    gen = torch.Generator().manual_seed(10_000 + seed)
    shape = tuple(shape)
    if style == "transposed" and len(shape) >= 2:
        g = torch.randn(shape[:-2] + (shape[-1], shape[-2]), generator=gen, dtype=torch.float64)
        return g.to(dtype).transpose(-1, -2)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def run_isolated(fn, timeout=60):
    """Runs fn() in a forked child so that a crash (segfault, abort) of the extension
    is reported as a test failure instead of killing the whole pytest process.
    An exception in fn fails the test with its message."""
    import os
    import select
    import signal
    import traceback

    import gc

    read_fd, write_fd = os.pipe()
    gc.freeze()  # the child's GC must not walk (and so copy) the parent's whole heap
    pid = os.fork()
    if pid == 0:  # child
        import faulthandler
        gc.disable()
        faulthandler.disable()  # the parent reports the signal; no traceback dump from the child
        os.close(read_fd)
        code = 0
        try:
            fn()
        except BaseException:  # noqa: BLE001
            os.write(write_fd, traceback.format_exc().encode()[-4000:])
            code = 1
        os.close(write_fd)
        os._exit(code)
    gc.unfreeze()
    os.close(write_fd)
    chunks = []
    ready, _, _ = select.select([read_fd], [], [], timeout)
    if ready:
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    message = b"".join(chunks).decode(errors="replace")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        raise AssertionError(f"the call crashed the process with signal {sig} ({signal.Signals(sig).name})"
                             + ("" if ready else " after a timeout"))
    assert os.WEXITSTATUS(status) == 0, message
