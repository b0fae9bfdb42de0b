"""Training over ``torch.distributed``: the fused trainer data-parallel, and ensembles sharded by model.

Two ways to spread work over processes (``torchrun``, or ``torch.multiprocessing``), both on the
process groups PyTorch users already make with :func:`torch.distributed.init_process_group`
(gloo on the CPU):

* **Data parallel** — one model, each rank holding a shard of the rows:
  ``fusedgrad.Trainer(net, opt, process_group=group)`` or
  ``fusedgrad.Trainer(DistributedDataParallel(net), opt)``. Every step, inside the C++ loop, the
  ranks' gradient sums are all-reduced in one flat float64 buffer
  (``csrc/trainer/step_reducer.cpp``) before each rank applies the same update; see
  :class:`fusedgrad.Trainer` and docs/distributed.md for the exact semantics.
* **Ensembles sharded by model** — :func:`shard_ensemble` gives each rank its slice of a
  :class:`~fusedgrad.FusedMLPEnsemble`'s K models, which it trains with no communication per
  step; :func:`gather_ensemble` and :func:`gather_losses` bring the models and loss histories
  back to one rank, where ``losses[-1].argmin()`` picks the best model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from . import _compat

if TYPE_CHECKING:
    from .ensemble import FusedMLPEnsemble


def _dist(fn: str):
    """torch.distributed, available and initialised, or an error naming ``fn``."""
    import torch.distributed as dist

    if not dist.is_available():
        raise RuntimeError(f"{fn}: this torch was built without torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"{fn}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (torchrun sets up its environment)")
    return dist


def _group(fn: str, group):
    dist = _dist(fn)
    group = dist.group.WORLD if group is None else group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: argument 'group' must be a torch.distributed ProcessGroup or None (the default "
                        f"group), got {type(group).__qualname__}")
    return dist, group


def model_slice(num_models: int, group=None) -> slice:
    """The models of a K-model ensemble that this rank of ``group`` (default: the whole world) holds:
    contiguous blocks, the first ``K mod world_size`` ranks holding one model more (as
    ``torch.tensor_split``). Use it to slice per-model data of shape (K, ...) the same way, e.g. a
    learning-rate sweep's ``model_lr_scale``."""
    fn = "fusedgrad.distributed.model_slice"
    if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 0:
        raise ValueError(f"{fn}: argument 'num_models' must be an int >= 0, got {num_models!r}")
    dist, group = _group(fn, group)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    base, extra = divmod(num_models, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def shard_ensemble(ensemble: "FusedMLPEnsemble", group=None) -> "FusedMLPEnsemble":
    """This rank's models of ``ensemble`` (:func:`model_slice`), as a new ensemble holding copies of
    their parameters. Every rank must pass the same ensemble (same seed, or one loaded from the same
    file): nothing is communicated here."""
    from .ensemble import FusedMLPEnsemble

    fn = "fusedgrad.distributed.shard_ensemble"
    if not isinstance(ensemble, FusedMLPEnsemble):
        raise TypeError(f"{fn}: argument 'ensemble' must be a fusedgrad.FusedMLPEnsemble, got "
                        f"{type(ensemble).__qualname__}")
    part = model_slice(ensemble.num_models, group)
    local = _like(ensemble, part.stop - part.start)
    with torch.no_grad():
        for name, p in ensemble.named_parameters():
            getattr(local, name).copy_(p[part])
    return local


def gather_ensemble(local: "FusedMLPEnsemble", group=None, dst: int = 0) -> Optional["FusedMLPEnsemble"]:
    """The whole ensemble, in model order, on rank ``dst`` of ``group`` (None on the other ranks):
    the inverse of :func:`shard_ensemble` for the trained shards. Every rank of the group must call it."""
    from .ensemble import FusedMLPEnsemble

    fn = "fusedgrad.distributed.gather_ensemble"
    if not isinstance(local, FusedMLPEnsemble):
        raise TypeError(f"{fn}: argument 'local' must be a fusedgrad.FusedMLPEnsemble, got {type(local).__qualname__}")
    dist, group = _group(fn, group)
    state = {name: p.detach().cpu() for name, p in local.named_parameters()}
    parts = _gather_objects(dist, group, dst, state)
    if parts is None:
        return None
    total = sum(next(iter(s.values())).shape[0] for s in parts)
    whole = _like(local, total)
    with torch.no_grad():
        for name, p in whole.named_parameters():
            p.copy_(torch.cat([s[name] for s in parts]))
    return whole


def gather_losses(losses: torch.Tensor, group=None, dst: int = 0) -> Optional[torch.Tensor]:
    """The ``(steps, K)`` loss history of the whole ensemble on rank ``dst`` (None elsewhere), from each
    rank's ``(steps, k_rank)`` history as ``Trainer.fit`` returns it for its shard. Every rank must have
    taken the same number of steps."""
    fn = "fusedgrad.distributed.gather_losses"
    if not isinstance(losses, torch.Tensor) or losses.dim() != 2:
        raise ValueError(f"{fn}: argument 'losses' must be a (steps, k) tensor, as Trainer.fit returns for an "
                         f"ensemble, got {getattr(losses, 'shape', type(losses).__qualname__)}")
    dist, group = _group(fn, group)
    parts = _gather_objects(dist, group, dst, losses.detach().cpu())
    if parts is None:
        return None
    steps = {p.shape[0] for p in parts}
    if len(steps) != 1:
        raise ValueError(f"{fn}: the ranks' histories have different step counts {sorted(steps)}")
    return torch.cat(parts, dim=1)


def _gather_objects(dist, group, dst, obj) -> Optional[List]:
    parts = [None] * dist.get_world_size(group) if dist.get_rank(group) == dst else None
    dist.gather_object(obj, parts, dst=dist.get_global_rank(group, dst), group=group)
    return parts


def _like(ensemble: "FusedMLPEnsemble", num_models: int) -> "FusedMLPEnsemble":
    from .ensemble import FusedMLPEnsemble

    p = ensemble.weight1
    return FusedMLPEnsemble(num_models, ensemble.in_features, list(ensemble.hidden_sizes), ensemble.out_features,
                            bias=ensemble.bias1 is not None, dtype=p.dtype, device=p.device,
                            activation=ensemble.activation)


# ---------------------------------------------------------------------- the trainer's data-parallel route
class DataParallel:
    """What ``fusedgrad.Trainer`` needs of its process group (private): the group, DDP's semantics or
    not, and the checks made when the trainer is built and at every call."""

    def __init__(self, fn: str, group, ddp=None) -> None:
        dist = _dist(fn)
        if not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"{fn}: argument 'process_group' must be a torch.distributed ProcessGroup (e.g. "
                            f"torch.distributed.group.WORLD), got {type(group).__qualname__}")
        self.dist = dist
        self.group = group
        self.ddp = ddp  # the DistributedDataParallel wrapper, or None
        self.rank_means = ddp is not None  # DDP averages the ranks' own losses' gradients
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def check_ddp(self, fn: str) -> None:
        """What native DDP training would do that the fused route cannot honour: refused, by name."""
        if self.ddp is None:
            return
        for problem in _compat.ddp_unsupported(self.ddp):
            raise ValueError(f"{fn}: the DistributedDataParallel wrapper has {problem}, which the fused trainer's "
                             "all-reduce would not honour; train with ddp(x) and loss.backward(), or remove it")

    def agree(self, fn: str, what: Tuple) -> None:
        """Every rank makes the same call: the same ``what`` (shapes, dtypes, optimizer, step counts).
        One small collective per call (never per step): a mismatch is an error on every rank, not a hang."""
        mine = repr(what)
        seen = [None] * self.world_size
        try:
            self.dist.all_gather_object(seen, mine, group=self.group)
        except Exception as e:  # noqa: BLE001 - the backend's error, whatever its class, named and chained
            raise RuntimeError(f"{fn}: the ranks of the process group could not compare their calls: another rank "
                               f"failed, left or did not reach this call within the group's timeout ({e})") from e
        if any(s != mine for s in seen):
            differing = sorted({s for s in seen})
            raise ValueError(f"{fn}: the ranks of the process group disagree on the call (each rank must build the "
                             f"same network and optimizer and make the same calls): {differing}")

    def broadcast_parameters(self, params) -> None:
        """The parameters of the group's rank 0 on every rank, as DistributedDataParallel does when built."""
        src = self.dist.get_global_rank(self.group, 0)
        with torch.no_grad():
            for p in params:
                if p is not None:
                    self.dist.broadcast(p.data, src=src, group=self.group)
