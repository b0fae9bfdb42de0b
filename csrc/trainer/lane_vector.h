// A 64-byte vector of T (16 float, 8 double), for the fused trainer's loops
// over the rows of a block: accumulators declared as LaneVec stay in
// registers, where `T acc[16]` arrays under `omp simd` were kept on the stack
// by GCC, each multiply-add then waiting on a store and a reload.
//
// GCC and clang: their vector extension (one AVX-512 register, two AVX2 or
// four SSE ones, as the clone of cpu_vector.h targets). Elsewhere: a plain
// array with the same operators, which the compiler may vectorise or not.
#pragma once

#include <cstdint>
#include <cstring>
#include <utility>

#include "../cpu_vector.h"  // FUSEDGRAD_CPU_INLINE

namespace fusedgrad::trainer {

template <typename T>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(T));

#if defined(__GNUC__) || defined(__clang__)

// Passing a 64-byte vector by value changes the ABI between the CPU clones;
// these helpers are always inlined into one clone, so no call crosses it.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

template <typename T>
struct LaneVecOf {
  typedef T type __attribute__((vector_size(64)));
};
template <typename T>
using LaneVec = typename LaneVecOf<T>::type;

template <typename T>
FUSEDGRAD_CPU_INLINE LaneVec<T> lanes_splat(T v) {
  return LaneVec<T>{} + v;
}

#else

template <typename T>
struct LaneVec {
  T v[kLanes<T>];
  LaneVec& operator+=(const LaneVec& o) { for (int64_t l = 0; l < kLanes<T>; ++l) v[l] += o.v[l]; return *this; }
  friend LaneVec operator+(LaneVec a, const LaneVec& b) { return a += b; }
  friend LaneVec operator-(LaneVec a, const LaneVec& b) { for (int64_t l = 0; l < kLanes<T>; ++l) a.v[l] -= b.v[l]; return a; }
  friend LaneVec operator*(LaneVec a, const LaneVec& b) { for (int64_t l = 0; l < kLanes<T>; ++l) a.v[l] *= b.v[l]; return a; }
  friend LaneVec operator*(T s, LaneVec a) { for (int64_t l = 0; l < kLanes<T>; ++l) a.v[l] *= s; return a; }
  friend LaneVec operator*(LaneVec a, T s) { return s * a; }
  friend LaneVec operator+(LaneVec a, T s) { for (int64_t l = 0; l < kLanes<T>; ++l) a.v[l] += s; return a; }
  friend LaneVec operator-(T s, LaneVec a) { for (int64_t l = 0; l < kLanes<T>; ++l) a.v[l] = s - a.v[l]; return a; }
};

template <typename T>
FUSEDGRAD_CPU_INLINE LaneVec<T> lanes_splat(T s) {
  LaneVec<T> r;
  for (int64_t l = 0; l < kLanes<T>; ++l) r.v[l] = s;
  return r;
}

#endif

template <typename T>
FUSEDGRAD_CPU_INLINE LaneVec<T> lanes_load(const T* p) {
  LaneVec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
FUSEDGRAD_CPU_INLINE void lanes_store(T* p, const LaneVec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

}  // namespace fusedgrad::trainer

namespace fusedgrad::trainer {

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
template <typename T, int W>
FUSEDGRAD_CPU_INLINE void fold_rounds(LaneVec<T>* v, int count) {
  if constexpr (W > 1) {
    constexpr int N = static_cast<int>(kLanes<T>);
    for (int k = 0; k < count / 2; ++k) {
      v[k] = fold_pair<LaneVec<T>, N, W>(v[2 * k], v[2 * k + 1], std::make_integer_sequence<int, N>{});
    }
    fold_rounds<T, W / 2>(v, count / 2);
  }
}
}  // namespace lanes_detail

template <typename T>
FUSEDGRAD_CPU_INLINE LaneVec<T> lane_sums(LaneVec<T>* in) {
  lanes_detail::fold_rounds<T, static_cast<int>(kLanes<T>)>(in, static_cast<int>(kLanes<T>));
  return in[0];
}

#else

template <typename T>
inline LaneVec<T> lane_sums(LaneVec<T>* in) {
  LaneVec<T> out;
  for (int64_t e = 0; e < kLanes<T>; ++e) {
    // The same tree as the vector form: halves folded in place.
    T tmp[kLanes<T>];
    for (int64_t l = 0; l < kLanes<T>; ++l) tmp[l] = in[e].v[l];
    for (int64_t half = kLanes<T> / 2; half >= 1; half /= 2) {
      for (int64_t l = 0; l < half; ++l) tmp[l] += tmp[l + half];
    }
    out.v[e] = tmp[0];
  }
  return out;
}

#endif

}  // namespace fusedgrad::trainer
