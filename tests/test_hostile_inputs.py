"""Hostile inputs: every call gives a correct answer (compared with native
autograd) or a clear ValueError / TypeError naming the offending argument —
never a crash, a hang or a silently wrong number.

Covered: non-tensor arguments, unsupported dtypes (complex, integer, bool,
float16, bfloat16), sparse / mkldnn layouts, meta tensors (the fake kernels),
wrong ranks and shapes, mixed dtypes and devices, zero-size dimensions, NaN and
±Inf, huge magnitudes, no_grad / inference_mode, non-leaf inputs, the same
tensor passed as several arguments.
"""
import math

import pytest
import torch

import fusedgrad
from problems_fuzz import compare, run_probe
from reference import ref_mlp, ref_mlp_loss

LOSS_ARGS = ("x", "w1", "b1", "w2", "b2", "target")
MLP_ARGS = LOSS_ARGS[:5]
F64 = torch.float64


def make(N=5, D=3, H=4, O=2, dtype=F64, seed=0, lead=None):
    g = torch.Generator().manual_seed(seed)
    lead = (N,) if lead is None else tuple(lead)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    return {"x": r(*lead, D), "w1": r(H, D), "b1": r(H), "w2": r(O, H), "b2": r(O), "target": r(*lead, O)}


def call_loss(args, fn=fusedgrad.mlp_loss, **kw):
    return fn(*(args[a] for a in LOSS_ARGS), **kw)


def call_mlp(args, fn=fusedgrad.mlp, **kw):
    return fn(*(args[a] for a in MLP_ARGS), **kw)


def fused_and_native(args, kind="loss", grad=LOSS_ARGS, rtol=1e-10, **kw):
    """Runs fused and native on separate leaf copies of `args`; compares value and the
    gradients of the arguments named in `grad` (NaN / Inf positions must agree)."""
    results = []
    names = LOSS_ARGS if kind == "loss" else MLP_ARGS
    for impl in ("fused", "native"):
        leaves = {a: None if args.get(a) is None else args[a].detach().clone().requires_grad_(a in grad)
                  for a in names}
        if kind == "loss":
            out = call_loss(leaves, fusedgrad.mlp_loss if impl == "fused" else ref_mlp_loss, **kw)
            scalar = out
        else:
            out = call_mlp(leaves, fusedgrad.mlp if impl == "fused" else ref_mlp, **kw)
            scalar = (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view(out.shape)).sum()
        if scalar.requires_grad:
            scalar.backward()
        results.append((out.detach(), {a: None if leaves[a] is None else leaves[a].grad for a in names}))
    (fo, fg), (no, ng) = results
    compare(fo, no, rtol, "value")
    for a in names:
        compare(fg[a], ng[a], rtol, f"grad of {a}")
    return fo, fg


def raises_naming(exc_type, name, fn):
    with pytest.raises(exc_type) as info:
        fn()
    assert f"'{name}'" in str(info.value), f"message does not name '{name}': {info.value}"
    return info.value


# --------------------------------------------------------------------------- non-tensor arguments

NON_TENSORS = {
    "list": lambda t: t.tolist(),
    "ndarray": lambda t: t.numpy(),
    "float": lambda t: 1.0,
    "int": lambda t: 1,
    "str": lambda t: "x",
    "tuple": lambda t: tuple(t.reshape(-1).tolist()),
}


@pytest.mark.parametrize("kind", sorted(NON_TENSORS))
@pytest.mark.parametrize("name", LOSS_ARGS)
def test_non_tensor_argument_mlp_loss(name, kind):
    args = make()
    args[name] = NON_TENSORS[kind](args[name])
    raises_naming(TypeError, name, lambda: call_loss(args))


@pytest.mark.parametrize("kind", ["list", "ndarray", "float"])
@pytest.mark.parametrize("name", MLP_ARGS)
def test_non_tensor_argument_mlp(name, kind):
    args = make()
    args[name] = NON_TENSORS[kind](args[name])
    raises_naming(TypeError, name, lambda: call_mlp(args))


@pytest.mark.parametrize("name", ["x", "w1"])
@pytest.mark.parametrize("fn", [call_loss, call_mlp])
def test_none_for_required_argument(fn, name):
    args = make()
    args[name] = None
    raises_naming(TypeError, name, lambda: fn(args))


