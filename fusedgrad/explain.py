"""fusedgrad.explain: which kernel path a call takes, and why — for users tuning their runs and for
the tests, which assert the path they mean to exercise instead of assuming it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import torch

from . import _C

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["explain"]


def explain(net_or_trainer: Union[torch.nn.Module, "Trainer"], x: torch.Tensor,
            target: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The path ``net.loss(x, target)`` (or ``net(x)`` without a target, or a trainer's steps) takes.

    Args:
        net_or_trainer: a :class:`~fusedgrad.FusedMLP`, :class:`~fusedgrad.FusedMLPEnsemble` or
            :class:`~fusedgrad.Trainer`.
        x: the input the call would get.
        target: the target: the loss op (or a training step) is explained; None: the forward.

    Returns:
        A dict with ``"path"`` — ``"engine"`` (any depth: row blocks through the register-blocked
        products of csrc/engine/; the one-hidden-layer ops too, up to the width where BLAS pays),
        ``"gemm"`` / ``"cuda"`` (the one-hidden-layer ops), ``"ensemble"`` (the one-hidden-layer ensemble ops),
        ``"trainer-narrow"`` / ``"trainer-narrow-fixed"`` (the
        one-hidden-layer trainer), ``"trainer-engine"`` (the trainer at any depth), ``"trainer-lbfgs"``
        (a trainer of torch.optim.LBFGS), ``"meta"``
        (fake tensors: shapes only) — and
        ``"call"``, ``"rows"`` (of ``x``: a trainer's mini-batch step sees ``batch_size`` of them),
        ``"widths"``, ``"dtype"``, ``"threads"`` (torch's thread count)
        and ``"why"``; the engine paths add ``"block_rows"``, ``"blocks"``, ``"chunks"``
        (fixed by the shape and the rows, never by the threads: the same bits for any thread
        count), ``"vector_bytes"`` and ``"layout"`` (``"padded-rows"``: each row's features padded to whole
        lane vectors, for wide layers; ``"rows-in-lanes"``: each feature a line of the block's rows, where
        padding would add more than a tenth to the products — widths like 1, 2, 20); ``"trainer-engine"`` adds ``"team_threads"``: the threads
        a ``fit`` of one model and at least 16 steps keeps for the whole call, to run each step's
        chunks without a fork and join per step (csrc/engine/thread_team.h; below 2**18 multiply-adds a
        pass the call times its first steps with and without them and keeps them where they pay; 1:
        none — an ensemble, a data-parallel trainer, one chunk or one thread); a data-parallel trainer
        (``process_group``, or a DistributedDataParallel net) adds ``"data_parallel"``: ``world_size``,
        ``rank``, the ``semantics`` of its mean and where the all-reduce runs. The forward (no target, no trainer)
        adds ``"create_graph"``: the route of ``autograd.grad(net(x), x, create_graph=True)`` and
        of that result's own x-gradient — ``"nested-jets"`` (one CPU model: nodes whose backward is
        the engine's directional jets, csrc/python/deep_autograd.cpp) or ``"torch-recompute"``
        (ensembles, CUDA: the first backward recomputed in plain torch ops) — with
        ``"create_graph_why"``.
    """
    info = _explain(net_or_trainer, x, target)
    if info["call"] == "forward":
        from .ensemble import FusedMLPEnsemble

        if isinstance(net_or_trainer, FusedMLPEnsemble) or x.device.type != "cpu":
            info["create_graph"] = "torch-recompute"
            info["create_graph_why"] = ("an ensemble or a non-CPU tensor: the create_graph backward recomputes the "
                                        "forward in plain torch ops and differentiates it (native speed)")
        else:
            info["create_graph"] = "nested-jets"
            info["create_graph_why"] = ("one CPU model: J(x)ᵀḡ and ḡᵀH(x)v are autograd nodes whose backward is one "
                                        "engine pass on directional jets; other create_graph gradients (the "
                                        "parameters', a third level) recompute in plain torch ops")
    return info


