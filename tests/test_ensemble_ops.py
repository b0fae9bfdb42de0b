"""The ensemble ops: fusedgrad.mlp_loss / mlp / mlp_loss_and_grads with w1 of shape (K, H, D).

The reference is native autograd, model by model: a Python loop over k running
F.linear → sigmoid → F.linear → mse_loss on model k's slices. float64 values and
gradients must agree to 1e-12 relative, for shared and per-model x / target,
every bias kind, both reductions and activations, w2=None, unit and weighted
upstream gradients. Then: gradcheck, opcheck of every ensemble op, torch.compile
(fullgraph=True), zero sizes, thread-count determinism, and the argument errors
(exact messages, the same from the real and the fake kernels).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import fusedgrad

OPS = torch.ops.fusedgrad
F64 = torch.float64
RTOL = 1e-12

# How each argument may be laid out, as a function of (K, N, C): C is D for x, H for b1, O for b2 / target.
X_KINDS = {"shared": lambda K, N, C: (N, C), "per_model": lambda K, N, C: (K, N, C),
           "one_model_dim": lambda K, N, C: (1, N, C)}
BIAS_KINDS = {"none": None, "per_model": lambda K, N, C: (K, C), "per_sample": lambda K, N, C: (K, N, C),
              "k1c": lambda K, N, C: (K, 1, C), "shared_per_sample": lambda K, N, C: (1, N, C),
              "kn1": lambda K, N, C: (K, N, 1), "shared_vec": lambda K, N, C: (1, 1, C),
              "shared_2d": lambda K, N, C: (1, C)}
TARGET_KINDS = {"none": None, "shared": lambda K, N, C: (N, C), "per_model": lambda K, N, C: (K, N, C),
                "one_model_dim": lambda K, N, C: (1, N, C), "k1c": lambda K, N, C: (K, 1, C),
                "column": lambda K, N, C: (N, 1)}


def model_slice(t, k, kind_is_bias=False):
    """Model k's slice of an ensemble argument, as the single-model call takes it."""
    if t is None:
        return None
    if t.dim() == 2 and kind_is_bias:  # (K or 1, C): one bias per model
        return t[k if t.shape[0] > 1 else 0]
    if t.dim() == 3:
        return t[k if t.shape[0] > 1 else 0]
    return t  # 2-D x / target: shared


def native_losses(x, w1, b1, w2, b2, t, reduction, activation):
    """(K,) losses by native autograd, one model at a time."""
    losses = []
    for k in range(w1.shape[0]):
        h = F.linear(model_slice(x, k), w1[k], model_slice(b1, k, True))
        s = torch.sigmoid(h) if activation == "sigmoid" else h
        p = s if w2 is None else F.linear(s, w2[k], model_slice(b2, k, True))
        tk = model_slice(t, k)
        target = torch.zeros_like(p) if tk is None else tk.expand_as(p)
        losses.append(F.mse_loss(p, target, reduction=reduction))
    if not losses:  # K = 0: an empty loss that still reaches w1 (gradient zero)
        return (w1.sum() * 0).reshape(1)[:0]
    return torch.stack(losses)


def native_preds(x, w1, b1, w2, b2, activation):
    preds = []
    for k in range(w1.shape[0]):
        h = F.linear(model_slice(x, k), w1[k], model_slice(b1, k, True))
        s = torch.sigmoid(h) if activation == "sigmoid" else h
        preds.append(s if w2 is None else F.linear(s, w2[k], model_slice(b2, k, True)))
    return torch.stack(preds)


def assert_rel(actual, expected, what, rtol=RTOL):
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.0e} * {scale:.3e}"


