// What the trainer's C++ routes (train_bindings.cpp for one hidden layer,
// deep_train.cpp for any depth) check before they take a call themselves
// instead of declining it to the Python route (fusedgrad/trainer.py), and what
// they record after; defined in train_bindings.cpp.
#pragma once

#include <Python.h>

namespace fusedgrad::trainer {

// Whether a step may run without the Python route: anomaly mode off, and no
// optimizer step hooks — the optimizer's own or torch.optim's global ones (an
// attribute torch moved elsewhere counts as a hook: fail closed).
bool plain_optimizer(PyObject* optimizer);

// What an LR scheduler's wrapper of optimizer.step() records (see trainer.py).
void mark_stepped(PyObject* optimizer);

// TEST-ONLY (fusedgrad._C._testing_fail_after_first_update, train_step.h): whether a run
// must fail right after the update of its first parameter; defined in train_cpu.cpp.
bool testing_fail_after_first_update();

}  // namespace fusedgrad::trainer