@pytest.mark.parametrize("name", ["x", "w1", "b1", "target"])
def test_raw_op_non_tensor_argument_raises_naming_it(name):
    """The raw op's schema check (torch's dispatcher) rejects non-tensors; it raises
    RuntimeError (torch's choice for every op), naming the argument."""
    args = make()
    args[name] = args[name].tolist()
    with pytest.raises((TypeError, RuntimeError)) as info:
        torch.ops.fusedgrad.mlp_loss(*(args[a] for a in LOSS_ARGS), "mean", "sigmoid")
    assert f"'{name}'" in str(info.value)


def test_raw_op_none_for_x():
    args = make()
    raises_naming(ValueError, "x", lambda: torch.ops.fusedgrad.mlp_loss(None, args["w1"], None, None, None, None, "mean", "sigmoid"))


@pytest.mark.parametrize("value", [None, 1, "MEAN", "none", b"mean", "elementwise_mean"])
def test_bad_reduction(value):
    error = ValueError if isinstance(value, str) else TypeError  # None, 1, b"mean": wrong types
    raises_naming(error, "reduction", lambda: call_loss(make(), reduction=value))


@pytest.mark.parametrize("value", [None, 0, "softplus", "Sigmoid", "gelu_erf"])
@pytest.mark.parametrize("fn", [call_loss, call_mlp])
def test_bad_activation(fn, value):
    error = ValueError if isinstance(value, str) else TypeError  # None, 0: wrong types
    raises_naming(error, "activation", lambda: fn(make(), activation=value))


# --------------------------------------------------------------------------- dtypes

BAD_DTYPES = [torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
              torch.int64, torch.int32, torch.int8, torch.uint8, torch.bool]


@pytest.mark.parametrize("dtype", BAD_DTYPES, ids=str)
def test_unsupported_dtype_everywhere_names_x(dtype):
    """float16 / bfloat16 on CPU (and complex, integer, bool) are refused with a TypeError naming x."""
    args = {k: v.to(dtype) for k, v in make().items()}
    err = raises_naming(TypeError, "x", lambda: call_loss(args))
    assert "float32" in str(err) and "float64" in str(err)
    raises_naming(TypeError, "x", lambda: call_mlp(args))
    raises_naming(TypeError, "x", lambda: torch.ops.fusedgrad.mlp_loss(*(args[a] for a in LOSS_ARGS), "mean", "sigmoid"))


@pytest.mark.parametrize("dtype", BAD_DTYPES + [torch.float32], ids=str)
@pytest.mark.parametrize("name", LOSS_ARGS[1:])
def test_mismatched_dtype_names_argument(name, dtype):
    args = make()  # float64
    args[name] = args[name].to(dtype)
    raises_naming(TypeError, name, lambda: call_loss(args))
    if name != "target":
        raises_naming(TypeError, name, lambda: call_mlp(args))


def test_float32_x_with_float64_weights_names_w1():
    args = make()
    args["x"] = args["x"].float()
    raises_naming(TypeError, "w1", lambda: call_loss(args))


# --------------------------------------------------------------------------- layouts

@pytest.mark.parametrize("layout", ["coo", "csr", "mkldnn"])
@pytest.mark.parametrize("name", LOSS_ARGS)
def test_non_strided_layout_names_argument(name, layout):
    args = {k: v.float() for k, v in make().items()}
    t = args[name]
    if layout == "coo":
        args[name] = t.to_sparse()
    elif layout == "csr":
        if t.dim() != 2:
            pytest.skip("CSR needs 2-D")
        args[name] = t.to_sparse_csr()
    else:
        args[name] = t.to_mkldnn()
    raises_naming(ValueError, name, lambda: call_loss(args))
    if name != "target":
        raises_naming(ValueError, name, lambda: call_mlp(args))


@pytest.mark.parametrize("name", LOSS_ARGS)
def test_raw_op_sparse_is_refused(name):
    """Raw ops have no sparse kernel: torch's dispatcher refuses the call (no result)."""
    args = make()
    args[name] = args[name].to_sparse()
    with pytest.raises((ValueError, NotImplementedError, RuntimeError)):
        torch.ops.fusedgrad.mlp_loss(*(args[a] for a in LOSS_ARGS), "mean", "sigmoid")


# --------------------------------------------------------------------------- meta tensors (fake kernels)

def meta(args):
    return {k: None if v is None else v.to("meta") for k, v in args.items()}