def make_args(K, N, D, H, O, x_kind, b1_kind, w2_on, b2_kind, t_kind, seed, dtype=F64, grad=True):
    gen = torch.Generator().manual_seed(seed)

    def t(shape):
        return None if shape is None else torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(grad)

    def shape_of(kinds, kind, C):
        f = kinds[kind]
        return None if f is None else f(K, N, C)

    O_eff = O if w2_on else H
    x = t(X_KINDS[x_kind](K, N, D))
    w1 = t((K, H, D))
    b1 = t(shape_of(BIAS_KINDS, b1_kind, H))
    w2 = t((K, O, H)) if w2_on else None
    b2 = t(shape_of(BIAS_KINDS, b2_kind, O_eff)) if w2_on else None
    target = t(shape_of(TARGET_KINDS, t_kind, O_eff))
    return [x, w1, b1, w2, b2, target]


def grads_of(args, fn):
    leaves = [a for a in args if a is not None and a.requires_grad]
    for a in leaves:
        a.grad = None
    fn()
    out = [None if a is None or not a.requires_grad else a.grad for a in args]
    for a in leaves:
        a.grad = None
    return out


problems = st.fixed_dictionaries({
    "K": st.integers(1, 5), "N": st.integers(1, 6), "D": st.integers(1, 4), "H": st.integers(1, 5),
    "O": st.integers(1, 3), "x_kind": st.sampled_from(sorted(X_KINDS)),
    "b1_kind": st.sampled_from(sorted(BIAS_KINDS)), "w2_on": st.booleans(),
    "b2_kind": st.sampled_from(sorted(BIAS_KINDS)), "t_kind": st.sampled_from(sorted(TARGET_KINDS)),
    "reduction": st.sampled_from(["mean", "sum"]), "activation": st.sampled_from(["sigmoid", "identity"]),
    "weighted": st.booleans(), "seed": st.integers(0, 2**16),
})


@settings(max_examples=150)
@given(problems)
def test_mlp_loss_matches_native_per_model(p):
    args = make_args(p["K"], p["N"], p["D"], p["H"], p["O"], p["x_kind"], p["b1_kind"], p["w2_on"],
                     p["b2_kind"], p["t_kind"], p["seed"])
    red, act = p["reduction"], p["activation"]
    weights = torch.randn(p["K"], dtype=F64) if p["weighted"] else None

    def run(loss_fn):
        def backward():
            loss = loss_fn()
            (loss.sum() if weights is None else (loss * weights).sum()).backward()
            run.loss = loss.detach()
        return backward

    fused = grads_of(args, run(lambda: fusedgrad.mlp_loss(*args, reduction=red, activation=act)))
    fused_loss = run.loss
    native = grads_of(args, run(lambda: native_losses(*args, red, act)))
    assert fused_loss.shape == (p["K"],)
    assert_rel(fused_loss, run.loss, "loss")
    for name, gf, gn in zip(("x", "w1", "b1", "w2", "b2", "target"), fused, native):
        if gn is not None:
            assert_rel(gf, gn, name)

    # The raw op without autograd: the gradients of loss.sum().
    if weights is None:
        loss, grads = fusedgrad.mlp_loss_and_grads(*args, reduction=red, activation=act)
        assert_rel(loss, fused_loss, "mlp_loss_and_grads loss")
        for name, g, gn in zip(("x", "w1", "b1", "w2", "b2", "target"), grads, native):
            assert (g is None) == (gn is None), name
            if gn is not None:
                assert_rel(g, gn, "mlp_loss_and_grads " + name)
                assert not g.requires_grad


@settings(max_examples=80)
@given(problems)
def test_mlp_matches_native_per_model(p):
    args = make_args(p["K"], p["N"], p["D"], p["H"], p["O"], p["x_kind"], p["b1_kind"], p["w2_on"],
                     p["b2_kind"], "none", p["seed"])[:5]
    act = p["activation"]
    pred = fusedgrad.mlp(*args, activation=act)
    ref = native_preds(*args, act)
    assert_rel(pred, ref, "prediction")
    grad_out = torch.randn(ref.shape, dtype=F64, generator=torch.Generator().manual_seed(p["seed"]))
    fused = grads_of(args, lambda: fusedgrad.mlp(*args, activation=act).backward(grad_out))
    native = grads_of(args, lambda: native_preds(*args, act).backward(grad_out))
    for name, gf, gn in zip(("x", "w1", "b1", "w2", "b2"), fused, native):
        if gn is not None:
            assert_rel(gf, gn, name)


