// Every private torch internal the C++ side reads, in one header (its Python
// counterpart is fusedgrad/_compat.py, whose import-time self-test exercises
// the hook recognition below through fusedgrad._C.grad_hook_flags).
//
// Why each is used:
// - THPVariable_Unpack / _Wrap and the exact-type test against THPVariableClass /
//   ParameterClass: the direct calls (direct_calls.cpp) and Trainer.step's C++
//   route (trainer/train_bindings.cpp) unpack tensors without torch.ops' boxed
//   argument parsing, ~25 µs a call against a ~2 µs step (README "Performance").
//   A subclass, or anything unexpected, declines to the public route.
// - at::impl::torch_function_mode_enabled: a TorchFunctionMode must see the
//   call, so the direct calls decline while one is active.
// - THPVariable's backward_hooks / post_accumulate_grad_hooks dictionaries, the
//   autograd hooks of a tensor (impl::hooks, impl::post_acc_grad_hooks) and of its
//   gradient accumulator, and the type
//   names of the hook objects torch builds for Python hooks: which hooks
//   backward() would run that a direct .grad write skips (grad_hooks.h). Hook
//   objects of any other type count as C++ hooks (refused or routed through
//   backward()), never as "no hook": a renamed type fails closed.
// A torch upgrade that changes any of these breaks the build here, in one
// place, or (the type names) fails the import-time self-test.
#pragma once

#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_hook.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstring>
#include <typeinfo>

namespace fusedgrad::compat {

// An exact torch.Tensor or nn.Parameter (not a subclass, which may override __torch_function__).
inline bool exact_tensor(PyObject* obj) {
  PyTypeObject* type = Py_TYPE(obj);
  return type == reinterpret_cast<PyTypeObject*>(THPVariableClass) ||
      type == reinterpret_cast<PyTypeObject*>(ParameterClass);
}

inline bool is_tensor(PyObject* obj) { return THPVariable_Check(obj); }

// The at::Tensor of a torch.Tensor (the caller checked exact_tensor or is_tensor).
inline const at::Tensor& unpack(PyObject* obj) { return THPVariable_Unpack(obj); }

// A new reference to the Python tensor of t.
inline PyObject* wrap(at::Tensor t) { return THPVariable_Wrap(std::move(t)); }

inline bool torch_function_mode_active() { return at::impl::torch_function_mode_enabled(); }

// The tensor's Python hook dictionaries (None, or a dict of the hooks registered from Python).
inline PyObject* tensor_hook_dict(PyObject* obj) { return reinterpret_cast<const THPVariable*>(obj)->backward_hooks; }
inline PyObject* post_accumulate_grad_hook_dict(PyObject* obj) {
  return reinterpret_cast<const THPVariable*>(obj)->post_accumulate_grad_hooks;
}

// The hook objects torch builds for hooks registered from Python are not
// exported from libtorch_python (no dynamic_cast across the library boundary),
// so they are recognised by their type's name (Itanium C++ ABI: GCC, Clang).
// Under another ABI, or after a rename, nothing matches: every hook counts as a
// C++ hook.
template <typename Hook>
bool is_type(const Hook& hook, const char* mangled) {
  return std::strcmp(typeid(hook).name(), mangled) == 0;
}
template <typename Hook>
bool is_python_tensor_pre_hook(const Hook& hook) { return is_type(hook, "N5torch8autograd23PyFunctionTensorPreHookE"); }
template <typename Hook>
bool is_python_pre_hook(const Hook& hook) { return is_type(hook, "N5torch8autograd17PyFunctionPreHookE"); }
template <typename Hook>
bool is_python_post_hook(const Hook& hook) { return is_type(hook, "N5torch8autograd18PyFunctionPostHookE"); }
// torch keeps a tensor's Python post-accumulate-grad hooks in one object of this type wrapping the
// dictionary above; an object of any other type in that slot was set from C++.
template <typename Hook>
bool is_python_post_acc_grad_hooks(const Hook& hook) {
  return is_type(hook, "N5torch8autograd32PyFunctionTensorPostAccGradHooksE");
}

}  // namespace fusedgrad::compat
