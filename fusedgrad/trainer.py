"""Fused training: forward, loss, backward and the optimizer update in one C++ call.

:class:`Trainer` drives a :class:`~fusedgrad.FusedMLP` (or a
:class:`~fusedgrad.FusedMLPEnsemble`) with the user's own ``torch.optim``
optimizer. ``trainer.step(x, y)`` does exactly what ::

    opt.zero_grad(); net.loss(x, y).backward(); opt.step()

does, and ``trainer.fit(x, y, steps)`` runs many such steps in C++ with the
GIL released. The optimizer stays the single source of truth: its
``param_groups`` (lr, betas, ...) and ``state`` (step, exp_avg, square_avg,
sum, momentum_buffer, ...) are read at every call and updated in place, so
plain ``opt.step()``, ``opt.state_dict()`` / ``load_state_dict()`` and LR
schedulers keep working between calls. The optimizers it runs (SGD, Adam,
AdamW, RMSprop, Adagrad) are described once each, in csrc/trainer/optimizers.h
and fusedgrad/_optimizers.py; LBFGS (full-batch fit of a FusedMLP) has its whole
step in csrc/trainer/lbfgs.cpp; the kernels are in csrc/trainer/.
"""
from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Callable, Optional, Union

import torch

from . import _C, _compat
from ._hooks import ACCUMULATOR_CPP_HOOK, grad_hook_flags, grad_hooks
from ._optimizers import description_of, prepare_state

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel

    from .ensemble import FusedMLPEnsemble
    from .module import FusedMLP

_PARAM_NAMES = ("w1", "b1", "w2", "b2")
_DTYPES = (torch.float32, torch.float64)
# Seconds of work per C++ call in fit(): small enough that Ctrl-C, progress and
# callbacks respond promptly, large enough that the Python between calls is noise.
_CALL_SECONDS = 0.05


