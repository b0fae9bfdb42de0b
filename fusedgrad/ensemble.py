"""FusedMLPEnsemble: K independent Linear → Sigmoid → Linear models in one module."""
import types

import torch
from torch import nn

from .functional import mlp, mlp_loss
from .module import FusedMLP


class FusedMLPEnsemble(nn.Module):
    """K independent ``Linear(D, H) → Sigmoid → Linear(H, O)`` models, computed by one fused op.

    The parameters are stacked along a leading model dimension and registered on
    the module itself (one optimizer over them is K independent optimizers for
    element-wise ones such as Adam, AdamW, SGD):

    * ``weight1`` ``(K, H, D)``, ``bias1`` ``(K, H)``, ``weight2`` ``(K, O, H)``, ``bias2`` ``(K, O)``
      (the biases are None with ``bias=False``).

    Initialisation: member k is initialised exactly as its own two ``nn.Linear``
    layers would be, drawn in order from the default generator — model 0's
    ``weight1, bias1, weight2, bias2``, then model 1's, ... — so with the same seed
    ``ensemble.module(k)`` equals the k-th of K ``FusedMLP(D, H, O)`` built one after
    the other (``nn.Linear.reset_parameters`` itself runs on each slice).

    Args:
        num_models: K.
        in_features, hidden_features, out_features: D, H, O.
        bias: if False, neither layer has a bias.
        device, dtype: as for ``nn.Linear``.

    ``forward(x)`` gives ``(K, N, O)`` for ``x`` of shape ``(N, D)`` (shared by all
    models) or ``(K, N, D)`` (one input per model); ``loss(x, target)`` gives the
    ``(K,)`` per-model losses. ``loss(x, y).sum().backward()`` gives every model
    exactly the gradient it would get alone.
    """

    def __init__(self, num_models, in_features, hidden_features, out_features, bias=True, device=None,
                 dtype=None):
        super().__init__()
        for name, value in (("num_models", num_models), ("in_features", in_features),
                            ("hidden_features", hidden_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FusedMLPEnsemble: {name} must be a non-negative int, got {value!r}")
        self.num_models = num_models
        self.in_features = in_features
        self.hidden_features = hidden_features
        self.out_features = out_features
        factory = {"device": device, "dtype": dtype}
        K, D, H, O = num_models, in_features, hidden_features, out_features
        self.weight1 = nn.Parameter(torch.empty((K, H, D), **factory))
        self.weight2 = nn.Parameter(torch.empty((K, O, H), **factory))
        if bias:
            self.bias1 = nn.Parameter(torch.empty((K, H), **factory))
            self.bias2 = nn.Parameter(torch.empty((K, O), **factory))
        else:
            self.register_parameter("bias1", None)
            self.register_parameter("bias2", None)
        self.reset_parameters()

    def reset_parameters(self):
        """Each member as its own ``nn.Linear``s would be initialised, drawn in model order."""
        if self.weight1.device.type == "meta":
            return
        w1, b1, w2, b2 = self._params()
        with torch.no_grad():
            for k in range(self.num_models):
                # nn.Linear.reset_parameters reads only .weight and .bias: run the
                # very function on model k's slices (same draws, same order).
                nn.Linear.reset_parameters(types.SimpleNamespace(weight=w1[k], bias=None if b1 is None else b1[k]))
                nn.Linear.reset_parameters(types.SimpleNamespace(weight=w2[k], bias=None if b2 is None else b2[k]))

    def _params(self):
        """``(w1, b1, w2, b2)``: the stacked parameters, read without ``nn.Module.__getattr__``."""
        p = self._parameters
        return p["weight1"], p["bias1"], p["weight2"], p["bias2"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction ``(K, N, O)`` for ``x`` ``(N, D)`` shared or ``(K, N, D)`` per model."""
        return mlp(x, *self._params())

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``(K,)``: model k's ``MSELoss(reduction)`` on ``x``/``target`` (shared ``(N, ·)`` or per model ``(K, N, ·)``)."""
        return mlp_loss(x, *self._params(), target, reduction=reduction)

    # --- conversions -----------------------------------------------------------------------

    @classmethod
    def from_modules(cls, models) -> "FusedMLPEnsemble":
        """An ensemble holding copies of the parameters of ``models``.

        Each model is a :class:`FusedMLP` or anything :meth:`FusedMLP.from_module`
        accepts (``nn.Sequential(Linear, Sigmoid, Linear)``, the notebooks' ``Net``).
        All must have the same widths, the same biases (present or not, per layer),
        dtype and device. The ensemble's parameters are new tensors: training it
        does not change the models.
        """
        models = list(models) if not isinstance(models, nn.Module) else [models]
        if not models:
            raise ValueError("FusedMLPEnsemble.from_modules: needs at least one model, got an empty list")
        nets = []
        for k, model in enumerate(models):
            if isinstance(model, FusedMLP):
                nets.append(model)
                continue
            try:
                nets.append(FusedMLP.from_module(model))
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"FusedMLPEnsemble.from_modules: model {k}: {exc}") from exc
        for k, net in enumerate(nets):
            if net.hidden_layers != 1:
                raise ValueError(f"FusedMLPEnsemble.from_modules: model {k} has {net.hidden_layers} hidden layers; "
                                 "FusedMLPEnsemble holds models of one hidden layer (deeper ensembles are not built "
                                 "yet: train each FusedMLP with its own Trainer)")
            if net.activation != "sigmoid":
                raise ValueError(f"FusedMLPEnsemble.from_modules: model {k} has activation {net.activation!r}; "
                                 "FusedMLPEnsemble computes sigmoid models only (the ensemble ops take any "
                                 "activation: fusedgrad.mlp_loss with a 3-D w1)")

        def describe(net):
            w1, b1, w2, b2 = net._params()
            return (tuple(w1.shape[::-1]) + (w2.shape[0],), b1 is not None, b2 is not None)

        first = nets[0]
        (D, H, _), has_b1, has_b2 = describe(first)
        O = first._params()[2].shape[0]
        ref_w = first._params()[0]
        for k, net in enumerate(nets[1:], start=1):
            shape, kb1, kb2 = describe(net)
            if shape != describe(first)[0]:
                raise ValueError(
                    f"FusedMLPEnsemble.from_modules: model {k} is {shape[0]}→{shape[1]}→{shape[2]} but model 0 is "
                    f"{D}→{H}→{O}; all models must have the same in/hidden/out features")
            if (kb1, kb2) != (has_b1, has_b2):
                raise ValueError(
                    f"FusedMLPEnsemble.from_modules: model {k} has biases (linear1: {kb1}, linear2: {kb2}) but "
                    f"model 0 has (linear1: {has_b1}, linear2: {has_b2}); all models must have the same biases")
            w = net._params()[0]
            if w.dtype != ref_w.dtype:
                raise TypeError(f"FusedMLPEnsemble.from_modules: model {k} has dtype {w.dtype} but model 0 has "
                                f"{ref_w.dtype}; all models must share one dtype")
            if w.device != ref_w.device:
                raise ValueError(f"FusedMLPEnsemble.from_modules: model {k} is on device {w.device} but model 0 is "
                                 f"on {ref_w.device}; all models must be on one device")

        ens = cls(len(nets), D, H, O, bias=True, device="meta", dtype=ref_w.dtype)  # no init work

        def stacked(i):
            return nn.Parameter(torch.stack([net._params()[i].detach() for net in nets]).clone())

        ens.weight1, ens.weight2 = stacked(0), stacked(2)
        ens.bias1 = stacked(1) if has_b1 else None
        ens.bias2 = stacked(3) if has_b2 else None
        ens.train(first.training)
        return ens

    def module(self, k: int) -> FusedMLP:
        """Model k as a plain :class:`FusedMLP` (copied parameters); its ``state_dict``
        (``linear1.*``, ``linear2.*``) loads into the notebooks' ``Net``."""
        K = self.num_models
        if not isinstance(k, int) or isinstance(k, bool) or not -K <= k < K:
            raise IndexError(f"FusedMLPEnsemble.module: model index {k!r} out of range for {K} models")
        w1, b1, w2, b2 = self._params()
        net = FusedMLP(self.in_features, self.hidden_features, self.out_features, device="meta", dtype=w1.dtype)
        with torch.no_grad():
            net.linear1.weight = nn.Parameter(w1[k].detach().clone())
            net.linear1.bias = None if b1 is None else nn.Parameter(b1[k].detach().clone())
            net.linear2.weight = nn.Parameter(w2[k].detach().clone())
            net.linear2.bias = None if b2 is None else nn.Parameter(b2[k].detach().clone())
        net.train(self.training)
        return net

    def to_modules(self):
        """``[self.module(k) for k in range(K)]``."""
        return [self.module(k) for k in range(self.num_models)]

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, in_features={self.in_features}, "
                f"hidden_features={self.hidden_features}, out_features={self.out_features}, "
                f"bias={self.bias1 is not None}, activation=sigmoid (fused)")
