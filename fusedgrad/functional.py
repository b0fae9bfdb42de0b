"""Functional entry points. Both go straight to the registered C++ ops, whose
Autograd kernels are C++ nodes (no Python autograd.Function in the way)."""
import torch

from ._checks import ACTIVATIONS, REDUCTIONS, check_tensors, option

_LOSS_ARGS = ("x", "w1", "b1", "w2", "b2", "target")
_MLP_ARGS = ("x", "w1", "b1", "w2", "b2")

# OpOverloads resolved once: calling them skips the overload lookup per call.
_mlp_loss_op = torch.ops.fusedgrad.mlp_loss.default
_mlp_op = torch.ops.fusedgrad.mlp.default


def mlp_loss(x, w1, b1=None, w2=None, b2=None, target=None, *, reduction="mean", activation="sigmoid"):
    r"""Squared loss of a two-layer perceptron, with its gradients from one fused pass.

    .. math::
        h = x w_1^T + b_1,\quad s = \sigma(h),\quad p = s w_2^T + b_2,\quad
        L = c \sum (p - t)^2

    with :math:`c = 1` for ``reduction="sum"`` and :math:`1/(N \cdot O)` for
    ``"mean"`` (as :class:`torch.nn.MSELoss`).

    Args:
        x: ``(*, D)`` input; leading dimensions are flattened to N rows.
        w1: ``(H, D)`` first weight (``nn.Linear`` layout).
        b1: bias broadcastable to ``(*, H)``: ``(H,)``, ``(1, H)``, per-sample ``(*, H)``, ... or None.
        w2: ``(O, H)`` second weight, or None to end the chain at the activation (``p = σ(h)``).
        b2: bias broadcastable to ``(*, O)``, or None. Needs ``w2``.
        target: broadcastable to ``(*, O)``; None means zeros.
        reduction: ``"mean"`` or ``"sum"``.
        activation: ``"sigmoid"`` or ``"identity"``.

    Returns:
        0-dim tensor. Every argument may require grad; ``backward()`` fills each
        ``.grad`` as native autograd would, bias gradients in the bias's own shape.
    """
    check_tensors("mlp_loss", _LOSS_ARGS, (x, w1, b1, w2, b2, target), 2)
    red = option("mlp_loss", "reduction", reduction, REDUCTIONS)
    act = option("mlp_loss", "activation", activation, ACTIVATIONS)
    return _mlp_loss_op(x, w1, b1, w2, b2, target, red, act)


def mlp(x, w1, b1=None, w2=None, b2=None, *, activation="sigmoid"):
    """Prediction ``σ(x w1ᵀ + b1) w2ᵀ + b2`` of shape ``(*, O)``, with a fused backward.

    Arguments as in :func:`mlp_loss`. Use this when the loss is not the
    squared error; use :func:`mlp_loss` when it is (one pass instead of two).
    """
    check_tensors("mlp", _MLP_ARGS, (x, w1, b1, w2, b2), 2)
    act = option("mlp", "activation", activation, ACTIVATIONS)
    return _mlp_op(x, w1, b1, w2, b2, act)
