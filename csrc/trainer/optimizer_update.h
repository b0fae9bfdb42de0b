// The element-wise update of torch.optim's SGD, Adam and AdamW, written as
// torch/optim/sgd.py and adam.py write them (single-tensor form; the foreach
// and fused forms compute the same formulas). One parameter tensor — or one
// model's slice of it — at a time, in place, right after its gradient is known.
//
// SGD (lr, momentum μ, dampening τ, weight_decay λ, nesterov, maximize):
//   g ← −g if maximize;   g ← g + λ p
//   b ← g at the first step, else b ← μ b + (1 − τ) g
//   g ← g + μ b if nesterov, else g ← b
//   p ← p − lr g
// Adam / AdamW (lr, β1, β2, eps, weight_decay λ, amsgrad, maximize), step t:
//   g ← −g if maximize
//   AdamW: p ← p (1 − lr λ)          Adam: g ← g + λ p
//   m ← lerp(m, g, 1 − β1)           v ← β2 v + (1 − β2) g g
//   v̂ ← max(v̂, v) if amsgrad (and v̂ is used below instead of v)
//   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
// Python floats (the hyper-parameters and the bias corrections) are computed
// in double, as Python does, and rounded to the parameter's dtype where
// ATen's tensor-scalar ops round them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../common/cpu_vector.h"

