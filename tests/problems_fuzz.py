"""Random fusedgrad problems for the property tests (tests/test_fuzz.py).

Hypothesis draws the *structure* of a problem — shapes, bias kinds, layouts,
which inputs require grad, the options — and a seed; the values come from a
``torch.Generator`` with that seed. Every tensor argument is a view of a leaf
"base" tensor (the base itself for a contiguous layout; a transpose, permute,
step-2 slice, storage offset or stride-0 expansion of it otherwise), so
gradients are compared on the bases and strided / expanded arguments are also
non-leaf inputs. The reference is native autograd (tests/reference.py).
"""
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import fusedgrad
from reference import ref_mlp, ref_mlp_loss

ARGS = ("x", "w1", "b1", "w2", "b2", "target")
LAYOUTS = ("contig", "transposed", "permuted", "strided", "offset", "expanded")

# Bias / target kinds, against a full shape lead + (cols,):
#   none, vec (cols,), row (1, cols), lead1 (1, 1, cols), full lead + (cols,),
#   col lead + (1,) (per-sample scalar, e.g. (N, 1)), scalar1 (1,), scalar0 (),
#   partial (a random broadcastable shape: leading dims dropped or set to 1).
OPERAND_KINDS = ("none", "vec", "row", "lead1", "full", "col", "scalar1", "scalar0", "partial")

# Small sizes with 1s and primes dominate; zero shows up now and then.
SMALL_DIMS = (1, 1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 0)
LEAD_DIMS = (1, 2, 3, 5, 7, 11, 13, 0)


@dataclass(frozen=True)
class Spec:
    lead: tuple  # leading dims of x; () means x is 1-D
    D: int
    H: int
    O: int  # == H when has_w2 is False
    has_w2: bool
    kinds: dict = field(hash=False)  # b1 / b2 / target -> (kind, shape or None)
    layouts: dict = field(hash=False)  # argument -> layout
    requires_grad: dict = field(hash=False)  # argument -> bool
    reduction: str = "mean"
    activation: str = "sigmoid"
    upstream: float = None  # None: loss.backward(); else (upstream * loss).backward()
    use_autograd_grad: bool = False  # torch.autograd.grad instead of .backward()
    downstream: str = "weighted"  # how mlp's prediction becomes a scalar
    seed: int = 0

    @property
    def N(self):
        return math.prod(self.lead)

    def shape(self, name):
        if name == "x":
            return self.lead + (self.D,)
        if name == "w1":
            return (self.H, self.D)
        if name == "w2":
            return (self.O, self.H) if self.has_w2 else None
        return self.kinds[name][1]

    def present(self, name):
        return self.shape(name) is not None

    def size(self):
        return sum(math.prod(self.shape(a)) for a in ARGS if self.present(a))


def operand_shape(kind, lead, cols, draw_mask):
    """Shape of a bias / target of `kind` against lead + (cols,); None if absent or not expressible."""
    r = len(lead)
    if kind == "none":
        return None
    if kind == "vec":
        return (cols,)
    if kind == "row":
        return (1, cols) if r >= 1 else None
    if kind == "lead1":
        return (1,) * r + (cols,) if r >= 2 else None
    if kind == "full":
        return lead + (cols,)
    if kind == "col":
        return lead + (1,) if r >= 1 else None
    if kind == "scalar1":
        return (1,)
    if kind == "scalar0":
        return ()
    if kind == "partial":
        keep_rank, keep = draw_mask
        full = lead + (cols,)
        dims = full[len(full) - keep_rank:] if keep_rank else ()
        return tuple(d if k else 1 for d, k in zip(dims, keep[len(keep) - len(dims):]))
    raise ValueError(kind)


