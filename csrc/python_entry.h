// Registers the direct Python entry points (python_entry.cpp) on fusedgrad._C.
#pragma once

#include <pybind11/pybind11.h>

namespace fusedgrad {
void register_python_entry_points(pybind11::module_& m);
}  // namespace fusedgrad
