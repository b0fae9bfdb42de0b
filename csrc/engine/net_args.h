// One validator for a network given as lists of weights and biases (the deep
// ops and the deep trainer): widths, bias flags, dtype, device, contiguity.
// Every failure is a ValueError / TypeError naming the function, the argument
// (with its list index) and what was expected against what was received.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "mlp_engine.h"

namespace fusedgrad::engine {

struct NetArgs {
  NetShape shape;
  std::vector<at::Tensor> W;  // contiguous (·, n_{l+1}, n_l): a leading model dimension when `models` > 0
  std::vector<at::Tensor> b;  // contiguous, undefined where a layer has no bias
  at::ScalarType dtype = at::kFloat;
  at::Device device = at::kCPU;
};

// weights[l]: (n_{l+1}, n_l), or (K, n_{l+1}, n_l) when `models` (K) > 0;
// biases[l]: None or (n_{l+1},) / (K, n_{l+1}). `biases` may be empty (no biases).
NetArgs check_net(const char* fn, at::TensorList weights, const std::vector<std::optional<at::Tensor>>& biases,
                  Activation act, int64_t models = 0);

}  // namespace fusedgrad::engine
