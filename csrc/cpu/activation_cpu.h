// The activation table (common/activation.h) in the CPU kernels' vector loops.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/activation.h"
#include "../common/cpu_vector.h"

namespace fusedgrad {

// exp and tanh in the vectorisable forms of cpu_vector.h. erf (gelu) is the
// C library's, per element: the loops with it stay scalar.
struct VectorMath {
  template <typename T>
  static FUSEDGRAD_CPU_INLINE T exp(T z) { return vec_exp(z); }
  template <typename T>
  static FUSEDGRAD_CPU_INLINE T tanh(T z) { return vec_tanh(z); }
  template <typename T>
  static FUSEDGRAD_CPU_INLINE T erf(T z) { return std::erf(z); }
};

// s[k] = act(h[k]) for k < n; s may be h (in place).
template <class A, typename T>
FUSEDGRAD_CPU_INLINE void activate_n(const T* h, T* s, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) s[k] = A::template value<VectorMath>(h[k]);
}

// d[k] = d[k] ⊙ act'(a[k]) for k < n (a: s, or h where A saves its input).
template <class A, typename T>
FUSEDGRAD_CPU_INLINE void activation_backward_n(T* FUSEDGRAD_RESTRICT d, const T* FUSEDGRAD_RESTRICT a, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) d[k] = d[k] * A::template grad<VectorMath>(a[k]);
}

// act and its first three derivatives at h[k] (A::jet) into d0 … d3, k < n.
template <class A, typename T>
FUSEDGRAD_CPU_INLINE void activation_jet_n(const T* FUSEDGRAD_RESTRICT h, T* FUSEDGRAD_RESTRICT d0,
                                           T* FUSEDGRAD_RESTRICT d1, T* FUSEDGRAD_RESTRICT d2,
                                           T* FUSEDGRAD_RESTRICT d3, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) A::template jet<VectorMath>(h[k], d0[k], d1[k], d2[k], d3[k]);
}

// The same, with the activation chosen at run time (the switch sits outside the loop).
template <typename T>
FUSEDGRAD_CPU_INLINE void activate_n(Activation act, const T* h, T* s, int64_t n) {
  switch (act) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  case Activation::E:                   \
    activate_n<S>(h, s, n);             \
    return;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE void activation_backward_n(Activation act, T* FUSEDGRAD_RESTRICT d, const T* FUSEDGRAD_RESTRICT a,
                                                int64_t n) {
  switch (act) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S)    \
  case Activation::E:                      \
    activation_backward_n<S>(d, a, n);     \
    return;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE void activation_jet_n(Activation act, const T* h, T* d0, T* d1, T* d2, T* d3, int64_t n) {
  switch (act) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S)        \
  case Activation::E:                          \
    activation_jet_n<S>(h, d0, d1, d2, d3, n); \
    return;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
}

}  // namespace fusedgrad
