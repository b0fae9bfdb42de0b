// Registers the direct Python calls of the ops (direct_calls.cpp) on fusedgrad._C.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedgrad {
void register_direct_calls(pybind11::module_& m);
}  // namespace fusedgrad