def test_each_model_is_computed_exactly_as_alone():
    """Model k of the ensemble runs the single-model kernels on its slices: bitwise the same
    loss and gradients as the single-model op, on each kernel path of the loss (the engine, tall and
    small, and the GEMMs of rows above its crossover; model_path asserts each)."""
    for (N, D, H, O), path in (((100, 1, 20, 1), "engine"), ((10, 33, 4, 2), "engine"),
                               ((64, 128, 128, 8), "gemm")):
        K = 3
        args = make_args(K, N, D, H, O, "shared", "per_model", True, "per_model", "per_model", seed=N, dtype=torch.float32,
                         grad=False)
        assert [model_path(args, k) for k in range(K)] == [path] * K
        x, w1, b1, w2, b2, t = args
        loss, grads = fusedgrad.mlp_loss_and_grads(*args, wrt=("w1", "b1", "w2", "b2"))
        for k in range(K):
            lk, gk = fusedgrad.mlp_loss_and_grads(x, w1[k], b1[k], w2[k], b2[k], t[k], wrt=("w1", "b1", "w2", "b2"))
            assert torch.equal(loss[k], lk)
            for g, g1 in zip(grads[1:5], gk[1:5]):
                assert torch.equal(g[k], g1)


def test_bitwise_identical_with_one_and_two_threads(restore_threads):
    args = make_args(64, 100, 1, 20, 1, "shared", "per_model", True, "per_model", "shared", seed=3, grad=False)
    assert model_path(args) == "engine"
    results = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        results.append(fusedgrad.mlp_loss_and_grads(*args, wrt=("x", "w1", "b1", "w2", "b2", "target")))
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


def model_path(args, k=0):
    """The kernel path model k's loss takes: every model runs the single-model dispatch."""
    x, w1, b1, w2, b2, target = args
    K = w1.shape[0]

    def model_k(t, per_model):  # model k's slice of a stacked argument, a shared one as it is
        return t.detach()[k] if t is not None and per_model(t) else (None if t is None else t.detach())

    data = lambda t: t.dim() == 3  # noqa: E731  (x, target: (K, N, ·) per model, (N, ·) shared)
    bias = lambda t: t.dim() >= 2 and t.shape[0] == K  # noqa: E731
    return fusedgrad._C.explain_op(True, model_k(x, data), w1.detach()[k], model_k(b1, bias), w2.detach()[k],
                                   model_k(b2, bias), model_k(target, data), "sigmoid")


@pytest.mark.parametrize("shape,path", [((4, 64, 128, 128, 8), "gemm"), ((64, 100, 1, 20, 1), "engine")],
                         ids=["gemm_path", "engine_path"])
def test_models_on_two_threads_under_autograd(shape, path, restore_threads):
    """Models spread over threads, arguments requiring grad: the worker threads run below
    autograd like the calling thread (no autograd views of the slices, no out= errors)."""
    K, N, D, H, O = shape
    args = make_args(K, N, D, H, O, "shared", "per_model", True, "per_model", "per_model", seed=9)
    assert model_path(args) == path
    torch.set_num_threads(2)
    fused = grads_of(args, lambda: fusedgrad.mlp_loss(*args).sum().backward())
    fused_mlp = grads_of(args[:5], lambda: fusedgrad.mlp(*args[:5]).sum().backward())
    native = grads_of(args, lambda: native_losses(*args, "mean", "sigmoid").sum().backward())
    native_mlp = grads_of(args[:5], lambda: native_preds(*args[:5], "sigmoid").sum().backward())
    for name, gf, gn in zip(("x", "w1", "b1", "w2", "b2", "target"), fused, native):
        assert_rel(gf, gn, name)
    for name, gf, gn in zip(("x", "w1", "b1", "w2", "b2"), fused_mlp, native_mlp):
        assert_rel(gf, gn, "mlp " + name)


