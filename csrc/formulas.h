// The element-wise math of fusedgrad, written once.
//
// Every function here is a scalar formula from the README's "Math" section.
// They are inline and marked host/device so that the CPU kernels (and any
// accelerator kernel) evaluate the very same expressions: the CPU tests check
// the math every backend runs.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDGRAD_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FUSEDGRAD_HOST_DEVICE inline
#endif

namespace fusedgrad {

// Values match the integers the Python layer passes to the ops.
enum class Activation : int64_t { Sigmoid = 0, Identity = 1 };
// Same integers as at::Reduction (Mean = 1, Sum = 2); "none" is not offered
// because the fused backward relies on the loss being a scalar.
enum class Reduction : int64_t { Mean = 1, Sum = 2 };

namespace math {

// s = σ(h) = 1 / (1 + e^(−h)). For h → −∞, e^(−h) → +inf and s → 0; for
// h → +∞, s → 1: saturation never produces NaN.
template <typename T>
FUSEDGRAD_HOST_DEVICE T sigmoid(T h) {
  return T(1) / (T(1) + std::exp(-h));
}

// s = act(h)
template <typename T>
FUSEDGRAD_HOST_DEVICE T activate(T h, Activation act) {
  return act == Activation::Sigmoid ? sigmoid(h) : h;
}

// dh = ds ⊙ act'(h), with act' written from the saved output s:
// σ'(h) = s (1 − s), never recomputed from h. Identity: act' = 1.
template <typename T>
FUSEDGRAD_HOST_DEVICE T activation_backward(T ds, T s, Activation act) {
  return act == Activation::Sigmoid ? ds * (s * (T(1) - s)) : ds;
}

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
