"""Fake (meta) kernels of the ensemble ops ``torch.ops.fusedgrad.ensemble_*``.

What the real kernels (csrc/ops/ensemble_ops.cpp) return, shapes and dtypes only,
after the real kernels' own argument checks (csrc/ops/ensemble.h:
check_ensemble_args, run from C++ on the fake or meta tensors by
``fusedgrad._fake.check_args``), so that meta tensors and tracing refuse what
the real kernels refuse, with their messages. The shape rules are those of
csrc/ops/ensemble.h: w1 ``(K, H, D)``, w2 ``(K, O, H)``; a 2-D bias is
``(K, C)`` read as ``(K, 1, C)``, a 3-D one broadcasts to ``(K, N, C)``; x and
target are 2-D (shared by all models) or 3-D (model dimension K, or 1 to share).
"""
import torch

from . import _C
from ._fake import check_args

_LIB = "fusedgrad"


class _Operand:
    """One argument; `stacked`: slice k belongs to model k alone (its gradient has the argument's shape)."""

    def __init__(self, t, stacked):
        self.t, self.stacked = t, stacked


class _Problem:
    pass


def _problem(fn, x, w1, b1, w2, b2, target, activation, reduction=None):
    """The C++ checks (named ``fn`` in messages), then the shapes the kernels produce."""
    check_args(_C.check_ensemble_args, fn, x, w1, b1, w2, b2, target, reduction, activation)
    e = _Problem()
    e.saves_input = _C.check_options(None, activation)
    e.K, e.H, e.N = w1.shape[0], w1.shape[1], x.shape[-2]
    e.O = w2.shape[1] if w2 is not None else e.H

    def operand(t, per_model):  # a model dimension of K (not 1, which shares the slice)
        return None if t is None else _Operand(t, per_model and t.shape[0] == e.K)

    e.x = operand(x, x.dim() == 3)
    e.w1 = _Operand(w1, True)
    e.w2 = None if w2 is None else _Operand(w2, True)
    e.b1, e.b2 = operand(b1, True), operand(b2, True)
    e.target = operand(target, target is not None and target.dim() == 3)
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
    check_args(_C.check_ensemble_backward_args, grad_out, x, w1, b1, w2, b2, activations, activation)
    e = _problem("mlp", x, w1, b1, w2, b2, None, activation)
    return _grads(e, output_mask, False, 5)
