"""Fake (meta) kernels of the ensemble ops ``torch.ops.fusedgrad.ensemble_*``.

What the real kernels (csrc/ops/ensemble_ops.cpp) return, shapes and dtypes only,
after the same argument checks with the same messages as
csrc/ops/ensemble_problem.cpp, so that meta tensors and tracing refuse what the
real kernels refuse. The shape rules are those of csrc/ops/ensemble.h: w1
``(K, H, D)``, w2 ``(K, O, H)``; a 2-D bias is ``(K, C)`` read as ``(K, 1, C)``,
a 3-D one broadcasts to ``(K, N, C)``; x and target are 2-D (shared by all
models) or 3-D (model dimension K, or 1 to share).
"""
import torch

from ._fake import check_options

_LIB = "fusedgrad"


def _shape(shape):
    return str(tuple(shape))


class _Operand:
    """One argument as (Km, R, C); `stacked`: slice k belongs to model k alone."""

    def __init__(self, t, view3, stacked):
        self.t, self.view3, self.stacked = t, view3, stacked


def _check_tensor(fn, name, t, x):
    torch._check_value(t.layout == torch.strided,
                       lambda: f"fusedgrad.{fn}: argument '{name}' must be a dense (torch.strided) tensor")
    if t is x:
        ok = t.dtype in (torch.float32, torch.float64) or (
            t.dtype in (torch.float16, torch.bfloat16) and t.device.type == "cuda")
        torch._check_type(ok, lambda: f"fusedgrad.{fn}: argument 'x' must have dtype torch.float32 or "
                          f"torch.float64, got {t.dtype}")
        return
    torch._check_type(t.dtype == x.dtype, lambda: f"fusedgrad.{fn}: argument '{name}' has dtype {t.dtype} but x "
                      f"has dtype {x.dtype}; all tensor arguments must share one dtype")
    torch._check_value(t.device == x.device, lambda: f"fusedgrad.{fn}: argument '{name}' is on device {t.device} "
                       f"but x is on device {x.device}; all tensor arguments must be on one device")


def _operand(fn, name, t, view3, K, rows, cols, meaning, forms, has_model_dim):
    km = view3.shape[0]
    torch._check_value(
        km == K or km == 1,
        lambda: f"fusedgrad.{fn}: argument '{name}' has shape {_shape(t.shape)}, which holds {km} models in its "
        f"model dimension but w1 holds K = {K} models; every per-model argument must have the same K (or 1 to "
        "share it)")
    fits = view3.shape[1] in (rows, 1) and view3.shape[2] in (cols, 1)
    torch._check_value(
        fits, lambda: f"fusedgrad.{fn}: argument '{name}' has shape {_shape(t.shape)}, which does not broadcast "
        f"to {meaning} {_shape((K, rows, cols))} ({forms})")
    return _Operand(t, view3, has_model_dim and km == K)


class _Problem:
    pass


