// Code generation for the CPU kernels' vector loops, shared by the engine
// (engine/) and the fused trainer (trainer/train_cpu.cpp).
//
// FUSEDGRAD_CPU_CLONES compiles a function for AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and baseline x86-64, and picks one at load time by the CPU's
// capabilities — as ATen picks its own kernels. The helpers such a function
// calls are FUSEDGRAD_CPU_INLINE, so that each clone carries its own vector
// code. On other compilers and architectures both are plain `inline` and the
// loops are vectorised for the baseline target.
//
// vec_exp / vec_sigmoid: e^z and σ in a form the compiler vectorises. A call
// to std::exp per element stops the vectoriser (2 000 of them are most of a
// 1→20→1 step) and ATen's vectorised exp (Sleef) is reachable from an
// extension only through the dispatcher (at::sigmoid_ on a view: ~0.7 ns per
// value, half the step). The clamps below are selects that GCC turns into
// vector blends only under -fno-trapping-math (setup.py), which changes no value.
#pragma once

#include <algorithm>
#include <atomic>
#include <bit>
#include <cstdint>
#include <utility>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FUSEDGRAD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
// For code of 32-byte lane vectors, which runs where cpu_vector_bytes() is 32: no AVX-512 clone.
#define FUSEDGRAD_CPU_CLONES_32 __attribute__((target_clones("arch=x86-64-v3", "default")))
#define FUSEDGRAD_CPU_INLINE __attribute__((always_inline)) inline  // compiled into each clone
#else
#define FUSEDGRAD_CPU_CLONES
#define FUSEDGRAD_CPU_CLONES_32
#define FUSEDGRAD_CPU_INLINE inline
#endif

#if defined(__GNUC__) || defined(__clang__)
#define FUSEDGRAD_RESTRICT __restrict__
#else
#define FUSEDGRAD_RESTRICT
#endif

namespace fusedgrad {

namespace detail {
inline std::atomic<int> forced_vector_bytes{0};  // tests: force_cpu_vector_bytes (csrc/engine)
}  // namespace detail

// The widest lane vector, in bytes, of the clone FUSEDGRAD_CPU_CLONES runs on
// this CPU: 64 where the AVX-512 clone runs, else 32. The kernels written over
// lane vectors (the engine's tiles, the trainer's and the streaming path's
// LaneVecs) are compiled for both widths and take this one: a 64-byte vector
// on an AVX2 CPU is two registers, and their accumulators spill.
inline int cpu_vector_bytes() {
  if (const int forced = detail::forced_vector_bytes.load(std::memory_order_relaxed)) return forced;
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
  static const int native = __builtin_cpu_supports("x86-64-v4") ? 64 : 32;  // the resolver's own test
  return native;
#else
  return 32;
#endif
}

// Calls wide(args...) where cpu_vector_bytes() is 64, narrow(args...) elsewhere: the two entry
// points of a kernel built for both lane widths.
template <typename Wide, typename Narrow, typename... Args>
inline void by_vector_width(Wide wide, Narrow narrow, Args&&... args) {
  if (cpu_vector_bytes() == 64) {
    wide(std::forward<Args>(args)...);
  } else {
    narrow(std::forward<Args>(args)...);
  }
}

// e^z for a tile of lanes, vectorisable (no calls, no branches): z = n ln2 + r
// with n = round(z / ln2) and |r| ≤ ln2/2, e^r by a polynomial (exp_polynomial),
// 2ⁿ built in the exponent bits. Within 1 ulp of the correctly rounded e^z in
// float (measured over every float in [−87, 88]; σ within 2 ulp), 1–2 ulp of
// std::exp in double; NaN stays NaN. z is clamped so
// that 2ⁿ stays representable: e^z = 0 below the clamp's lower end (where
// 1 + e^z rounds to 1 anyway) and +inf above its upper end (σ = 1/(1 + inf)
// = 0, as for std::exp's overflow).
constexpr double inverse_factorial(int m) {
  double f = 1.0;
  for (int k = 2; k <= m; ++k) f *= k;
  return 1.0 / f;
}

template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  using Bits = uint32_t;
  static constexpr float lo = -88.0f, hi = 89.0f;        // n ∈ [-127, 128]
  static constexpr float shift = 12582912.0f + 127;       // 1.5·2²³ + the exponent bias
  static constexpr int mantissa = 23;
};
template <>
struct ExpConsts<double> {
  using Bits = uint64_t;
  static constexpr double lo = -708.0, hi = 709.9;        // n ∈ [-1021, 1024]
  static constexpr double shift = 6755399441055744.0 + 1023;  // 1.5·2⁵² + the exponent bias
  static constexpr int mantissa = 52;
  static constexpr int degree = 13;
};

