"""Every private torch internal fusedgrad's Python reads, in one place, checked once at import.

Each use is justified by what it buys (measured where it is a speed-up), and each is verified
by a self-test when fusedgrad is imported (:data:`FAILURES`). A failed check never lets a fast
path skip what PyTorch would have run: the routes that depend on it refuse with a RuntimeError
that names the torch version and the check (:func:`require`), or take the autograd route.

| internal | why | if the check fails |
|---|---|---|
| ``Optimizer._optimizer_step_pre_hooks`` / ``_post_hooks``, ``torch.optim.optimizer._global_optimizer_pre_hooks`` / ``_post_hooks`` | ``opt.step()`` runs these; the fused trainer does not call ``opt.step()`` and must refuse an optimizer that has them | ``Trainer`` refuses every optimizer |
| ``Optimizer._opt_called`` | what an LR scheduler's wrapper of ``opt.step()`` records; without it a scheduler warns that the optimizer never stepped | ``Trainer`` refuses (the warning would be wrong) |
| the hook objects torch builds for Python hooks (``csrc/python/direct_calls.cpp``: ``grad_hook_flags`` reads the autograd metadata and recognises ``PyFunctionPreHook`` & co by their C++ type names) | a Python hook on a gradient accumulator must not be taken for DDP's C++ hook, and no hook may be missed | every hook counts as a C++ hook there already (fail closed); the self-test makes a misreport an import-time finding, and ``loss_backward`` / ``Trainer`` then take the autograd route or refuse |
| ``torch._C._functorch.is_functorch_wrapped_tensor`` | a call under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ...) runs the network in plain torch ops, which every transform understands, instead of the fused kernels, which no transform does | every call runs the fused kernels, and a transform raises torch's own error about them: nothing is computed wrongly |
| ``torch._C._functorch.is_batchedtensor`` | under ``vmap`` alone (the model-ensembling recipe, or batches of data) the network runs the fused kernels through ``torch.autograd.Function.vmap`` rules — the ensemble kernel for stacked parameters (measured: K=256 1→20→1 nets, forward + backward, see tests/test_vmap.py) — and only under transforms that differentiate (``grad``, ``jacrev``, ...) in plain torch ops | every call under a transform runs in plain torch ops (exact, native speed) |
| ``DistributedDataParallel``'s settings: ``find_unused_parameters``, ``require_backward_grad_sync`` (``no_sync()``), ``mixed_precision``, ``parameters_to_ignore``, ``_delay_all_reduce_params``, ``_comm_hooks`` and the ``comm_hook`` of ``_get_ddp_logging_data()`` (built-in hooks are registered in C++ only) | ``Trainer(DistributedDataParallel(net), opt)`` replaces DDP's reducer by one all-reduce per step and must refuse what it would not honour | the DDP route refuses (:func:`ddp_unsupported` reports the unreadable setting); ``Trainer(net, opt, process_group=...)`` still works |
| ``torch.fx.experimental.symbolic_shapes.has_hint`` / ``hint_int`` (:func:`size_hint`) | a fake kernel runs its op's C++ argument checks at the traced sizes of a dynamic-shape trace, without adding a guard | no check at trace time for a symbolic size; the kernel's own check at run time remains |
| each optimizer's state layout (``fusedgrad/_optimizers.py``) and ``torch.optim.optimizer._get_scalar_dtype`` (what ``step`` is kept in) | the trainer creates the state a first ``opt.step()`` would, so a fresh optimizer's first ``fit`` needs no Python step | pinned by ``tests/test_compat.py`` and ``tests/test_optimizers.py`` against torch's own first step, option by option |

The C++ side's private reads (``THPVariable_Unpack``, ``THPVariableClass``/``ParameterClass``,
``at::impl::torch_function_mode_enabled``, the tensors' hook dictionaries and the hook objects'
type names) are all in ``csrc/python/torch_compat.h``, with why each is used: the direct calls
that skip ``torch.ops``' argument parsing (~25 µs a call of a ~2 µs step, README "Performance") and
the hook detection the self-test below exercises.
"""
from __future__ import annotations

from typing import List

import torch
from torch.optim import optimizer as _optimizer_module

from . import _C

TORCH_VERSION = torch.__version__

_STEP_HOOKS = ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks")
_GLOBAL_STEP_HOOKS = ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
_OPT_CALLED = "_opt_called"

