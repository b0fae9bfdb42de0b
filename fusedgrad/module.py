"""FusedMLP: a drop-in Linear → activation → Linear module with fused kernels."""
import copy as _copy

import torch
from torch import nn

from torch.compiler import is_compiling

from . import _C
from ._checks import ACTIVATIONS, attributed
from ._hooks import direct_grad_write_ok
from .functional import mlp, mlp_loss, mlp_loss_and_grads

_PARAM_NAMES = ("linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias")
# The functional argument names of the parameters, as the module calls them.
_RENAMES = dict(zip(("w1", "b1", "w2", "b2"), _PARAM_NAMES))


def _check_activation(fn_name, activation):
    """``activation`` if it is one of ACTIVATIONS, else the ValueError the ops raise, naming ``fn_name``."""
    if isinstance(activation, str) and activation in ACTIVATIONS:
        return activation
    allowed = ", ".join(repr(a) for a in ACTIVATIONS)
    raise ValueError(f"{fn_name}: argument 'activation' must be one of {allowed}, got {activation!r}")


def _activation_of(module):
    """The name in ACTIVATIONS of a torch.nn activation module (nn.Sigmoid → "sigmoid",
    nn.GELU(approximate="tanh") → "gelu_tanh", ...); None for anything else."""
    cls = type(module)
    if getattr(nn, cls.__name__, None) is not cls:  # exact torch.nn classes: a subclass may compute something else
        return None
    name = cls.__name__.lower()
    approximate = getattr(module, "approximate", "none")
    if approximate != "none":
        name = f"{name}_{approximate}"
    return name if name in ACTIVATIONS else None


def activation_module(name):
    """The torch.nn module computing the activation ``name`` of ACTIVATIONS (the inverse of _activation_of)."""
    _check_activation("fusedgrad.activation_module", name)
    base, _, approximate = name.partition("_")
    classes = {cls.lower(): getattr(nn, cls) for cls in dir(nn) if isinstance(getattr(nn, cls), type)}
    return classes[base](approximate=approximate) if approximate else classes[base]()


