// What the trainer's C++ routes (train_bindings.cpp for one hidden layer,
// deep_train.cpp for any depth) share: what they check before they take a call
// themselves instead of declining it to the Python route (fusedgrad/trainer.py),
// the gradients a first call makes, what they record after, and the error of a
// call that failed after it began writing; defined in train_bindings.cpp.
#pragma once

#include <Python.h>
#include <ATen/core/Tensor.h>

#include <string>
#include <utility>
#include <vector>

namespace fusedgrad::trainer {

// Whether a step may run without the Python route: anomaly mode off, and no
// optimizer step hooks — the optimizer's own or torch.optim's global ones (an
// attribute torch moved elsewhere counts as a hook: fail closed).
bool plain_optimizer(PyObject* optimizer);

// What an LR scheduler's wrapper of optimizer.step() records (see trainer.py).
void mark_stepped(PyObject* optimizer);

// The gradients a call makes for parameters whose .grad is None (a first step: what
// backward() would leave after zero_grad(), a fresh tensor of the parameter's layout),
// stored as their .grad only once the steps have run — as fusedgrad.Trainer._after_run
// stores the ones the Python route makes; a call refused before any step leaves none.
class NewGrads {
 public:
  at::Tensor make(const at::Tensor& param) {
    at::Tensor grad = at::empty_like(param, at::MemoryFormat::Contiguous);
    made_.emplace_back(param, grad);
    return grad;
  }
  void store() const {
    for (const auto& [param, grad] : made_) at::Tensor(param).mutable_grad() = grad;
  }

 private:
  std::vector<std::pair<at::Tensor, at::Tensor>> made_;  // (parameter, its new gradient)
};

// One parameter of a call taken in C++: an exact torch.Tensor or nn.Parameter, a leaf
// that requires grad, with no hook backward() would run (grad_hooks.h); `param` and
// `grad` get it and its .grad (made by new_grads when None). False: the Python route.
bool plain_param(PyObject* obj, NewGrads& new_grads, at::Tensor& param, at::Tensor& grad);

// Raises the RuntimeError of a call that failed after it began writing: parameters,
// .grad and optimizer state may be partly updated, and the call is never declined to
// the Python route then, since a rerun would apply a step twice
// (tests/test_no_double_update.py).
[[noreturn]] void raise_partly_applied(const std::string& fn, const std::string& failure);

// TEST-ONLY (fusedgrad._C._testing_fail_after_first_update, train_step.h): whether a run
// must fail right after the update of its first parameter; defined in train_cpu.cpp.
bool testing_fail_after_first_update();

}  // namespace fusedgrad::trainer
