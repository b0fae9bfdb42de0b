"""The functional API. All reach the registered C++ ops, whose Autograd
kernels are C++ nodes (no Python autograd.Function in the way).

Each first tries the direct call of ``fusedgrad._C`` (csrc/python/direct_calls.cpp):
the same dispatcher op without torch.ops' boxed argument parsing. It returns
None for any call it does not take (tensor subclasses, TorchFunctionModes, bad
arguments); those, and calls traced by torch.compile, go through torch.ops,
where the argument errors are raised.
"""
from typing import Iterable, Optional, Union

import torch
from torch import Tensor
from torch.compiler import is_compiling

from . import _C, _compat

from . import _ensemble_functional as _ensemble
from ._checks import attributed, check_tensors, option

_LOSS_ARGS = ("x", "w1", "b1", "w2", "b2", "target")
_MLP_ARGS = ("x", "w1", "b1", "w2", "b2")

# OpOverloads resolved once: calling them skips the overload lookup per call.
_mlp_loss_op = torch.ops.fusedgrad.mlp_loss.default
_mlp_op = torch.ops.fusedgrad.mlp.default


#: mlp_loss_and_grads' gradients: (dx, dw1, db1, dw2, db2, dtarget), None where not requested.
Grads = tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor],
              Optional[Tensor]]


def mlp_loss(x: Tensor, w1: Tensor, b1: Optional[Tensor] = None, w2: Optional[Tensor] = None,
             b2: Optional[Tensor] = None, target: Optional[Tensor] = None, *, reduction: str = "mean",
             activation: str = "sigmoid") -> Tensor:
    r"""Squared loss of a two-layer perceptron, with its gradients from one fused pass.

    .. math::
        h = x w_1^T + b_1,\quad s = \mathrm{act}(h),\quad p = s w_2^T + b_2,\quad
        L = c \sum (p - t)^2

    with :math:`c = 1` for ``reduction="sum"`` and :math:`1/(N \cdot O)` for
    ``"mean"`` (as :class:`torch.nn.MSELoss`).

    Args:
        x: ``(*, D)`` input; leading dimensions are flattened to N rows.
        w1: ``(H, D)`` first weight (``nn.Linear`` layout).
        b1: bias broadcastable to ``(*, H)``: ``(H,)``, ``(1, H)``, per-sample ``(*, H)``, ... or None.
        w2: ``(O, H)`` second weight, or None to end the chain at the activation (``p = act(h)``).
        b2: bias broadcastable to ``(*, O)``, or None. Needs ``w2``.
        target: broadcastable to ``(*, O)``; None means zeros.
        reduction: ``"mean"`` or ``"sum"``.
        activation: one of :data:`fusedgrad.ACTIVATIONS` (``"sigmoid"`` by default,
            ``"tanh"``, ``"relu"``, ``"gelu"``, ...; ``"gelu_tanh"`` is
            ``F.gelu(approximate="tanh")``), each as ``torch.nn.functional`` computes it
            (the activation table, csrc/common/activation.h).

    Returns:
        0-dim tensor. Every argument may require grad; ``backward()`` fills each
        ``.grad`` as native autograd would, bias gradients in the bias's own shape.

    Ensembles: with ``w1`` of shape ``(K, H, D)`` (and ``w2`` ``(K, O, H)``) this
    is K independent models in one op; the loss has shape ``(K,)``, each model's
    own ``reduction``. Shape rules in docs/ensembles.md.

    Any depth: ``mlp_loss(x, [W_1, …, W_L], [b_1, …, b_L] or None, target=t)`` — ``w1`` a list
    of weights and ``b1`` a list of biases — is :func:`fusedgrad.deep.mlp_loss`.
    """
    if isinstance(w1, (list, tuple)):
        _deep_positional("mlp_loss", w1, w2, b2)
        return _deep().mlp_loss(x, w1, b1, target, reduction=reduction, activation=activation)
    if _compat.under_functorch(x, w1, b1, w2, b2, target):
        return _native_loss(x, w1, b1, w2, b2, target, reduction, activation)
    if isinstance(w1, torch.Tensor) and w1.dim() == 3:
        return _ensemble.mlp_loss(x, w1, b1, w2, b2, target, reduction, activation)
    try:
        if not is_compiling():
            loss = _C.mlp_loss(x, w1, b1, w2, b2, target, reduction, activation)
            if loss is not None:
                return loss
        check_tensors("mlp_loss", _LOSS_ARGS, (x, w1, b1, w2, b2, target), 2)
        red = option("mlp_loss", "reduction", reduction)
        act = option("mlp_loss", "activation", activation)
        return _mlp_loss_op(x, w1, b1, w2, b2, target, red, act)
    except (ValueError, TypeError) as exc:
        raise attributed(exc, "fusedgrad.mlp_loss", _LOSS_ARGS, (x, w1, b1, w2, b2, target)) from None


