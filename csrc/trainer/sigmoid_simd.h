// σ(h) = 1 / (1 + e^(−h)) over a contiguous array, in a form the compiler
// vectorises.
//
// Why not std::exp or ATen: a call to std::exp per element stops the
// vectoriser (and costs ~2 000 calls in the 1→20→1 step, more than the rest of
// the step), and ATen's vectorised exp (Sleef) is reachable from an extension
// only through the dispatcher (at::sigmoid_ on a view: a few µs per call, the
// size of the whole tiny training step). So e^x is written here the textbook
// way, with nothing but + × and bit moves:
//
//   x = n ln2 + r,  n = round(x / ln2),  |r| ≤ ln2 / 2
//   e^x = 2^n · e^r,  e^r by its Taylor series (degree 7 for float, 13 for
//   double: truncation error < 1 ulp on |r| ≤ 0.347), 2^n written into the
//   exponent bits.
//
// Rounding n uses the "add 1.5·2^p" trick, so no float→int conversion (which
// is undefined for NaN) is needed: NaN in gives NaN out, ±inf saturate, and
// inputs beyond the exponent range give 0 or +inf exactly as std::exp does,
// so σ saturates to exactly 0 or 1 like torch.sigmoid. Accuracy is checked
// against std::exp over the whole range in tests/test_trainer_kernels.py
// (through the trainer's results) and by the float64 training tests.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

#include "simd.h"

namespace fusedgrad::trainer {

template <typename T>
struct ExpConstants;

template <>
struct ExpConstants<float> {
  using Bits = int32_t;
  static constexpr int kMantissaBits = 23;
  static constexpr Bits kBias = 127;
  static constexpr float kRound = 12582912.0f;  // 1.5 · 2^23
  static constexpr float kMax = 88.72283935546875f;   // e^x overflows above
  static constexpr float kMin = -103.97207641601562f;  // e^x underflows to 0 below
  static constexpr float kLog2e = 1.44269504088896341f;
  static constexpr float kLn2Hi = 0.693359375f;        // ln 2 split in two so
  static constexpr float kLn2Lo = -2.12194440e-4f;     // n·ln2_hi is exact
  static constexpr int kDegree = 7;
  static constexpr float kInvFactorial[8] = {1.0f, 1.0f, 1.0f / 2, 1.0f / 6, 1.0f / 24, 1.0f / 120, 1.0f / 720,
                                             1.0f / 5040};
};

template <>
struct ExpConstants<double> {
  using Bits = int64_t;
  static constexpr int kMantissaBits = 52;
  static constexpr Bits kBias = 1023;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 · 2^52
  static constexpr double kMax = 709.782712893384;
  static constexpr double kMin = -745.1332191019412;
  static constexpr double kLog2e = 1.4426950408889634074;
  static constexpr double kLn2Hi = 6.93145751953125e-1;
  static constexpr double kLn2Lo = 1.42860682030941723212e-6;
  static constexpr int kDegree = 13;
  static constexpr double kInvFactorial[14] = {
      1.0, 1.0, 1.0 / 2, 1.0 / 6, 1.0 / 24, 1.0 / 120, 1.0 / 720, 1.0 / 5040, 1.0 / 40320, 1.0 / 362880,
      1.0 / 3628800, 1.0 / 39916800, 1.0 / 479001600, 1.0 / 6227020800.0};
};

// The integer value of a float that holds one (|v| < 2^22): the bits of
// v + 1.5·2^p minus those of 1.5·2^p.
template <typename T>
FUSEDGRAD_TRAIN_INLINE typename ExpConstants<T>::Bits int_of(T v) {
  using C = ExpConstants<T>;
  typename C::Bits a, b;
  const T shifted = v + C::kRound, round = C::kRound;
  std::memcpy(&a, &shifted, sizeof(a));
  std::memcpy(&b, &round, sizeof(b));
  return a - b;
}

// e^x for one element; inlined into vectorised loops.
template <typename T>
FUSEDGRAD_TRAIN_INLINE T exp_elem(T x) {
  using C = ExpConstants<T>;
  using Bits = typename C::Bits;
  // Clamp into the range where 2^n is a normal number, split off 2^n in two
  // halves below so that the result may be subnormal, like std::exp.
  const T xc = x < C::kMin ? C::kMin : (x > C::kMax ? C::kMax : x);
  const T n = (xc * C::kLog2e + C::kRound) - C::kRound;  // round(x / ln2)
  const T r = (xc - n * C::kLn2Hi) - n * C::kLn2Lo;
  // Horner form of Σ_{k=0..degree} r^k / k!
  T poly = C::kInvFactorial[C::kDegree];
#pragma GCC unroll 16
  for (int k = C::kDegree - 1; k >= 0; --k) poly = poly * r + C::kInvFactorial[k];
  // 2^n as two factors 2^half · 2^(n − half): each stays a normal number for
  // n in [−150, 128] (float) / [−1075, 1024] (double). The integers are read
  // back out of "value + 1.5·2^p" (only adds, subtracts and left shifts, which
  // vectorise on AVX2 for both widths).
  const T half = (n * T(0.5) + C::kRound) - C::kRound;
  const T rest = n - half;
  const Bits e1 = (int_of<T>(half) + C::kBias) << C::kMantissaBits;
  const Bits e2 = (int_of<T>(rest) + C::kBias) << C::kMantissaBits;
  T s1, s2;
  std::memcpy(&s1, &e1, sizeof(s1));
  std::memcpy(&s2, &e2, sizeof(s2));
  T result = poly * s1 * s2;
  // Beyond the range: exactly 0 or +inf (and NaN stays NaN: comparisons are false).
  result = x < C::kMin ? T(0) : result;
  result = x > C::kMax ? std::numeric_limits<T>::infinity() : result;
  return result;
}

// s[k] = σ(s[k]) in place, the formula torch.sigmoid evaluates: 1 / (1 + e^(−h)).
template <typename T>
FUSEDGRAD_TRAIN_INLINE void sigmoid_inplace(T* FUSEDGRAD_RESTRICT s, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) s[k] = T(1) / (T(1) + exp_elem(-s[k]));
}

}  // namespace fusedgrad::trainer