def test_no_grad_and_unit_gradient_hand_over():
    args = make_args(3, 5, 2, 4, 2, "shared", "per_model", True, "per_model", "per_model", seed=1)
    with torch.no_grad():
        loss = fusedgrad.mlp_loss(*args)
    assert loss.grad_fn is None and loss.shape == (3,)
    # retain_graph: the gradients handed out are the caller's own, a second backward gives them again.
    loss = fusedgrad.mlp_loss(*args)
    g1 = torch.autograd.grad(loss.sum(), args[1], retain_graph=True)[0]
    expected = g1.clone()
    g1.zero_()
    g2 = torch.autograd.grad(loss.sum(), args[1])[0]
    assert torch.equal(g2, expected) and expected.abs().max() > 0


@pytest.mark.parametrize("x_kind", ["shared", "per_model"])
def test_double_backward_matches_native(x_kind):
    """create_graph=True through the ensemble ops: the gradient of a loss built from dx (a gradient
    penalty) and from d(loss)/dw1 is native autograd's, per model, in float64."""
    args = make_args(3, 4, 2, 5, 2, x_kind, "per_model", True, "per_model", "shared", seed=2)

    def penalty(loss_fn, pred_fn):
        dx, dw1 = torch.autograd.grad(loss_fn().sum(), [args[0], args[1]], create_graph=True)
        gx, = torch.autograd.grad(pred_fn().pow(2).sum(), [args[0]], create_graph=True)
        return dx.pow(2).sum() + dw1.pow(3).sum() + gx.sin().sum()

    fused = grads_of(args, lambda: penalty(lambda: fusedgrad.mlp_loss(*args),
                                           lambda: fusedgrad.mlp(*args[:5])).backward())
    native = grads_of(args, lambda: penalty(lambda: native_losses(*args, "mean", "sigmoid"),
                                            lambda: native_preds(*args[:5], "sigmoid")).backward())
    for name, f, n in zip(["x", "w1", "b1", "w2", "b2", "target"], fused, native):
        assert (f is None) == (n is None), name
        if n is not None:
            assert n.abs().max() > 0, name
            assert_rel(f, n, f"d{name}", rtol=1e-10)


@pytest.mark.parametrize("K,N", [(0, 4), (3, 0)])
def test_zero_sizes(K, N):
    args = make_args(K, N, 2, 3, 2, "shared", "per_model", True, "per_model", "per_model", seed=4)
    for red in ("mean", "sum"):
        fused = grads_of(args, lambda: fusedgrad.mlp_loss(*args, reduction=red).sum().backward())
        native = grads_of(args, lambda: native_losses(*args, red, "sigmoid").sum().backward())
        loss = fusedgrad.mlp_loss(*args, reduction=red).detach()
        ref = native_losses(*args, red, "sigmoid").detach()
        assert loss.shape == (K,)
        torch.testing.assert_close(loss, ref, equal_nan=True)
        for a, gf, gn in zip(args, fused, native):
            if a is not None:
                assert gf.shape == a.shape
                torch.testing.assert_close(gf, torch.zeros_like(a) if gn is None else gn)


def test_gradcheck():
    args = make_args(3, 4, 2, 3, 2, "shared", "per_model", True, "per_sample", "per_model", seed=5)
    assert torch.autograd.gradcheck(lambda *a: fusedgrad.mlp_loss(*a), tuple(args))
    assert torch.autograd.gradcheck(lambda *a: fusedgrad.mlp(*a), tuple(args[:5]))
    args = make_args(2, 3, 2, 3, 2, "per_model", "shared_per_sample", True, "k1c", "one_model_dim", seed=6)
    assert torch.autograd.gradcheck(lambda *a: fusedgrad.mlp_loss(*a, reduction="sum"), tuple(args))