@pytest.mark.parametrize("lead", [(5,), (), (2, 3)], ids=str)
@pytest.mark.parametrize("b1_shape", ["vec", "full", "none"])
@pytest.mark.parametrize("has_w2", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=str)
def test_meta_inputs_give_meta_results(lead, b1_shape, has_w2, dtype):
    args = make(lead=lead, dtype=dtype)
    if b1_shape == "full":
        args["b1"] = torch.randn(*lead, 4, dtype=dtype)
    elif b1_shape == "none":
        args["b1"] = None
    if not has_w2:
        args["w2"] = args["b2"] = None
        args["target"] = torch.randn(*lead, 4, dtype=dtype)
    m = meta(args)
    loss = call_loss(m)
    ref_loss = call_loss(m, ref_mlp_loss)
    assert loss.device.type == "meta" and loss.shape == ref_loss.shape == () and loss.dtype == dtype
    pred = call_mlp(m)
    ref_pred = call_mlp(m, ref_mlp)
    assert pred.device.type == "meta" and pred.shape == ref_pred.shape and pred.dtype == dtype

    # raw ops
    present = [m[a] is not None for a in LOSS_ARGS]
    res = torch.ops.fusedgrad.mlp_loss_and_grads(*(m[a] for a in LOSS_ARGS), "mean", "sigmoid", [True] * 6)
    assert res[0].shape == () and res[0].device.type == "meta"
    for k, a in enumerate(LOSS_ARGS):
        want = m[a].shape if present[k] else (0,)
        assert res[1 + k].shape == want, (a, res[1 + k].shape, want)
        assert res[1 + k].device.type == "meta" and res[1 + k].dtype == dtype
    p, acts = torch.ops.fusedgrad.mlp_forward(*(m[a] for a in MLP_ARGS), "sigmoid")
    assert p.shape == ref_pred.shape and p.device.type == "meta"


@pytest.mark.parametrize("has_bias", [True, False])
def test_meta_backward_gives_meta_grads_in_argument_shapes(has_bias):
    args = make(lead=(2, 3))
    args["b1"] = torch.randn(1, 4, dtype=F64)  # (1, H)
    if not has_bias:
        args["b1"] = args["b2"] = None
    for kind in ("loss", "mlp"):
        leaves = {k: None if v is None else v.to("meta").requires_grad_() for k, v in args.items()}
        out = call_loss(leaves) if kind == "loss" else call_mlp(leaves).sum()
        out.backward()
        for a, t in leaves.items():
            if t is None or (kind == "mlp" and a == "target"):
                continue
            assert t.grad is not None, (kind, a)
            assert t.grad.device.type == "meta" and t.grad.shape == t.shape, (kind, a, t.grad.shape)


def test_meta_with_fake_tensor_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        args = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in make(lead=(2, 7)).items()}
        loss = call_loss(args)
        pred = call_mlp(args)
    assert loss.shape == () and pred.shape == (2, 7, 2)


@pytest.mark.parametrize("name", ["w1", "b1", "w2", "target"])
def test_mixed_cpu_and_meta_devices_name_argument(name):
    """Regression (fixed in f18d8fa): one argument on meta and the rest on CPU is
    routed to the fake kernel, which returned an uninitialised CPU tensor without an error."""
    args = make()
    args[name] = args[name].to("meta")
    raises_naming(ValueError, name, lambda: call_loss(args))
    if name != "target":
        raises_naming(ValueError, name, lambda: call_mlp(args))


def test_x_on_meta_rest_on_cpu_names_first_other_argument():
    args = make()
    args["x"] = args["x"].to("meta")
    raises_naming(ValueError, "w1", lambda: call_loss(args))
    raises_naming(ValueError, "w1", lambda: call_mlp(args))


@pytest.mark.parametrize("name,shape", [("w1", (4, 2)), ("w2", (2, 3)), ("b1", (3,)), ("target", (5, 3))])
def test_meta_shape_mismatch_names_argument(name, shape):
    """The fake kernels refuse what the CPU kernel refuses (they used to check only what they
    needed to compute output shapes, so all-meta calls with mismatched shapes returned results)."""
    args = make()
    args[name] = torch.randn(*shape, dtype=F64)
    raises_naming(ValueError, name, lambda: call_loss(args))  # the CPU kernel refuses it ...
    raises_naming(ValueError, name, lambda: call_loss(meta(args)))  # ... and so must the fake one


