// The ops' string options (`str activation`, `str reduction` in the schemas),
// parsed here and nowhere else.
#pragma once

#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

#include "formulas.h"

namespace fusedgrad {

// nullopt for a name that is not one of the table's (common/activation.h).
std::optional<Activation> find_activation(c10::string_view name);
std::optional<Reduction> find_reduction(c10::string_view name);

// As find_*, raising a ValueError that names the argument and lists the valid
// names ("fusedgrad: argument 'activation' must be one of ...").
Activation parse_activation(c10::string_view name);
Reduction parse_reduction(c10::string_view name);

inline const char* reduction_name(Reduction r) { return r == Reduction::Sum ? "sum" : "mean"; }

// The activations' names, in table order (fusedgrad._C.activations).
std::vector<std::string> activation_names();

}  // namespace fusedgrad
