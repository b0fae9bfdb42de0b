"""fusedgrad: Linear → activation (sigmoid by default) → Linear → squared loss,
forward and hand-derived backward in one fused C++ pass.

The public API:

* :func:`mlp_loss` / :func:`mlp` — functional calls; ``loss.backward()`` works
  through a C++ autograd node.
* :func:`mlp_loss_and_grads` — the loss and its gradients in one call, no
  autograd engine, for hand-written training loops.
* :class:`FusedMLP` — a drop-in ``nn.Module`` whose ``state_dict`` matches
  ``Linear → Sigmoid → Linear``.
* :class:`FusedMLPEnsemble` — K such models stacked, one fused op for all
  (the functions above also take ``w1`` of shape ``(K, H, D)``).
* ``torch.ops.fusedgrad.*`` — the registered operators themselves.
"""
import torch  # noqa: F401  (loads libtorch, which _C links against)

from . import _C  # noqa: F401  (loading the library registers torch.ops.fusedgrad)
from . import _fake  # noqa: F401  (fake kernels: torch.compile / export / opcheck)
from . import _fake_ensemble  # noqa: F401  (fake kernels of the ensemble ops)
from ._checks import ACTIVATIONS  # the names activation= takes, from the C++ activation table
from .functional import mlp, mlp_loss, mlp_loss_and_grads
from .module import FusedMLP
from .trainer import Trainer
from .ensemble import FusedMLPEnsemble
from . import deep  # networks of any depth over weight / bias lists (fusedgrad.deep.mlp_loss, ...)
from .deep import derivatives  # u, ∂u/∂x, ∂²u/∂x² in one fused pass (physics-informed losses)
from . import distributed  # data-parallel training and sharded ensembles over torch.distributed
from .explain import explain

#: Devices this build has kernels for, e.g. ("cpu",) or ("cpu", "cuda").
backends = tuple(_C.backends)

__all__ = ["mlp_loss", "mlp", "mlp_loss_and_grads", "FusedMLP", "FusedMLPEnsemble", "Trainer", "backends",
           "ACTIVATIONS", "explain", "deep", "derivatives"]
__version__ = "0.1.0"