# ---- opcheck ---------------------------------------------------------------------------------------

SUBTESTS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
ENSEMBLE_OPS = ("ensemble_mlp_loss", "ensemble_mlp_loss_and_grads", "ensemble_mlp_loss_forward", "ensemble_mlp",
                "ensemble_mlp_forward", "ensemble_mlp_backward")
# (x kind, b1 kind, w2 on, b2 kind, target kind, requires grad)
OPCHECK_SAMPLES = {
    "shared_x_per_model_biases": ("shared", "per_model", True, "per_model", "shared", True),
    "per_model_x_per_sample": ("per_model", "per_sample", True, "per_sample", "per_model", True),
    "broadcasts_no_w2": ("one_model_dim", "shared_per_sample", False, "none", "k1c", True),
    "no_grad": ("shared", "kn1", True, "none", "none", False),
}


def test_every_ensemble_op_is_covered():
    registered = {name.split("::", 1)[1].split(".", 1)[0] for name in torch._C._dispatch_get_all_op_names()
                  if name.startswith("fusedgrad::ensemble_")}
    assert registered == set(ENSEMBLE_OPS)


def opcheck_args(op_name, sample, dtype):
    x_kind, b1_kind, w2_on, b2_kind, t_kind, grad = OPCHECK_SAMPLES[sample]
    x, w1, b1, w2, b2, t = make_args(3, 5, 2, 4, 2, x_kind, b1_kind, w2_on, b2_kind, t_kind, seed=len(sample),
                                     dtype=dtype, grad=grad)
    if op_name == "ensemble_mlp_loss":
        return (x, w1, b1, w2, b2, t, "mean", "sigmoid")
    if op_name in ("ensemble_mlp_loss_and_grads", "ensemble_mlp_loss_forward"):
        return (x, w1, b1, w2, b2, t, "sum", "sigmoid", [True, True, True, True, True, t is not None])
    if op_name in ("ensemble_mlp", "ensemble_mlp_forward"):
        return (x, w1, b1, w2, b2, "identity")
    with torch.no_grad():
        pred, acts = OPS.ensemble_mlp_forward(x, w1, b1, w2, b2, "sigmoid")
    if w2 is None:
        acts = pred
    grad_out = torch.randn(pred.shape, dtype=dtype)
    return (grad_out, x, w1, b1, w2, b2, acts, "sigmoid", [True] * 5)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
@pytest.mark.parametrize("sample", list(OPCHECK_SAMPLES))
@pytest.mark.parametrize("op_name", ENSEMBLE_OPS)
def test_opcheck(op_name, sample, dtype):
    args = opcheck_args(op_name, sample, dtype)
    results = torch.library.opcheck(getattr(OPS, op_name).default, args, test_utils=SUBTESTS, raise_exception=False)
    failed = {k: v for k, v in results.items() if v != "SUCCESS"}
    assert not failed, failed


def test_meta_tensors_give_shapes():
    args = make_args(3, 5, 2, 4, 2, "per_model", "per_model", True, "per_model", "shared", seed=0)
    meta = [None if a is None else a.detach().to("meta").requires_grad_() for a in args]
    loss = fusedgrad.mlp_loss(*meta)
    assert loss.shape == (3,) and loss.device.type == "meta"
    loss.sum().backward()
    assert [a.grad.shape for a in meta] == [a.shape for a in args]
    assert fusedgrad.mlp(*meta[:5]).shape == (3, 5, 2)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()
    try:
        args = make_args(4, 6, 3, 5, 2, "shared", "per_model", True, "per_model", "per_model", seed=8)
        x, w1, b1, w2, b2, t = args
        weights = torch.tensor([1.0, 2.0, -0.5, 0.25], dtype=F64)

        def fn(x, t):
            return (fusedgrad.mlp_loss(x, w1, b1, w2, b2, t) * weights).sum() + \
                F.l1_loss(fusedgrad.mlp(x, w1, b1, w2, b2), t.expand(4, 6, 2))

        compiled = torch.compile(fn, fullgraph=True)
        got = grads_of(args, lambda: compiled(x, t).backward())
        want = grads_of(args, lambda: fn(x, t).backward())
        for name, g, w in zip("x w1 b1 w2 b2 t".split(), got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-14, msg=name)
    finally:
        torch._dynamo.reset()


