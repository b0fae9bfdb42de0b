"""FusedMLP: a drop-in Linear → Sigmoid → Linear module with fused kernels."""
import torch
from torch import nn

from .functional import mlp, mlp_loss


class FusedMLP(nn.Module):
    """``Linear(in, hidden) → Sigmoid → Linear(hidden, out)`` computed by fusedgrad.

    The parameters live in two real ``nn.Linear`` children named ``linear1`` and
    ``linear2``, created (and so initialised) exactly as ``nn.Linear`` does: the
    ``state_dict`` loads into and from a ``Net`` with ``linear1``, a sigmoid and
    ``linear2`` unchanged.

    Args:
        in_features, hidden_features, out_features: layer widths D, H, O.
        bias: if False, neither layer has a bias.
        device, dtype: as for ``nn.Linear``.
    """

    def __init__(self, in_features, hidden_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.linear1 = nn.Linear(in_features, hidden_features, bias=bias, **factory)
        self.linear2 = nn.Linear(hidden_features, out_features, bias=bias, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prediction of shape ``(*, out_features)``; backward is fused too."""
        l1, l2 = self.linear1, self.linear2
        return mlp(x, l1.weight, l1.bias, l2.weight, l2.bias)

    def loss(self, x: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """``MSELoss(reduction)(self(x), target)`` in one fused forward+backward pass."""
        l1, l2 = self.linear1, self.linear2
        return mlp_loss(x, l1.weight, l1.bias, l2.weight, l2.bias, target, reduction=reduction)

    def extra_repr(self) -> str:
        return "activation=sigmoid (fused)"
