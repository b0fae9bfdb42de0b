// The Python extension module fusedgrad._C. Importing it runs the static
// TORCH_LIBRARY registrations of the other translation units; the ops are then
// reached through torch.ops.fusedgrad, or from fusedgrad.functional through
// the direct calls of direct_calls.cpp.
#include <pybind11/pybind11.h>

#include "direct_calls.h"

namespace fusedgrad {
void register_explain(pybind11::module& m);         // csrc/python/explain_bindings.cpp
void register_deep_autograd(pybind11::module_& m);  // csrc/python/deep_autograd.cpp
}

namespace fusedgrad::trainer {
void register_trainer(pybind11::module& m);       // csrc/trainer/train_bindings.cpp
void register_deep_trainer(pybind11::module& m);  // csrc/trainer/deep_train.cpp
void register_lbfgs(pybind11::module& m);         // csrc/trainer/lbfgs.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fusedgrad C++ core: registers the torch.ops.fusedgrad operators";
#ifdef FUSEDGRAD_WITH_CUDA
  m.attr("backends") = pybind11::make_tuple("cpu", "cuda");
#else
  m.attr("backends") = pybind11::make_tuple("cpu");
#endif
  fusedgrad::register_direct_calls(m);
  fusedgrad::register_deep_autograd(m);
  fusedgrad::trainer::register_trainer(m);
  fusedgrad::trainer::register_deep_trainer(m);
  fusedgrad::trainer::register_lbfgs(m);
  fusedgrad::register_explain(m);
}
