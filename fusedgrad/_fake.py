"""Fake (meta) kernels of the ``torch.ops.fusedgrad`` operators.

``torch.compile``, ``torch.export`` and FX tracing run operators on
FakeTensors, which carry shape, dtype and device but no data. A fake kernel
says what the real kernel returns — shapes, dtypes, strides — without
computing anything. Every output of the CPU kernels is a fresh contiguous
tensor, so ``new_empty`` describes each one exactly. Shapes may be symbolic
(``dynamic=True``): only products and indexing of sizes are used here.

Argument checking lives in C++ (csrc/common/problem.cpp, options.cpp). The fake
kernels repeat the device, dtype and shape rules (ValueError/TypeError naming
the argument, like the C++ ones), so that meta tensors and tracing refuse what
the real kernels refuse instead of returning a result; the string options are
checked by the C++ parser itself (``_C.check_options``).
"""
import torch

from . import _C

_LIB = "fusedgrad"
check_options = _C.check_options


def _rows(x):
    """N: the product of x's leading dimensions (1 for a 1-D x)."""
    n = 1
    for size in x.shape[:-1]:
        n = n * size
    return n


def _check_same_device_and_dtype(name, x, **tensors):
    """All tensor arguments on x's device and of x's dtype, as the real kernels demand.

    Without this a call mixing, say, meta and CPU tensors would be routed to
    this fake kernel and return a result instead of the error the real kernel
    gives."""
    for arg_name, t in tensors.items():
        if t is None:
            continue
        torch._check_value(
            t.device == x.device,
            lambda: f"fusedgrad.{name}: argument '{arg_name}' is on device {t.device} but x is on device "
            f"{x.device}; all tensor arguments must be on one device",
        )
        torch._check_type(
            t.dtype == x.dtype,
            lambda: f"fusedgrad.{name}: argument '{arg_name}' has dtype {t.dtype} but x has dtype {x.dtype}; "
            "all tensor arguments must share one dtype",
        )


def _shapes(name, x, w1, w2):
    """(hidden shape (*, H), prediction shape (*, O), H, O) from x (*, D), w1 (H, D), w2 (O, H) or None."""
    torch._check_value(x.dim() >= 1, lambda: f"fusedgrad.{name}: argument 'x' must have at least one dimension")
    torch._check_value(w1.dim() == 2,
                       lambda: f"fusedgrad.{name}: argument 'w1' must be 2-D (H, D), got {tuple(w1.shape)}")
    torch._check_value(w2 is None or w2.dim() == 2,
                       lambda: f"fusedgrad.{name}: argument 'w2' must be 2-D (O, H), got {tuple(w2.shape)}")
    torch._check_value(
        w1.shape[1] == x.shape[-1],
        lambda: f"fusedgrad.{name}: argument 'w1' must have shape (H, {x.shape[-1]}) to match the last "
        f"dimension of x, got {tuple(w1.shape)}")
    torch._check_value(
        w2 is None or w2.shape[1] == w1.shape[0],
        lambda: f"fusedgrad.{name}: argument 'w2' must have shape (O, {w1.shape[0]}) to match w1's "
        f"hidden_features, got {tuple(w2.shape)}")
    hidden = w1.shape[0]
    out = hidden if w2 is None else w2.shape[0]
    lead = tuple(x.shape[:-1])
    return lead + (hidden,), lead + (out,), hidden, out


def _check_broadcasts(name, arg_name, t, full_shape):
    """t must broadcast to full_shape without enlarging it (as csrc/common/problem.cpp demands)."""
    if t is None:
        return
    ok = t.dim() <= len(full_shape) and all(
        t.shape[-k] == full_shape[-k] or t.shape[-k] == 1 for k in range(1, t.dim() + 1))
    torch._check_value(
        ok, lambda: f"fusedgrad.{name}: argument '{arg_name}' has shape {tuple(t.shape)}, which does not "
        f"broadcast to {tuple(full_shape)}")


def _grad_or_empty(needed, arg, like):
    """The gradient of ``arg`` in its own shape, or the empty (numel 0) placeholder."""
    if needed and arg is not None:
        return arg.new_empty(arg.shape)
    return like.new_empty((0,))


