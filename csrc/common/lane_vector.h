// Lane-wise sums over rows, for the CPU kernels that stream rows through
// blocks (the fused trainer, trainer/train_cpu.cpp, and the engine, engine/).
//
// A LaneVec<T, VB> is a VB-byte vector of T — 64 bytes (16 float, 8 double)
// where the CPU has AVX-512, 32 elsewhere (cpu_vector_bytes(); the kernels are
// compiled for both and pick at run time): accumulators
// declared as LaneVec stay in registers, where `T acc[16]` arrays under
// `omp simd` were kept on the stack by GCC, each multiply-add then waiting on
// a store and a reload. A sum over rows is taken lane-wise — lane l sums rows
// l, l + kLanes, ... — and the lanes of many sums are folded at once
// (lane_sums): a horizontal sum per dot, as `omp simd reduction` lowers it,
// cost as much as the rest of a 100-row training step.
//
// GCC and clang: their vector extension (one AVX-512 or AVX2 register, or two
// SSE ones, as the clone of cpu_vector.h targets). 64-byte vectors on an AVX2
// CPU are two registers each, and the kernels' accumulators spilled to the stack:
// seed-004's 1→20→1 fit step took 7.2 µs there, 2.0 µs with 32-byte vectors.
// Elsewhere: a plain array with the same operators, which the compiler may
// vectorise or not.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "cpu_vector.h"  // FUSEDGRAD_CPU_INLINE, FUSEDGRAD_RESTRICT

namespace fusedgrad {

template <typename T, int VB>
constexpr int64_t kLanes = VB / static_cast<int64_t>(sizeof(T));

#if defined(__GNUC__) || defined(__clang__)

// Passing a 64-byte vector by value changes the ABI between the CPU clones;
// these helpers are always inlined into one clone, so no call crosses it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T, int VB>
struct LaneVecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB>
using LaneVec = typename LaneVecOf<T, VB>::type;

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE LaneVec<T, VB> lanes_splat(T v) {
  return LaneVec<T, VB>{} + v;
}

#else

template <typename T, int VB>
struct LaneVec {
  T v[kLanes<T, VB>];
  LaneVec& operator+=(const LaneVec& o) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) v[l] += o.v[l]; return *this; }
  friend LaneVec operator+(LaneVec a, const LaneVec& b) { return a += b; }
  friend LaneVec operator-(LaneVec a, const LaneVec& b) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) a.v[l] -= b.v[l]; return a; }
  friend LaneVec operator*(LaneVec a, const LaneVec& b) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) a.v[l] *= b.v[l]; return a; }
  friend LaneVec operator*(T s, LaneVec a) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) a.v[l] *= s; return a; }
  friend LaneVec operator*(LaneVec a, T s) { return s * a; }
  friend LaneVec operator+(LaneVec a, T s) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) a.v[l] += s; return a; }
  friend LaneVec operator-(T s, LaneVec a) { for (int64_t l = 0; l < kLanes<T, VB>; ++l) a.v[l] = s - a.v[l]; return a; }
};

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE LaneVec<T, VB> lanes_splat(T s) {
  LaneVec<T, VB> r;
  for (int64_t l = 0; l < kLanes<T, VB>; ++l) r.v[l] = s;
  return r;
}

#endif

// A growable buffer of T whose data starts on a 64-byte boundary, the size of
// a lane vector: the blocks' rows are a whole number of lane vectors long, so
// every vector load and store then stays within one cache line. (malloc's
// 16-byte alignment made most of them straddle two, and a step's time
// depended on where the buffer landed: up to 10% at 1→20→1.) get(n) returns
// room for n values; when it grows, what the buffer held does not stay in
// place (callers write what they read, every block).
template <typename T>
class LaneBuffer {
 public:
  T* get(size_t n) {
    constexpr size_t kSlack = 64 / sizeof(T);
    if (values_.size() < n + kSlack) values_.resize(n + kSlack);
    const auto misalign = reinterpret_cast<uintptr_t>(values_.data()) % 64;
    return values_.data() + (64 - misalign) % 64 / sizeof(T);
  }

