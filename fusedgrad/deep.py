"""Networks of any depth, given as lists of weights and biases.

Under a ``torch.func`` transform (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``hessian``, ``vmap``,
``functional_call``) the network runs in plain torch ops, which every transform differentiates
and batches: exact, at native speed; the fused kernels run everywhere else.

``Linear → act → Linear → … → Linear`` (L linear layers, the same activation
after each but the last) on the CPU engine of csrc/engine/: the loss and every
gradient in one pass over the rows, the prediction with a backward that
recomputes each row block's forward instead of keeping it. The registered ops
(``torch.ops.fusedgrad.deep_mlp_loss_and_grads``, ``deep_mlp``,
``deep_mlp_backward``) are csrc/ops/deep_ops.cpp; their fake kernels are
here, so ``torch.compile`` and ``torch.export`` see them.

Weights are ``(out_features, in_features)`` as in ``nn.Linear``; a bias is
``(out_features,)`` or None.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from . import _C, _compat
from ._fake import check_args  # the C++ argument rules, run by the fake kernels
from ._checks import ACTIVATIONS

__all__ = ["mlp_loss", "mlp", "mlp_loss_and_grads", "derivatives"]

_loss_op = torch.ops.fusedgrad.deep_mlp_loss_and_grads.default
_mlp_op = torch.ops.fusedgrad.deep_mlp.default
_backward_op = torch.ops.fusedgrad.deep_mlp_backward.default


def _layers(fn: str, weights, biases):
    """(weights, biases) as lists of equal length; the C++ validator checks the tensors."""
    if isinstance(weights, torch.Tensor) or not isinstance(weights, (list, tuple)):
        raise TypeError(f"{fn}: argument 'weights' must be a list or tuple of tensors, got {type(weights).__name__}")
    weights = list(weights)
    for i, w in enumerate(weights):
        if not isinstance(w, torch.Tensor):
            raise TypeError(f"{fn}: argument 'weights'[{i}] must be a torch.Tensor, got {type(w).__name__}")
    if biases is None:
        biases = [None] * len(weights)
    elif isinstance(biases, torch.Tensor) or not isinstance(biases, (list, tuple)):
        raise TypeError(f"{fn}: argument 'biases' must be a list or tuple of tensors or None, got "
                        f"{type(biases).__name__}")
    biases = list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"{fn}: argument 'biases' must have one entry per weight: {len(weights)} expected, got "
                         f"{len(biases)}")
    for i, b in enumerate(biases):
        if b is not None and not isinstance(b, torch.Tensor):
            raise TypeError(f"{fn}: argument 'biases'[{i}] must be a torch.Tensor or None, got {type(b).__name__}")
    return weights, biases


def _option(fn: str, name: str, value, allowed) -> str:
    if not isinstance(value, str):  # a wrong type is a TypeError, as torch raises it
        raise TypeError(f"{fn}: argument '{name}' must be a str, one of {', '.join(repr(a) for a in allowed)}, "
                        f"got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{fn}: argument '{name}' must be one of {', '.join(repr(a) for a in allowed)}, "
                         f"got {value!r}")
    return value


def _check_x(fn: str, x, target=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if target is not None and not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: argument 'target' must be a torch.Tensor or None, got {type(target).__name__}")


_NATIVE_ACTIVATIONS = {
    "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu, "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda h: torch.nn.functional.gelu(h, approximate="tanh"),
    "identity": lambda h: h,
}


def _native_prediction(x, weights, biases, activation):
    """The network in plain torch ops (K stacked models: batched matmuls) — the double-backward route."""
    act = _NATIVE_ACTIVATIONS[activation]
    stacked = weights[0].dim() == 3
    a = x
    for l, (w, b) in enumerate(zip(weights, biases)):
        a = torch.matmul(a, w.transpose(-1, -2))
        if b is not None:
            a = a + (b.unsqueeze(-2) if stacked else b)
        if l < len(weights) - 1:
            a = act(a)
    return a


def _differentiable_backward(outputs, inputs, grad_outputs):
    """Gradients that are themselves differentiable (backward with create_graph=True): the forward
    recomputed in plain torch ops from the saved inputs, differentiated by autograd with
    create_graph=True. Exact (native autograd's own formulas, second derivatives included), at
    native speed; None for inputs that need no gradient."""
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    if not wanted:
        return [None] * len(inputs)
    grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, allow_unused=True))
    out = []
    for t in inputs:
        if t is None or not t.requires_grad:
            out.append(None)
            continue
        g = next(grads)
        out.append(torch.zeros_like(t) if g is None else g)
    return out


def _double_backward(kind, x, params, activation, order, target, reduction, grads, needs, extras=()):
    """The create_graph=True backward of the loss (kind "loss"), the prediction ("mlp"), the input
    derivatives ("derivatives") or the prediction's nested gradients (C++ nodes only: "input_vjp",
    J(x)ᵀḡ with ``extras`` (ḡ,); "hvp", ḡᵀH(x)v with ``extras`` (ḡ, v)): ``[dx, *dparams]`` (then
    ``dtarget`` for a loss with a target, or the extras' gradients; None where ``needs`` is false),
    differentiable themselves. Shared by the Python Functions here and the C++ nodes
    (csrc/python/deep_autograd.cpp)."""
    L = len(params) // 2
    weights, biases = list(params[:L]), list(params[L:])
    inputs = [x, *params] + ([target] if kind == "loss" and target is not None else []) + list(extras)
    with torch.enable_grad():
        if kind == "loss":
            outs = [_native_loss(x, weights, biases, target, reduction, activation)]
        elif kind == "mlp":
            outs = [_native_prediction(x, weights, biases, activation)]
        elif kind in ("input_vjp", "hvp"):
            # x as a fresh leaf when it needs no gradient here: autograd.grad(u, x) needs x in the graph.
            xx = x if x.requires_grad else x.detach().requires_grad_()
            u = _native_prediction(xx, weights, biases, activation)
            dx, = torch.autograd.grad(u, xx, extras[0], create_graph=True)
            outs = [dx if kind == "input_vjp" else torch.autograd.grad(dx, xx, extras[1], create_graph=True)[0]]
        else:
            outs = _native_derivatives(x, weights, biases, activation, order)
        used = [(o, g) for o, g in zip(outs, grads) if g is not None]
        # Only what this backward needs: torch.autograd.grad(u, x) needs dx alone, not the parameters'.
        wanted = [t if n else None for t, n in zip(inputs, needs)]
        got = _differentiable_backward([o for o, _ in used], wanted, [g for _, g in used])
    return [g if n else None for g, n in zip(got, needs)]


_C._set_differentiable_backward(_double_backward)


def _models(weights) -> int:
    """K for stacked (K, out, in) weights, 0 for one model."""
    return weights[0].shape[0] if weights[0].dim() == 3 else 0


def _scaled(g, grad, K):
    """A model's gradient g times the incoming gradient of its loss: a scalar, or (K,) for K models."""
    if K == 0:
        return g if _is_one(grad) else g * grad
    return g * grad.view((K,) + (1,) * (g.dim() - 1))


def _rows_grad(g, grad, K, shared):
    """dx / dtarget: per model (K, N, ·) from the op; a shared argument gets Σ_k grad_k · g_k."""
    if K == 0:
        return _scaled(g, grad, 0)
    if shared:
        return torch.einsum("k,knd->nd", grad.to(g.dtype), g)
    return _scaled(g, grad, K)


def _outer_transform(*tensors) -> bool:
    """Whether a transform other than vmap still wraps the tensors once a vmap rule has peeled its own
    level: that transform must see plain torch ops. An outer vmap (nested vmap) runs the rule again."""
    return _compat.under_functorch(*tensors) and not _compat.vmapped_only(*tensors)


def _vmap_rule(info, x_dim, param_dims, x, params, fused, native):
    """The vmap rule of the prediction and of the input derivatives (``torch.autograd.Function.vmap``).

    Parameters batched (the model-ensembling recipe, ``stack_module_state`` + ``vmap``): the B models
    run as one stacked call — the ensemble kernel — with ``x`` shared or batched per model. Only ``x``
    batched: its batch dimension becomes leading rows of one plain call. Outputs carry the batch in
    dimension 0. Where the tensors are still wrapped by a transform further out (``grad`` around
    ``vmap``), the same stacked call runs in plain torch ops (``native``), which that transform follows.
    """
    B = info.batch_size
    D = x.shape[-1]
    if not any(d is not None for d in param_dims):  # vmap over data: one call over all the rows
        xb = x.movedim(x_dim, 0)
        run = native if _outer_transform(xb, *params) else fused
        out = run(xb, list(params))
        return out, (0,) * len(out) if isinstance(out, tuple) else 0
    stacked = [None if p is None else p.movedim(d, 0) if d is not None else p.expand(B, *p.shape)
               for p, d in zip(params, param_dims)]
    if x_dim is None:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, D)
    else:
        xb = x.movedim(x_dim, 0)
        lead = xb.shape[1:-1]
        x2 = xb.reshape(B, -1, D)
    run = native if _outer_transform(x2, *stacked) else fused
    out = run(x2, stacked)
    if isinstance(out, tuple):  # u (B, N, O); du, d2u (B, N, O, D)
        shaped = tuple(t.reshape(B, *lead, *t.shape[2:]) for t in out)
        return shaped, (0,) * len(shaped)
    return out.reshape(B, *lead, out.shape[-1]), 0


