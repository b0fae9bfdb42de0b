// Which hooks would backward() run for a leaf parameter that a direct write
// into its .grad (FusedMLP.loss_backward, a fused trainer) would skip?
//
// backward() reaches a leaf through its gradient accumulator (an AccumulateGrad
// node) and there runs, in order: the tensor's own hooks (Tensor.register_hook),
// the node's pre-hooks, the accumulation into .grad, the tensor's
// post-accumulate-grad hooks (Tensor.register_post_accumulate_grad_hook) and
// the node's post-hooks. DistributedDataParallel's gradient all-reduce is a
// C++ post-hook on that node. Writing .grad directly runs none of them, so a
// caller that finds any must take the autograd route (or refuse).
//
// Implemented in direct_calls.cpp (it reads the Python hook dictionaries).
#pragma once

typedef struct _object PyObject;  // as Python.h declares it

namespace fusedgrad {

enum GradHook : unsigned {
  kTensorHook = 1u << 0,             // Tensor.register_hook, from Python (a non-empty dict)
  kCppTensorHook = 1u << 1,          // a tensor hook registered from C++ (at::Tensor::register_hook)
  kPostAccumulateGradHook = 1u << 2, // Tensor.register_post_accumulate_grad_hook (a non-empty dict)
  kAccumulatorPyHook = 1u << 3,      // register_hook / register_prehook on the AccumulateGrad node, from Python
  kAccumulatorCppHook = 1u << 4,     // any other hook on the AccumulateGrad node: DDP's reducer, C++ code
};

// The GradHook bits of `param` (a torch.Tensor; the GIL must be held). 0 means
// a direct .grad write does exactly what backward() would, hook-wise.
// The accumulator's hooks are seen only while the node is alive: a node nobody
// holds is freed with its hooks, and backward() would build a fresh one, with
// none. Hooks of an unknown kind count as C++ hooks (never as "no hook").
unsigned grad_hook_flags(PyObject* param);

// The number of C++ hooks (pre and post) on `param`'s gradient accumulator, 0 when it has none
// alive: DistributedDataParallel's reducer adds exactly one per parameter.
unsigned accumulator_cpp_hook_count(PyObject* param);

}  // namespace fusedgrad