# --------------------------------------------------------------------------- ranks and shapes

SHAPE_ERRORS = [
    ("x", lambda a: a["x"][0, 0]),  # 0-dim
    ("w1", lambda a: a["w1"][0]),  # 1-D
    ("w1", lambda a: a["w1"][None, None]),  # 4-D (3-D is an ensemble: tests/test_ensemble_ops.py)
    ("w1", lambda a: a["w1"][:, :2]),  # wrong D
    ("w1", lambda a: a["w1"].t()),  # (D, H)
    ("w2", lambda a: a["w2"][:, :3]),  # wrong H
    ("w2", lambda a: a["w2"][0]),  # 1-D
    ("w2", lambda a: a["w2"].t()),  # (H, O)
    ("b1", lambda a: a["b1"][:3]),  # wrong H
    ("b1", lambda a: torch.zeros(2, 5, 4, dtype=F64)),  # would enlarge the result
    ("b1", lambda a: torch.zeros(5, 4, 1, dtype=F64)),  # rank larger than (N, H)
    ("b1", lambda a: torch.zeros(4, 1, dtype=F64)),  # (H, 1) against (N, H)
    ("b2", lambda a: a["b2"].repeat(2)),  # wrong O
    ("b2", lambda a: torch.zeros(3, 5, 2, dtype=F64)),
    ("target", lambda a: a["target"][:, :1].repeat(1, 3)),  # wrong O
    ("target", lambda a: a["target"][:4]),  # wrong N
    ("target", lambda a: a["target"].unsqueeze(0).repeat(2, 1, 1)),  # would enlarge
]


@pytest.mark.parametrize("name,bad", SHAPE_ERRORS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(SHAPE_ERRORS)])
def test_bad_shape_names_argument(name, bad):
    args = make()
    args[name] = bad(args)
    raises_naming(ValueError, name, lambda: call_loss(args))
    if name != "target":
        raises_naming(ValueError, name, lambda: call_mlp(args))
    raises_naming(ValueError, name, lambda: torch.ops.fusedgrad.mlp_loss(*(args[a] for a in LOSS_ARGS), "mean", "sigmoid"))


def test_b2_without_w2_names_b2():
    args = make()
    args["w2"] = None
    raises_naming(ValueError, "b2", lambda: call_loss(args))
    raises_naming(ValueError, "b2", lambda: call_mlp(args))


def test_x_1d_refuses_row_bias():
    """x (D,) gives h (H,): a (1, H) bias would enlarge it to (1, H), which the contract refuses."""
    args = make(lead=())
    args["b1"] = args["b1"].unsqueeze(0)
    raises_naming(ValueError, "b1", lambda: call_loss(args))


def test_raw_mlp_backward_bad_grad_out_and_activations():
    args = make()
    pred, acts = torch.ops.fusedgrad.mlp_forward(*(args[a] for a in MLP_ARGS), "sigmoid")
    mask = [True] * 5
    raises_naming(ValueError, "grad_out", lambda: torch.ops.fusedgrad.mlp_backward(
        torch.ones(5, 3, dtype=F64), *(args[a] for a in MLP_ARGS), acts, "sigmoid", mask))
    raises_naming(ValueError, "activations", lambda: torch.ops.fusedgrad.mlp_backward(
        torch.ones_like(pred), *(args[a] for a in MLP_ARGS), acts[:2], "sigmoid", mask))
    with pytest.raises(TypeError):
        torch.ops.fusedgrad.mlp_backward(torch.ones_like(pred).float(), *(args[a] for a in MLP_ARGS), acts, "sigmoid", mask)


# --------------------------------------------------------------------------- zero-size dimensions

ZERO_CASES = {
    "N=0": dict(lead=(0,)),
    "N=0 3-D": dict(lead=(2, 0)),
    "N=0 3-D b": dict(lead=(0, 3)),
    "D=0": dict(D=0),
    "H=0": dict(H=0),
    "O=0": dict(O=0),
    "all 0": dict(lead=(0,), D=0, H=0, O=0),
}


