"""FusedMLPEnsemble: K independent Linear → act → … → Linear models in one module."""
import types
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import deep as _deep
from .functional import mlp, mlp_loss
from .module import FusedMLP, _check_activation, _hidden_widths


class FusedMLPEnsemble(nn.Module):
    """K independent ``Linear → act → … → Linear`` models, computed by one fused op.

    The parameters are stacked along a leading model dimension and registered on
    the module itself (one optimizer over them is K independent optimizers for
    element-wise ones: SGD, Adam, AdamW, RMSprop, Adagrad):

    * ``weight{l}`` ``(K, n_l, n_{l−1})`` and ``bias{l}`` ``(K, n_l)`` for the L = hidden_layers + 1
      layers (``weight1 (K, H, D)``, ``bias1 (K, H)``, ``weight2 (K, O, H)``, ``bias2 (K, O)`` with one
      hidden layer; the biases are None with ``bias=False``).

    Initialisation: member k is initialised exactly as its own ``nn.Linear``
    layers would be, drawn in order from the default generator — model 0's
    ``weight1, bias1, weight2, bias2, …``, then model 1's, ... — so with the same seed
    ``ensemble.module(k)`` equals the k-th of K ``FusedMLP(D, H, O, ...)`` built one after
    the other (``nn.Linear.reset_parameters`` itself runs on each slice).

    Args:
        num_models: K.
        in_features, hidden_features, out_features: D, the hidden width (an int, or one
            width per hidden layer), O — as for :class:`FusedMLP`.
        bias: if False, no layer has a bias.
        device, dtype: as for ``nn.Linear``.
        activation: one of :data:`fusedgrad.ACTIVATIONS` (default ``"sigmoid"``).
        hidden_layers: the number of hidden layers (default 1, or the length of ``hidden_features``).

    ``forward(x)`` gives ``(K, N, O)`` for ``x`` of shape ``(N, D)`` (shared by all
    models) or ``(K, N, D)`` (one input per model); ``loss(x, target)`` gives the
    ``(K,)`` per-model losses. ``loss(x, y).sum().backward()`` gives every model
    exactly the gradient it would get alone.
    """

    activation = "sigmoid"
    hidden_layers = 1

    def __init__(self, num_models: int, in_features: int, hidden_features: Union[int, Sequence[int]],
                 out_features: int, bias: bool = True, device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None, activation: str = "sigmoid",
                 hidden_layers: Optional[int] = None) -> None:
        super().__init__()
        for name, value in (("num_models", num_models), ("in_features", in_features),
                            ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FusedMLPEnsemble: {name} must be a non-negative int, got {value!r}")
        if isinstance(hidden_features, int) and not isinstance(hidden_features, bool) and hidden_features < 0:
            raise ValueError(f"FusedMLPEnsemble: hidden_features must be a non-negative int, got {hidden_features!r}")
        widths = _hidden_widths("FusedMLPEnsemble", hidden_features, hidden_layers)
        self.activation = _check_activation("FusedMLPEnsemble", activation)
        self.num_models = num_models
        self.in_features = in_features
        self.hidden_features = hidden_features if isinstance(hidden_features, int) else tuple(widths)
        self.hidden_sizes = tuple(widths)
        self.hidden_layers = len(widths)
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        sizes = [in_features, *widths, out_features]
        L = len(sizes) - 1
        for l in range(L):
            setattr(self, f"weight{l + 1}", nn.Parameter(torch.empty((num_models, sizes[l + 1], sizes[l]), **factory)))
        for l in range(L):
            if bias:
                setattr(self, f"bias{l + 1}", nn.Parameter(torch.empty((num_models, sizes[l + 1]), **factory)))
            else:
                self.register_parameter(f"bias{l + 1}", None)
        self.reset_parameters()

    @property
    def num_layers(self) -> int:
        """The number of linear layers of each model, L = hidden_layers + 1."""
        return self.hidden_layers + 1

    def reset_parameters(self) -> None:
        """Each member as its own ``nn.Linear``s would be initialised, drawn in model order."""
        params = self._params()
        if params[0].device.type == "meta":
            return
        with torch.no_grad():
            for k in range(self.num_models):
                # nn.Linear.reset_parameters reads only .weight and .bias: run the
                # very function on model k's slices (same draws, same order).
                for w, b in zip(params[0::2], params[1::2]):
                    nn.Linear.reset_parameters(types.SimpleNamespace(weight=w[k], bias=None if b is None else b[k]))

    def _params(self):
        """``(w1, b1, w2, b2, …)``: the stacked parameters, read without ``nn.Module.__getattr__``."""
        p = self._parameters
        if self.hidden_layers == 1:
            return p["weight1"], p["bias1"], p["weight2"], p["bias2"]
        return tuple(p[f"{kind}{l}"] for l in range(1, self.num_layers + 1) for kind in ("weight", "bias"))

    def _param_names(self):
        """The parameters' names, in _params() order."""
        return tuple(f"{kind}{l}" for l in range(1, self.num_layers + 1) for kind in ("weight", "bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction ``(K, N, O)`` for ``x`` ``(N, D)`` shared or ``(K, N, D)`` per model."""
        params = self._params()
        if self.hidden_layers != 1:
            return _deep.mlp(x, list(params[0::2]), list(params[1::2]), activation=self.activation)
        return mlp(x, *params, activation=self.activation)

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``(K,)``: model k's ``MSELoss(reduction)`` on ``x``/``target`` (shared ``(N, ·)`` or per model ``(K, N, ·)``)."""
        params = self._params()
        if self.hidden_layers != 1:
            return _deep.mlp_loss(x, list(params[0::2]), list(params[1::2]), target, reduction=reduction,
                                  activation=self.activation)
        return mlp_loss(x, *params, target, reduction=reduction, activation=self.activation)

    def derivatives(self, x: torch.Tensor, order: int = 1) -> Tuple[torch.Tensor, ...]:
        """Every model's ``(u, du[, d2u])`` (see :meth:`FusedMLP.derivatives`): ``u`` ``(K, N, O)``,
        ``du`` / ``d2u`` ``(K, N, O, D)``, for ``x`` ``(N, D)`` shared or ``(K, N, D)`` per model."""
        params = self._params()
        return _deep.derivatives(x, list(params[0::2]), list(params[1::2]), activation=self.activation, order=order)

    # --- conversions -----------------------------------------------------------------------

    @classmethod
    def from_modules(cls, models: Union[nn.Module, Iterable[nn.Module]]) -> "FusedMLPEnsemble":
        """An ensemble holding copies of the parameters of ``models``.

        Each model is a :class:`FusedMLP` or anything :meth:`FusedMLP.from_module`
        accepts (``nn.Sequential(Linear, act, …, Linear)``, the notebooks' ``Net``).
        All must have the same widths, activation, biases (present or not, per layer),
        dtype and device. The ensemble's parameters are new tensors: training it
        does not change the models.
        """
        fn = "FusedMLPEnsemble.from_modules"
        models = list(models) if not isinstance(models, nn.Module) else [models]
        if not models:
            raise ValueError(f"{fn}: needs at least one model, got an empty list")
        nets = []
        for k, model in enumerate(models):
            if isinstance(model, FusedMLP):
                nets.append(model)
                continue
            try:
                nets.append(FusedMLP.from_module(model))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{fn}: model {k}: {exc}") from exc

        def describe(net):
            params = net._params()
            widths = (params[0].shape[1],) + tuple(w.shape[0] for w in params[0::2])
            return widths, tuple(b is not None for b in params[1::2])

        first = nets[0]
        widths, has_bias = describe(first)
        ref_w = first._params()[0]
        for k, net in enumerate(nets[1:], start=1):
            kwidths, kbias = describe(net)
            if kwidths != widths:
                raise ValueError(f"{fn}: model {k} is {'→'.join(map(str, kwidths))} but model 0 is "
                                 f"{'→'.join(map(str, widths))}; all models must have the same widths")
            if net.activation != first.activation:
                raise ValueError(f"{fn}: model {k} has activation {net.activation!r} but model 0 has "
                                 f"{first.activation!r}; all models must have the same activation")
            if kbias != has_bias:
                describe_bias = lambda flags: ", ".join(f"linear{l + 1}: {f}" for l, f in enumerate(flags))  # noqa: E731
                raise ValueError(f"{fn}: model {k} has biases ({describe_bias(kbias)}) but model 0 has "
                                 f"({describe_bias(has_bias)}); all models must have the same biases")
            w = net._params()[0]
            if w.dtype != ref_w.dtype:
                raise TypeError(f"{fn}: model {k} has dtype {w.dtype} but model 0 has {ref_w.dtype}; all models "
                                "must share one dtype")
            if w.device != ref_w.device:
                raise ValueError(f"{fn}: model {k} is on device {w.device} but model 0 is on {ref_w.device}; all "
                                 "models must be on one device")
        hidden = list(widths[1:-1])
        ens = cls(len(nets), widths[0], hidden[0] if len(hidden) == 1 else hidden, widths[-1], bias=True,
                  device="meta", dtype=ref_w.dtype, activation=first.activation)  # no init work
        for i, name in enumerate(ens._param_names()):
            if name.startswith("bias") and not has_bias[i // 2]:
                setattr(ens, name, None)
            else:
                setattr(ens, name, nn.Parameter(torch.stack([net._params()[i].detach() for net in nets]).clone()))
        ens.train(first.training)
        return ens

    def module(self, k: int) -> FusedMLP:
        """Model k as a plain :class:`FusedMLP` (copied parameters); its ``state_dict``
        (``linear1.*``, ``linear2.*``, …) loads into the notebooks' ``Net`` (one hidden layer)
        or, through ``to_module()``, into ``nn.Sequential``."""
        K = self.num_models
        if not isinstance(k, int) or isinstance(k, bool) or not -K <= k < K:
            raise IndexError(f"FusedMLPEnsemble.module: model index {k!r} out of range for {K} models")
        params = self._params()
        net = FusedMLP(self.in_features, list(self.hidden_sizes), self.out_features, device="meta",
                       dtype=params[0].dtype, activation=self.activation)
        with torch.no_grad():
            for l, layer in enumerate(net._layers()):
                w, b = params[2 * l], params[2 * l + 1]
                layer.weight = nn.Parameter(w[k].detach().clone())
                layer.bias = None if b is None else nn.Parameter(b[k].detach().clone())
        net.train(self.training)
        return net

    def to_modules(self) -> List[FusedMLP]:
        """``[self.module(k) for k in range(K)]``."""
        return [self.module(k) for k in range(self.num_models)]

    def extra_repr(self) -> str:
        hidden = self.hidden_features if self.hidden_layers == 1 else list(self.hidden_sizes)
        return (f"num_models={self.num_models}, in_features={self.in_features}, "
                f"hidden_features={hidden}, out_features={self.out_features}, "
                f"bias={self.bias1 is not None}, activation={self.activation} (fused)")