// c_n xⁿ + … + c_1 x + c_0 by Horner, the coefficients highest degree first:
// horner(x, c_n, …, c_0) is acc = c_n, then acc = acc·x + c_k down to c_0 (one
// multiply-add each, unrolled at compile time, as the polynomials are written
// out in the literature).
template <typename T>
FUSEDGRAD_CPU_INLINE T horner(T, T acc) {
  return acc;
}
template <typename T, typename... C>
FUSEDGRAD_CPU_INLINE T horner(T x, T acc, T next, C... rest) {
  return horner(x, acc * x + next, rest...);
}

// Σ_{m = M}^{Deg} r^(m−M) / m!, by Horner, unrolled at compile time (a loop
// here would keep the caller's lane loop from vectorising).
template <typename T, int M, int Deg>
FUSEDGRAD_CPU_INLINE T exp_taylor(T r) {
  if constexpr (M == Deg) {
    return T(inverse_factorial(Deg));
  } else {
    return exp_taylor<T, M + 1, Deg>(r) * r + T(inverse_factorial(M));
  }
}

// e^r for |r| ≤ ln2/2. Float: the degree-6 polynomial of least maximum
// relative error there (Lawson's algorithm; 1.9e-9, 1.7e-8 with the
// coefficients rounded to float, both below float's half ulp of 6e-8): one
// multiply-add fewer than the degree-7 Taylor polynomial it replaced, which
// σ's cost follows — the exponential is most of the trainer's step. Over
// every float in [−87, 88]: e^z within 1 ulp and σ within 2 ulp for both,
// 0.67% against 0.46% of e^z not correctly rounded. Double: Taylor to r¹³
// (truncation below half an ulp).
template <typename T>
FUSEDGRAD_CPU_INLINE T exp_polynomial(T r) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return horner(r, T(0x1.6ab98p-10f), T(0x1.126d0cp-7f), T(0x1.55589ap-5f), T(0x1.55540ap-3f),
                  T(0x1.fffffap-2f), T(1), T(1));
  } else {
    return exp_taylor<T, 0, ExpConsts<T>::degree>(r);
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE T vec_exp(T z) {
  using C = ExpConsts<T>;
  using Bits = typename C::Bits;
  constexpr T log2e = T(1.4426950408889634074);
  constexpr T ln2_hi = T(0.693145751953125);              // ln 2 = ln2_hi + ln2_lo, ln2_hi exact in few bits
  constexpr T ln2_lo = T(1.42860682030941723212e-6);
  z = z < C::lo ? C::lo : z;
  z = z > C::hi ? C::hi : z;
  // k = z/ln2 + 1.5·2^m + bias, m the mantissa's width: adding 1.5·2^m rounds
  // z/ln2 to the integer n (the float spacing there is 1), and k's low
  // mantissa bits then hold n + bias — 2ⁿ's exponent field, moved into place
  // by one shift (the bits above it shift out).
  const T k = z * log2e + C::shift;
  const T n = k - C::shift;
  const T r = (z - n * ln2_hi) - n * ln2_lo;
  const T poly = exp_polynomial(r);
  const T scale = std::bit_cast<T>(static_cast<Bits>(std::bit_cast<Bits>(k) << C::mantissa));  // 2ⁿ
  return poly * scale;
}

// σ(h) = 1 / (1 + e^(−h)), the formula of formulas.h's sigmoid and of torch.sigmoid, with vec_exp.
template <typename T>
FUSEDGRAD_CPU_INLINE T vec_sigmoid(T h) {
  return T(1) / (T(1) + vec_exp(-h));
}

// tanh(z) in float: z P(s) / Q(s), s = z² clamped to 81, P and Q of degree 5,
// the result clamped to [−1, 1] — so 1 − tanh² is never negative, and beyond
// |z| = 9, where tanh rounds to ±1 in float, it is ±1. The coefficients are a
// weighted least-squares fit of the relative error on [0, 9]
// (scripts/fit_tanh.py: 3.7e-11 before rounding to float; the float
// evaluation's roundings are the error). P(0) = Q(0) = 1: tanh z = z for tiny
// z. Over every float in [0, 10] (odd: the negative half is its mirror),
// against the correctly rounded tanh: within 5.5 ulp (3.3 below 0.5, 4.8
// below 6), 0.13% of floats beyond 2 ulp — the exponential form below was
// within 2.8. About twenty vector operations and one division, the
// exponential form forty: 0.87 → 0.53 ns a value on an AVX2 Zen 3, where the
// tanh had been a third of a 1→[20]×3→1 training step (docs/performance.md).
// NaN stays NaN; ±inf gives ±1.
FUSEDGRAD_CPU_INLINE float tanh_rational(float z) {
  // s = min(z², 81) as integers (a non-negative float orders as its bits): one
  // vpminsd, where a float select is a compare and a blend (GCC maps it to
  // vminps only under -ffinite-math-only). Beyond |z| = 9 the ratio below is
  // then z R(9)/9, past ±1, and the clamp at the end makes it ±1; NaN stays
  // NaN through the factor z.
  const float s = std::bit_cast<float>(std::min(std::bit_cast<int32_t>(z * z), std::bit_cast<int32_t>(81.0f)));
  const float p = horner(s, 0x1.44e59p-35f, 0x1.deda8ep-24f, 0x1.631646p-15f, 0x1.2233d2p-8f, 0x1.20c918p-3f, 1.0f);
  const float q = horner(s, 0x1.97324cp-29f, 0x1.5e2d06p-19f, 0x1.06cd26p-11f, 0x1.de8e74p-6f, 0x1.e5b9e2p-2f, 1.0f);
  // The clamp on the magnitude, the sign put back by integer ops: one compare
  // and one blend (NaN > 1 is false: NaN stays), where clamping at +1 and at −1
  // as two float selects compiled to nine vector operations — 0.47 → 0.41 ns a
  // value in a loop of 7 200 (AVX2 Zen 3), the same bits. (Degree 4/4 would
  // take it to 0.34 at the same worst case and rms error over the floats, but
  // moves which values round badly: a 7-row float32 bias gradient of
  // test_against_autograd, a sum that cancels, then fell outside its bound.)
  const uint32_t bits = std::bit_cast<uint32_t>(z * p / q);
  float mag = std::bit_cast<float>(bits & 0x7fffffffu);
  mag = mag > 1.0f ? 1.0f : mag;
  return std::bit_cast<float>(std::bit_cast<uint32_t>(mag) | (bits & 0x80000000u));
}

// tanh(z) in double, vectorisable, from one reduction of y = −2|z| as in vec_exp:
// y = n ln2 + r, e^r − 1 = r (1 + r/2! + r²/3! + …) by Horner (no constant term),
// e = e^y = 2ⁿ (1 + (e^r − 1)), then
//   n = 0 (|z| < ln2/4): m = e^r − 1 exactly as the polynomial gives it (relative
//       accuracy however small z is, where 1 − e would cancel), tanh = −m / (2 + m);
//   n < 0: tanh = (1 − e) / (1 + e), e from 2ⁿ: accurate near ±1, where the
//       derivative 1 − tanh² cancels and needs it.
// One division for every z; the sign of z put back. Within 3 ulp of torch's
// (the float instance of this form was within 2.8 ulp of the correctly rounded
// tanh). Truncation r¹⁴/14! relative to r at |r| = ln2/2, below half an ulp.
// NaN stays NaN; ±inf gives ±1.
template <typename T>
FUSEDGRAD_CPU_INLINE T vec_tanh(T z) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return tanh_rational(z);
  } else {
    using C = ExpConsts<T>;
    using Bits = typename C::Bits;
    constexpr T log2e = T(1.4426950408889634074);
    constexpr T ln2_hi = T(0.693145751953125);
    constexpr T ln2_lo = T(1.42860682030941723212e-6);
    const T a = z < T(0) ? -z : z;
    T y = T(-2) * a;
    y = y < C::lo ? C::lo : y;
    const T k = y * log2e + C::shift;
    const T n = k - C::shift;
    const T r = (y - n * ln2_hi) - n * ln2_lo;
    const T em1_r = r * exp_taylor<T, 1, ExpConsts<T>::degree>(r);
    const T scale = std::bit_cast<T>(static_cast<Bits>(std::bit_cast<Bits>(k) << C::mantissa));  // 2ⁿ
    const T e = scale * em1_r + scale;
    const bool small = n == T(0);
    const T num = small ? -em1_r : T(1) - e;
    const T den = small ? T(2) + em1_r : T(1) + e;
    const T t = num / den;
    return z < T(0) ? -t : t;
  }
}

// y[k] += a · x[k]
template <typename T>
FUSEDGRAD_CPU_INLINE void axpy(T* FUSEDGRAD_RESTRICT y, T a, const T* FUSEDGRAD_RESTRICT x, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) y[k] += a * x[k];
}

// Σ_k a[k] · b[k], vectorised (reassociated into lanes, as a BLAS dot is).
template <typename T>
FUSEDGRAD_CPU_INLINE T dot(const T* FUSEDGRAD_RESTRICT a, const T* FUSEDGRAD_RESTRICT b, int64_t n) {
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += a[k] * b[k];
  return sum;
}

// Σ_k a[k], vectorised.
template <typename T>
FUSEDGRAD_CPU_INLINE T row_sum(const T* FUSEDGRAD_RESTRICT a, int64_t n) {
  T sum = T(0);
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < n; ++k) sum += a[k];
  return sum;
}

// s[k] = σ(s[k]) over a contiguous array.
template <typename T>
FUSEDGRAD_CPU_INLINE void sigmoid_inplace(T* FUSEDGRAD_RESTRICT s, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) s[k] = vec_sigmoid(s[k]);
}

}  // namespace fusedgrad