@pytest.mark.parametrize("bias", ["vec", "row", "full", "col", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", sorted(ZERO_CASES))
def test_zero_size_dimensions_match_autograd(case, reduction, bias):
    kw = dict(ZERO_CASES[case])
    lead = kw.pop("lead", (5,))
    D, H, O = kw.get("D", 3), kw.get("H", 4), kw.get("O", 2)
    args = make(D=D, H=H, O=O, lead=lead)
    if bias != "vec":
        shape = {"row": lambda c: (1, c), "full": lambda c: lead + (c,), "col": lambda c: lead + (1,)}
        args["b1"] = None if bias == "none" else torch.randn(*shape[bias](H), dtype=F64)
        args["b2"] = None if bias == "none" else torch.randn(*shape[bias](O), dtype=F64)
    value, grads = fused_and_native(args, reduction=reduction)
    n_out = math.prod(lead) * O
    if n_out == 0:  # the documented values
        assert math.isnan(value.item()) if reduction == "mean" else value.item() == 0.0
    for a in LOSS_ARGS:
        if args[a] is not None:
            assert grads[a].shape == args[a].shape
    fused_and_native(args, kind="mlp", grad=MLP_ARGS)


ZERO_ROW_PROBE = """
import torch, fusedgrad
z = torch.zeros
# a full-shape bias over zero rows is the GEMM path's; a full-shape target the engine's (csrc/ops/engine_path.cpp)
for D in (3, 33):
    for b1, b2, t, path in [(z(0, 4), None, None, "gemm"), (None, z(0, 2), None, "gemm"), (None, None, z(0, 2), "engine")]:
        got = fusedgrad._C.explain_op(True, z(0, D), z(4, D), b1, z(2, 4), b2, t, "sigmoid")
        assert got == path, (D, got, path)
        args = [None if a is None else a.requires_grad_() for a in (b1, b2, t)]
        loss = fusedgrad.mlp_loss(z(0, D), z(4, D), args[0], z(2, 4), args[1], args[2], reduction="sum")
        loss.backward()
        for a in args:
            assert a is None or (a.grad is not None and a.grad.shape == a.shape and not a.grad.any()), a
print("survived")
"""


def test_zero_rows_full_shape_gradient_no_crash():
    """Regression (fixed in 67c01be): N = 0 rows and the gradient of a full-shape
    b1 (N, H), b2 (N, O) or target (N, O) requested made the (since removed) small path write column
    sums through the empty gradient's null data pointer (SIGSEGV). The probe asserts the path of each
    case. Run in a subprocess so that a regression fails this test instead of killing the session."""
    r = run_probe(ZERO_ROW_PROBE)
    assert r.returncode == 0 and "survived" in r.stdout, f"exit code {r.returncode}: {(r.stderr or '')[-2000:]}"


# --------------------------------------------------------------------------- NaN and ±Inf

def _sizes(path):
    # the engine (few multiply-adds a row) and the GEMM path: 128·128 + 128·8 multiply-adds a row, above
    # the engine's crossover (csrc/ops/engine_path.cpp); _assert_path checks each through the dispatch's own test.
    return dict(N=5, D=33, H=4, O=2) if path == "engine" else dict(N=64, D=128, H=128, O=8)


def _assert_path(args, path, activation="sigmoid"):
    got = fusedgrad._C.explain_op(True, args["x"].detach(), args["w1"], args.get("b1"), args.get("w2"),
                                  args.get("b2"), args.get("target"), activation)
    assert got == path, f"the loss op takes {got!r}, the test means {path!r}"


@pytest.mark.parametrize("path", ["engine", "gemm"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", LOSS_ARGS)
@pytest.mark.parametrize("activation", ["sigmoid", "identity"])
def test_non_finite_inputs_propagate_as_autograd(name, value, activation, path):
    args = make(**_sizes(path), seed=3)
    _assert_path(args, path, activation)
    flat = args[name].view(-1)
    flat[1] = value
    flat[-1] = value
    for reduction in ("mean", "sum"):
        fused_and_native(args, reduction=reduction, activation=activation)
    if name != "target":
        fused_and_native(args, kind="mlp", grad=MLP_ARGS, activation=activation)


def test_non_finite_per_sample_bias_row():
    args = make(N=6)
    args["b1"] = torch.randn(6, 4, dtype=F64)
    args["b1"][2, 1] = math.nan
    args["b2"] = torch.randn(6, 1, dtype=F64)
    args["b2"][4, 0] = math.inf
    for reduction in ("mean", "sum"):
        fused_and_native(args, reduction=reduction)


# --------------------------------------------------------------------------- huge magnitudes

@pytest.mark.parametrize("path", ["engine", "gemm"])
@pytest.mark.parametrize("magnitude", [1e4, 1e10, 1e30, 1e300])
@pytest.mark.parametrize("where", ["x", "b1", "w1"])
def test_saturated_sigmoid_float64_matches_autograd(where, magnitude, path):
    args = make(**_sizes(path), seed=5)
    _assert_path(args, path)
    args[where] = args[where] * magnitude  # |h| ~ magnitude, both signs
    for reduction in ("mean", "sum"):
        value, grads = fused_and_native(args, reduction=reduction)
        assert torch.isfinite(value)
        for a in LOSS_ARGS:
            assert torch.isfinite(grads[a]).all(), a
    pred, _ = fused_and_native(args, kind="mlp", grad=MLP_ARGS)
    assert torch.isfinite(pred).all()


@pytest.mark.parametrize("path", ["engine", "gemm"])
@pytest.mark.parametrize("magnitude", [1e4, 1e10, 1e30])
def test_saturated_sigmoid_float32_no_nan(magnitude, path):
    """float32, |h| up to 1e30: no NaN, values within float32 rounding of native float32."""
    args = {k: v.float() for k, v in make(**_sizes(path), seed=6).items()}
    _assert_path(args, path)
    args["x"] = args["x"] * magnitude
    value, grads = fused_and_native(args, rtol=1e-4)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values())
    s = torch.sigmoid(args["x"] @ args["w1"].t() + args["b1"])
    assert (s == 0).any() and (s == 1).any()  # really saturated


def test_float32_loss_accumulates_without_overflow():
    """The fused loss sums r² in float64: a float32 mean whose largest r² overflows float32 is
    still the right (finite) float32 number, where native float32 gives inf. Gradients agree."""
    args = {k: torch.zeros_like(v).float() for k, v in make(N=4, D=3, H=2, O=1).items()}
    args["target"][0, 0] = 2e19  # r² = 4e38 > float32 max; the mean over 4 entries is 1e38
    truth = call_loss({k: v.double() for k, v in args.items()}, ref_mlp_loss).item()
    assert math.isinf(call_loss(args, ref_mlp_loss).item())
    grads = []
    for fn in (fusedgrad.mlp_loss, ref_mlp_loss):
        w2, t = args["w2"].clone().requires_grad_(), args["target"].clone().requires_grad_()
        loss = fn(args["x"], args["w1"], args["b1"], w2, args["b2"], t)
        loss.backward()
        grads.append((loss.item(), w2.grad, t.grad))
    (fused, fw2, ft), (_, nw2, nt) = grads
    assert fused == pytest.approx(truth, rel=1e-6)
    compare(fw2, nw2, 1e-6, "grad of w2")
    compare(ft, nt, 1e-6, "grad of target")
    assert ft[0, 0].item() == pytest.approx(1e19, rel=1e-6)


# --------------------------------------------------------------------------- grad modes

@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_no_grad_and_inference_mode(mode):
    args = make()
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    ctx = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    with ctx:
        loss = call_loss(leaves)
        pred = call_mlp(leaves)
    assert not loss.requires_grad and loss.grad_fn is None
    assert not pred.requires_grad and pred.grad_fn is None
    assert loss.is_inference() == (mode == "inference_mode")
    compare(loss, call_loss(args, ref_mlp_loss), 1e-12, "loss")
    compare(pred, call_mlp(args, ref_mlp), 1e-12, "pred")
    # bitwise the values computed with grad mode on
    assert torch.equal(loss, call_loss(leaves).detach())
    assert torch.equal(pred, call_mlp(leaves).detach())


def test_inference_tensors_as_inputs():
    """Inference tensors (made under inference_mode) used outside it: mlp_loss saves the
    gradients it computed and keeps its inputs for a create_graph=True backward outside
    autograd's saved variables, so it works where native autograd refuses; mlp saves its
    inputs and refuses exactly as native does."""
    args = make()
    with torch.inference_mode():
        inf = {k: v.clone() for k, v in args.items()}
    w1 = args["w1"].clone().requires_grad_()
    loss = fusedgrad.mlp_loss(inf["x"], w1, inf["b1"], inf["w2"], inf["b2"], inf["target"])
    loss.backward()
    ref = args["w1"].clone().requires_grad_()
    ref_mlp_loss(args["x"], ref, args["b1"], args["w2"], args["b2"], args["target"]).backward()
    compare(w1.grad, ref.grad, 1e-10, "grad of w1")
    compare(loss.detach(), call_loss(args, ref_mlp_loss), 1e-12, "loss")

    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        ref_mlp(inf["x"], ref, inf["b1"], inf["w2"], inf["b2"])
    with pytest.raises(RuntimeError, match="Inference tensors cannot be saved for backward"):
        fusedgrad.mlp(inf["x"], w1, inf["b1"], inf["w2"], inf["b2"])
    # without anything requiring grad, inference tensors simply work
    out = call_mlp(inf)
    compare(out, call_mlp(args, ref_mlp), 1e-12, "pred")


# --------------------------------------------------------------------------- non-leaf inputs, None arguments

def test_non_leaf_inputs_requiring_grad():
    args = make(lead=(2, 3))
    results = []
    for fn in (fusedgrad.mlp_loss, ref_mlp_loss):
        a = args["x"].clone().requires_grad_()
        w = args["w1"].t().contiguous().requires_grad_()  # w1 = w.t(): non-contiguous, non-leaf
        b = args["b1"].clone().requires_grad_()
        x = a * 2 + 1
        x.retain_grad()
        w1 = w.t()
        b1 = b.expand(2, 3, 4)  # per-sample, stride 0
        t = args["target"].clone().requires_grad_()
        loss = fn(x, w1, b1, args["w2"], args["b2"], t[:, :, :] * 1)
        loss.backward()
        results.append([loss.detach(), a.grad, x.grad, w.grad, b.grad, t.grad])
    for k, (f, n) in enumerate(zip(*results)):
        compare(f, n, 1e-10, f"item {k}")


@pytest.mark.parametrize("present", [
    # every combination of the optional arguments (b1, w2, b2, target), b2 only with w2
    (b1, w2, b2, t) for b1 in (0, 1) for w2 in (0, 1) for b2 in (0, 1) for t in (0, 1) if w2 or not b2
], ids=lambda p: "".join("b1 w2 b2 t".split()[k] + "+" if on else "" for k, on in enumerate(p)) or "none")
@pytest.mark.parametrize("kind", ["loss", "mlp"])
def test_none_arguments_with_every_requires_grad_subset(present, kind):
    """Gradients reach exactly the inputs that need them whichever optional arguments are None
    (autograd numbers only the tensors given, so positions and edges differ)."""
    args = make(O=4)  # O = H so that w2 = None keeps the target's shape
    for name, on in zip(("b1", "w2", "b2", "target"), present):
        if not on:
            args[name] = None
    names = [a for a in (LOSS_ARGS if kind == "loss" else MLP_ARGS) if args[a] is not None]
    for mask in range(1, 2 ** len(names)):
        grad = [a for k, a in enumerate(names) if mask >> k & 1]
        fused_and_native(args, kind=kind, grad=grad)


@pytest.mark.parametrize("bias", [True, False])
def test_fused_module_trains_every_parameter(bias):
    torch.manual_seed(0)
    net = fusedgrad.FusedMLP(3, 4, 2, bias=bias).double()
    x, t = torch.randn(5, 3, dtype=F64), torch.randn(5, 2, dtype=F64)
    for out in (lambda: net.loss(x, t), lambda: net(x).square().sum()):
        net.zero_grad(set_to_none=True)
        out().backward()
        for name, p in net.named_parameters():
            assert p.grad is not None, f"{name} got no gradient"
            assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- the same tensor twice

def test_same_tensor_as_several_arguments():
    g = torch.Generator().manual_seed(7)
    X = torch.randn(5, 4, generator=g, dtype=F64)
    W = torch.randn(4, 4, generator=g, dtype=F64) / 2
    B = torch.randn(4, generator=g, dtype=F64)
    cases = {
        "b1 is b2": (("x", X), ("w1", W), ("b1", B), ("w2", W * 0.5), ("b2", "b1"), ("target", X)),
        "w1 is w2": (("x", X), ("w1", W), ("b1", B), ("w2", "w1"), ("b2", None), ("target", X)),
        "x is target": (("x", X), ("w1", W), ("b1", None), ("w2", W.t() * 1), ("b2", B), ("target", "x")),
        "b1 is b2 is target": (("x", X), ("w1", W), ("b1", B), ("w2", W), ("b2", "b1"), ("target", "b1")),
        "w1 is w2, b1 is b2": (("x", X), ("w1", W), ("b1", B), ("w2", "w1"), ("b2", "b1"), ("target", None)),
        "x is every operand": (("x", X), ("w1", W), ("b1", "x"), ("w2", W), ("b2", "x"), ("target", "x")),
    }
    for label, spec in cases.items():
        for kind in ("loss", "mlp"):
            results = []
            for impl in ("fused", "native"):
                leaves, args = {}, {}
                for name, v in spec:
                    if isinstance(v, str):
                        args[name] = args[v]
                    elif v is None:
                        args[name] = None
                    else:
                        args[name] = leaves[name] = v.clone().requires_grad_()
                if kind == "loss":
                    out = call_loss(args, fusedgrad.mlp_loss if impl == "fused" else ref_mlp_loss)
                else:
                    out = call_mlp(args, fusedgrad.mlp if impl == "fused" else ref_mlp).square().sum()
                out.backward()
                results.append((out.detach(), {k: v.grad for k, v in leaves.items()}))
            (fo, fg), (no, ng) = results
            compare(fo, no, 1e-10, f"{label} {kind} value")
            for k in fg:
                compare(fg[k], ng[k], 1e-10, f"{label} {kind} grad of {k}")


def test_overlapping_strided_input():
    """x whose rows overlap in memory (as_strided with stride 1 along rows)."""
    base = torch.randn(16, dtype=F64)
    args = make(N=6, D=4)
    args["x"] = base.as_strided((6, 4), (2, 1))
    fused_and_native(args, grad=("w1", "b1", "w2"))


# --------------------------------------------------------------------------- returned gradients are the caller's own

def test_autograd_grad_results_do_not_alias_across_calls():
    """Regression (fixed in 67c01be): with a unit upstream gradient the loss node
    returned the gradient tensors it saved at forward time themselves, so two
    torch.autograd.grad(..., retain_graph=True) calls returned the same storage."""
    args = make()
    w1 = args["w1"].clone().requires_grad_()
    loss = fusedgrad.mlp_loss(args["x"], w1, args["b1"], args["w2"], args["b2"], args["target"])
    g1, = torch.autograd.grad(loss, w1, retain_graph=True)
    g2, = torch.autograd.grad(loss, w1, retain_graph=True)
    expected = g2.clone()
    g1.mul_(0.5)  # e.g. in-place gradient scaling / clipping by the caller
    assert torch.equal(g2, expected), "the second call's gradient changed with the first's"
    g3, = torch.autograd.grad(loss, w1)
    assert torch.equal(g3, expected)


# --------------------------------------------------------------------------- inputs changed after the forward

def test_mlp_loss_input_modified_in_place_after_forward():
    """mlp_loss computes every gradient in its forward and saves only those: changing an input
    in place before backward does not affect (or invalidate) them — backward gives the gradient
    at the values the loss was computed from. Native autograd refuses such a backward instead."""
    args = make()
    w1 = args["w1"].clone().requires_grad_()
    w2 = args["w2"].clone().requires_grad_()
    loss = fusedgrad.mlp_loss(args["x"], w1, args["b1"], w2, args["b2"], args["target"])
    with torch.no_grad():
        w1.mul_(3)
        w2.add_(1)
    loss.backward()
    ref = {k: args[k].clone().requires_grad_() for k in ("w1", "w2")}
    ref_mlp_loss(args["x"], ref["w1"], args["b1"], ref["w2"], args["b2"], args["target"]).backward()
    compare(w1.grad, ref["w1"].grad, 1e-10, "grad of w1")
    compare(w2.grad, ref["w2"].grad, 1e-10, "grad of w2")

    n1, n2 = args["w1"].clone().requires_grad_(), args["w2"].clone().requires_grad_()
    native = ref_mlp_loss(args["x"], n1, args["b1"], n2, args["b2"], args["target"])
    with torch.no_grad():
        n2.add_(1)  # native saved w2 (to backpropagate into s)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        native.backward()


def test_mlp_input_modified_in_place_after_forward_is_refused():
    """mlp saves x, w1, w2 for its backward: an in-place change is detected, as natively."""
    args = make()
    w1 = args["w1"].clone().requires_grad_()
    pred = fusedgrad.mlp(args["x"], w1, args["b1"], args["w2"], args["b2"])
    with torch.no_grad():
        w1.mul_(3)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        pred.sum().backward()
