"""FusedMLP: a drop-in Linear → activation → Linear module with fused kernels."""
import copy as _copy
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from torch.compiler import is_compiling

from . import _C
from . import deep as _deep
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
    if not isinstance(activation, str):  # a wrong type is a TypeError, as torch raises it
        raise TypeError(f"{fn_name}: argument 'activation' must be a str, one of {allowed}, got "
                        f"{type(activation).__name__}")
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


def activation_module(name: str) -> nn.Module:
    """The torch.nn module computing the activation ``name`` of ACTIVATIONS (the inverse of _activation_of)."""
    _check_activation("fusedgrad.activation_module", name)
    base, _, approximate = name.partition("_")
    classes = {cls.lower(): getattr(nn, cls) for cls in dir(nn) if isinstance(getattr(nn, cls), type)}
    return classes[base](approximate=approximate) if approximate else classes[base]()


def _hidden_widths(fn_name, hidden_features, hidden_layers):
    """The hidden widths n_1 … n_{L−1}: ``hidden_layers`` copies of an int ``hidden_features``, or the
    sequence itself (``hidden_layers`` then None or its length)."""
    if hidden_layers is not None and (isinstance(hidden_layers, bool) or not isinstance(hidden_layers, int)):
        raise TypeError(f"{fn_name}: argument 'hidden_layers' must be an int >= 1 or None, got "
                        f"{type(hidden_layers).__name__}")
    if hidden_layers is not None and hidden_layers < 1:
        raise ValueError(f"{fn_name}: argument 'hidden_layers' must be an int >= 1 or None, got {hidden_layers!r}")
    if isinstance(hidden_features, int) and not isinstance(hidden_features, bool):
        return [hidden_features] * (hidden_layers or 1)
    if isinstance(hidden_features, (list, tuple)) and hidden_features and all(
            isinstance(h, int) and not isinstance(h, bool) for h in hidden_features):
        if hidden_layers is not None and hidden_layers != len(hidden_features):
            raise ValueError(f"{fn_name}: argument 'hidden_layers' ({hidden_layers}) must equal the number of "
                             f"hidden widths in 'hidden_features' {tuple(hidden_features)} ({len(hidden_features)}), "
                             "or be left out")
        return list(hidden_features)
    raise TypeError(f"{fn_name}: argument 'hidden_features' must be an int or a non-empty sequence of ints (one "
                    f"width per hidden layer), got {hidden_features!r}")