# The bits of csrc/python/grad_hooks.h (fusedgrad/_hooks.py names them).
_TENSOR_HOOK, _CPP_TENSOR_HOOK, _POST_ACCUMULATE_GRAD_HOOK = 1 << 0, 1 << 1, 1 << 2
_ACCUMULATOR_PY_HOOK, _ACCUMULATOR_CPP_HOOK = 1 << 3, 1 << 4


def _flags_with_hook(tensor, register) -> int:
    """``grad_hook_flags(tensor)`` while one no-op hook added by ``register`` is in place."""
    handle = register(lambda *args: None)
    try:
        return _C.grad_hook_flags(tensor)
    finally:
        handle.remove()


def _self_test() -> List[str]:
    failures = []
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    for name in _STEP_HOOKS:
        if not isinstance(getattr(probe, name, None), dict):
            failures.append(f"torch.optim.Optimizer has no dict '{name}' (its step hooks)")
    for name in _GLOBAL_STEP_HOOKS:
        if not isinstance(getattr(_optimizer_module, name, None), dict):
            failures.append(f"torch.optim.optimizer has no dict '{name}' (the global step hooks)")
    sched = torch.optim.lr_scheduler.StepLR(probe, 1)
    probe.step()
    if getattr(probe, _OPT_CALLED, None) is not True:
        failures.append(f"torch.optim.Optimizer.step no longer records '{_OPT_CALLED}' for LR schedulers")
    del sched
    # Known Python hooks must be read as Python hooks: on a gradient accumulator, on the tensor, after
    # accumulation.
    t = torch.zeros(2, requires_grad=True)
    accumulator = t.view_as(t).grad_fn.next_functions[0][0]
    flags = _flags_with_hook(t, accumulator.register_prehook)
    if not flags & _ACCUMULATOR_PY_HOOK or flags & _ACCUMULATOR_CPP_HOOK:
        failures.append("a Python hook on a gradient accumulator is not recognised as Python (the type names of "
                        "torch's hook objects changed): it would be reported as a C++ (DDP) hook")
    if not _flags_with_hook(t, t.register_hook) & _TENSOR_HOOK:
        failures.append("a tensor hook (Tensor.register_hook) is not seen")
    flags = _flags_with_hook(t, t.register_post_accumulate_grad_hook)
    if not flags & _POST_ACCUMULATE_GRAD_HOOK or flags & _CPP_TENSOR_HOOK:
        failures.append("a Python post-accumulate-grad hook is not recognised as Python (the type name of torch's "
                        "hook object changed): it would be reported as a C++ hook")
    del accumulator
    # Tensors inside a torch.func transform are seen as such (and plain ones are not).
    seen = []
    torch.func.grad(lambda v: seen.append(_functorch_wrapped(v)) or v.sum())(torch.zeros(2))
    if seen != [True] or _functorch_wrapped(torch.zeros(2)):
        failures.append("tensors inside torch.func transforms are not recognised (torch._C._functorch."
                        "is_functorch_wrapped_tensor)")
    # vmap's wrappers are told apart from grad's.
    kinds = []
    torch.func.vmap(lambda v: kinds.append(_batched(v)) or v)(torch.zeros(2, 1))
    torch.func.grad(lambda v: kinds.append(_batched(v)) or v.sum())(torch.zeros(2))
    if kinds != [True, False]:
        failures.append("vmap's batched tensors are not told apart from grad's wrappers (torch._C._functorch."
                        "is_batchedtensor)")
    return failures


# Looked up once: every op call asks (two getattrs per tensor per call were ~5 µs of a small call).
_IS_BATCHED = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
_IS_WRAPPED = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor", None)


def _batched(t) -> bool:
    return bool(_IS_BATCHED(t)) if _IS_BATCHED is not None else False


def _functorch_wrapped(t) -> bool:
    return bool(_IS_WRAPPED(t)) if _IS_WRAPPED is not None else False


#: The checks that failed on this torch (empty when every internal reads as expected).
FAILURES: List[str] = _self_test()


def require(fn: str) -> None:
    """Raise the RuntimeError that names the torch version when a check failed: the fused trainer reads
    the optimizer's hooks and writes its scheduler record itself, and must not run on a torch where either
    is not what it reads."""
    trainer_failures = [f for f in FAILURES if "torch.func" not in f]  # a transform check does not concern it
    if trainer_failures:
        raise RuntimeError(f"{fn}: the fused trainer reads torch internals that torch {TORCH_VERSION} does not have "
                           f"as fusedgrad expects ({'; '.join(trainer_failures)}); train with loss.backward() and "
                           "opt.step(), or use the torch version fusedgrad was built for")


def hooks_readable() -> bool:
    """Whether hooks are told apart reliably; when not, callers take the autograd route."""
    return not any("hook" in f and "step" not in f for f in FAILURES)