class Trainer:
    """Trains ``net`` with ``optimizer``, each step forward + loss + backward + update in one C++ call.

    Args:
        net: a :class:`~fusedgrad.FusedMLP`, or a :class:`~fusedgrad.FusedMLPEnsemble` of K models
            (its stacked parameters, one optimizer over them: SGD, Adam, AdamW, RMSprop and Adagrad are
            element-wise, so this is exactly K independent optimizers), or a FusedMLP wrapped in
            ``torch.nn.parallel.DistributedDataParallel`` (see ``process_group``).
        optimizer: ``torch.optim.SGD``, ``Adam``, ``AdamW``, ``RMSprop`` or ``Adagrad`` built on ``net``'s
            parameters, with any options those classes take (``foreach`` / ``fused`` settings are
            accepted: they compute the same formulas) except ``capturable=True`` and
            ``differentiable=True``; or ``torch.optim.LBFGS`` (any options, ``line_search_fn`` None or
            ``"strong_wolfe"``) for a FusedMLP, full batch: each step is one ``opt.step(closure)``
            with the whole iteration loop and line search in C++. Several param
            groups with different options are fine. Each of ``net``'s parameters must be in it
            exactly once, require grad and have no gradient hooks, and it must hold no other
            parameter.
        reduction: ``"mean"`` (as ``nn.MSELoss``) or ``"sum"``.
        model_lr_scale: ensembles only, optional ``(K,)`` tensor: model k is updated with learning
            rate ``group['lr'] * model_lr_scale[k]`` (for every param group, and every lr an LR
            scheduler sets), which turns one ensemble into a learning-rate sweep. It applies to the
            trainer's own steps only; a plain ``optimizer.step()`` uses ``group['lr']``.
        process_group: a ``torch.distributed`` ProcessGroup (e.g. ``torch.distributed.group.WORLD``)
            to train one FusedMLP data-parallel: each rank passes its own shard of the rows to
            :meth:`step` / :meth:`fit`, and every step the ranks' gradient sums are all-reduced inside
            the C++ loop (one float64 buffer, GIL released), so every rank applies the same update and
            holds the same parameters (rank 0's are broadcast when the trainer is built, as
            ``DistributedDataParallel`` does). ``reduction="mean"`` is the mean over all ranks' rows of
            the step (shards may differ in size) and the returned losses are that global loss, the same
            on every rank. With mini-batches each rank draws from its own shard (``randperm`` of the
            shard with the ``generator`` it passes); all ranks take every step together, a rank whose
            shard has fewer batches simply starts its next epoch sooner. Every rank must make the same
            calls (``fit``'s arguments are compared once per call: a mismatch raises, never hangs); a
            rank that fails or leaves makes the others raise within the group's timeout
            (``init_process_group(timeout=...)``). A ``DistributedDataParallel(net)`` passed as ``net``
            uses the wrapper's group and DDP's own semantics: each rank's loss is the mean (or sum) over
            its own rows and the gradients are averaged over the ranks, exactly what ``ddp(x)`` and
            ``loss.backward()`` compute; DDP settings the all-reduce would not honour
            (``find_unused_parameters``, communication hooks, ``no_sync()``, mixed precision, ignored
            parameters) are refused. Not for ensembles (shard their models:
            :func:`fusedgrad.distributed.shard_ensemble`) or LBFGS.

    After :meth:`step` or :meth:`fit`, each parameter's ``.grad`` holds the gradient of the last
    step and the optimizer state is that of the reference loop, so training may continue with
    either. Float32 and float64 on the CPU.
    """

    def __init__(self, net: Union["FusedMLP", "FusedMLPEnsemble", "DistributedDataParallel"],
                 optimizer: torch.optim.Optimizer, reduction: str = "mean", *,
                 model_lr_scale: Optional[torch.Tensor] = None, process_group=None) -> None:
        fn = "fusedgrad.Trainer"
        _compat.require(fn)  # the torch internals it reads are what it expects (fusedgrad/_compat.py)
        from .module import FusedMLP

        ddp = None
        if _is_ddp(net):
            ddp, net = net, net.module
            if not isinstance(net, FusedMLP):
                raise TypeError(f"{fn}: a DistributedDataParallel 'net' must wrap a fusedgrad.FusedMLP, got "
                                f"{type(net).__qualname__}")
            if process_group is not None and process_group is not ddp.process_group:
                raise ValueError(f"{fn}: argument 'process_group' differs from the DistributedDataParallel "
                                 "wrapper's process group; leave it out (the wrapper's is used)")
            process_group = ddp.process_group
        if not isinstance(net, FusedMLP) and not is_ensemble(net):
            raise TypeError(f"{fn}: argument 'net' must be a fusedgrad.FusedMLP or fusedgrad.FusedMLPEnsemble, "
                            f"got {type(net).__qualname__}")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"{fn}: argument 'optimizer' must be a torch.optim optimizer, got "
                            f"{type(optimizer).__qualname__}")
        description_of(fn, optimizer)
        if reduction not in ("mean", "sum"):
            raise ValueError(f"{fn}: argument 'reduction' must be 'mean' or 'sum', got {reduction!r}")
        self.net = net
        self.optimizer = optimizer
        self.reduction = reduction
        self.num_models = net.num_models if is_ensemble(net) else 1
        self._ensemble = is_ensemble(net)
        self._membership_key, self._membership_value = None, None
        self._description = description_of(fn, optimizer)
        self._lbfgs = not self._description.elementwise
        self._fast_step = True  # tests turn it off to compare the two routes
        self._engine_key, self._engine_value = None, False  # _deep()'s cache
        self.model_lr_scale = None
        if model_lr_scale is not None:
            if not self._ensemble:
                raise ValueError(f"{fn}: argument 'model_lr_scale' is for ensembles (FusedMLPEnsemble); "
                                 "for one model, set the optimizer's lr")
            scale = torch.as_tensor(model_lr_scale)
            if scale.shape != (self.num_models,) or not scale.is_floating_point():
                raise ValueError(f"{fn}: argument 'model_lr_scale' must be a floating-point tensor of shape "
                                 f"(K,) = ({self.num_models},), got {tuple(scale.shape)} {scale.dtype}")
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError(f"{fn}: argument 'model_lr_scale' must hold finite, non-negative factors")
            self.model_lr_scale = scale.detach().to(dtype=torch.float64, device="cpu").contiguous()
        self.process_group = process_group
        self._parallel = None
        if process_group is not None:
            from .distributed import DataParallel

            if self._ensemble:
                raise ValueError(f"{fn}: argument 'process_group' is for one model trained on shards of the rows; "
                                 "an ensemble's models are sharded over the ranks instead (fusedgrad.distributed."
                                 "shard_ensemble), each rank training its own with no process group")
            if self._lbfgs:
                raise ValueError(f"{fn}: LBFGS is not run data-parallel (its line search would need a collective "
                                 "per evaluation); use SGD, Adam, AdamW, RMSprop or Adagrad with 'process_group'")
            self._parallel = DataParallel(fn, process_group, ddp)
            self._parallel.check_ddp(fn)
        # Refuse a bad setup now, not at the first step: what the steps will read, read once.
        params, _ = self._prepare(fn, make_grads=False)  # (the gradients are made by the first step)
        if self._parallel is not None:
            # The same network, dtype and optimizer on every rank, then rank 0's parameters everywhere
            # (DDP did that when it was built).
            self._parallel.agree(fn, ("Trainer", [None if p is None else (tuple(p.shape), str(p.dtype))
                                                  for p in params], self._activation(), self._description.name,
                                      reduction))
            if ddp is None:
                self._parallel.broadcast_parameters(params)
        if self._lbfgs:
            if self._ensemble:
                raise ValueError(f"{fn}: LBFGS over an ensemble's stacked parameters is one optimizer coupling "
                                 "every model (its dot products are not element-wise); the fused trainer runs LBFGS "
                                 "for a FusedMLP only — train the ensemble with opt.step(closure)")
            self._lbfgs_options(fn)
        else:
            _C.read_optimizer(fn, optimizer, self._description.name, params, self._pnames())

    # ------------------------------------------------------------------ setup, read at every call
    def _params(self):
        return self.net._params()

    def _deep(self):
        """Whether the steps run on the any-depth engine (csrc/trainer/deep_train.cpp): every network of
        more than one hidden layer, and those of one whose widths the engine runs faster than the
        one-hidden-layer kernels (the rule is csrc/trainer/train_cpu.cpp's train_path_name, which
        fusedgrad.explain reports too)."""
        if getattr(self.net, "hidden_layers", 1) != 1:
            return True
        w1, _, w2, _ = self.net._params()
        key = (w1.shape[-1], w1.shape[-2], w2.shape[-2], self._activation())
        if key != self._engine_key:
            self._engine_key, self._engine_value = key, _C.explain_trainer(*key)
        return self._engine_value == "trainer-engine"

    def _activation(self):
        """The hidden layer's activation: FusedMLP's own (any of the table's), an ensemble's sigmoid."""
        return getattr(self.net, "activation", "sigmoid")

    def _membership(self, fn, params, groups):
        """Group index of each parameter (None where the model has none); the optimizer must
        hold exactly the model's parameters. Cached on the ids involved, re-checked when they change."""
        key = (tuple(id(p) for p in params), tuple(tuple(id(p) for p in g["params"]) for g in groups))
        if key == self._membership_key:
            return self._membership_value
        where = {}
        for gi, group in enumerate(groups):
            for p in group["params"]:
                where[id(p)] = gi
        wanted = {id(p) for p in params if p is not None}
        strangers = sum(1 for group in groups for p in group["params"] if id(p) not in wanted)
        if strangers:
            raise ValueError(f"{fn}: the optimizer holds {strangers} parameter(s) that are not part of the "
                             "network; build it on net.parameters() only")
        value = []
        for name, p in zip(self._names(), params):
            if p is not None and id(p) not in where:
                raise ValueError(f"{fn}: parameter '{self._pname(name)}' is not in the optimizer; build the "
                                 "optimizer on net.parameters()")
            value.append(None if p is None else where[id(p)])
        self._membership_key, self._membership_value = key, value
        return value

    def _prepare(self, fn, make_grads=True):
        """The parameters and their .grad buffers, with the optimizer state torch.optim would have
        made before this step (fusedgrad/_optimizers.py); the optimizer itself is read in C++
        (csrc/trainer/binding_helpers.h), which raises what is wrong with its options or state."""
        opt = self.optimizer
        d = description_of(fn, opt)
        if _compat.optimizer_step_hooks(opt):
            raise RuntimeError(f"{fn}: the optimizer has step hooks (register_step_pre_hook / "
                             "register_step_post_hook, or global optimizer hooks), which opt.step() runs and the "
                             "fused trainer would skip; train with opt.step() instead")
        if torch.is_anomaly_enabled():
            raise RuntimeError(f"{fn}: anomaly detection is on (torch.autograd.detect_anomaly); it checks what "
                             "backward() computes, which the fused trainer does not run — train with "
                             "loss.backward() and opt.step() while it is on")
        params = self._params()
        groups = opt.param_groups
        membership = self._membership(fn, params, groups)
        grads = []
        for name, p, gi in zip(self._names(), params, membership):
            if p is None:
                grads.append(None)
                continue
            if not p.requires_grad or not p.is_leaf or p.dtype not in _DTYPES or p.device.type != "cpu" \
                    or not p.is_contiguous() or not self._hooks_allowed(grad_hook_flags(p), p):
                self._refuse_param(fn, name, p)
            g = p.grad
            if g is None and not make_grads:
                pass  # made by the C++ call (deep_train_steps), stored as .grad after its steps
            elif g is None or g.shape != p.shape or g.dtype != p.dtype or not g.is_contiguous() \
                    or g.device != p.device:
                # What backward() would leave after zero_grad(): a fresh gradient of p's layout.
                g = torch.empty_like(p, memory_format=torch.contiguous_format)
            grads.append(g)
            prepare_state(d, opt, groups[gi], p)
        return params, grads

    def _hooks_allowed(self, flags, p):
        """Whether ``p``'s hooks (``flags``) let the trainer write its .grad: none, or — on the DDP route —
        only DistributedDataParallel's gradient all-reduce (one C++ hook on its accumulator), which the
        data-parallel route replaces by its own all-reduce of the same sums."""
        if not flags:
            return True
        return (self._parallel is not None and self._parallel.ddp is not None
                and flags == ACCUMULATOR_CPP_HOOK and _C.accumulator_cpp_hook_count(p) == 1)

    def _refuse_param(self, fn, name, p):
        pname = self._pname(name)
        if not p.requires_grad:
            raise ValueError(f"{fn}: parameter '{pname}' does not require grad (frozen); the fused trainer updates "
                             "every parameter — unfreeze it or train with loss.backward() and opt.step()")
        if not p.is_leaf:
            raise ValueError(f"{fn}: parameter '{pname}' is computed (not a leaf, e.g. a parametrization), so it "
                             "cannot be updated in place")
        hooks = grad_hooks(p)
        if hooks and self._parallel is not None and self._parallel.ddp is not None:
            raise ValueError(f"{fn}: parameter '{pname}' has hooks besides DistributedDataParallel's all-reduce "
                             f"({', '.join(hooks)}, {_C.accumulator_cpp_hook_count(p)} C++ accumulator hook(s)); "
                             "the fused trainer would skip them — train with ddp(x) and loss.backward()")
        if hooks:
            raise ValueError(f"{fn}: parameter '{pname}' has {', '.join(hooks)}; the fused trainer writes .grad "
                             "directly and would skip it — train with loss.backward() and opt.step() instead")
        if p.device.type != "cpu":
            raise ValueError(f"{fn}: the fused trainer runs on the CPU; parameter '{pname}' is on {p.device}")
        if p.dtype not in _DTYPES:
            raise TypeError(f"{fn}: parameters must be float32 or float64; '{pname}' is {p.dtype}")
        raise ValueError(f"{fn}: parameter '{pname}' must be contiguous")

    def _names(self):
        """The parameters' names in _params() order (their state_dict names where the net has them)."""
        names = getattr(self.net, "_param_names", None)
        return names() if names is not None else _PARAM_NAMES

    def _pnames(self):
        return [self._pname(n) for n in self._names()]

    def _pname(self, name):
        if name not in _PARAM_NAMES:
            return name
        if self._ensemble:
            return {"w1": "weight1", "b1": "bias1", "w2": "weight2", "b2": "bias2"}[name]
        return {"w1": "linear1.weight", "b1": "linear1.bias", "w2": "linear2.weight", "b2": "linear2.bias"}[name]

    def _lbfgs_options(self, fn):
        """LBFGS's param group options (it has exactly one group), by name."""
        groups = self.optimizer.param_groups
        if len(groups) != 1:
            raise ValueError(f"{fn}: LBFGS has exactly one param group, got {len(groups)}")
        g = groups[0]
        for key in ("capturable", "differentiable"):
            if g.get(key, False):
                raise ValueError(f"{fn}: param_groups[0] has {key}=True, which the fused trainer does not "
                                 "support; train with opt.step()")
        if g["line_search_fn"] not in (None, "strong_wolfe"):
            raise ValueError(f"{fn}: LBFGS's line_search_fn must be None or 'strong_wolfe', got "
                             f"{g['line_search_fn']!r}")
        lr = g["lr"]
        if isinstance(lr, torch.Tensor):
            if lr.numel() != 1 or lr.requires_grad:
                raise ValueError(f"{fn}: param_groups[0]['lr'] must be a number or a one-element tensor that "
                                 "does not require grad")
            lr = lr.item()
        return {"lr": float(lr), "max_iter": int(g["max_iter"]), "max_eval": int(g["max_eval"]),
                "tolerance_grad": float(g["tolerance_grad"]), "tolerance_change": float(g["tolerance_change"]),
                "history_size": int(g["history_size"]), "strong_wolfe": g["line_search_fn"] == "strong_wolfe"}

    def _run_lbfgs(self, fn, x, target, steps, losses, done):
        """torch.optim.LBFGS's step(closure) `steps` times, full batch, in C++ (csrc/trainer/lbfgs.cpp);
        its state, that of the group's first parameter, is read and written back there."""
        params, grads = self._prepare(fn)
        options = self._lbfgs_options(fn)
        group_params = list(self.optimizer.param_groups[0]["params"])
        where = {id(p): i for i, p in enumerate(params) if p is not None}
        group_grads = [grads[where[id(p)]] for p in group_params]
        state = self.optimizer.state[group_params[0]]
        _C.lbfgs_steps(fn, state, group_params, group_grads, params, grads, x, target, steps,
                       self.reduction == "mean", losses, done, self._activation(), **options)
        self._after_run(params, grads)

    def _data(self, fn, x, target):
        """x and target as the contiguous 2-D (or per-model 3-D) matrices the kernels read."""
        for name, t in (("x", x), ("target", target)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{fn}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
            if t.layout is not torch.strided:
                raise ValueError(f"{fn}: argument '{name}' must be a dense (torch.strided) tensor, got {t.layout}")
        params = self._params()
        w1, w2 = params[0], params[-2]
        D, O = w1.shape[-1], w2.shape[-2]
        if self._ensemble:
            K = self.num_models
            if x.dim() not in (2, 3) or x.shape[-1] != D or (x.dim() == 3 and x.shape[0] != K):
                raise ValueError(f"{fn}: argument 'x' must have shape (N, {D}) (shared by all models) or "
                                 f"(K, N, {D}) = ({K}, N, {D}), got {tuple(x.shape)}")
            expected = x.shape[:-1] + (O,)
            ok = target.shape == expected or (target.dim() == 2 and target.shape == x.shape[-2:-1] + (O,)) \
                or (target.dim() == 3 and target.shape == (K,) + x.shape[-2:-1] + (O,))
            if not ok:
                raise ValueError(f"{fn}: argument 'target' must have shape (N, {O}) or (K, N, {O}) with x's N, got "
                                 f"{tuple(target.shape)} for x of shape {tuple(x.shape)}")
        else:
            if x.dim() < 1 or x.shape[-1] != D:
                raise ValueError(f"{fn}: argument 'x' must have shape (*, in_features) = (*, {D}), got "
                                 f"{tuple(x.shape)}")
            expected = x.shape[:-1] + (O,)
            if target.shape != expected:
                raise ValueError(f"{fn}: argument 'target' must have the prediction's shape x.shape[:-1] + "
                                 f"(out_features,) = {tuple(expected)}, got {tuple(target.shape)}")
            x = x.reshape(-1, D)
            target = target.reshape(-1, O)
        if x.dtype != w1.dtype or target.dtype != w1.dtype:
            raise TypeError(f"{fn}: arguments 'x' and 'target' must have the parameters' dtype {w1.dtype}, got "
                            f"{x.dtype} and {target.dtype}")
        if x.device != w1.device or target.device != w1.device:
            raise ValueError(f"{fn}: arguments 'x' and 'target' must be on the parameters' device {w1.device}, "
                             f"got {x.device} and {target.device}")
        if x.shape[-2] == 0:
            raise ValueError(f"{fn}: argument 'x' has no rows")
        return x.detach().contiguous(), target.detach().contiguous()

    def _run(self, fn, x, target, steps, first_step=0, batch_size=0, order=None, losses=None, done=None,
             sklearn_terms=None):
        # fit()'s calls in the common case read the optimizer in C++ (as step() does); anything
        # else (e.g. a first step, before the optimizer has state) takes the route below.
        # sklearn_terms: fusedgrad.sklearn's step terms (csrc/trainer/train_step.h: SklearnTerms), or None.
        name = self._description.name
        if self._lbfgs:
            if batch_size:
                raise ValueError(f"{fn}: LBFGS trains on the full batch: batch_size must be None")
            self._run_lbfgs(fn, x, target, steps, losses, done)
            return
        parallel = self._parallel
        group, rank_means = None, False
        if parallel is not None:  # the data-parallel route (fusedgrad/distributed.py)
            parallel.check_ddp(fn)
            group, rank_means = parallel.group, parallel.rank_means
        if self._deep():
            # The common case read straight from the parameters and optimizer in C++, as below for
            # one hidden layer; anything else (hooks, a tensor lr, an ensemble, ...) declines to here.
            if self._fast_step and parallel is None and sklearn_terms is None and not self._ensemble \
                    and self.model_lr_scale is None and _C.deep_train_steps_fast(
                    fn, self.optimizer, name, self.net._params(), x, target, batch_size, order, first_step, steps,
                    self.reduction == "mean", losses, done, self._activation()):
                return
            params, grads = self._prepare(fn, make_grads=False)  # C++ makes the missing ones
            _C.deep_train_steps(fn, self.optimizer, name, params, grads, self._pnames(), x, target, batch_size,
                                order, first_step, steps, self.reduction == "mean", self.model_lr_scale, losses,
                                done, self._activation(), self.num_models if self._ensemble else 0, group,
                                rank_means, sklearn_terms)
            self._after_run(params, grads)
            return
        if self._fast_step and parallel is None and sklearn_terms is None and done is not None \
                and _C.train_steps_fast(
                self.optimizer, name, self.net._params(), x, target, batch_size, order, first_step, steps,
                self.reduction == "mean", self.model_lr_scale, losses, done, self._activation()):
            return
        params, grads = self._prepare(fn)
        _C.train_steps(fn, self.optimizer, name, params, grads, self._pnames(), x, target, batch_size, order,
                       first_step, steps, self.reduction == "mean", self.model_lr_scale, losses, done,
                       self._activation(), group, rank_means, sklearn_terms)
        self._after_run(params, grads)

    def _after_run(self, params, grads):
        # The gradients are the parameters' own .grad (a state tensor the first gradient
        # filled, SGD's momentum buffer, the C++ side stored in the optimizer's state).
        for p, g in zip(params, grads):
            if p is not None and g is not None and p.grad is not g:
                p.grad = g
        # What an LR scheduler's wrapper of optimizer.step() records; without it a scheduler
        # stepped after fused steps would warn that the optimizer never stepped.
        _compat.mark_stepped(self.optimizer)

    # ------------------------------------------------------------------ public
    def step(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One optimizer step: ``opt.zero_grad(); net.loss(x, target).backward(); opt.step()``.

        Args:
            x: ``(*, in_features)`` input (for an ensemble ``(N, D)`` shared or ``(K, N, D)``).
            target: the prediction's shape, ``x.shape[:-1] + (out_features,)`` (ensembles: ``(N, O)``
                or ``(K, N, O)``).

        Returns:
            The loss before the update, detached: 0-dim, or ``(K,)`` for an ensemble.
        """
        # The common case, read straight from the optimizer in C++ (csrc/trainer/train_bindings.cpp);
        # it declines (None) anything else, which the route below handles or refuses. It declines only
        # before writing anything: an error after the update began is raised, never rerun here
        # (a rerun would apply the step twice; tests/test_no_double_update.py).
        if self._fast_step and not self._lbfgs and self._parallel is None:
            if not self._deep():
                loss = _C.train_step_fast(self.optimizer, self._description.name, self.net._params(), x, target,
                                          self.reduction == "mean", self.model_lr_scale, self._activation())
            elif not self._ensemble and self.model_lr_scale is None:
                loss = _C.deep_train_step_fast(self.optimizer, self._description.name, self.net._params(), x,
                                               target, self.reduction == "mean", self._activation())
            else:
                loss = None
            if loss is not None:
                return loss
        fn = "fusedgrad.Trainer.step"
        x, target = self._data(fn, x, target)
        losses = torch.empty((1, self.num_models), dtype=x.dtype)
        self._run(fn, x, target, 1, losses=losses)
        return losses[0] if self._ensemble else losses[0, 0]

    def fit(self, x: torch.Tensor, target: torch.Tensor, steps: int, batch_size: Optional[int] = None,
            shuffle: bool = True, generator: Optional[torch.Generator] = None, progress: bool = False,
            callback: Optional[Callable[[int, torch.Tensor], Optional[bool]]] = None,
            callback_every: int = 1) -> torch.Tensor:
        """``steps`` optimizer steps in C++ (GIL released); returns the loss history.

        Full batch when ``batch_size`` is None. Otherwise mini-batches of ``batch_size`` rows (the
        last batch of an epoch keeps the remainder, as ``DataLoader(drop_last=False)``), in the
        order of ``torch.randperm(N, generator=generator)`` drawn at the start of each epoch — as a
        reference loop drawing one permutation per epoch gets them — or in order when
        ``shuffle=False``. Each ``fit`` call starts a new epoch.

        Args:
            x, target: as for :meth:`step`.
            steps: number of optimizer steps (>= 0).
            batch_size: rows per step, or None for the full batch.
            shuffle, generator: the batch order (see above).
            progress: show a progress bar (tqdm) with the running loss.
            callback: ``callback(step, loss)`` after every ``callback_every`` steps (step counts from 1;
                loss is that step's loss, 0-dim or ``(K,)``); returning ``False`` stops training.
            callback_every: steps between callbacks.

        Returns:
            The losses of the steps taken, ``(steps,)`` (ensembles: ``(steps, K)``). Fewer than
            ``steps`` when a callback stopped training or on Ctrl-C (KeyboardInterrupt), which stops
            at a step boundary with the parameters, gradients and optimizer state of the last step
            taken.
        """
        fn = "fusedgrad.Trainer.fit"
        if isinstance(steps, bool) or not isinstance(steps, int):
            raise TypeError(f"{fn}: argument 'steps' must be an int >= 0, got {type(steps).__name__}")
        if steps < 0:
            raise ValueError(f"{fn}: argument 'steps' must be an int >= 0, got {steps!r}")
        if callback is not None and not callable(callback):
            raise TypeError(f"{fn}: argument 'callback' must be callable, got {type(callback).__name__}")
        if isinstance(callback_every, bool) or not isinstance(callback_every, int):
            raise TypeError(f"{fn}: argument 'callback_every' must be an int >= 1, got "
                            f"{type(callback_every).__name__}")
        if callback_every < 1:
            raise ValueError(f"{fn}: argument 'callback_every' must be an int >= 1, got {callback_every!r}")
        x, target = self._data(fn, x, target)
        if self._parallel is not None:
            self._parallel.agree(fn, ("fit", steps, batch_size, shuffle and batch_size is not None,
                                      callback_every if callback is not None else None))
        N = x.shape[-2]
        bs, order = 0, None
        if batch_size is not None:
            if isinstance(batch_size, bool) or not isinstance(batch_size, int):
                raise TypeError(f"{fn}: argument 'batch_size' must be an int >= 1 or None, got "
                                f"{type(batch_size).__name__}")
            if batch_size < 1:
                raise ValueError(f"{fn}: argument 'batch_size' must be an int >= 1 or None, got {batch_size!r}")
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"{fn}: argument 'generator' must be a torch.Generator or None, got "
                                f"{type(generator).__name__}")
            bs = batch_size
            if shuffle and steps > 0:
                per_epoch = math.ceil(N / bs)
                epochs = math.ceil(steps / per_epoch)
                order = torch.cat([torch.randperm(N, generator=generator) for _ in range(epochs)])
        # The C++ side writes step s of model k at s·K + k: a (steps,) history for one model,
        # (steps, K) for an ensemble, returned as it is.
        losses = torch.empty((steps, self.num_models) if self._ensemble else (steps,), dtype=x.dtype)
        done = torch.zeros(1, dtype=torch.int64)  # steps completed, counted by the C++ side
        taken = 0  # the same, read back only where a step may have been cut short (Ctrl-C)
        bar = _progress_bar(steps) if progress else None
        try:
            per_call = callback_every if callback is not None else max(1, steps)
            if callback is None and (bar is not None or steps > 1):
                per_call, taken = self._steps_per_call(fn, x, target, steps, bs, order, losses, done, bar)
            while taken < steps:
                n = min(per_call, steps - taken)
                self._run(fn, x, target, n, taken, bs, order, losses[taken:taken + n], done)
                taken += n
                if bar is not None:
                    bar.update(n)
                    bar.set_postfix(loss=_loss_text(losses[taken - 1]), refresh=False)
                if callback is not None and callback(taken, losses[taken - 1].clone()) is False:
                    break
        except KeyboardInterrupt:
            taken = int(done)  # the steps counted there are complete and consistent
        finally:
            if bar is not None:
                bar.close()
        return losses if taken == steps else losses[:taken]

    def _steps_per_call(self, fn, x, target, steps, bs, order, losses, done, bar):
        """Runs a first call sized from the arithmetic (~1 ns per multiply-add, which is
        pessimistic here), times it, and sizes the calls after it to ~_CALL_SECONDS each.
        Returns (steps per later call, steps taken by the first)."""
        rows = bs if bs else x.shape[-2]
        macs = 3 * rows * sum(w.numel() for w in self._params()[0::2]) + 1  # every model's multiply-adds of a step
        if self._lbfgs:  # a step is up to max_eval evaluations
            macs *= max(1, int(self.optimizer.param_groups[0]["max_eval"]))
        first = max(1, min(steps, int(_CALL_SECONDS / (macs * 1e-9))))
        if steps - first <= first // 4:
            # A remainder of a quarter or less joins the first call (at most 1.25 × _CALL_SECONDS by the
            # pessimistic estimate) rather than paying a second call's overhead: the 201-step curve fit
            # (1→[20]×3→1, 100 rows) was sized 198 + 3, the 3 steps on one thread and without the team.
            first = steps
        start = time.perf_counter()
        self._run(fn, x, target, first, 0, bs, order, losses[0:first], done)
        elapsed = max(time.perf_counter() - start, 1e-7)
        if bar is not None:
            bar.update(first)
        return max(1, int(_CALL_SECONDS * first / elapsed)), first


def _is_ddp(net: object) -> bool:
    import torch.distributed

    if not torch.distributed.is_available():
        return False
    return isinstance(net, torch.nn.parallel.DistributedDataParallel)


def is_ensemble(net: object) -> bool:
    try:
        from .ensemble import FusedMLPEnsemble
    except ImportError:  # built without the ensemble module
        return False
    return isinstance(net, FusedMLPEnsemble)


def _loss_text(loss):
    return f"{loss.item():.4g}" if loss.numel() == 1 else f"{loss.mean().item():.4g} (mean of {loss.numel()})"


def _progress_bar(total):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", desc="fusedgrad fit", leave=False)