def _explain(net_or_trainer, x, target) -> Dict[str, Any]:
    from .ensemble import FusedMLPEnsemble
    from .module import FusedMLP
    from .trainer import Trainer

    fn = "fusedgrad.explain"
    trainer = net_or_trainer if isinstance(net_or_trainer, Trainer) else None
    net = trainer.net if trainer is not None else net_or_trainer
    if not isinstance(net, (FusedMLP, FusedMLPEnsemble)):
        raise TypeError(f"{fn}: argument 'net_or_trainer' must be a FusedMLP, FusedMLPEnsemble or Trainer, got "
                        f"{type(net_or_trainer).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: argument 'x' must be a torch.Tensor, got {type(x).__name__}")
    if target is not None and not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: argument 'target' must be a torch.Tensor or None, got {type(target).__name__}")
    params = net._params()
    weights = params[0::2]
    widths = [weights[0].shape[-1]] + [w.shape[-2] for w in weights]
    ensemble = isinstance(net, FusedMLPEnsemble)
    if x.dim() < (2 if ensemble else 1) or x.shape[-1] != widths[0]:
        expected = f"(N, {widths[0]}) or (K, N, {widths[0]})" if ensemble else f"(*, {widths[0]})"
        raise ValueError(f"{fn}: argument 'x' must have shape {expected}, got {tuple(x.shape)}")
    # A trainer's steps see x's rows (a full batch; a mini-batch step sees batch_size of them).
    rows = x.shape[-2] if ensemble else x.numel() // max(x.shape[-1], 1)
    info: Dict[str, Any] = {
        "call": "train" if trainer is not None else ("loss" if target is not None else "forward"),
        "rows": int(rows),
        "widths": widths,
        "dtype": weights[0].dtype,
        "threads": torch.get_num_threads(),
    }
    if trainer is not None and trainer._lbfgs:
        info.update(_engine(widths, rows, weights, None))
        info["path"] = "trainer-lbfgs"
        info["why"] = ("torch.optim.LBFGS: each step its whole iteration loop, two-loop recursion and line search "
                       "in C++ (csrc/trainer/lbfgs.cpp), each evaluation one full-batch engine pass")
        return info
    deep = net.hidden_layers != 1
    if deep:
        info.update(_engine(widths, rows, weights, trainer, ensemble))
        if trainer is not None:
            info["path"] = "trainer-engine"
            info["why"] = ("more than one hidden layer: each step is one engine pass over the step's rows, then the "
                           "optimizer update, in C++")
        else:
            info["path"] = "engine"
            info["why"] = "more than one hidden layer: the any-depth engine (csrc/engine/)"
        if isinstance(net, FusedMLPEnsemble):
            info["why"] += f"; {net.num_models} models in parallel, each pass on one thread"
        return _data_parallel(info, trainer)
    if trainer is not None:
        D, H, O = widths
        info["path"] = _C.explain_trainer(D, H, O, net.activation)
        if info["path"] == "trainer-engine":
            info.update(_engine(widths, rows, weights, trainer))
        info["why"] = {"trainer-engine": ">= 4 inputs and >= 192 multiply-adds a row, >= 16 inputs and >= 128, "
                                         ">= 4 outputs and >= 320, or any row of >= 2048: the any-depth engine, "
                                         "measured faster there than the one-hidden-layer kernels",
                       "trainer-narrow-fixed": "σ with 1–2 inputs and 1 output: the compile-time-width block kernel",
                       "trainer-narrow": "narrow layers: the block kernel over rows"}[info["path"]]
        return _data_parallel(info, trainer)
    if isinstance(net, FusedMLPEnsemble):
        info["path"] = "ensemble"
        info["why"] = "the one-hidden-layer ensemble ops (csrc/ops/ensemble*.cpp)"
        return info
    w1, b1, w2, b2 = params
    if x.device.type not in ("cpu", "cuda"):  # meta / fake tensors: the fake kernels, shapes only
        info["path"] = x.device.type
        info["why"] = f"{x.device.type} tensors run the fake kernels (fusedgrad/_fake.py): shapes, no arithmetic"
        return info
    info["path"] = _C.explain_op(target is not None, x, w1, b1, w2, b2, target, net.activation)
    if info["path"] == "engine":
        info.update(_engine(widths, rows, weights, None))
    info["why"] = {"engine": "the any-depth engine at one hidden layer: row blocks through the register-blocked "
                             "products of csrc/engine/ (csrc/ops/engine_path.cpp)",
                   "gemm": "wide enough for BLAS, or an operand the engine does not read directly "
                           "(csrc/ops/gemm_path.cpp)",
                   "cuda": "CUDA kernels (csrc/cuda/)"}[info["path"]]
    return info


def _engine(widths, rows, weights, trainer, ensemble=False) -> Dict[str, Any]:
    """The engine's blocks and chunks for a pass of ``rows`` rows, and for a trainer of one model its
    step team (data-parallel steps wait on an all-reduce and keep none)."""
    info = _C.explain_engine(widths, int(rows), weights[0].element_size())
    team = info.pop("team_threads")
    if trainer is not None:
        info["team_threads"] = team if trainer._parallel is None and not ensemble else 1
    return info


def _data_parallel(info: Dict[str, Any], trainer) -> Dict[str, Any]:
    """A data-parallel trainer's group: its size, this rank, and what the all-reduce averages."""
    parallel = trainer._parallel if trainer is not None else None
    if parallel is not None:
        info["data_parallel"] = {
            "world_size": parallel.world_size, "rank": parallel.rank,
            "semantics": ("DistributedDataParallel: the mean over ranks of each rank's loss" if parallel.rank_means
                          else f"the {trainer.reduction} over every rank's rows of the step"),
            "all_reduce": "each step's gradient sums, one float64 buffer, inside the C++ loop "
                          "(csrc/trainer/step_reducer.cpp)"}
        info["why"] += f"; data-parallel over {parallel.world_size} ranks"
    return info