class _Loss(torch.autograd.Function):
    """The loss; its forward pass also computes the gradients backward needs (scaled by ∂out/∂L there)."""

    @staticmethod
    def forward(ctx, x, target, reduction, activation, num_layers, *params):
        weights, biases = list(params[:num_layers]), list(params[num_layers:])
        needs = ctx.needs_input_grad
        mask = [needs[0], any(needs[5:]), target is not None and needs[1]]
        loss, grads = _loss_op(x, weights, biases, target, reduction, activation, mask)
        ctx.num_layers, ctx.models = num_layers, _models(weights)
        ctx.has_bias = [b is not None for b in biases]
        ctx.shared = (x.dim() == 2, target is not None and target.dim() == 2)
        ctx.reduction, ctx.activation = reduction, activation
        ctx.save_for_backward(x, target, *params, *grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        L, K = ctx.num_layers, ctx.models
        saved = ctx.saved_tensors
        x, target, params, grads = saved[0], saved[1], saved[2:2 + 2 * L], saved[2 + 2 * L:]
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
            got = _double_backward("loss", x, params, ctx.activation, 0, target, ctx.reduction, [grad_loss],
                                   [needs[0], *needs[5:]] + ([needs[1]] if target is not None else []))
            dt = got.pop() if target is not None else None
            return (got[0], dt, None, None, None, *got[1:])
        dx = _rows_grad(grads[2 * L], grad_loss, K, ctx.shared[0]) if needs[0] else None
        dt = _rows_grad(grads[2 * L + 1], grad_loss, K, ctx.shared[1]) if needs[1] else None
        dW = [_scaled(grads[l], grad_loss, K) if needs[5 + l] else None for l in range(L)]
        db = [_scaled(grads[L + l], grad_loss, K) if ctx.has_bias[l] and needs[5 + L + l] else None for l in range(L)]
        return (dx, dt, None, None, None, *dW, *db)


def _is_one(t: torch.Tensor) -> bool:
    """Whether the incoming gradient is exactly 1 (loss.backward()), so the saved gradients are the result.
    Under torch.compile the value is not known at trace time: always scale there."""
    if torch.compiler.is_compiling():
        return False
    return t.numel() == 1 and not t.requires_grad and bool(t == 1)


class _Mlp(torch.autograd.Function):
    """The prediction; backward recomputes the forward row block by row block (nothing of size N kept).
    Under vmap, its rule runs the ensemble kernel (stacked parameters) or the plain one (batched rows)."""

    @staticmethod
    def forward(x, activation, num_layers, *params):
        return _mlp_op(x, list(params[:num_layers]), list(params[num_layers:]), activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, activation, num_layers, *params = inputs
        ctx.num_layers, ctx.activation = num_layers, activation
        ctx.save_for_backward(x, *params)

    @staticmethod
    def vmap(info, in_dims, x, activation, num_layers, *params):
        def fused(xx, ps):
            return _Mlp.apply(xx, activation, num_layers, *ps)

        def native(xx, ps):
            return _native_prediction(xx, ps[:num_layers], ps[num_layers:], activation)

        return _vmap_rule(info, in_dims[0], in_dims[3:], x, params, fused, native)

    @staticmethod
    def backward(ctx, grad_out):
        L = ctx.num_layers
        x, *params = ctx.saved_tensors
        weights, biases = params[:L], params[L:]
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: gradients that are differentiable themselves
            dx, *dparams = _double_backward("mlp", x, params, ctx.activation, 0, None, "", [grad_out],
                                            [needs[0], *needs[3:]])
            return (dx, None, None, *dparams)
        mask = [needs[0], any(needs[3:])]
        grads = _backward_op(grad_out.contiguous(), x, weights, biases, ctx.activation, mask)
        dW = [grads[l] if needs[3 + l] else None for l in range(L)]
        db = [grads[L + l] if biases[l] is not None and needs[3 + L + l] else None for l in range(L)]
        dx = None
        if needs[0]:
            dx = grads[2 * L]
            if _models(weights) and x.dim() == 2:  # x shared by the models: the sum of their parts
                dx = dx.sum(0)
        return (dx, None, None, *dW, *db)


def mlp_loss(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
             target: Optional[torch.Tensor] = None, *, reduction: str = "mean",
             activation: str = "sigmoid") -> torch.Tensor:
    r"""Squared loss of an MLP of ``len(weights)`` linear layers, with its gradients from one fused pass.

    .. math::
        a_0 = x,\quad h_l = a_{l-1} W_l^T + b_l,\quad a_l = \mathrm{act}(h_l)\ (l < L),\quad
        L = c \sum (h_L - t)^2

    Args:
        x: ``(*, D)`` input, leading dimensions flattened to N rows.
        weights: ``W_1 … W_L``, each ``(n_l, n_{l-1})`` (``nn.Linear`` layout), ``n_0 = D``.
        biases: None (no biases) or one entry per weight: ``(n_l,)`` or None.
        target: the prediction's shape ``(*, O)``; None means zeros.
        reduction: ``"mean"`` (÷ N·O, as ``nn.MSELoss``) or ``"sum"``.
        activation: one of :data:`fusedgrad.ACTIVATIONS`, after every layer but the last.

    Returns:
        0-dim loss; ``backward()`` fills every ``.grad`` as native autograd would. With
        ``create_graph=True`` the gradients are differentiable too (recomputed in plain torch ops:
        exact, at native speed).
    """
    fn = "fusedgrad.mlp_loss"
    _check_x(fn, x, target)
    weights, biases = _layers(fn, weights, biases)
    _option(fn, "reduction", reduction, ("mean", "sum"))
    _option(fn, "activation", activation, ACTIVATIONS)
    if _compat.under_functorch(x, target, *weights, *biases):
        return _native_loss(x, weights, biases, target, reduction, activation)
    if not torch.compiler.is_compiling():
        loss = _C.deep_mlp_loss(x, weights, biases, target, reduction, activation)  # its autograd node in C++
        if loss is not None:
            return loss
    if torch.is_grad_enabled():
        return _Loss.apply(x, target, reduction, activation, len(weights), *weights, *biases)
    loss, _ = _loss_op(x, weights, biases, target, reduction, activation, [False, False, False])
    return loss


def _native_loss(x, weights, biases, target, reduction, activation):
    """The loss in plain torch ops (torch.func transforms, and the double-backward route)."""
    pred = _native_prediction(x, weights, biases, activation)
    sq = (pred - (0 if target is None else target)) ** 2
    dims = (1, 2) if weights[0].dim() == 3 else tuple(range(sq.dim()))  # K models: (K,) losses
    return sq.mean(dims) if reduction == "mean" else sq.sum(dims)


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
        *, activation: str = "sigmoid") -> torch.Tensor:
    """Prediction ``(*, O)`` of an MLP of ``len(weights)`` linear layers, with a fused backward.

    Arguments as in :func:`mlp_loss`. For one model (2-D weights), ``autograd.grad(u, x, ḡ,
    create_graph=True)`` returns J(x)ᵀḡ from a node whose backward is fused, and that result's own
    ``create_graph`` x-gradient ḡᵀH(x)v another (PINN code's u_x, then u_xx; README, "Nested input
    gradients"); other ``create_graph`` gradients recompute in plain torch ops (exact, native speed).
    """
    fn = "fusedgrad.mlp"
    _check_x(fn, x)
    weights, biases = _layers(fn, weights, biases)
    _option(fn, "activation", activation, ACTIVATIONS)
    functorch = _compat.under_functorch(x, *weights, *biases)
    if functorch and not _compat.vmapped_only(x, *weights, *biases):
        return _native_prediction(x, weights, biases, activation)
    if not functorch and not torch.compiler.is_compiling():
        pred = _C.deep_mlp(x, weights, biases, activation)  # the same op, its autograd node in C++
        if pred is not None:
            return pred
    if torch.is_grad_enabled() or functorch:
        return _Mlp.apply(x, activation, len(weights), *weights, *biases)
    return _mlp_op(x, weights, biases, activation)


def mlp_loss_and_grads(x: torch.Tensor, weights: Sequence[torch.Tensor],
                       biases: Optional[Sequence[Optional[torch.Tensor]]] = None,
                       target: Optional[torch.Tensor] = None, *, reduction: str = "mean",
                       activation: str = "sigmoid", x_grad: bool = False, target_grad: bool = False
                       ) -> Tuple[torch.Tensor, List[torch.Tensor], List[Optional[torch.Tensor]],
                                  Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Loss and every parameter gradient in one call, without the autograd engine.

    Returns ``(loss, weight_grads, bias_grads, dx, dtarget)``: lists of L tensors (None for a
    layer without a bias), ``dx`` / ``dtarget`` only when ``x_grad`` / ``target_grad``.
    """
    fn = "fusedgrad.mlp_loss_and_grads"
    _check_x(fn, x, target)
    weights, biases = _layers(fn, weights, biases)
    _option(fn, "reduction", reduction, ("mean", "sum"))
    _option(fn, "activation", activation, ACTIVATIONS)
    mask = [bool(x_grad), True, bool(target_grad) and target is not None]
    with torch.no_grad():  # no graph: the gradients are the result
        loss, grads = _loss_op(x, weights, biases, target, reduction, activation, mask)
    L = len(weights)
    bias_grads = [grads[L + l] if biases[l] is not None else None for l in range(L)]
    return (loss, list(grads[:L]), bias_grads, grads[2 * L] if mask[0] else None,
            grads[2 * L + 1] if mask[2] else None)


# ---------------------------------------------------------------------------- fake kernels
# Each fake kernel first runs its op's argument rules from C++ (csrc/ops/deep_checks.h: the functions the
# CPU kernel runs), so that torch.compile, torch.export and meta tensors refuse what the kernel refuses,
# with its message, instead of returning shapes for arguments it would reject.
def _empty(like):
    return like.new_empty((0,))


def _rows_like(x, weights, width):
    """The (·, width) rows the ops return: x's leading shape for one model, (K, N, width) for K."""
    K = _models(weights)
    return x.new_empty((K, x.shape[-2], width) if K else tuple(x.shape[:-1]) + (width,))


@torch.library.register_fake("fusedgrad::deep_mlp_loss_and_grads")
def _loss_fake(x, weights, biases, target, reduction, activation, output_mask):
    check_args(_C.check_deep_mlp_loss, x, weights, biases, target, reduction, activation)
    wx, wp, wt = output_mask
    K = _models(weights)
    grads = [w.new_empty(w.shape) if wp else _empty(w) for w in weights]
    grads += [b.new_empty(b.shape) if (wp and b is not None) else _empty(x) for b in biases]
    grads.append(_rows_like(x, weights, x.shape[-1]) if wx else _empty(x))
    grads.append(_rows_like(x, weights, weights[-1].shape[-2]) if (wt and target is not None) else _empty(x))
    return x.new_empty((K,) if K else ()), grads


@torch.library.register_fake("fusedgrad::deep_mlp")
def _mlp_fake(x, weights, biases, activation):
    check_args(_C.check_deep_mlp, x, weights, biases, activation)
    return _rows_like(x, weights, weights[-1].shape[-2])


@torch.library.register_fake("fusedgrad::deep_mlp_backward")
def _backward_fake(grad_out, x, weights, biases, activation, output_mask):
    check_args(_C.check_deep_mlp_backward, grad_out, x, weights, biases, activation)
    return _param_and_x_grads(x, weights, biases, output_mask)


def _param_and_x_grads(x, weights, biases, output_mask):
    wx, wp = output_mask
    grads = [w.new_empty(w.shape) if wp else _empty(w) for w in weights]
    grads += [b.new_empty(b.shape) if (wp and b is not None) else _empty(x) for b in biases]
    grads.append(_rows_like(x, weights, x.shape[-1]) if wx else _empty(x))
    return grads


@torch.library.register_fake("fusedgrad::deep_mlp_jvp")
def _jvp_fake(x, weights, biases, activation, directions, pairs):
    check_args(_C.check_deep_mlp_jvp, x, weights, biases, activation, directions, pairs)
    lead, O = tuple(x.shape[:-1]), weights[-1].shape[-2]
    return [x.new_empty(lead + (O,)), x.new_empty(lead + (O, directions.shape[-2])),
            x.new_empty(lead + (O, len(pairs) // 2))]


@torch.library.register_fake("fusedgrad::deep_mlp_jvp_backward")
def _jvp_backward_fake(grad_u, grad_tangents, grad_seconds, x, weights, biases, activation, directions, pairs,
                       output_mask):
    check_args(_C.check_deep_mlp_jvp_backward, grad_u, grad_tangents, grad_seconds, x, weights, biases, activation,
               directions, pairs)
    grads = _param_and_x_grads(x, weights, biases, output_mask[:2])
    grads.append(directions.new_empty(directions.shape) if output_mask[2] else _empty(x))
    return grads


# ---------------------------------------------------------------------------- input derivatives
_derivatives_op = torch.ops.fusedgrad.deep_mlp_derivatives.default
_derivatives_backward_op = torch.ops.fusedgrad.deep_mlp_derivatives_backward.default


def _act_jet(activation: str, h: torch.Tensor):
    """act(h), act'(h), act''(h) in torch ops: the activation table's jet() (csrc/common/activation.h)
    for the native route, which autograd differentiates once more (double backward, torch.func)."""
    if activation == "sigmoid":
        s = torch.sigmoid(h)
        g = s * (1 - s)
        return s, g, g * (1 - 2 * s)
    if activation == "tanh":
        t = torch.tanh(h)
        g = 1 - t * t
        return t, g, -2 * t * g
    if activation == "relu":
        return torch.relu(h), (h > 0).to(h.dtype), torch.zeros_like(h)
    if activation == "silu":
        sig = torch.sigmoid(h)
        g = sig * (1 - sig)
        return h * sig, sig * (1 + h * (1 - sig)), g * (2 + h * (1 - 2 * sig))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(h * 0.70710678118654752440))
        pdf = torch.exp(-0.5 * h * h) * 0.39894228040143267794
        return h * cdf, cdf + h * pdf, pdf * (2 - h * h)
    if activation == "gelu_tanh":
        beta, kappa = 0.79788456080286535588, 0.044715
        t = torch.tanh(beta * (h + kappa * h ** 3))
        q = 1 - t * t
        u1, u2 = beta * (1 + 3 * kappa * h * h), 6 * beta * kappa * h
        t1, t2 = q * u1, q * (u2 - 2 * t * u1 * u1)
        return 0.5 * h * (1 + t), 0.5 * (1 + t) + 0.5 * h * t1, t1 + 0.5 * h * t2
    return h, torch.ones_like(h), torch.zeros_like(h)  # identity


def _native_derivatives(x, weights, biases, activation, order):
    """``(u, du[, d2u])`` by the same forward-mode propagation as the fused pass, in plain torch ops:
    the route under torch.func transforms and for double backward (autograd differentiates it)."""
    stacked = weights[0].dim() == 3
    D = x.shape[-1]
    lead = x.shape[:-1]
    # Tangent parts (…, D, n): part d is ∂a/∂x_d; a_0's are the unit vectors, its second parts 0.
    da = torch.eye(D, dtype=x.dtype, device=x.device).expand(*lead, D, D)
    d2a = torch.zeros_like(da) if order == 2 else None
    a = x
    L = len(weights)
    for l, (w, b) in enumerate(zip(weights, biases)):
        wt = w.transpose(-1, -2)
        h = torch.matmul(a, wt)
        if b is not None:
            h = h + (b.unsqueeze(-2) if stacked else b)
        wt_parts = wt.unsqueeze(-3) if stacked else wt  # (K, 1, n_in, n_out): the parts carry an extra D axis
        dh = torch.matmul(da, wt_parts)
        d2h = torch.matmul(d2a, wt_parts) if order == 2 else None
        if l == L - 1:
            break
        a, g1, g2 = _act_jet(activation, h)
        g1, g2 = g1.unsqueeze(-2), g2.unsqueeze(-2)
        if order == 2:
            d2a = g2 * dh * dh + g1 * d2h
        da = g1 * dh
    out = (h, dh.transpose(-1, -2))
    return out + (d2h.transpose(-1, -2),) if order == 2 else out


class _Derivatives(torch.autograd.Function):
    """``(u, du[, d2u])`` from one fused jet pass; backward: one fused pass that recomputes the forward."""

    @staticmethod
    def forward(x, activation, order, num_layers, *params):
        return tuple(_derivatives_op(x, list(params[:num_layers]), list(params[num_layers:]), activation, order))

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, activation, order, num_layers, *params = inputs
        ctx.num_layers, ctx.activation, ctx.order = num_layers, activation, order
        ctx.set_materialize_grads(False)  # an output the loss does not use is a zero the kernel skips
        ctx.save_for_backward(x, *params)

    @staticmethod
    def vmap(info, in_dims, x, activation, order, num_layers, *params):
        def fused(xx, ps):
            return _Derivatives.apply(xx, activation, order, num_layers, *ps)

        def native(xx, ps):
            return _native_derivatives(xx, ps[:num_layers], ps[num_layers:], activation, order)

        return _vmap_rule(info, in_dims[0], in_dims[4:], x, params, fused, native)

    @staticmethod
    def backward(ctx, *grads):
        L, order = ctx.num_layers, ctx.order
        x, *params = ctx.saved_tensors
        weights, biases = params[:L], params[L:]
        needs = ctx.needs_input_grad
        if all(g is None for g in grads):
            return (None,) * (4 + len(params))
        if torch.is_grad_enabled():  # create_graph=True: the same math in torch ops, differentiated by autograd
            dx, *dparams = _double_backward("derivatives", x, params, ctx.activation, order, None, "", grads,
                                            [needs[0], *needs[4:]])
            return (dx, None, None, None, *dparams)
        mask = [needs[0], any(needs[4:])]
        grad_u, grad_du = grads[0], grads[1]
        grad_d2u = grads[2] if order == 2 else None
        out = _derivatives_backward_op(grad_u, grad_du, grad_d2u, x, list(weights), list(biases), ctx.activation,
                                       order, mask)
        dW = [out[l] if needs[4 + l] else None for l in range(L)]
        db = [out[L + l] if biases[l] is not None and needs[4 + L + l] else None for l in range(L)]
        dx = None
        if needs[0]:
            dx = out[2 * L]
            if _models(weights) and x.dim() == 2:  # x shared by the models: the sum of their parts
                dx = dx.sum(0)
        return (dx, None, None, None, *dW, *db)


def derivatives(x: torch.Tensor, weights: Sequence[torch.Tensor],
                biases: Optional[Sequence[Optional[torch.Tensor]]] = None, *, activation: str = "sigmoid",
                order: int = 1):
    r"""The prediction and its derivatives with respect to the input, in one fused pass.

    For ``x`` of shape ``(*, D)`` and ``O`` outputs returns ``(u, du)`` (``order=1``) or
    ``(u, du, d2u)`` (``order=2``):

    - ``u``: ``(*, O)``, the prediction (as :func:`mlp`);
    - ``du[..., o, d]`` = :math:`\partial u_o / \partial x_d`, shape ``(*, O, D)``;
    - ``d2u[..., o, d]`` = :math:`\partial^2 u_o / \partial x_d^2`, shape ``(*, O, D)`` — the
      diagonal of each output's Hessian, what Laplacians and per-variable PDE terms need.

    They are computed by carrying the tangents :math:`\partial h/\partial x_d` (and second
    derivatives) through the layers beside the values (README, "Input derivatives"), and are
    differentiable with respect to the weights, biases and ``x``: ``loss(u, du, d2u).backward()``
    runs one more fused pass. With ``create_graph=True`` that backward is itself differentiable
    (recomputed in plain torch ops, at native speed); under ``torch.func`` transforms the whole
    call runs in plain torch ops.

    For K stacked models (weights ``(K, n_l, n_{l-1})``), ``x`` is ``(N, D)`` shared or
    ``(K, N, D)`` per model, and the outputs get a leading K: ``(K, N, O)``, ``(K, N, O, D)``.

    Arguments as in :func:`mlp`; ``order`` is 1 or 2.
    """
    fn = "fusedgrad.derivatives"
    _check_x(fn, x)
    weights, biases = _layers(fn, weights, biases)
    _option(fn, "activation", activation, ACTIVATIONS)
    if isinstance(order, bool) or not isinstance(order, int):
        raise TypeError(f"{fn}: argument 'order' must be an int, 1 or 2, got {type(order).__name__}")
    if order not in (1, 2):
        raise ValueError(f"{fn}: argument 'order' must be 1 (u, du) or 2 (u, du, d2u), got {order}")
    functorch = _compat.under_functorch(x, *weights, *biases)
    if functorch and not _compat.vmapped_only(x, *weights, *biases):
        return _native_derivatives(x, weights, biases, activation, order)
    if not functorch and not torch.compiler.is_compiling():
        out = _C.deep_derivatives(x, weights, biases, activation, order)  # its autograd node in C++
        if out is not None:
            return out
    if torch.is_grad_enabled() or functorch:
        return _Derivatives.apply(x, activation, order, len(weights), *weights, *biases)
    return tuple(_derivatives_op(x, weights, biases, activation, order))


@torch.library.register_fake("fusedgrad::deep_mlp_derivatives")
def _derivatives_fake(x, weights, biases, activation, order):
    check_args(_C.check_deep_derivatives, x, weights, biases, activation, order)
    O, D = weights[-1].shape[-2], x.shape[-1]
    K = _models(weights)
    part = x.new_empty((K, x.shape[-2], O, D) if K else tuple(x.shape[:-1]) + (O, D))
    out = [_rows_like(x, weights, O), part]
    if order == 2:
        out.append(torch.empty_like(part))
    return out


@torch.library.register_fake("fusedgrad::deep_mlp_derivatives_backward")
def _derivatives_backward_fake(grad_u, grad_du, grad_d2u, x, weights, biases, activation, order, output_mask):
    check_args(_C.check_deep_derivatives_backward, grad_u, grad_du, grad_d2u, x, weights, biases, activation,
                order)
    return _param_and_x_grads(x, weights, biases, output_mask)
