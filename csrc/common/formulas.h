// The element-wise math of the loss, written once (README, "Math"); the
// activations and their derivatives are the activation table's
// (common/activation.h).
//
// Every function here is a scalar formula, inline and marked host/device so
// that the CPU kernels and the CUDA kernels evaluate the very same expressions.
#pragma once

#include <cmath>
#include <cstdint>

#include "activation.h"

namespace fusedgrad {

// "none" is not offered: the fused backward relies on the loss being a scalar.
enum class Reduction : int8_t { Mean, Sum };

namespace math {

// s = act(h + b): the first layer's epilogue (b = 0 when there is no bias).
// Written as one addition then the activation, the order the CPU pass uses.
template <typename T>
FUSEDGRAD_HOST_DEVICE T bias_activate(T h, T b, Activation act) {
  return activate(h + b, act);
}

// r = p + b2 − t (b2 = 0 without a second bias, t = 0 without a target):
// (p + b2) first, then − t, the order the CPU pass adds them in.
template <typename T>
FUSEDGRAD_HOST_DEVICE T residual(T pred, T b2, T target) {
  return (pred + b2) - target;
}

// g = dL/dp = 2c · r, with two_c = 2c already in the kernel's type.
template <typename T>
FUSEDGRAD_HOST_DEVICE T loss_grad(T r, T two_c) {
  return r * two_c;
}

// c in L = c · Σ r²: 1 for "sum", 1/(N·O) for "mean" (as nn.MSELoss).
// With N·O = 0 the mean is 0/0 = NaN, as nn.MSELoss gives on empty input.
inline double loss_scale(Reduction reduction, int64_t numel) {
  return reduction == Reduction::Sum ? 1.0 : 1.0 / static_cast<double>(numel);
}

}  // namespace math
}  // namespace fusedgrad