def _problem(fn, x, w1, b1, w2, b2, target, activation, reduction=None):
    """The checks of csrc/ops/ensemble_problem.cpp, in the same order (the options first, by the C++ parser)."""
    saves_input = check_options(reduction, activation)
    _check_tensor(fn, "x", x, x)
    _check_tensor(fn, "w1", w1, x)
    torch._check_value(w1.dim() == 3, lambda: f"fusedgrad.{fn}: argument 'w1' of an ensemble must have shape "
                       f"(K, hidden_features, in_features), got {_shape(w1.shape)}")
    e = _Problem()
    e.saves_input = saves_input
    e.K, e.H = w1.shape[0], w1.shape[1]
    torch._check_value(x.dim() in (2, 3), lambda: f"fusedgrad.{fn}: argument 'x' of an ensemble must have shape "
                       f"(N, D), shared by all models, or (K, N, D), one per model; got {_shape(x.shape)}")
    e.D, e.N = x.shape[-1], x.shape[-2]
    torch._check_value(w1.shape[2] == e.D, lambda: f"fusedgrad.{fn}: argument 'w1' must have shape (K, H, {e.D}) "
                       f"to match the last dimension of x, got {_shape(w1.shape)}")
    e.w1 = _Operand(w1, w1, True)
    x3 = x.unsqueeze(0) if x.dim() == 2 else x
    e.x = _operand(fn, "x", x, x3, e.K, e.N, e.D, "the ensemble's input (K, N, D) =",
                   "(N, D) shared by all models, or (K, N, D) one per model", x.dim() == 3)
    if w2 is not None:
        _check_tensor(fn, "w2", w2, x)
        torch._check_value(
            w2.dim() == 3 and w2.shape[2] == e.H,
            lambda: f"fusedgrad.{fn}: argument 'w2' must have shape (K, out_features, hidden_features) = "
            f"(K, O, {e.H}) to match w1's hidden_features, got {_shape(w2.shape)}"
            + (" (w1 is 3-D, (K, H, D): an ensemble of K models, whose weights are all stacked; for one model "
               "pass w1 as (H, D))" if w2.dim() == 2 else ""))
        torch._check_value(
            w2.shape[0] == e.K,
            lambda: f"fusedgrad.{fn}: argument 'w2' has shape {_shape(w2.shape)}, which holds {w2.shape[0]} models "
            f"but w1 holds K = {e.K} models; every per-model argument must have the same K")
        e.O = w2.shape[1]
        e.w2 = _Operand(w2, w2, True)
    else:
        torch._check_value(b2 is None, lambda: f"fusedgrad.{fn}: argument 'b2' was given without 'w2'; b2 is the "
                           "second layer's bias and needs w2 (pass w2, or drop b2)")
        e.O = e.H
        e.w2 = None

    def bias(name, b, cols, meaning):
        if b is None:
            return None
        _check_tensor(fn, name, b, x)
        torch._check_value(
            b.dim() in (2, 3),
            lambda: f"fusedgrad.{fn}: argument '{name}' of an ensemble must have shape (K, {cols}), one bias per "
            f"model, or be 3-D, broadcasting to (K, N, {cols}) (per-sample biases); got {_shape(b.shape)}")
        forms = ("a 2-D bias is read as (K, C), one per model" if b.dim() == 2 else
                 "a 3-D bias broadcasts to (K, N, C): (K, N, C), (K, 1, C), (1, N, C), ...")
        return _operand(fn, name, b, b.unsqueeze(1) if b.dim() == 2 else b, e.K, e.N, cols, meaning, forms, True)

    e.b1 = bias("b1", b1, e.H, "the ensemble's hidden activations (K, N, H) =")
    e.b2 = bias("b2", b2, e.O, "the ensemble's prediction (K, N, O) =")
    e.target = None
    if target is not None:
        _check_tensor(fn, "target", target, x)
        torch._check_value(
            target.dim() in (2, 3),
            lambda: f"fusedgrad.{fn}: argument 'target' of an ensemble must have shape (N, O), shared by all "
            f"models, or (K, N, O), one per model; got {_shape(target.shape)}")
        t3 = target.unsqueeze(0) if target.dim() == 2 else target
        e.target = _operand(fn, "target", target, t3, e.K, e.N, e.O, "the ensemble's prediction (K, N, O) =",
                            "(N, O) shared by all models, or (K, N, O) one per model; dimensions of size 1 "
                            "broadcast", target.dim() == 3)
    e.operands = (e.x, e.w1, e.b1, e.w2, e.b2, e.target)
    return e


def _grads(e, mask, per_model_shared, n):
    out = []
    for need, op in zip(mask, e.operands[:n]):
        if not need or op is None:
            out.append(e.x.t.new_empty((0,)))
        elif op.stacked or not per_model_shared:
            out.append(op.t.new_empty(op.t.shape))
        else:
            out.append(op.t.new_empty((e.K,) + tuple(op.t.shape)))
    return tuple(out)


@torch.library.register_fake(f"{_LIB}::ensemble_mlp_loss")
def _loss_fake(x, w1, b1, w2, b2, target, reduction, activation):
    e = _problem("mlp_loss", x, w1, b1, w2, b2, target, activation, reduction)
    return x.new_empty((e.K,))


@torch.library.register_fake(f"{_LIB}::ensemble_mlp_loss_and_grads")
def _loss_and_grads_fake(x, w1, b1, w2, b2, target, reduction, activation, output_mask):
    e = _problem("mlp_loss_and_grads", x, w1, b1, w2, b2, target, activation, reduction)
    return (x.new_empty((e.K,)),) + _grads(e, output_mask, False, 6)


@torch.library.register_fake(f"{_LIB}::ensemble_mlp_loss_forward")
def _loss_forward_fake(x, w1, b1, w2, b2, target, reduction, activation, output_mask):
    e = _problem("mlp_loss", x, w1, b1, w2, b2, target, activation, reduction)
    return (x.new_empty((e.K,)),) + _grads(e, output_mask, True, 6)


@torch.library.register_fake(f"{_LIB}::ensemble_mlp")
def _mlp_fake(x, w1, b1, w2, b2, activation):
    e = _problem("mlp", x, w1, b1, w2, b2, None, activation)
    return x.new_empty((e.K, e.N, e.O))


@torch.library.register_fake(f"{_LIB}::ensemble_mlp_forward")
def _mlp_forward_fake(x, w1, b1, w2, b2, activation):
    e = _problem("mlp", x, w1, b1, w2, b2, None, activation)
    acts = x.new_empty((e.K, e.N, e.H)) if w2 is not None or e.saves_input else x.new_empty((0,))
    return x.new_empty((e.K, e.N, e.O)), acts


@torch.library.register_fake(f"{_LIB}::ensemble_mlp_backward")
def _mlp_backward_fake(grad_out, x, w1, b1, w2, b2, activations, activation, output_mask):
    e = _problem("mlp", x, w1, b1, w2, b2, None, activation)
    torch._check_value(
        tuple(grad_out.shape) == (e.K, e.N, e.O),
        lambda: f"fusedgrad.mlp: argument 'grad_out' must have the prediction's shape {_shape((e.K, e.N, e.O))}, "
        f"got {_shape(grad_out.shape)}")
    return _grads(e, output_mask, False, 5)