def optimizer_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` would run step hooks (its own or the global ones). An optimizer
    without the hook dictionaries (e.g. built without ``Optimizer.__init__``) cannot be read: refused."""
    for name in _STEP_HOOKS:
        if not isinstance(getattr(optimizer, name, None), dict):
            raise RuntimeError(f"fusedgrad.Trainer: the optimizer has no '{name}' dictionary (torch "
                               f"{TORCH_VERSION} keeps its step hooks there), so the hooks opt.step() would run "
                               "cannot be read; train with opt.step()")
    return any(bool(getattr(optimizer, name)) for name in _STEP_HOOKS) or any(
        bool(getattr(_optimizer_module, name)) for name in _GLOBAL_STEP_HOOKS)


def mark_stepped(optimizer: torch.optim.Optimizer) -> None:
    """What ``opt.step()``'s wrapper records for LR schedulers (set after fused steps)."""
    setattr(optimizer, _OPT_CALLED, True)


# DistributedDataParallel's settings the fused route reads (fusedgrad/distributed.py), and the value
# each must have for the route to do what DDP's reducer would.
_DDP_SETTINGS = (
    ("find_unused_parameters", False, "find_unused_parameters=True (a model that does not use every parameter)"),
    ("require_backward_grad_sync", True, "gradient synchronisation off (inside ddp.no_sync())"),
    ("mixed_precision", None, "mixed_precision set (gradients reduced in another dtype)"),
    ("_comm_hooks", [], "a communication hook (register_comm_hook)"),
    ("_delay_all_reduce_params", [], "parameters whose all-reduce is delayed"),
)


def ddp_unsupported(ddp) -> List[str]:
    """What ``ddp`` (a DistributedDataParallel) does that one plain all-reduce of the gradients per step
    does not: empty when the fused route computes exactly what DDP's reducer would. A setting that
    cannot be read (another torch) is reported too: the route fails closed."""
    problems = []
    for name, expected, text in _DDP_SETTINGS:
        if not hasattr(ddp, name):
            problems.append(f"no attribute '{name}' (torch {TORCH_VERSION} keeps DDP's settings elsewhere)")
        elif getattr(ddp, name) != expected:
            problems.append(text)
    if getattr(ddp, "parameters_to_ignore", None):
        problems.append("parameters excluded from synchronisation (_ddp_params_and_buffers_to_ignore)")
    logging_data = getattr(ddp, "_get_ddp_logging_data", None)
    hook = logging_data().get("comm_hook") if logging_data is not None else None
    if logging_data is None:
        problems.append(f"no '_get_ddp_logging_data' (torch {TORCH_VERSION}), so a built-in communication hook "
                        "cannot be ruled out")
    elif hook:
        problems.append(f"a communication hook ({hook})")
    return problems


def size_hint(size):
    """A tensor size as an int: a symbolic one (``torch.compile`` with dynamic shapes) at its hint, the size
    of the example being traced; None when it has none (a data-dependent size). The fake kernels check
    arguments at these sizes (fusedgrad.deep); without a hint the kernel's own check at run time remains."""
    if isinstance(size, int):
        return size
    try:
        from torch.fx.experimental.symbolic_shapes import has_hint, hint_int
        return hint_int(size) if has_hint(size) else None
    except Exception:  # an API moved in a later torch: no check at trace time, never a wrong one
        return None


def under_functorch(*tensors) -> bool:
    """Whether any of ``tensors`` is a ``torch.func`` transform's wrapper (``grad``, ``vjp``, ``jacrev``,
    ``vmap``, ...): the ops then run in plain torch ops, which the transforms differentiate and batch."""
    if _IS_WRAPPED is None or torch.compiler.is_compiling():  # dynamo traces the fused ops (not the probe)
        return False
    for t in tensors:
        if isinstance(t, torch.Tensor) and _IS_WRAPPED(t):
            return True
    return False


def vmapped_only(*tensors) -> bool:
    """Whether the innermost transform over ``tensors`` is ``vmap`` (every transform-wrapped one is a
    BatchedTensor): the fused ops then run through their ``vmap`` rules (fusedgrad.deep). Transforms
    further out (``grad`` around ``vmap``) are handled inside those rules."""
    if any("is_batchedtensor" in f for f in FAILURES):
        return False
    wrapped = [t for t in tensors if t is not None and isinstance(t, torch.Tensor) and _functorch_wrapped(t)]
    return bool(wrapped) and all(_batched(t) for t in wrapped)
