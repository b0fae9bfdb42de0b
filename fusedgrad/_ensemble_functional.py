"""The ensemble forms of mlp_loss / mlp / mlp_loss_and_grads (``w1`` of shape ``(K, H, D)``).

fusedgrad.functional routes here when ``w1.dim() == 3``. The registered ops are
``torch.ops.fusedgrad.ensemble_*`` (csrc/ops/ensemble_ops.cpp, shape rules in
csrc/ops/ensemble.h and docs/ensembles.md); their autograd is the C++ node of
csrc/ops/ensemble_autograd.cpp. Argument errors name the function the user called.
"""
import torch

from ._checks import check_tensors, option

_LOSS_ARGS = ("x", "w1", "b1", "w2", "b2", "target")
_MLP_ARGS = ("x", "w1", "b1", "w2", "b2")

_loss_op = torch.ops.fusedgrad.ensemble_mlp_loss.default
_loss_and_grads_op = torch.ops.fusedgrad.ensemble_mlp_loss_and_grads.default
_mlp_op = torch.ops.fusedgrad.ensemble_mlp.default


def _call(fn, op, *args):
    """op(*args), with the options' errors (raised by the C++ parser, which
    does not know the caller) naming the function the user called."""
    try:
        return op(*args)
    except ValueError as exc:
        message = str(exc)
        if not message.startswith("fusedgrad: argument '"):
            raise
        raise ValueError(message.replace("fusedgrad: ", f"fusedgrad.{fn}: ", 1)) from None


def mlp_loss(x, w1, b1, w2, b2, target, reduction, activation):
    check_tensors("mlp_loss", _LOSS_ARGS, (x, w1, b1, w2, b2, target), 2)
    red = option("mlp_loss", "reduction", reduction)
    act = option("mlp_loss", "activation", activation)
    return _call("mlp_loss", _loss_op, x, w1, b1, w2, b2, target, red, act)


def mlp(x, w1, b1, w2, b2, activation):
    check_tensors("mlp", _MLP_ARGS, (x, w1, b1, w2, b2), 2)
    act = option("mlp", "activation", activation)
    return _call("mlp", _mlp_op, x, w1, b1, w2, b2, act)


def mlp_loss_and_grads(x, w1, b1, w2, b2, target, reduction, activation, mask):
    red = option("mlp_loss_and_grads", "reduction", reduction)
    act = option("mlp_loss_and_grads", "activation", activation)
    loss, *grads = _call("mlp_loss_and_grads", _loss_and_grads_op, x, w1, b1, w2, b2, target, red, act, mask)
    return loss, tuple(g if m else None for g, m in zip(grads, mask))
