#include "options.h"

#include <c10/util/Exception.h>

#include <sstream>

namespace fusedgrad {
namespace {

template <typename Names>
std::string quoted_list(const Names& names) {
  std::ostringstream out;
  for (size_t i = 0; i < names.size(); ++i) out << (i ? ", " : "") << "'" << names[i] << "'";
  return out.str();
}

}  // namespace

std::optional<Activation> find_activation(c10::string_view name) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  if (name == S::name) return Activation::E;
  FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  return std::nullopt;
}

std::optional<Reduction> find_reduction(c10::string_view name) {
  if (name == "mean") return Reduction::Mean;
  if (name == "sum") return Reduction::Sum;
  return std::nullopt;
}

std::vector<std::string> activation_names() {
  std::vector<std::string> names;
#define FUSEDGRAD_ACTIVATION_NAME(E, S) names.emplace_back(S::name);
  FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_NAME)
#undef FUSEDGRAD_ACTIVATION_NAME
  return names;
}

Activation parse_activation(c10::string_view name) {
  const auto act = find_activation(name);
  TORCH_CHECK_VALUE(act.has_value(), "fusedgrad: argument 'activation' must be one of ",
                    quoted_list(activation_names()), ", got '", std::string(name), "'");
  return *act;
}

Reduction parse_reduction(c10::string_view name) {
  const auto red = find_reduction(name);
  TORCH_CHECK_VALUE(red.has_value(), "fusedgrad: argument 'reduction' must be 'mean' or 'sum', got '",
                    std::string(name), "'");
  return *red;
}

}  // namespace fusedgrad