class FusedMLP(nn.Module):
    """``Linear(in, hidden) → activation → Linear(hidden, out)`` computed by fusedgrad.

    The parameters live in two real ``nn.Linear`` children named ``linear1`` and
    ``linear2``, created (and so initialised) exactly as ``nn.Linear`` does: the
    ``state_dict`` loads into and from a ``Net`` with ``linear1``, an activation and
    ``linear2`` unchanged (the activation has no parameters).

    Args:
        in_features, hidden_features, out_features: layer widths D, H, O.
        bias: if False, neither layer has a bias.
        device, dtype: as for ``nn.Linear``.
        activation: one of :data:`fusedgrad.ACTIVATIONS` (default ``"sigmoid"``).
    """

    activation = "sigmoid"  # (a class default too: modules pickled before the argument existed)

    def __init__(self, in_features, hidden_features, out_features, bias=True, device=None, dtype=None,
                 activation="sigmoid"):
        super().__init__()
        self.activation = _check_activation("FusedMLP", activation)
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.linear2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def _params(self):
        """``(w1, b1, w2, b2)``, read from the layers' parameter dicts.

        ``self.linear1.weight`` runs ``nn.Module.__getattr__`` (Python) twice, and
        six such lookups cost more than a small step's whole kernel. A layer whose
        weight or bias is not a registered parameter (e.g. a parametrization) is
        read through its attributes.
        """
        l1, l2 = self._modules["linear1"], self._modules["linear2"]
        p1, p2 = l1._parameters, l2._parameters
        try:
            return p1["weight"], p1["bias"], p2["weight"], p2["bias"]
        except KeyError:
            return l1.weight, l1.bias, l2.weight, l2.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of shape ``(*, out_features)``; backward is fused too."""
        try:
            return mlp(x, *self._params(), activation=self.activation)
        except (ValueError, TypeError) as exc:
            raise self._error(exc, "FusedMLP.forward", x, None) from None

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``MSELoss(reduction)(self(x), target)`` in one fused forward+backward pass."""
        try:
            return mlp_loss(x, *self._params(), target, reduction=reduction, activation=self.activation)
        except (ValueError, TypeError) as exc:
            raise self._error(exc, "FusedMLP.loss", x, target) from None

    def loss_backward(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``self.loss(x, target, reduction).backward()`` without the autograd engine.

        Computes the loss and accumulates each parameter's gradient into its
        ``.grad`` exactly as ``backward()`` would (assigned when ``.grad`` is
        None, added otherwise), for parameters that require grad. Returns the
        loss, detached. For hand-written loops::

            opt.zero_grad(); net.loss_backward(x, y); opt.step()

        Hooks: where ``backward()`` would run hooks for a parameter (tensor hooks,
        post-accumulate-grad hooks, Python hooks on its gradient accumulator) or
        anomaly mode is on, this *is* ``self.loss(x, target, reduction).backward()``,
        so every hook runs as it would there. A C++ hook on a gradient accumulator —
        ``DistributedDataParallel``'s gradient all-reduce — raises RuntimeError: DDP
        synchronises only in a backward that follows the DDP module's forward, so
        train through the DDP module (see fusedgrad._hooks).
        """
        params = self._params()
        if not is_compiling():  # one C++ call: gradients computed and accumulated (csrc/python/direct_calls.cpp)
            try:
                loss = _C.loss_backward(x, *params, target, reduction, self.activation)
            except (ValueError, TypeError) as exc:
                raise self._error(exc, "FusedMLP.loss_backward", x, target) from None
            if loss is not None:
                return loss
            # Declined: hooks, anomaly mode, tensor subclasses, modes, a bad option, a computed weight.
        for name, param in zip(_PARAM_NAMES, params):
            if param is not None and param.requires_grad and not param.is_leaf:
                raise ValueError(
                    f"FusedMLP.loss_backward: parameter '{name}' is computed (not a leaf, e.g. a "
                    "parametrization), so it has no .grad of its own to accumulate into; use "
                    "loss(x, target).backward() instead")
        if not direct_grad_write_ok("FusedMLP.loss_backward", zip(_PARAM_NAMES, params)):
            # backward() runs hooks a direct .grad write would skip: be backward().
            try:
                loss = mlp_loss(x, *params, target, reduction=reduction, activation=self.activation)
            except (ValueError, TypeError) as exc:
                raise self._error(exc, "FusedMLP.loss_backward", x, target) from None
            loss.backward()
            return loss.detach()
        try:
            loss, grads = mlp_loss_and_grads(x, *params, target, reduction=reduction, activation=self.activation,
                                             wrt=self._wrt(params))
        except (ValueError, TypeError) as exc:
            raise self._error(exc, "FusedMLP.loss_backward", x, target) from None
        for param, grad in zip(params, grads[1:5]):
            if grad is None:
                continue
            if param.grad is None:
                param.grad = grad
            else:
                param.grad += grad
        return loss

    def _error(self, exc, fn_name, x, target):
        """An argument error of the ops, as the error of the method the user called.

        The module's weights fix D, H and O, so a shape mismatch with ``x`` is ``x``'s."""
        in_features = self._modules["linear1"].in_features
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != in_features and "'w1'" in str(exc):
            hint = ""
            if x.dim() == 1 and in_features == 1:
                hint = (f" (a 1-D x is one sample with {x.shape[-1]} features; for {x.shape[-1]} samples of one "
                        "feature pass x.unsqueeze(-1))")
            return type(exc)(
                f"{fn_name}: argument 'x' has shape {tuple(x.shape)}, but this FusedMLP has in_features="
                f"{in_features}: x must have shape (*, {in_features}){hint}")
        names = ("x", "w1", "b1", "w2", "b2", "target")
        return attributed(exc, fn_name, names, (x, *self._params(), target), renames=_RENAMES)

    @staticmethod
    def _wrt(params):
        names = ("w1", "b1", "w2", "b2")
        return tuple(n for n, p in zip(names, params) if p is not None and p.requires_grad)

    @classmethod
    def from_module(cls, model: nn.Module, copy: bool = False) -> "FusedMLP":
        """A FusedMLP computing an existing ``Linear → activation → Linear`` model.

        ``model`` is a FusedMLP (its layers and activation), an
        ``nn.Sequential(nn.Linear, act, nn.Linear)``, or any module
        whose only children are a Linear, an activation and a Linear, registered in
        that order (e.g. the ``Net`` of the notebooks, ``linear2(sigmoid(linear1(x)))``),
        where ``act`` is the torch.nn module of one of :data:`fusedgrad.ACTIVATIONS`
        (``nn.Sigmoid``, ``nn.Tanh``, ``nn.ReLU``, ``nn.GELU`` of either ``approximate``,
        ``nn.Identity``, ...: the class named like the activation). Such a module's
        forward is checked on a small probe input on the CPU: it must compute
        ``linear2(act(linear1(x)))``.

        Args:
            model: the module to convert.
            copy: False (default) shares the model's two ``nn.Linear`` layers — the
                same Parameters, so training either trains both; True deep-copies them.

        Either layer may have a bias or not. Raises TypeError for a non-module or
        a dtype fusedgrad has no kernel for, ValueError (naming what is wrong) for
        any other structure, mismatched widths, or a forward that computes
        something else.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"FusedMLP.from_module: expected an nn.Module, got {type(model).__name__}")
        if type(model) is FusedMLP:  # already one: its layers (shared or copied), its activation
            lin1, lin2 = model.linear1, model.linear2
            net = cls(lin1.in_features, lin1.out_features, lin2.out_features, device="meta",
                      dtype=lin1.weight.dtype, activation=model.activation)
            net.linear1 = _copy.deepcopy(model.linear1) if copy else model.linear1
            net.linear2 = _copy.deepcopy(model.linear2) if copy else model.linear2
            net.train(model.training)
            return net
        children = list(model.named_children())
        described = ", ".join(f"{name}: {type(child).__name__}" for name, child in children) or "none"
        # Exact types: a subclass (LoRA, quantised, ...) may compute something else.
        activation = _activation_of(children[1][1]) if len(children) == 3 else None
        if activation is None or not all(type(children[k][1]) is nn.Linear for k in (0, 2)):
            raise ValueError(
                "FusedMLP.from_module: the model must consist of exactly nn.Linear, nn.Sigmoid, nn.Linear "
                "(in that order, e.g. nn.Sequential(nn.Linear(D, H), nn.Sigmoid(), nn.Linear(H, O))), or "
                "another torch.nn activation module in place of nn.Sigmoid, one of fusedgrad.ACTIVATIONS "
                f"({', '.join(ACTIVATIONS)}: nn.Tanh, nn.GELU(approximate='tanh'), ...); "
                f"{type(model).__name__} has children ({described})")
        (name1, lin1), _, (name2, lin2) = children
        if lin1.out_features != lin2.in_features:
            raise ValueError(
                f"FusedMLP.from_module: the first layer '{name1}' has out_features={lin1.out_features} but the "
                f"second layer '{name2}' has in_features={lin2.in_features}; they must be equal (the hidden width)")
        w1, w2 = lin1.weight, lin2.weight
        if w1.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"FusedMLP.from_module: fusedgrad supports float32 and float64, the model has {w1.dtype}")
        tensors = [t for t in (w1, lin1.bias, w2, lin2.bias) if t is not None]
        if any(t.dtype != w1.dtype for t in tensors):
            raise TypeError("FusedMLP.from_module: all the model's parameters must share one dtype, got "
                            + ", ".join(str(t.dtype) for t in tensors))
        if any(t.device != w1.device for t in tensors):
            raise ValueError("FusedMLP.from_module: all the model's parameters must be on one device, got "
                             + ", ".join(str(t.device) for t in tensors))

        # Build on the meta device (no initialisation work), then put the layers in.
        net = cls(lin1.in_features, lin1.out_features, lin2.out_features, device="meta", dtype=w1.dtype,
                  activation=activation)
        net.linear1 = _copy.deepcopy(lin1) if copy else lin1
        net.linear2 = _copy.deepcopy(lin2) if copy else lin2
        net.train(model.training)
        if type(model).forward is not nn.Sequential.forward:
            _check_same_forward(model, net)
        return net

    def extra_repr(self) -> str:
        return f"activation={self.activation} (fused)"


