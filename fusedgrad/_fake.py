"""Fake (meta) kernels of the ``torch.ops.fusedgrad`` operators.

``torch.compile``, ``torch.export`` and FX tracing run operators on
FakeTensors, which carry shape, dtype and device but no data. A fake kernel
says what the real kernel returns — shapes, dtypes, strides — without
computing anything. Every output of the CPU kernels is a fresh contiguous
tensor, so ``new_empty`` describes each one exactly. Shapes may be symbolic
(``dynamic=True``): only products and indexing of sizes are used here.

Argument checking lives in C++ only (csrc/common/problem.cpp, options.cpp,
csrc/ops/op_kernels.h, deep_checks.h): each fake kernel first runs its op's
own rules from there on the fake or meta tensors (:func:`check_args`), so that
tracing and meta tensors refuse what the kernels refuse, with their message.
"""
import torch

from . import _C, _compat

_LIB = "fusedgrad"
check_options = _C.check_options


def _rows(x):
    """N: the product of x's leading dimensions (1 for a 1-D x)."""
    n = 1
    for size in x.shape[:-1]:
        n = n * size
    return n


class _NoHint(Exception):
    pass


def _concrete(arg):
    """A fake argument the C++ checks can read: a tensor of symbolic size (dynamic shapes) as an empty one of
    the sizes traced (their hints, no guard added); lists element by element; anything else as it is."""
    if isinstance(arg, (list, tuple)):
        return [_concrete(a) for a in arg]
    if isinstance(arg, torch.Tensor) and not all(isinstance(size, int) for size in arg.shape):
        hints = [_compat.size_hint(size) for size in arg.shape]
        if any(h is None for h in hints):
            raise _NoHint
        return arg.new_empty(hints)
    return arg


def check_args(check, *args):
    """Runs ``check`` (an op's argument rules, from ``fusedgrad._C``) on a fake kernel's arguments."""
    try:
        args = [_concrete(a) for a in args]
    except _NoHint:  # a size without a hint (data-dependent): the kernel checks it when it runs
        return
    check(*args)


def _shapes(x, w1, w2):
    """(hidden shape (*, H), prediction shape (*, O), H) from x (*, D), w1 (H, D), w2 (O, H) or None."""
    hidden = w1.shape[0]
    out = hidden if w2 is None else w2.shape[0]
    lead = tuple(x.shape[:-1])
    return lead + (hidden,), lead + (out,), hidden


def _grad_or_empty(needed, arg, like):
    """The gradient of ``arg`` in its own shape, or the empty (numel 0) placeholder."""
    if needed and arg is not None:
        return arg.new_empty(arg.shape)
    return like.new_empty((0,))


@torch.library.register_fake(f"{_LIB}::mlp_loss")
def _mlp_loss_fake(x, w1, b1, w2, b2, target, reduction, activation):
    check_args(_C.check_problem_args, x, w1, b1, w2, b2, target, reduction, activation)
    return x.new_empty(())


@torch.library.register_fake(f"{_LIB}::mlp_loss_and_grads")
def _mlp_loss_and_grads_fake(x, w1, b1, w2, b2, target, reduction, activation, output_mask):
    check_args(_C.check_problem_args, x, w1, b1, w2, b2, target, reduction, activation)
    args = (x, w1, b1, w2, b2, target)
    grads = tuple(_grad_or_empty(need, arg, x) for need, arg in zip(output_mask, args))
    return (x.new_empty(()),) + grads


@torch.library.register_fake(f"{_LIB}::mlp")
def _mlp_fake(x, w1, b1, w2, b2, activation):
    check_args(_C.check_problem_args, x, w1, b1, w2, b2, None, None, activation)
    _, out_shape, _ = _shapes(x, w1, w2)
    return x.new_empty(out_shape)


@torch.library.register_fake(f"{_LIB}::mlp_forward")
def _mlp_forward_fake(x, w1, b1, w2, b2, activation):
    check_args(_C.check_problem_args, x, w1, b1, w2, b2, None, None, activation)
    saves_input = _C.check_options(None, activation)
    _, out_shape, hidden = _shapes(x, w1, w2)
    prediction = x.new_empty(out_shape)
    # Without w2 the prediction is s itself: the slot is empty, unless the
    # activation's derivative reads h.
    activations = x.new_empty((_rows(x), hidden)) if w2 is not None or saves_input else x.new_empty((0,))
    return prediction, activations


@torch.library.register_fake(f"{_LIB}::mlp_backward")
def _mlp_backward_fake(grad_out, x, w1, b1, w2, b2, activations, activation, output_mask):
    check_args(_C.check_backward_args, grad_out, x, w1, b1, w2, b2, activations, activation)
    args = (x, w1, b1, w2, b2)
    return tuple(_grad_or_empty(need, arg, x) for need, arg in zip(output_mask, args))