def _check_operands(name, hidden_shape, out_shape, b1=None, w2=None, b2=None, target=None):
    torch._check_value(
        b2 is None or w2 is not None,
        lambda: f"fusedgrad.{name}: argument 'b2' was given without 'w2'; b2 is the second layer's bias and needs w2")
    _check_broadcasts(name, "b1", b1, hidden_shape)
    _check_broadcasts(name, "b2", b2, out_shape)
    _check_broadcasts(name, "target", target, out_shape)


@torch.library.register_fake(f"{_LIB}::mlp_loss")
def _mlp_loss_fake(x, w1, b1, w2, b2, target, reduction, activation):
    check_options(reduction, activation)
    _check_same_device_and_dtype("mlp_loss", x, w1=w1, b1=b1, w2=w2, b2=b2, target=target)
    hidden_shape, out_shape, _, _ = _shapes("mlp_loss", x, w1, w2)
    _check_operands("mlp_loss", hidden_shape, out_shape, b1=b1, w2=w2, b2=b2, target=target)
    return x.new_empty(())


@torch.library.register_fake(f"{_LIB}::mlp_loss_and_grads")
def _mlp_loss_and_grads_fake(x, w1, b1, w2, b2, target, reduction, activation, output_mask):
    check_options(reduction, activation)
    _check_same_device_and_dtype("mlp_loss_and_grads", x, w1=w1, b1=b1, w2=w2, b2=b2, target=target)
    hidden_shape, out_shape, _, _ = _shapes("mlp_loss_and_grads", x, w1, w2)
    _check_operands("mlp_loss_and_grads", hidden_shape, out_shape, b1=b1, w2=w2, b2=b2, target=target)
    args = (x, w1, b1, w2, b2, target)
    grads = tuple(_grad_or_empty(need, arg, x) for need, arg in zip(output_mask, args))
    return (x.new_empty(()),) + grads


@torch.library.register_fake(f"{_LIB}::mlp")
def _mlp_fake(x, w1, b1, w2, b2, activation):
    check_options(None, activation)
    _check_same_device_and_dtype("mlp", x, w1=w1, b1=b1, w2=w2, b2=b2)
    hidden_shape, out_shape, _, _ = _shapes("mlp", x, w1, w2)
    _check_operands("mlp", hidden_shape, out_shape, b1=b1, w2=w2, b2=b2)
    return x.new_empty(out_shape)


@torch.library.register_fake(f"{_LIB}::mlp_forward")
def _mlp_forward_fake(x, w1, b1, w2, b2, activation):
    saves_input = check_options(None, activation)
    _check_same_device_and_dtype("mlp_forward", x, w1=w1, b1=b1, w2=w2, b2=b2)
    hidden_shape, out_shape, hidden, _ = _shapes("mlp_forward", x, w1, w2)
    _check_operands("mlp_forward", hidden_shape, out_shape, b1=b1, w2=w2, b2=b2)
    prediction = x.new_empty(out_shape)
    # Without w2 the prediction is s itself: the slot is empty, unless the
    # activation's derivative reads h.
    activations = x.new_empty((_rows(x), hidden)) if w2 is not None or saves_input else x.new_empty((0,))
    return prediction, activations


@torch.library.register_fake(f"{_LIB}::mlp_backward")
def _mlp_backward_fake(grad_out, x, w1, b1, w2, b2, activations, activation, output_mask):
    check_options(None, activation)
    _check_same_device_and_dtype("mlp_backward", x, grad_out=grad_out, w1=w1, b1=b1, w2=w2, b2=b2,
                                 activations=activations)
    _, out_shape, _, _ = _shapes("mlp_backward", x, w1, w2)
    torch._check_value(
        tuple(grad_out.shape) == tuple(out_shape),
        lambda: f"fusedgrad.mlp_backward: grad_out must have the prediction's shape {tuple(out_shape)}, "
        f"got {tuple(grad_out.shape)}",
    )
    args = (x, w1, b1, w2, b2)
    return tuple(_grad_or_empty(need, arg, x) for need, arg in zip(output_mask, args))