def _check_same_forward(model, net):
    """A custom forward may use its children differently (another activation, another
    order, a residual...): compare it with the fused one on a small probe input."""
    w = net.linear1.weight
    model_children = list(model.children())
    if w.device.type != "cpu":
        return  # a probe on another device could sync or lack a kernel; the structure was checked
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(4, net.linear1.in_features, generator=gen, dtype=torch.float64).to(w.dtype)
    with torch.no_grad():
        try:
            theirs = model(probe)
        except Exception as exc:  # noqa: BLE001  (any failure means the forward is not the plain chain)
            raise ValueError(
                f"FusedMLP.from_module: could not check that {type(model).__name__}.forward computes "
                f"linear2({net.activation}(linear1(x))): calling it on a ({tuple(probe.shape)}) input raised "
                f"{type(exc).__name__}: {exc}") from exc
        ours = net(probe)
    rtol = 1e-4 if w.dtype == torch.float32 else 1e-10
    same = (isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape
            and (theirs - ours).abs().max() <= rtol * max(ours.abs().max().item(), 1.0))
    if not same:
        raise ValueError(
            f"FusedMLP.from_module: {type(model).__name__} has Linear, {type(model_children[1]).__name__}, Linear "
            f"children but its forward does not compute linear2({net.activation}(linear1(x))) (checked on a probe "
            "input); convert only models that do")