# ---- argument errors ---------------------------------------------------------------------------------

def _base(dtype=F64):
    K, N, D, H, O = 3, 5, 2, 4, 2
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=dtype: torch.randn(*s, generator=g, dtype=dt)  # noqa: E731
    return dict(x=r(N, D), w1=r(K, H, D), b1=r(K, H), w2=r(K, O, H), b2=r(K, O), target=r(N, O))


ERRORS = [
    # (description, overrides, exception, exact message after "fusedgrad.mlp_loss: ")
    ("w2 with another K", dict(w2=(2, 2, 4)), ValueError,
     "argument 'w2' has shape (2, 2, 4), which holds 2 models but w1 holds K = 3 models; every per-model "
     "argument must have the same K"),
    ("b1 with another K", dict(b1=(2, 4)), ValueError,
     "argument 'b1' has shape (2, 4), which holds 2 models in its model dimension but w1 holds K = 3 models; "
     "every per-model argument must have the same K (or 1 to share it)"),
    ("x with another K", dict(x=(2, 5, 2)), ValueError,
     "argument 'x' has shape (2, 5, 2), which holds 2 models in its model dimension but w1 holds K = 3 models; "
     "every per-model argument must have the same K (or 1 to share it)"),
    ("target with another K", dict(target=(4, 5, 2)), ValueError,
     "argument 'target' has shape (4, 5, 2), which holds 4 models in its model dimension but w1 holds K = 3 "
     "models; every per-model argument must have the same K (or 1 to share it)"),
    ("w1 against x", dict(w1=(3, 4, 3)), ValueError,
     "argument 'w1' must have shape (K, H, 2) to match the last dimension of x, got (3, 4, 3)"),
    ("w2 against w1", dict(w2=(3, 2, 5)), ValueError,
     "argument 'w2' must have shape (K, out_features, hidden_features) = (K, O, 4) to match w1's "
     "hidden_features, got (3, 2, 5)"),
    ("single-model w2 with 3-D w1", dict(w2=(2, 4)), ValueError,
     "argument 'w2' must have shape (K, out_features, hidden_features) = (K, O, 4) to match w1's "
     "hidden_features, got (2, 4) (w1 is 3-D, (K, H, D): an ensemble of K models, whose weights are all "
     "stacked; for one model pass w1 as (H, D))"),
    ("1-D bias", dict(b1=(4,)), ValueError,
     "argument 'b1' of an ensemble must have shape (K, 4), one bias per model, or be 3-D, broadcasting to "
     "(K, N, 4) (per-sample biases); got (4,)"),
    ("bias not broadcasting", dict(b2=(3, 5, 3)), ValueError,
     "argument 'b2' has shape (3, 5, 3), which does not broadcast to the ensemble's prediction (K, N, O) = "
     "(3, 5, 2) (a 3-D bias broadcasts to (K, N, C): (K, N, C), (K, 1, C), (1, N, C), ...)"),
    ("target rows", dict(target=(4, 2)), ValueError,
     "argument 'target' has shape (4, 2), which does not broadcast to the ensemble's prediction (K, N, O) = "
     "(3, 5, 2) ((N, O) shared by all models, or (K, N, O) one per model; dimensions of size 1 broadcast)"),
    ("x 1-D", dict(x=(2,)), ValueError,
     "argument 'x' of an ensemble must have shape (N, D), shared by all models, or (K, N, D), one per model; "
     "got (2,)"),
    ("target 1-D", dict(target=(2,)), ValueError,
     "argument 'target' of an ensemble must have shape (N, O), shared by all models, or (K, N, O), one per "
     "model; got (2,)"),
    ("b2 without w2", dict(w2=None), ValueError,
     "argument 'b2' was given without 'w2'; b2 is the second layer's bias and needs w2 (pass w2, or drop b2)"),
    ("dtype", dict(w2=((3, 2, 4), torch.float32)), TypeError,
     "argument 'w2' has dtype torch.float32 but x has dtype torch.float64; all tensor arguments must share one "
     "dtype"),
    ("integer x", dict(x=((5, 2), torch.int64)), TypeError,
     "argument 'x' must have dtype torch.float32 or torch.float64, got torch.int64"),
]