def _engine_layout(w1, b1, w2, b2) -> bool:
    """Whether the arguments are nn.Linear's layout, which the engine's ops take (one model: 2-D weights,
    biases None or 1-D of the layer's width)."""
    tensors = all(isinstance(t, torch.Tensor) for t in (w1, w2)) and all(
        b is None or isinstance(b, torch.Tensor) for b in (b1, b2))
    return (tensors and w1.dim() == 2 and w2.dim() == 2 and w2.shape[1] == w1.shape[0]
            and (b1 is None or tuple(b1.shape) == (w1.shape[0],))
            and (b2 is None or tuple(b2.shape) == (w2.shape[0],)))


def mlp(x: Tensor, w1: Tensor, b1: Optional[Tensor] = None, w2: Optional[Tensor] = None,
        b2: Optional[Tensor] = None, *, activation: str = "sigmoid") -> Tensor:
    """Prediction ``act(x w1ᵀ + b1) w2ᵀ + b2`` of shape ``(*, O)``, with a fused backward.

    Arguments as in :func:`mlp_loss`. Use this when the loss is not the
    squared error; use :func:`mlp_loss` when it is (one pass instead of two).
    With ``w1`` of shape ``(K, H, D)``: K models, prediction ``(K, N, O)``. Any depth:
    ``mlp(x, [W_1, …, W_L], [b_1, …, b_L] or None)`` is :func:`fusedgrad.deep.mlp`.
    """
    if isinstance(w1, (list, tuple)):
        _deep_positional("mlp", w1, w2, b2)
        return _deep().mlp(x, w1, b1, activation=activation)
    if _compat.under_functorch(x, w1, b1, w2, b2):
        if _compat.vmapped_only(x, w1, b1, w2, b2) and _engine_layout(w1, b1, w2, b2):
            # vmap alone (the model-ensembling recipe, or batched data): the engine's op and its vmap rule
            return _deep().mlp(x, [w1, w2], [b1, b2], activation=activation)
        return _native_prediction(x, w1, b1, w2, b2, activation)
    if isinstance(w1, torch.Tensor) and w1.dim() == 3:
        return _ensemble.mlp(x, w1, b1, w2, b2, activation)
    try:
        if not is_compiling():
            pred = _C.mlp(x, w1, b1, w2, b2, activation)
            if pred is not None:
                return pred
        check_tensors("mlp", _MLP_ARGS, (x, w1, b1, w2, b2), 2)
        act = option("mlp", "activation", activation)
        return _mlp_op(x, w1, b1, w2, b2, act)
    except (ValueError, TypeError) as exc:
        raise attributed(exc, "fusedgrad.mlp", _MLP_ARGS, (x, w1, b1, w2, b2)) from None


_mlp_loss_and_grads_op = torch.ops.fusedgrad.mlp_loss_and_grads.default


def mlp_loss_and_grads(
    x: Tensor, w1: Tensor, b1: Optional[Tensor] = None, w2: Optional[Tensor] = None, b2: Optional[Tensor] = None,
    target: Optional[Tensor] = None, *, reduction: str = "mean", activation: str = "sigmoid",
    wrt: Union[str, Iterable[str], None] = None,
) -> tuple[Tensor, Grads]:
    """Loss and gradients in one fused call, without the autograd engine.

    For hand-written training loops: no graph is recorded and no ``backward()``
    is needed. Arguments as in :func:`mlp_loss`, plus

    Args:
        wrt: names of the arguments to differentiate, a subset of
            ``("x", "w1", "b1", "w2", "b2", "target")``; default: every given
            argument that ``requires_grad``.

    Returns:
        ``(loss, (dx, dw1, db1, dw2, db2, dtarget))`` — each gradient in its
        argument's shape, ``None`` where it was not requested or the argument
        is None. The tensors do not require grad.

    With ``w1`` of shape ``(K, H, D)`` (an ensemble) the loss has shape ``(K,)``
    and the gradients are those of ``loss.sum()``: each model's own in the
    stacked arguments, summed over models in shared ones.
    """
    args = (x, w1, b1, w2, b2, target)
    try:
        return _mlp_loss_and_grads(args, reduction, activation, wrt)
    except (ValueError, TypeError) as exc:
        raise attributed(exc, "fusedgrad.mlp_loss_and_grads", _LOSS_ARGS, args) from None


def _mlp_loss_and_grads(args: tuple, reduction: object, activation: object, wrt: object) -> tuple[Tensor, Grads]:
    x, w1, b1, w2, b2, target = args
    check_tensors("mlp_loss_and_grads", _LOSS_ARGS, args, 2)
    if wrt is None:
        mask = [a is not None and a.requires_grad for a in args]
    else:
        wanted = _wrt_names(wrt)
        unknown = [w for w in wanted if w not in _LOSS_ARGS]
        if unknown:
            raise ValueError(
                f"fusedgrad.mlp_loss_and_grads: argument 'wrt' names unknown arguments {unknown}; "
                f"expected names from {_LOSS_ARGS}"
            )
        mask = [a is not None and name in wanted for name, a in zip(_LOSS_ARGS, args)]
    if w1.dim() == 3:  # an ensemble: (K,) losses, gradients of their sum
        return _ensemble.mlp_loss_and_grads(x, w1, b1, w2, b2, target, reduction, activation, mask)
    if not is_compiling():
        result = _C.mlp_loss_and_grads(x, w1, b1, w2, b2, target, reduction, activation, mask)
        if result is not None:
            return result
    red = option("mlp_loss_and_grads", "reduction", reduction)
    act = option("mlp_loss_and_grads", "activation", activation)
    loss, *grads = _mlp_loss_and_grads_op(x, w1, b1, w2, b2, target, red, act, mask)
    return loss, tuple(g if m else None for g, m in zip(grads, mask))


