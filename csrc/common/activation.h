// The activation table: every activation fusedgrad offers, its value and its
// derivative, written once.
//
// Each entry is a struct with
//   name          the string the ops' schemas take (`str activation`) and Python passes
//   saves_input   false: the derivative is written from the output s = act(h), which the
//                 backward reads anyway (sigmoid: s (1 − s)); true: from the input h,
//                 which the kernels then keep beside s
//   value<M>(h)   act(h)
//   grad<M>(a)    act'(h), from a = s (saves_input false) or a = h (true)
//   jet<M>(h, d0, d1, d2, d3)  act and its first three derivatives at h: the input
//                 derivatives' pass (engine/mlp_jets_cpu.cpp) carries ∂h and ∂²h
//                 through act by the chain rule, and its backward differentiates that
// M supplies exp / tanh / erf: ScalarMath below (std::, host and device: the CUDA
// kernels and the scalar reference), or cpu/activation_cpu.h's VectorMath (the
// CPU kernels' vectorisable forms, cpu_vector.h). Every formula is the one
// torch.nn.functional evaluates (ATen's native kernels and their derivatives),
// so that float64 results agree to rounding.
//
// Adding an activation: one struct and one line of FUSEDGRAD_ACTIVATIONS.
// The enum, the name parsing (options.cpp), the kernels' dispatch (every path
// switches over this list), the Python names (fusedgrad._C.activations) follow.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FUSEDGRAD_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__) || defined(__clang__)
#define FUSEDGRAD_HOST_DEVICE __attribute__((always_inline)) inline  // compiled into each CPU clone
#else
#define FUSEDGRAD_HOST_DEVICE inline
#endif

namespace fusedgrad {

// exp, tanh, erf as the C++ library (and CUDA's device library) computes them.
struct ScalarMath {
  template <typename T>
  static FUSEDGRAD_HOST_DEVICE T exp(T z) { return std::exp(z); }
  template <typename T>
  static FUSEDGRAD_HOST_DEVICE T tanh(T z) { return std::tanh(z); }
  template <typename T>
  static FUSEDGRAD_HOST_DEVICE T erf(T z) { return std::erf(z); }
};

namespace act {

// σ(h) = 1 / (1 + e^(−h)); σ' = s (1 − s). For h → −∞, e^(−h) → +inf and s → 0;
// for h → +∞, s → 1: saturation never produces NaN.
struct Sigmoid {
  static constexpr const char* name = "sigmoid";
  static constexpr bool saves_input = false;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) { return T(1) / (T(1) + M::exp(-h)); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T s) { return s * (T(1) - s); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    const T s = value<M>(h), g = s * (T(1) - s), c = T(1) - T(2) * s;
    d0 = s;
    d1 = g;
    d2 = g * c;                   // σ'' = σ' (1 − 2σ)
    d3 = g * (c * c - T(2) * g);  // σ''' = σ' (1 − 2σ)² − 2σ'²
  }
};

// tanh(h); tanh' = 1 − s².
struct Tanh {
  static constexpr const char* name = "tanh";
  static constexpr bool saves_input = false;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) { return M::tanh(h); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T s) { return T(1) - s * s; }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    const T t = M::tanh(h), g = T(1) - t * t;
    d0 = t;
    d1 = g;
    d2 = T(-2) * t * g;                  // tanh'' = −2t (1 − t²)
    d3 = g * (T(4) * t * t - T(2) * g);  // tanh''' = (1 − t²)(4t² − 2(1 − t²))
  }
};

// max(h, 0) (NaN stays NaN); relu' = 0 where s ≤ 0 (0 at h = 0, as torch's threshold_backward).
struct Relu {
  static constexpr const char* name = "relu";
  static constexpr bool saves_input = false;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) { return h < T(0) ? T(0) : h; }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T s) { return s <= T(0) ? T(0) : T(1); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    d0 = value<M>(h);
    d1 = h > T(0) ? T(1) : T(0);  // as grad(): 0 at h = 0; the second and third derivatives are 0, as torch's
    d2 = T(0);
    d3 = T(0);
  }
};

// h σ(h); silu' = σ (1 + h (1 − σ)).
struct Silu {
  static constexpr const char* name = "silu";
  static constexpr bool saves_input = true;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) { return h / (T(1) + M::exp(-h)); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T h) {
    const T sig = T(1) / (T(1) + M::exp(-h));
    return sig * (T(1) + h * (T(1) - sig));
  }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    const T sig = T(1) / (T(1) + M::exp(-h)), g = sig * (T(1) - sig), c = T(1) - T(2) * sig;
    d0 = h * sig;
    d1 = sig * (T(1) + h * (T(1) - sig));
    d2 = g * (T(2) + h * c);                       // (hσ)'' = 2σ' + hσ'' = σ' (2 + h (1 − 2σ))
    d3 = g * (c * (T(3) + h * c) - T(2) * h * g);  // (hσ)''' = 3σ'' + hσ'''
  }
};