def _apply(overrides, device=None):
    args = _base()
    for name, spec in overrides.items():
        if spec is None:
            args[name] = None
            continue
        shape, dtype = spec if isinstance(spec[0], tuple) else (spec, F64)
        args[name] = torch.zeros(shape, dtype=dtype) if dtype == torch.int64 else torch.randn(shape, dtype=dtype)
    if device is not None:
        args = {k: None if v is None else v.to(device) for k, v in args.items()}
    return args


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("what,overrides,exc,message", ERRORS, ids=[e[0] for e in ERRORS])
def test_argument_errors_name_the_function_and_argument(what, overrides, exc, message, device):
    a = _apply(overrides, device)
    with pytest.raises(exc, match="^" + re.escape("fusedgrad.mlp_loss: " + message) + "$"):
        fusedgrad.mlp_loss(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["target"])
    with pytest.raises(exc, match="^" + re.escape("fusedgrad.mlp_loss_and_grads: " + message) + "$"):
        fusedgrad.mlp_loss_and_grads(a["x"], a["w1"], a["b1"], a["w2"], a["b2"], a["target"], wrt="w1")
    if "target" not in overrides:
        with pytest.raises(exc, match="^" + re.escape("fusedgrad.mlp: " + message) + "$"):
            fusedgrad.mlp(a["x"], a["w1"], a["b1"], a["w2"], a["b2"])


def test_errors_with_grad_name_mlp_loss():
    """The autograd path (requires_grad) reports the same function name."""
    a = _apply(dict(w2=(2, 2, 4)))
    a["w1"].requires_grad_()
    with pytest.raises(ValueError, match=r"^fusedgrad\.mlp_loss: argument 'w2' has shape \(2, 2, 4\)"):
        fusedgrad.mlp_loss(**a)
    with pytest.raises(ValueError, match=r"^fusedgrad\.mlp: argument 'w2' has shape \(2, 2, 4\)"):
        fusedgrad.mlp(a["x"], a["w1"], a["b1"], a["w2"], a["b2"])


def test_mixed_devices_and_options():
    a = _base()
    a["b1"] = a["b1"].to("meta")
    with pytest.raises(ValueError, match=re.escape(
            "fusedgrad.mlp_loss: argument 'b1' is on device meta but x is on device cpu; all tensor arguments "
            "must be on one device")):
        fusedgrad.mlp_loss(**a)
    a = _base()
    with pytest.raises(ValueError, match=re.escape("fusedgrad.mlp_loss: argument 'reduction' must be 'mean' or "
                                                   "'sum', got 'none'")):
        fusedgrad.mlp_loss(**a, reduction="none")
    with pytest.raises(TypeError, match=re.escape("fusedgrad.mlp: argument 'b1' must be a torch.Tensor or None, "
                                                  "got list")):
        fusedgrad.mlp(a["x"], a["w1"], [1.0], a["w2"], a["b2"])