def _wrt_names(wrt: object) -> tuple[str, ...]:
    """``wrt`` as a tuple of names: a str, or an iterable of strs (else TypeError naming it)."""
    if isinstance(wrt, str):
        return (wrt,)
    try:
        wanted = tuple(wrt)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(
            f"fusedgrad.mlp_loss_and_grads: argument 'wrt' must be None, a str or an iterable of strs "
            f"(names from {_LOSS_ARGS}), got {type(wrt).__name__}"
        ) from None
    wrong = [w for w in wanted if not isinstance(w, str)]
    if wrong:
        raise TypeError(
            f"fusedgrad.mlp_loss_and_grads: argument 'wrt' must hold strs (names from {_LOSS_ARGS}), "
            f"got {type(wrong[0]).__name__} {wrong[0]!r}"
        )
    return wanted


def _deep():
    from . import deep  # imported here: deep imports _checks, as this module does

    return deep


def _deep_positional(fn: str, w1, w2, b2) -> None:
    """With weight and bias lists, the 4th and 5th positional arguments have no meaning."""
    if w2 is not None or b2 is not None:
        raise TypeError(f"fusedgrad.{fn}: argument 'w1' must be a torch.Tensor, or a list of weights for a network "
                        f"of any depth — got a {type(w1).__name__}, and with a list 'w2' and 'b2' must be None (pass "
                        "the biases as 'b1' and the target as target=...)")


# Under a torch.func transform (grad, vjp, jacrev, jacfwd, hessian, vmap) the C++ autograd node
# cannot be transformed: the network runs in plain torch ops instead — exact, at native speed.
def _native_prediction(x, w1, b1, w2, b2, activation):
    act = _deep()._NATIVE_ACTIVATIONS[option("mlp", "activation", activation)]
    stacked = w1.dim() == 3

    def bias(b):  # an ensemble's (K, H) bias is one row per model: (K, 1, H) against (K, N, H)
        return b.unsqueeze(-2) if stacked and b.dim() == 2 else b

    h = torch.matmul(x, w1.transpose(-1, -2))
    a = act(h if b1 is None else h + bias(b1))
    if w2 is None:
        return a
    p = torch.matmul(a, w2.transpose(-1, -2))
    return p if b2 is None else p + bias(b2)


def _native_loss(x, w1, b1, w2, b2, target, reduction, activation):
    sq = (_native_prediction(x, w1, b1, w2, b2, activation) - (0 if target is None else target)) ** 2
    dims = tuple(range(1, sq.dim())) if w1.dim() == 3 else tuple(range(sq.dim()))  # K models: (K,) losses
    return sq.mean(dims) if option("mlp_loss", "reduction", reduction) == "mean" else sq.sum(dims)


def _nested_route(x, w1, b1, w2, b2, grad, needs):
    """Whether a create_graph backward of the prediction takes the fused nested node: x's gradient alone, one
    CPU model with a second layer, biases of one value per column (the deeper nets' op rules)."""
    return (needs[0] and not any(needs[1:]) and grad is not None and w2 is not None and w1.dim() == 2
            and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and all(b is None or b.dim() == 1 for b in (b1, b2)))


def _recompute_backward(kind, inputs, reduction, activation, grad, needs):
    """The create_graph=True backward of the one-hidden-layer ops and their ensembles (their C++ nodes call it:
    csrc/ops/autograd_helpers.h): the op recomputed in plain torch ops from its inputs ``(x, w1, b1, w2, b2[,
    target])``, differentiated with ``create_graph=True`` with respect to the inputs that ``needs`` names —
    gradients that are themselves differentiable (gradient penalties; gradgradcheck), exact, at native speed —
    except the prediction's x-gradient alone (a PINN's u_x, then u_xx), which takes the fused nested node
    (_nested_route). One entry per input: None where none is needed."""
    x, w1, b1, w2, b2 = inputs[:5]
    if kind == "mlp" and _nested_route(x, w1, b1, w2, b2, grad, needs):
        # autograd.grad(u, x, create_graph=True): J(x)ᵀḡ as the deeper nets' node, whose own backward
        # (u_xx, then the parameters' gradient) is fused (csrc/python/deep_autograd.cpp).
        return [_C._input_vjp(x, [w1, w2], [b1, b2], activation, grad), None, None, None, None]
    with torch.enable_grad():
        out = (_native_loss(x, w1, b1, w2, b2, inputs[5], reduction, activation) if kind == "mlp_loss"
               else _native_prediction(x, w1, b1, w2, b2, activation))
        wanted = [t if n else None for t, n in zip(inputs, needs)]
        return _deep()._differentiable_backward([out], wanted, [grad])  # the deeper nets' route


_C._set_recompute_backward(_recompute_backward)