 private:
  std::vector<T> values_;
};

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE LaneVec<T, VB> lanes_load(const T* p) {
  LaneVec<T, VB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, typename V>
FUSEDGRAD_CPU_INLINE void lanes_store(T* p, const V& v) {  // V: a LaneVec of T
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace fusedgrad

namespace fusedgrad {

// out[e] = Σ_l in[e][l] for the kLanes vectors in[0 .. kLanes): the horizontal
// sums of a whole row of vectors at once. Each round pairs up vectors and folds
// every group of lanes in half (two shuffles and an add per pair), so kLanes
// sums take kLanes − 1 pair folds instead of one horizontal sum each. The sum
// of each vector is a fixed tree over its lanes, the same on every CPU.
#if defined(__GNUC__) || defined(__clang__)

namespace lanes_detail {
// Lane i of a pair fold of (a, b) whose groups are `w` lanes wide: the
// low (Lo) or high half of the group it comes from; groups of a come first.
template <int N, int W, bool Lo>
constexpr int fold_index(int i) {
  const int half = W / 2, group = i / half, pos = i % half, groups_per_vec = N / W;
  const int src = group < groups_per_vec ? 0 : N;
  const int g = group < groups_per_vec ? group : group - groups_per_vec;
  return src + g * W + pos + (Lo ? 0 : half);
}

template <typename V, int N, int W, int... I>
FUSEDGRAD_CPU_INLINE V fold_pair(const V& a, const V& b, std::integer_sequence<int, I...>) {
  const V lo = __builtin_shufflevector(a, b, fold_index<N, W, true>(I)...);
  const V hi = __builtin_shufflevector(a, b, fold_index<N, W, false>(I)...);
  return lo + hi;
}

// Folds `count` vectors (groups W lanes wide) pairwise in place, until one holds every sum.
template <typename T, int VB, int W>
FUSEDGRAD_CPU_INLINE void fold_rounds(LaneVec<T, VB>* v, int count) {
  if constexpr (W > 1) {
    constexpr int N = static_cast<int>(kLanes<T, VB>);
    for (int k = 0; k < count / 2; ++k) {
      v[k] = fold_pair<LaneVec<T, VB>, N, W>(v[2 * k], v[2 * k + 1], std::make_integer_sequence<int, N>{});
    }
    fold_rounds<T, VB, W / 2>(v, count / 2);
  }
}
}  // namespace lanes_detail

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE LaneVec<T, VB> lane_sums(LaneVec<T, VB>* in) {
  lanes_detail::fold_rounds<T, VB, static_cast<int>(kLanes<T, VB>)>(in, static_cast<int>(kLanes<T, VB>));
  return in[0];
}

#else

template <typename T, int VB>
inline LaneVec<T, VB> lane_sums(LaneVec<T, VB>* in) {
  LaneVec<T, VB> out;
  for (int64_t e = 0; e < kLanes<T, VB>; ++e) {
    // The same tree as the vector form: halves folded in place.
    T tmp[kLanes<T, VB>];
    for (int64_t l = 0; l < kLanes<T, VB>; ++l) tmp[l] = in[e].v[l];
    for (int64_t half = kLanes<T, VB> / 2; half >= 1; half /= 2) {
      for (int64_t l = 0; l < half; ++l) tmp[l] += tmp[l + half];
    }
    out.v[e] = tmp[0];
  }
  return out;
}

#endif

}  // namespace fusedgrad

namespace fusedgrad {

// out[q][l] = Σ_{r ≡ l (mod kLanes), r < n} a[r] · b[q][r] for q < Q: Q dots
// sharing the loads of `a`, as lane partials (rows past the last whole
// vector are added to the first lanes, in order).
template <int Q, int VB, typename T>
FUSEDGRAD_CPU_INLINE void lane_dots(const T* a, const T* const* b, int64_t n, T* const* out) {
  constexpr int64_t L = kLanes<T, VB>;
  const int64_t whole = n / L * L;
  LaneVec<T, VB> acc[Q];
  for (int q = 0; q < Q; ++q) acc[q] = lanes_splat<T, VB>(T(0));
  for (int64_t r = 0; r < whole; r += L) {
    const LaneVec<T, VB> av = lanes_load<T, VB>(a + r);
    for (int q = 0; q < Q; ++q) acc[q] += av * lanes_load<T, VB>(b[q] + r);
  }
  for (int q = 0; q < Q; ++q) {
    lanes_store(out[q], acc[q]);
    for (int64_t r = whole; r < n; ++r) out[q][r - whole] += a[r] * b[q][r];
  }
}

// partials[(first + c·stride) · kLanes ...] = lane partials of Σ_r a[r] · b[c·ldb + r]
// over n rows, for c < C, four at a time (four independent chains of multiply-adds).
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void lane_dots_with(const T* a, const T* b, int64_t ldb, int64_t C, int64_t n, T* partials,
                                           int64_t first, int64_t stride) {
  constexpr int64_t L = kLanes<T, VB>;
  auto row = [&](int64_t c) { return b + c * ldb; };
  auto out = [&](int64_t c) { return partials + (first + c * stride) * L; };
  int64_t c = 0;
  for (; c + 4 <= C; c += 4) {
    const T* bs[4] = {row(c), row(c + 1), row(c + 2), row(c + 3)};
    T* outs[4] = {out(c), out(c + 1), out(c + 2), out(c + 3)};
    lane_dots<4, VB>(a, bs, n, outs);
  }
  switch (C - c) {
    case 3: {
      const T* bs[3] = {row(c), row(c + 1), row(c + 2)};
      T* outs[3] = {out(c), out(c + 1), out(c + 2)};
      lane_dots<3, VB>(a, bs, n, outs);
      break;
    }
    case 2: {
      const T* bs[2] = {row(c), row(c + 1)};
      T* outs[2] = {out(c), out(c + 1)};
      lane_dots<2, VB>(a, bs, n, outs);
      break;
    }
    case 1: {
      const T* bs[1] = {row(c)};
      T* outs[1] = {out(c)};
      lane_dots<1, VB>(a, bs, n, outs);
      break;
    }
    default:
      break;
  }
}

// out[l] = Σ_{r ≡ l (mod kLanes), r < n} a[r], as lane partials.
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void lane_row_sum(const T* a, int64_t n, T* out) {
  constexpr int64_t L = kLanes<T, VB>;
  const int64_t whole = n / L * L;
  LaneVec<T, VB> acc = lanes_splat<T, VB>(T(0));
  for (int64_t r = 0; r < whole; r += L) acc += lanes_load<T, VB>(a + r);
  lanes_store(out, acc);
  for (int64_t r = whole; r < n; ++r) out[r - whole] += a[r];
}

// sums[e] += Σ_l partials[e·kLanes + l] for e < count: each row's lanes summed
// in T by a fixed tree (lane_sums, kLanes rows at a time), then added in double.
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void add_lane_sums(const T* FUSEDGRAD_RESTRICT partials, int64_t count,
                                          double* FUSEDGRAD_RESTRICT sums) {
  constexpr int64_t L = kLanes<T, VB>;
  for (int64_t e0 = 0; e0 < count; e0 += L) {
    const int64_t n = std::min(L, count - e0);
    LaneVec<T, VB> rows[L];
    for (int64_t i = 0; i < L; ++i) {
      rows[i] = i < n ? lanes_load<T, VB>(partials + (e0 + i) * L) : lanes_splat<T, VB>(T(0));
    }
    T total[L];
    lanes_store(total, lane_sums<T, VB>(rows));
    for (int64_t i = 0; i < n; ++i) sums[e0 + i] += static_cast<double>(total[i]);
  }
}

}  // namespace fusedgrad