// F.gelu(approximate="none"): h Φ(h), Φ(h) = (1 + erf(h / √2)) / 2; gelu' = Φ(h) + h φ(h).
struct Gelu {
  static constexpr const char* name = "gelu";
  static constexpr bool saves_input = true;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) {
    return h * T(0.5) * (T(1) + M::erf(h * T(0.70710678118654752440)));
  }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T h) {
    const T cdf = T(0.5) * (T(1) + M::erf(h * T(0.70710678118654752440)));
    const T pdf = M::exp(T(-0.5) * h * h) * T(0.39894228040143267794);  // 1/√(2π)
    return cdf + h * pdf;
  }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    const T cdf = T(0.5) * (T(1) + M::erf(h * T(0.70710678118654752440)));
    const T pdf = M::exp(T(-0.5) * h * h) * T(0.39894228040143267794);
    d0 = h * cdf;
    d1 = cdf + h * pdf;
    d2 = pdf * (T(2) - h * h);  // with φ' = −hφ
    d3 = pdf * h * (h * h - T(4));
  }
};

// F.gelu(approximate="tanh"): h (1 + tanh(u)) / 2, u = √(2/π) (h + 0.044715 h³).
struct GeluTanh {
  static constexpr const char* name = "gelu_tanh";
  static constexpr bool saves_input = true;
  static constexpr double kBeta = 0.79788456080286535588;  // √(2/π)
  static constexpr double kKappa = 0.044715;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) {
    const T inner = T(kBeta) * (h + T(kKappa) * h * h * h);
    return T(0.5) * h * (T(1) + M::tanh(inner));
  }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T h) {
    const T h_sq = h * h;
    const T inner = T(kBeta) * (h + T(kKappa) * h_sq * h);
    const T t = M::tanh(inner);
    const T left = T(0.5) * h;
    const T right = T(1) + t;
    const T left_derivative = T(0.5) * right;
    const T right_derivative = left * (T(1) - t * t) * T(kBeta) * (T(1) + T(3 * kKappa) * h_sq);
    return left_derivative + right_derivative;
  }
  // With u(h) above, t = tanh(u) and q = 1 − t²: s = h (1 + t) / 2, t' = q u',
  // t'' = q (u'' − 2t u'²), t''' = q (u''' − 6t u' u'' + (4t² − 2q) u'³).
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    const T h_sq = h * h;
    const T t = M::tanh(T(kBeta) * (h + T(kKappa) * h_sq * h)), q = T(1) - t * t;
    const T u1 = T(kBeta) * (T(1) + T(3 * kKappa) * h_sq), u2 = T(6 * kBeta * kKappa) * h;
    const T u3 = T(6 * kBeta * kKappa);
    const T t1 = q * u1, t2 = q * (u2 - T(2) * t * u1 * u1);
    const T t3 = q * (u3 - T(6) * t * u1 * u2 + (T(4) * t * t - T(2) * q) * u1 * u1 * u1);
    d0 = T(0.5) * h * (T(1) + t);
    d1 = T(0.5) * (T(1) + t) + T(0.5) * h * t1;
    d2 = t1 + T(0.5) * h * t2;
    d3 = T(1.5) * t2 + T(0.5) * h * t3;
  }
};

// h; identity' = 1.
struct Identity {
  static constexpr const char* name = "identity";
  static constexpr bool saves_input = false;
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T value(T h) { return h; }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE T grad(T) { return T(1); }
  template <class M, typename T>
  static FUSEDGRAD_HOST_DEVICE void jet(T h, T& d0, T& d1, T& d2, T& d3) {
    d0 = h;
    d1 = T(1);
    d2 = T(0);
    d3 = T(0);
  }
};

}  // namespace act

// X(enumerator, struct) for every activation; the first is the default.
#define FUSEDGRAD_ACTIVATIONS(X) \
  X(Sigmoid, act::Sigmoid)       \
  X(Tanh, act::Tanh)             \
  X(Relu, act::Relu)             \
  X(Silu, act::Silu)             \
  X(Gelu, act::Gelu)             \
  X(GeluTanh, act::GeluTanh)     \
  X(Identity, act::Identity)

#define FUSEDGRAD_ACTIVATION_ENUMERATOR(E, S) E,
enum class Activation : int8_t { FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_ENUMERATOR) };
#undef FUSEDGRAD_ACTIVATION_ENUMERATOR

// f(Entry{}) with the table entry of `a`: code written once for all
// activations, instantiated for each (the switch sits outside the loops).
template <class F>
FUSEDGRAD_HOST_DEVICE decltype(auto) visit_activation(Activation a, F&& f) {
  switch (a) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  case Activation::E:                   \
    return f(S{});
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
  return f(act::Identity{});  // not reached: every enumerator has a case
}

inline constexpr bool activation_saves_input(Activation a) {
  switch (a) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  case Activation::E:                   \
    return S::saves_input;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
  return false;
}

inline constexpr const char* activation_name(Activation a) {
  switch (a) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  case Activation::E:                   \
    return S::name;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
  return "";
}

// Scalar forms over the whole table, for device kernels and the reference.
namespace math {
template <typename T>
FUSEDGRAD_HOST_DEVICE T activate(T h, Activation a) {
  return visit_activation(a, [&](auto A) { return decltype(A)::template value<ScalarMath>(h); });
}
// dh = ds ⊙ act'(saved) (saved: s, or h where the activation saves its input).
template <typename T>
FUSEDGRAD_HOST_DEVICE T activation_backward(T ds, T saved, Activation a) {
  return visit_activation(a, [&](auto A) { return ds * decltype(A)::template grad<ScalarMath>(saved); });
}
}  // namespace math

}  // namespace fusedgrad
