"""Hooks that ``backward()`` runs for a parameter and a direct ``.grad`` write skips.

``backward()`` reaches a leaf parameter through its gradient accumulator (an
``AccumulateGrad`` node) and runs there, in this order:

1. the tensor's hooks (``Tensor.register_hook``), which may replace the gradient;
2. the node's pre-hooks (``register_prehook`` on the node);
3. the accumulation into ``.grad``;
4. the tensor's post-accumulate-grad hooks (``Tensor.register_post_accumulate_grad_hook``,
   used by optimizer-in-backward and FSDP2-style sharding);
5. the node's post-hooks (``register_hook`` on the node). ``DistributedDataParallel``'s
   gradient all-reduce is a C++ post-hook here.

Code that writes ``.grad`` itself (``FusedMLP.loss_backward``, a fused trainer) runs
none of them. :func:`grad_hooks` lists what it would skip, and
:func:`direct_grad_write_ok` decides for a set of parameters: write directly
(no hooks), take the autograd route (hooks that ``backward()`` runs correctly on
its own: the caller should call ``loss.backward()``), or refuse (a C++ hook on the
accumulator, such as DDP's: it only synchronises gradients in a backward that follows
the DDP module's own forward, which a method called on the inner module never is).

What is detected (``csrc/python/grad_hooks.h``, read in C++ from torch 2.13's autograd metadata):

* Python tensor hooks and post-accumulate-grad hooks: the tensor's hook dictionaries,
  so hooks removed again through their handles do not count;
* tensor hooks registered from C++ (``at::Tensor::register_hook``), and a post-accumulate-grad
  hook set from C++ (``impl::set_post_acc_grad_hooks``; Python's dictionary does not show it);
* pre- and post-hooks on the accumulator node, Python ones (dictionaries, as above)
  and C++ ones (DDP's reducer, any extension's), while the node is alive. A node
  nobody holds has been freed with its hooks; ``backward()`` would build a new one
  with none, so nothing is missed.
* ``torch.autograd.detect_anomaly()`` (a global mode, not a hook): it checks the
  gradients ``backward()`` computes, so :func:`direct_grad_write_ok` sends it to the
  autograd route too.

What cannot be detected, because it is not attached to the parameter:

* module hooks (``register_full_backward_hook`` and friends) run only when the module
  is *called*; ``net.loss(x, t).backward()`` does not run them either, so nothing
  differs;
* hooks on other graph nodes (the loss's ``grad_fn``) and ``torch.autograd.graph``
  global hooks on saved tensors: a direct write builds no graph, so there is nothing
  for them to act on, exactly as with a fused kernel;
* compiled autograd (``torch._dynamo.compiled_autograd``) replaces the engine; a direct
  write does not go through it;
* hook objects of an unknown type are counted as C++ hooks (refused), never ignored;
  on a non-Itanium C++ ABI (MSVC) every Python accumulator hook is seen that way.
"""
import torch

from . import _C

# The bits of csrc/python/grad_hooks.h.
TENSOR_HOOK = 1 << 0
CPP_TENSOR_HOOK = 1 << 1
POST_ACCUMULATE_GRAD_HOOK = 1 << 2
ACCUMULATOR_PY_HOOK = 1 << 3
ACCUMULATOR_CPP_HOOK = 1 << 4

_DESCRIPTIONS = (
    (TENSOR_HOOK, "a tensor hook (Tensor.register_hook)"),
    (CPP_TENSOR_HOOK, "a tensor hook registered from C++ (at::Tensor::register_hook, or a post-accumulate-grad "
                      "hook set from C++)"),
    (POST_ACCUMULATE_GRAD_HOOK, "a post-accumulate-grad hook (Tensor.register_post_accumulate_grad_hook)"),
    (ACCUMULATOR_PY_HOOK, "a Python hook on its gradient accumulator (AccumulateGrad.register_hook/register_prehook)"),
    (ACCUMULATOR_CPP_HOOK, "a C++ hook on its gradient accumulator (e.g. DistributedDataParallel's gradient "
                           "all-reduce)"),
)


def grad_hook_flags(param):
    """The bits above for ``param`` (0: a direct ``.grad`` write skips nothing).

    Under ``torch.compile`` tracing only the Python-visible dictionaries are read
    (``_backward_hooks``, ``_post_accumulate_grad_hooks``).
    """
    if param is None or not isinstance(param, torch.Tensor):
        return 0
    if torch.compiler.is_compiling():
        return ((TENSOR_HOOK if param._backward_hooks else 0)
                | (POST_ACCUMULATE_GRAD_HOOK if param._post_accumulate_grad_hooks else 0))
    return _C.grad_hook_flags(param)


def grad_hooks(param):
    """Descriptions of the hooks ``backward()`` would run for ``param`` that a direct
    ``.grad`` write would skip; ``[]`` when there are none."""
    flags = grad_hook_flags(param)
    return [text for bit, text in _DESCRIPTIONS if flags & bit]


def direct_grad_write_ok(fn_name, named_params):
    """Whether ``fn_name`` may write the gradients of ``named_params`` into ``.grad`` itself.

    Args:
        fn_name: the public name of the caller, for the error message.
        named_params: ``(name, tensor or None)`` pairs.

    Returns True when no parameter has a hook (and anomaly mode is off): write
    directly. False when ``backward()`` must run the hooks: the caller computes the
    loss with autograd and calls ``backward()``. Raises RuntimeError for a C++ hook
    on a gradient accumulator (DistributedDataParallel).
    """
    from . import _compat  # (imported here: _compat's self-test reads _C's hook flags)

    route_autograd = torch.is_anomaly_enabled() or not _compat.hooks_readable()
    for name, param in named_params:
        flags = grad_hook_flags(param)
        if flags & ACCUMULATOR_CPP_HOOK:
            raise RuntimeError(
                f"{fn_name}: parameter '{name}' has a C++ hook on its gradient accumulator, as "
                "torch.nn.parallel.DistributedDataParallel installs to all-reduce gradients. Writing .grad "
                "directly would skip it, and DDP synchronises gradients only in a backward() that follows the "
                "DDP module's own forward. Compute the loss through the DDP module and call backward() on it, "
                "e.g. wrap a module whose forward returns net.loss(x, target) in DDP and call "
                "ddp(x, target).backward()")
        route_autograd = route_autograd or flags != 0
    return not route_autograd