namespace fusedgrad::trainer {

enum class OptimizerKind { SGD, Adam };

// One parameter tensor's optimizer: its param group's options and its state.
struct UpdateRule {
  OptimizerKind kind = OptimizerKind::SGD;
  double lr = 0, weight_decay = 0;
  bool maximize = false;
  // SGD
  double momentum = 0, dampening = 0;
  bool nesterov = false;
  // Adam / AdamW
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  bool amsgrad = false, decoupled_weight_decay = false;
  // lr is a float32 tensor: Adam's single-tensor code computes lr / (1 − β1^t)
  // and 1 − lr λ as float32 tensors, so their values carry float32 rounding.
  bool lr_float32_tensor = false;
};

// Per-step scalars of the Adam update (step t counted from 1).
struct AdamStepScalars {
  double step_size;              // lr / (1 − β1^t)
  double bias_correction2_sqrt;  // √(1 − β2^t)
  double decay;                  // 1 − lr λ (AdamW)
};

// The bias corrections of step t: 1 − β1^t and √(1 − β2^t) (two pow: worth
// computing once per step, not once per model of an ensemble).
struct AdamBiasCorrections {
  double bc1, bc2_sqrt;
};

inline AdamBiasCorrections adam_bias_corrections(const UpdateRule& u, double t) {
  return {1.0 - std::pow(u.beta1, t), std::pow(1.0 - std::pow(u.beta2, t), 0.5)};
}

inline AdamStepScalars adam_step_scalars(const UpdateRule& u, double lr, const AdamBiasCorrections& bc) {
  if (u.lr_float32_tensor) {
    const float lr32 = static_cast<float>(lr);
    return {static_cast<float>(lr32 / static_cast<float>(bc.bc1)), bc.bc2_sqrt,
            static_cast<float>(1.0f - lr32 * static_cast<float>(u.weight_decay))};
  }
  return {lr / bc.bc1, bc.bc2_sqrt, 1.0 - lr * u.weight_decay};
}

inline AdamStepScalars adam_step_scalars(const UpdateRule& u, double lr, double t) {
  return adam_step_scalars(u, lr, adam_bias_corrections(u, t));
}

// Whether two rules give the same AdamStepScalars at the same step.
inline bool same_adam_options(const UpdateRule& a, const UpdateRule& b) {
  return a.lr == b.lr && a.beta1 == b.beta1 && a.beta2 == b.beta2 && a.weight_decay == b.weight_decay &&
      a.lr_float32_tensor == b.lr_float32_tensor;
}

// ATen's lerp: self + w (end − self) for |w| < 0.5, else end − (end − self)(1 − w).
template <typename T>
FUSEDGRAD_CPU_INLINE T lerp(T self, T end, T w) {
  return std::abs(w) < T(0.5) ? self + w * (end - self) : end - (end - self) * (T(1) - w);
}

// The loops below must vectorise (a scalar sqrt and two divisions per
// element made Adam 14 % of an ensemble's step): every option is read into
// a local before the loop and applied by a select, and the optional state
// (momentum buffer, v̂) is a template parameter, so no branch and no store
// depends on a run-time condition inside the loop.

// SGD over n elements. `buf` is the momentum buffer (null when momentum is 0);
// `first` means it holds nothing yet (torch creates it as a copy of g).
template <typename T, bool kMomentum>
FUSEDGRAD_CPU_INLINE void sgd_update_n(const UpdateRule& u, double lr, T* FUSEDGRAD_RESTRICT p,
                                         const T* FUSEDGRAD_RESTRICT grad, T* FUSEDGRAD_RESTRICT buf,
                                         bool first, int64_t n) {
  const T wd = static_cast<T>(u.weight_decay), mu = static_cast<T>(u.momentum);
  const T one_minus_damp = static_cast<T>(1.0 - u.dampening), neg_lr = static_cast<T>(-lr);
  const T sign = u.maximize ? T(-1) : T(1);  // −g exactly, as a product (a select here stops the vectoriser)
  const bool has_wd = u.weight_decay != 0, nesterov = u.nesterov;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T g = sign * grad[k];
    g = has_wd ? g + wd * p[k] : g;
    if constexpr (kMomentum) {
      const T b = first ? g : buf[k] * mu + one_minus_damp * g;
      buf[k] = b;
      g = nesterov ? g + mu * b : b;
    }
    p[k] = p[k] + neg_lr * g;
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE void sgd_update(const UpdateRule& u, double lr, T* FUSEDGRAD_RESTRICT p,
                                       const T* FUSEDGRAD_RESTRICT grad, T* FUSEDGRAD_RESTRICT buf,
                                       bool first, int64_t n) {
  if (u.momentum != 0) {
    sgd_update_n<T, true>(u, lr, p, grad, buf, first, n);
  } else {
    sgd_update_n<T, false>(u, lr, p, grad, buf, first, n);
  }
}

// Adam / AdamW over n elements; vmax is null unless amsgrad.
template <typename T, bool kAmsgrad>
FUSEDGRAD_CPU_INLINE void adam_update_n(const UpdateRule& u, const AdamStepScalars& s,
                                          T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                          T* FUSEDGRAD_RESTRICT m, T* FUSEDGRAD_RESTRICT v,
                                          T* FUSEDGRAD_RESTRICT vmax, int64_t n) {
  const T wd = static_cast<T>(u.weight_decay);
  const T decay = static_cast<T>(s.decay);
  const T w1 = static_cast<T>(1.0 - u.beta1), b2 = static_cast<T>(u.beta2), w2 = static_cast<T>(1.0 - u.beta2);
  const T bc2_sqrt = static_cast<T>(s.bias_correction2_sqrt), eps = static_cast<T>(u.eps);
  const T neg_step = static_cast<T>(-s.step_size);
  const T sign = u.maximize ? T(-1) : T(1);  // −g exactly, as a product (a select here stops the vectoriser)
  // `&`, not `&&`: a short circuit here is control flow that GCC carries into the loop.
  const bool coupled_wd = (u.weight_decay != 0) & !u.decoupled_weight_decay;
  const bool decoupled_wd = (u.weight_decay != 0) & u.decoupled_weight_decay;
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T g = sign * grad[k];
    const T pk = decoupled_wd ? p[k] * decay : p[k];
    g = coupled_wd ? g + wd * pk : g;
    const T mk = lerp(m[k], g, w1);
    const T vk = v[k] * b2 + w2 * g * g;
    m[k] = mk;
    v[k] = vk;
    T vu = vk;
    if constexpr (kAmsgrad) {
      vu = std::max(vmax[k], vk);
      vmax[k] = vu;
    }
    const T denom = std::sqrt(vu) / bc2_sqrt + eps;
    p[k] = pk + neg_step * mk / denom;
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE void adam_update(const UpdateRule& u, const AdamStepScalars& s,
                                        T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                        T* FUSEDGRAD_RESTRICT m, T* FUSEDGRAD_RESTRICT v,
                                        T* FUSEDGRAD_RESTRICT vmax, int64_t n) {
  if (vmax) {
    adam_update_n<T, true>(u, s, p, grad, m, v, vmax, n);
  } else {
    adam_update_n<T, false>(u, s, p, grad, m, v, vmax, n);
  }
}

}  // namespace fusedgrad::trainer