class FusedMLP(nn.Module):
    """``Linear(in, hidden) → activation → … → Linear(hidden, out)`` computed by fusedgrad.

    The parameters live in real ``nn.Linear`` children named ``linear1`` … ``linear{L}``
    (L = hidden_layers + 1), created (and so initialised) exactly as ``nn.Linear`` does.
    With one hidden layer the ``state_dict`` loads into and from a ``Net`` with
    ``linear1``, an activation and ``linear2`` unchanged (the activation has no
    parameters); at any depth ``linear{l}.*`` is ``nn.Sequential``'s ``{2(l−1)}.*``
    (:meth:`to_module` / :meth:`from_module`).

    Args:
        in_features, out_features: widths D and O.
        hidden_features: the hidden width (an int: ``hidden_layers`` layers of it), or a
            sequence of ints, one width per hidden layer.
        bias: if False, no layer has a bias.
        device, dtype: as for ``nn.Linear``.
        activation: one of :data:`fusedgrad.ACTIVATIONS` (default ``"sigmoid"``), after
            every linear layer but the last.
        hidden_layers: the number of hidden layers (default 1, or the length of
            ``hidden_features`` when that is a sequence).

    Attributes:
        in_features, hidden_features, out_features, hidden_layers: as given
            (``hidden_features`` a tuple when given as a sequence).
        hidden_sizes: the hidden widths, one per hidden layer (a tuple).
        activation: the activation's name.
    """

    activation = "sigmoid"  # (a class default too: modules pickled before the argument existed)
    hidden_layers = 1

    def __init__(self, in_features: int, hidden_features: Union[int, Sequence[int]], out_features: int,
                 bias: bool = True, device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None, activation: str = "sigmoid",
                 hidden_layers: Optional[int] = None) -> None:
        super().__init__()
        self.activation = _check_activation("FusedMLP", activation)
        widths = _hidden_widths("FusedMLP", hidden_features, hidden_layers)
        factory = {"device": device, "dtype": dtype}
        sizes = [in_features, *widths, out_features]
        for l in range(len(sizes) - 1):
            setattr(self, f"linear{l + 1}", nn.Linear(sizes[l], sizes[l + 1], bias=bias, **factory))
        self.in_features, self.out_features = in_features, out_features
        self.hidden_features = hidden_features if isinstance(hidden_features, int) else tuple(widths)
        self.hidden_sizes = tuple(widths)
        self.hidden_layers = len(widths)

    @property
    def num_layers(self) -> int:
        """The number of linear layers, L = hidden_layers + 1."""
        return self.hidden_layers + 1

    def _layers(self):
        return [self._modules[f"linear{l}"] for l in range(1, self.num_layers + 1)]

    def _param_names(self):
        """The parameters' state_dict names, in _params() order."""
        return tuple(f"linear{l}.{kind}" for l in range(1, self.num_layers + 1) for kind in ("weight", "bias"))

    def _weights_biases(self):
        params = self._params()
        return list(params[0::2]), list(params[1::2])

    def _params(self):
        """``(w1, b1, w2, b2)`` (deeper: ``(W_1, b_1, …, W_L, b_L)``), read from the layers' parameter dicts.

        ``self.linear1.weight`` runs ``nn.Module.__getattr__`` (Python) twice, and
        six such lookups cost more than a small step's whole kernel. A layer whose
        weight or bias is not a registered parameter (e.g. a parametrization) is
        read through its attributes.
        """
        if self.hidden_layers != 1:
            out = []
            for layer in self._layers():
                p = layer._parameters
                try:
                    out += (p["weight"], p["bias"])
                except KeyError:
                    out += (layer.weight, layer.bias)
            return tuple(out)
        l1, l2 = self._modules["linear1"], self._modules["linear2"]
        p1, p2 = l1._parameters, l2._parameters
        try:
            return p1["weight"], p1["bias"], p2["weight"], p2["bias"]
        except KeyError:
            return l1.weight, l1.bias, l2.weight, l2.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of shape ``(*, out_features)``; backward is fused too."""
        if self.hidden_layers != 1:
            weights, biases = self._weights_biases()
            try:
                return _deep.mlp(x, weights, biases, activation=self.activation)
            except (ValueError, TypeError) as exc:
                raise self._deep_error(exc, "FusedMLP.forward") from None
        try:
            return mlp(x, *self._params(), activation=self.activation)
        except (ValueError, TypeError) as exc:
            raise self._error(exc, "FusedMLP.forward", x, None) from None

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``MSELoss(reduction)(self(x), target)`` in one fused forward+backward pass."""
        if self.hidden_layers != 1:
            weights, biases = self._weights_biases()
            try:
                return _deep.mlp_loss(x, weights, biases, target, reduction=reduction, activation=self.activation)
            except (ValueError, TypeError) as exc:
                raise self._deep_error(exc, "FusedMLP.loss") from None
        try:
            return mlp_loss(x, *self._params(), target, reduction=reduction, activation=self.activation)
        except (ValueError, TypeError) as exc:
            raise self._error(exc, "FusedMLP.loss", x, target) from None

    def derivatives(self, x: torch.Tensor, order: int = 1) -> Tuple[torch.Tensor, ...]:
        """``(u, du)`` or, with ``order=2``, ``(u, du, d2u)``: the prediction and its input derivatives.

        ``u = self(x)`` ``(*, O)``; ``du[..., o, d] = ∂u_o/∂x_d`` and ``d2u[..., o, d] = ∂²u_o/∂x_d²``,
        each ``(*, O, D)``, from one fused pass that carries the tangents through the layers,
        differentiable with respect to the parameters and ``x`` by one more fused pass — what a
        physics-informed loss needs (see :func:`fusedgrad.deep.derivatives`). CPU only.
        """
        weights, biases = self._weights_biases()
        try:
            return _deep.derivatives(x, weights, biases, activation=self.activation, order=order)
        except (ValueError, TypeError) as exc:
            raise self._deep_error(exc, "FusedMLP.derivatives") from None

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
        if self.hidden_layers != 1:
            return self._deep_loss_backward(x, target, reduction)
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
        _accumulate(params, grads[1:5])
        return loss

    def _deep_loss_backward(self, x, target, reduction):
        fn = "FusedMLP.loss_backward"
        params, names = self._params(), self._param_names()
        for name, param in zip(names, params):
            if param is not None and param.requires_grad and not param.is_leaf:
                raise ValueError(
                    f"{fn}: parameter '{name}' is computed (not a leaf, e.g. a parametrization), so it has no .grad "
                    "of its own to accumulate into; use loss(x, target).backward() instead")
        if not direct_grad_write_ok(fn, zip(names, params)):
            loss = self.loss(x, target, reduction)  # backward() runs hooks a direct .grad write would skip
            loss.backward()
            return loss.detach()
        weights, biases = self._weights_biases()
        try:
            loss, dw, db, _, _ = _deep.mlp_loss_and_grads(x, weights, biases, target, reduction=reduction,
                                                          activation=self.activation)
        except (ValueError, TypeError) as exc:
            raise self._deep_error(exc, fn) from None
        _accumulate(params, [g for pair in zip(dw, db) for g in pair])
        return loss

    def _deep_error(self, exc, fn_name):
        """An error of the deep ops, as the error of the method the user called, naming the layers."""
        text = str(exc)
        for prefix in ("fusedgrad.mlp_loss_and_grads:", "fusedgrad.mlp_loss:", "fusedgrad.mlp:",
                       "fusedgrad.derivatives:"):
            if text.startswith(prefix):
                text = fn_name + ":" + text[len(prefix):]
                break
        for l in range(self.num_layers):
            text = text.replace(f"'weights'[{l}]", f"'linear{l + 1}.weight'").replace(
                f"'biases'[{l}]", f"'linear{l + 1}.bias'")
        return type(exc)(text)

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
        """A FusedMLP computing an existing ``Linear → act → Linear → … → Linear`` model.

        ``model`` is a FusedMLP (its layers and activation), an
        ``nn.Sequential(nn.Linear, act, nn.Linear, act, …, nn.Linear)`` of any depth, or
        any module whose only children are Linears with one activation between each
        two, registered in that order (e.g. the ``Net`` of the notebooks,
        ``linear2(sigmoid(linear1(x)))``), where every ``act`` is the torch.nn module of
        one and the same activation of :data:`fusedgrad.ACTIVATIONS` (``nn.Sigmoid``,
        ``nn.Tanh``, ``nn.ReLU``, ``nn.GELU`` of either ``approximate``, ``nn.Identity``,
        ...: the class named like the activation). Such a module's forward is checked on
        a small probe input on the CPU: it must compute that chain.

        Args:
            model: the module to convert.
            copy: False (default) shares the model's ``nn.Linear`` layers — the same
                Parameters, so training either trains both; True deep-copies them.

        Layers may have a bias or not. Raises TypeError for a non-module or a dtype
        fusedgrad has no kernel for, ValueError (naming what is wrong) for any other
        structure, mismatched widths, or a forward that computes something else.
        """
        fn = "FusedMLP.from_module"
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
        if type(model) is FusedMLP:  # already one: its layers (shared or copied), its activation
            layers, activation = model._layers(), model.activation
        else:
            children = list(model.named_children())
            described = ", ".join(f"{name}: {type(child).__name__}" for name, child in children) or "none"
            # Exact types: a subclass (LoRA, quantised, ...) may compute something else.
            acts = {_activation_of(child) for _, child in children[1::2]}
            activation = acts.pop() if len(acts) == 1 else None
            if (len(children) < 3 or len(children) % 2 == 0 or activation is None
                    or not all(type(child) is nn.Linear for _, child in children[0::2])):
                raise ValueError(
                    f"{fn}: the model must consist of nn.Linear layers with one activation module between each "
                    "two (in that order, e.g. nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, H), nn.Tanh(), "
                    "nn.Linear(H, O))), every activation the same one of fusedgrad.ACTIVATIONS "
                    f"({', '.join(ACTIVATIONS)}: nn.Sigmoid, nn.Tanh, nn.GELU(approximate='tanh'), ...); "
                    f"{type(model).__name__} has children ({described})")
            named = children[0::2]
            for (name_a, lin_a), (name_b, lin_b) in zip(named, named[1:]):
                if lin_a.out_features != lin_b.in_features:
                    raise ValueError(
                        f"{fn}: layer '{name_a}' has out_features={lin_a.out_features} but the next layer "
                        f"'{name_b}' has in_features={lin_b.in_features}; they must be equal (a hidden width)")
            layers = [lin for _, lin in named]
        w = layers[0].weight
        if w.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{fn}: fusedgrad supports float32 and float64, the model has {w.dtype}")
        tensors = [t for lin in layers for t in (lin.weight, lin.bias) if t is not None]
        if any(t.dtype != w.dtype for t in tensors):
            raise TypeError(f"{fn}: all the model's parameters must share one dtype, got "
                            + ", ".join(str(t.dtype) for t in tensors))
        if any(t.device != w.device for t in tensors):
            raise ValueError(f"{fn}: all the model's parameters must be on one device, got "
                             + ", ".join(str(t.device) for t in tensors))
        # Build on the meta device (no initialisation work), then put the layers in.
        hidden = [lin.out_features for lin in layers[:-1]]
        net = cls(layers[0].in_features, hidden[0] if len(hidden) == 1 else hidden, layers[-1].out_features,
                  device="meta", dtype=w.dtype, activation=activation)
        for l, lin in enumerate(layers):
            setattr(net, f"linear{l + 1}", _copy.deepcopy(lin) if copy else lin)
        net.train(model.training)
        if type(model) is not FusedMLP and type(model).forward is not nn.Sequential.forward:
            _check_same_forward(model, net)
        return net

    def to_module(self, copy: bool = False) -> nn.Sequential:
        """The plain ``nn.Sequential(Linear, act, …, Linear)`` this module computes.

        Its ``state_dict`` keys are ``{2(l−1)}.weight`` / ``.bias`` for this module's
        ``linear{l}.*``. ``copy=False`` (default) shares the ``nn.Linear`` layers (the
        same Parameters); True deep-copies them. ``FusedMLP.from_module`` is the inverse.
        """
        items = []
        for l, layer in enumerate(self._layers()):
            if l:
                items.append(activation_module(self.activation))
            items.append(_copy.deepcopy(layer) if copy else layer)
        seq = nn.Sequential(*items)
        seq.train(self.training)
        return seq

    def extra_repr(self) -> str:
        return f"activation={self.activation} (fused)"


def _accumulate(params, grads):
    """Each gradient into its parameter's .grad as backward() does: assigned when None, else added."""
    for param, grad in zip(params, grads):
        if param is None or grad is None or not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = grad
        else:
            param.grad += grad


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
                f"{_chain(net)}: calling it on a ({tuple(probe.shape)}) input raised "
                f"{type(exc).__name__}: {exc}") from exc
        ours = net(probe)
    rtol = 1e-4 if w.dtype == torch.float32 else 1e-10
    same = (isinstance(theirs, torch.Tensor) and theirs.shape == ours.shape
            and (theirs - ours).abs().max() <= rtol * max(ours.abs().max().item(), 1.0))
    if not same:
        raise ValueError(
            f"FusedMLP.from_module: {type(model).__name__} has "
            f"{', '.join(type(child).__name__ for child in model_children)} children but its forward does not "
            f"compute {_chain(net)} (checked on a probe input); convert only models that do")


def _chain(net):
    """``linear2(sigmoid(linear1(x)))`` for the module's layers and activation."""
    text = "x"
    for l in range(1, net.num_layers + 1):
        text = f"linear{l}({text})"
        if l < net.num_layers:
            text = f"{net.activation}({text})"
    return text