@st.composite
def problem_specs(draw, allow_zero=True, large_weight=1):
    """A random Spec. `large_weight` / 16 of the problems are large enough for the GEMM path
    and for row-blocked (multi-block, multi-thread) reductions."""
    size_class = draw(st.integers(0, 15))  # shrinks towards 0: small problems
    if size_class >= 16 - large_weight:
        lead = (draw(st.sampled_from((257, 300, 521, 1031))),)
        if draw(st.booleans()):
            lead = (draw(st.sampled_from((2, 3))),) + lead
        D = draw(st.sampled_from((17, 32, 61, 64)))
        H = draw(st.sampled_from((16, 33, 64)))
        O = draw(st.sampled_from((1, 3, 8, 17)))
    else:
        dims = SMALL_DIMS if allow_zero else SMALL_DIMS[:-1]
        lead_dims = LEAD_DIMS if allow_zero else LEAD_DIMS[:-1]
        lead = tuple(draw(st.lists(st.sampled_from(lead_dims), min_size=0, max_size=3)))
        if math.prod(lead) > 400:
            lead = lead[:1]
        D = draw(st.sampled_from(dims))
        H = draw(st.sampled_from(dims))
        O = draw(st.sampled_from(dims))
    has_w2 = draw(st.integers(0, 5)) > 0
    if not has_w2:
        O = H

    kinds = {}
    for name, cols in (("b1", H), ("b2", O), ("target", O)):
        if name == "b2" and not has_w2:
            kinds[name] = ("none", None)
            continue
        while True:
            kind = draw(st.sampled_from(OPERAND_KINDS))
            mask = None
            if kind == "partial":
                keep_rank = draw(st.integers(0, len(lead) + 1))
                keep = tuple(draw(st.lists(st.booleans(), min_size=len(lead) + 1, max_size=len(lead) + 1)))
                mask = (keep_rank, keep)
            shape = operand_shape(kind, lead, cols, mask)
            if shape is not None or kind == "none":
                break
        kinds[name] = (kind, shape)

    layout_st = st.sampled_from(("contig", "contig", "contig") + LAYOUTS[1:])
    layouts = {a: draw(layout_st) for a in ARGS}
    requires_grad = {a: draw(st.booleans()) for a in ARGS}
    if draw(st.integers(0, 3)) == 0:  # the common training case
        requires_grad = {a: a in ("w1", "b1", "w2", "b2") for a in ARGS}
    return Spec(
        lead=lead, D=D, H=H, O=O, has_w2=has_w2, kinds=kinds, layouts=layouts,
        requires_grad=requires_grad,
        reduction=draw(st.sampled_from(("mean", "sum"))),
        activation=draw(st.sampled_from(("sigmoid",) + fusedgrad.ACTIVATIONS)),
        upstream=draw(st.sampled_from((None, None, None, 2.5, -0.75, 0.0))),
        use_autograd_grad=draw(st.booleans()),
        downstream=draw(st.sampled_from(("weighted", "weighted", "sum", "square", "slice"))),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


# --------------------------------------------------------------------------- building tensors

def _view_plan(shape, layout):
    """(base shape, function base -> argument) for one layout."""
    nd = len(shape)
    if layout == "transposed" and nd >= 2:
        return shape[:-2] + (shape[-1], shape[-2]), lambda b: b.transpose(-1, -2)
    if layout == "permuted" and nd >= 2:
        perm = tuple(reversed(range(nd)))  # its own inverse
        return tuple(shape[p] for p in perm), lambda b: b.permute(perm)
    if layout == "strided" and nd >= 1:
        return shape[:-1] + (2 * shape[-1],), lambda b: b[..., ::2]
    if layout == "offset":
        n = math.prod(shape)
        return (n + 3,), lambda b: b[3:].view(shape)
    if layout == "expanded":
        big = [i for i, s in enumerate(shape) if s > 1]
        if big:
            base = tuple(1 if i == big[0] else s for i, s in enumerate(shape))
            return base, lambda b: b.expand(shape)
    return shape, lambda b: b


@dataclass
class Built:
    bases: dict  # argument -> leaf base tensor (or None)
    args: dict  # argument -> the tensor passed (a view of the base)


class Problem:
    """The values of one Spec (float64), instantiated per dtype on demand."""

    def __init__(self, spec):
        self.spec = spec
        gen = torch.Generator().manual_seed(spec.seed)
        self.plans = {}
        self.values = {}
        scale = {"w1": 1 / math.sqrt(max(spec.D, 1)), "w2": 2 / math.sqrt(max(spec.H, 1))}
        for a in ARGS:
            if not spec.present(a):
                continue
            base_shape, view = _view_plan(tuple(spec.shape(a)), spec.layouts[a])
            self.plans[a] = view
            self.values[a] = torch.randn(base_shape, generator=gen, dtype=torch.float64) * scale.get(a, 1.0)
        out_shape = spec.lead + (spec.O,)
        self.downstream_weight = torch.randn(out_shape, generator=gen, dtype=torch.float64)

    def rounded(self, dtype):
        """The same problem with every value rounded through `dtype` (still stored in float64):
        the exact-arithmetic reference for computations done in `dtype`."""
        other = object.__new__(Problem)
        other.__dict__.update(self.__dict__)
        other.values = {k: v.to(dtype).double() for k, v in self.values.items()}
        other.downstream_weight = self.downstream_weight.to(dtype).double()
        return other

    def build(self, dtype, grad=True, names=ARGS):
        bases, args = {}, {}
        for a in names:
            if a not in self.values:
                bases[a] = args[a] = None
                continue
            base = self.values[a].to(dtype).clone()
            if grad and self.spec.requires_grad[a]:
                base.requires_grad_(True)
            bases[a] = base
            args[a] = self.plans[a](base)
        return Built(bases, args)


def run_probe(code, timeout=600):
    """Runs `code` in a fresh interpreter that imports this very fusedgrad build
    (for checks whose failure mode is a crash of the interpreter)."""
    import fusedgrad as _fg

    root = os.path.dirname(os.path.dirname(os.path.abspath(_fg.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)


# --------------------------------------------------------------------------- comparisons

def compare(actual, expected, rtol, name):
    """Relative error of `actual` against `expected` (max |a − e| / max |e| over finite
    entries); non-finite entries must agree exactly (same NaN positions, same ±Inf)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, (
            f"{name}: fused gives {'no gradient' if actual is None else 'a gradient'}, "
            f"native autograd {'none' if expected is None else 'one'}")
        return 0.0
    assert isinstance(actual, torch.Tensor), f"{name}: not a tensor: {type(actual)}"
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    if expected.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    fin = torch.isfinite(e)
    if not bool(fin.all()):
        torch.testing.assert_close(
            a[~fin], e[~fin], rtol=0, atol=0, equal_nan=True,
            msg=lambda m: f"{name}: non-finite entries differ: {m}")
        assert bool(torch.isfinite(a[fin]).all()), f"{name}: fused has non-finite values where native is finite"
        a, e = a[fin], e[fin]
        if e.numel() == 0:
            return 0.0
    assert bool(torch.isfinite(a).all()), f"{name}: fused has non-finite values where native is finite"
    scale = e.abs().max().item()
    err = (a - e).abs().max().item()
    assert err <= rtol * max(scale, 1e-300), (
        f"{name}: max abs err {err:.3e} > {rtol:.0e} x scale {scale:.3e}")
    return err / scale if scale else 0.0


# float32 outputs that passed only through the native-relative bound (for the survey report)
F32_STATS = {"outputs_beyond_rtol": 0, "worst_ratio_to_native": 0.0, "worst_ratio_label": ""}


def compare_to_truth(actual, native, truth, rtol, factor, name):
    """float32: `actual` (fused) and `native` against `truth` (float64 on the same rounded
    inputs). Passes if the fused error is at most rtol · max|truth|, or at most `factor`
    times native float32's own error — so an ill-conditioned output (e.g. a bias gradient
    summing thousands of terms that cancel) may carry float32 noise as large as native's,
    while a well-conditioned one must be within rtol. Returns fused error / max|truth|."""
    if native is None or actual is None:
        return compare(actual, native, rtol, name)
    # shapes, dtypes and non-finite positions exactly as native's
    compare_shape_and_nonfinite(actual, native, name)
    a, n, t = actual.detach().double(), native.detach().double(), truth.detach().double()
    fin = torch.isfinite(a) & torch.isfinite(n) & torch.isfinite(t)
    if not bool(fin.any()):
        return 0.0
    a, n, t = a[fin], n[fin], t[fin]
    scale = t.abs().max().item()
    err, err_native = (a - t).abs().max().item(), (n - t).abs().max().item()
    assert err <= max(rtol * scale, factor * err_native, 1e-300), (
        f"{name}: fused float32 error {err:.3e} > max({rtol:.0e} x scale {scale:.3e}, "
        f"{factor} x native float32 error {err_native:.3e})")
    if err > rtol * scale:
        F32_STATS["outputs_beyond_rtol"] += 1
        ratio = err / err_native
        if ratio > F32_STATS["worst_ratio_to_native"]:
            F32_STATS["worst_ratio_to_native"] = ratio
            F32_STATS["worst_ratio_label"] = f"{name}: fused {err:.2e}, native {err_native:.2e}, scale {scale:.2e}"
    return err / scale if scale else 0.0


def compare_shape_and_nonfinite(actual, expected, name):
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    fin = torch.isfinite(expected)
    if not bool(fin.all()):
        torch.testing.assert_close(
            actual[~fin], expected[~fin], rtol=0, atol=0, equal_nan=True,
            msg=lambda m: f"{name}: non-finite entries differ: {m}")
    assert bool(torch.isfinite(actual[fin]).all()), f"{name}: fused has non-finite values where native is finite"


# --------------------------------------------------------------------------- the checks

def _backprop(spec, out, bases):
    """Backpropagates the scalar `out`; returns {argument: gradient of its base or None}."""
    wanted = [a for a in ARGS if bases[a] is not None and bases[a].requires_grad]
    if not wanted or not out.requires_grad:
        return {a: None for a in ARGS}
    if spec.upstream is not None:
        out = out * spec.upstream
    if spec.use_autograd_grad:
        grads = torch.autograd.grad(out, [bases[a] for a in wanted], allow_unused=True)
        got = dict(zip(wanted, grads))
    else:
        out.backward()
        got = {a: bases[a].grad for a in wanted}
    return {a: got.get(a) for a in ARGS}


def run_loss(problem, dtype, impl):
    spec = problem.spec
    b = problem.build(dtype)
    fn = fusedgrad.mlp_loss if impl == "fused" else ref_mlp_loss
    loss = fn(*(b.args[a] for a in ARGS), reduction=spec.reduction, activation=spec.activation)
    return loss.detach(), _backprop(spec, loss, b.bases)


def _reduce_prediction(spec, pred, weight):
    if spec.downstream == "sum":
        return pred.sum()
    if spec.downstream == "square":
        return pred.square().mean()
    if spec.downstream == "slice":  # a grad_out that is zero outside the first output column
        return pred[..., :1].sum() if pred.shape[-1] else pred.sum()
    return (pred * weight.to(pred.dtype)).sum()


def run_mlp(problem, dtype, impl):
    spec = problem.spec
    b = problem.build(dtype, names=ARGS[:5])
    b.bases["target"] = None
    fn = fusedgrad.mlp if impl == "fused" else ref_mlp
    pred = fn(*(b.args[a] for a in ARGS[:5]), activation=spec.activation)
    out = _reduce_prediction(spec, pred, problem.downstream_weight)
    return pred.detach(), _backprop(spec, out, b.bases)


def check_pair(problem, runner, dtype, rtol, label, factor=None):
    """Fused against native for one runner and dtype; returns the worst relative error.
    With `factor` (float32), both are also measured against float64 on the same rounded
    inputs: see compare_to_truth."""
    fused_out, fused_grads = runner(problem, dtype, "fused")
    ref_out, ref_grads = runner(problem, dtype, "native")
    if factor is None:
        worst = compare(fused_out, ref_out, rtol, f"{label} value")
        for a in ARGS:
            worst = max(worst, compare(fused_grads[a], ref_grads[a], rtol, f"{label} grad of {a}"))
        return worst
    truth_out, truth_grads = runner(problem.rounded(dtype), torch.float64, "native")
    worst = compare_to_truth(fused_out, ref_out, truth_out, rtol, factor, f"{label} value")
    for a in ARGS:
        worst = max(worst, compare_to_truth(
            fused_grads[a], ref_grads[a], truth_grads[a], rtol, factor, f"{label} grad of {a}"))
    return worst


def _arg_grads_native(spec, args, fn, **kw):
    """Native gradients with respect to each present argument (as a leaf in its own shape)."""
    leaves = {a: None if t is None else t.detach().clone().requires_grad_(True) for a, t in args.items()}
    out = fn(*(leaves[a] for a in args), **kw)
    return out, leaves


def check_loss_and_grads_op(problem, dtype, rtol):
    """torch.ops.fusedgrad.mlp_loss_and_grads: every requested gradient in its argument's
    exact shape, empty (numel 0) placeholders for the rest."""
    spec = problem.spec
    args = problem.build(dtype, grad=False).args
    mask = [spec.requires_grad[a] for a in ARGS]  # may ask for absent arguments too
    res = torch.ops.fusedgrad.mlp_loss_and_grads(
        *(args[a] for a in ARGS), spec.reduction, spec.activation, mask)
    loss, leaves = _arg_grads_native(spec, args, ref_mlp_loss, reduction=spec.reduction, activation=spec.activation)
    present = [a for a in ARGS if leaves[a] is not None]
    grads = torch.autograd.grad(loss, [leaves[a] for a in present], allow_unused=True)
    ref = dict(zip(present, grads))
    worst = compare(res[0], loss.detach(), rtol, "op loss")
    for k, a in enumerate(ARGS):
        got = res[1 + k]
        assert not got.requires_grad, f"op grad {a} requires grad"
        if mask[k] and a in ref:
            want = ref[a] if ref[a] is not None else torch.zeros_like(leaves[a])
            worst = max(worst, compare(got, want, rtol, f"op grad of {a}"))
        else:
            assert got.numel() == 0, f"op grad {a}: not requested / absent, expected an empty placeholder, got {tuple(got.shape)}"
    return worst


def check_forward_backward_ops(problem, dtype, rtol):
    """torch.ops.fusedgrad.mlp_forward / mlp_backward against native, gradients in exact shapes."""
    spec = problem.spec
    args = problem.build(dtype, grad=False, names=ARGS[:5]).args
    act = spec.activation
    pred, activations = torch.ops.fusedgrad.mlp_forward(*(args[a] for a in ARGS[:5]), act)
    ref_pred, leaves = _arg_grads_native(spec, args, ref_mlp, activation=spec.activation)
    worst = compare(pred, ref_pred.detach(), rtol, "op prediction")
    grad_out = problem.downstream_weight.to(dtype)
    # Without w2 the prediction is s, saved as the output, unless the activation saves its input h.
    saved = activations if spec.has_w2 or fusedgrad._C.check_options(None, act) else pred
    mask = [spec.requires_grad[a] for a in ARGS[:5]]
    res = torch.ops.fusedgrad.mlp_backward(grad_out, *(args[a] for a in ARGS[:5]), saved, act, mask)
    present = [a for a in ARGS[:5] if leaves[a] is not None]
    grads = torch.autograd.grad(ref_pred, [leaves[a] for a in present], grad_out, allow_unused=True)
    ref = dict(zip(present, grads))
    for k, a in enumerate(ARGS[:5]):
        if mask[k] and a in ref:
            want = ref[a] if ref[a] is not None else torch.zeros_like(leaves[a])
            worst = max(worst, compare(res[k], want, rtol, f"op mlp_backward grad of {a}"))
        else:
            assert res[k].numel() == 0, f"op mlp_backward grad {a}: expected an empty placeholder"
    return worst
