// The engine's CPU building blocks, shared by its passes (mlp_engine_cpu.cpp:
// loss, forward, backward; mlp_jets_cpu.cpp: the input derivatives): lane
// vectors, the register-blocked micro-kernel `tile` and its drivers, column
// sums, and the choice of vector width. Everything here is FUSEDGRAD_CPU_INLINE,
// compiled into the CPU clones of the pass that includes it.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/cpu_vector.h"
#include "../common/lane_vector.h"  // LaneBuffer (64-byte aligned scratch), add_lane_sums, lane_row_sum
#include "mlp_engine.h"

namespace fusedgrad::engine::kernels {

constexpr int64_t kMaxChunks = 16;        // row chunks of a pass: fixed by the row count, not the threads
// Multiply-adds of a pass below which a second thread does not pay. On this
// 2-vCPU machine a 100-row depth-3 step (86 k multiply-adds) took 14.8 µs on
// one thread and, split in two, 12.5 or 25 µs on two depending on the process
// (bimodal from run to run: the barrier and the shared core); the PINN-sized
// step (2.2 M) gains from the second thread every run.
constexpr int64_t kMinParallelMacs = 1 << 18;
// Multiply-adds of a pass from which its rows are split into at least two blocks (so two chunks),
// and a thread team (thread_team.h), which costs no fork or join, runs them on two threads: the
// 100-row curve-fit step (86 k) went from 13.7 to 11.1 µs; one thread pays ~0.5 µs for the split.
constexpr int64_t kMinSplitMacs = 1 << 15;
constexpr int64_t kMinSplitRows = 16;
constexpr int64_t kScratchBytes = 192 * 1024;  // a block's intermediates: within L2

inline int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

// A vector of VB bytes of T (GCC's vector extension): 64 (one AVX-512
// register) or 32, chosen per network by vector_bytes().
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB>
using Vec = typename VecOf<T, VB>::type;

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE Vec<T, VB> load(const T* p) {
  Vec<T, VB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void store(T* p, const Vec<T, VB>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE Vec<T, VB> splat(T x) {
  Vec<T, VB> v;
#pragma GCC unroll 16
  for (int q = 0; q < static_cast<int>(VB / sizeof(T)); ++q) v[q] = x;
  return v;
}

// out[i, 0 : NV vectors] = init + Σ_{k < K} coef[i·ci + k·ck] · M[k·ldm, 0 : NV vectors] for RI rows i.
// With few accumulators (RI·NV < 8) each would wait on its own previous multiply-add (4 cycles):
// KU accumulators per output then take every KU-th k and are added at the end (a fixed order:
// the result depends on the shape, never on the threads). Measured: the 1-row tiles of a 1-wide
// input layer's weight gradient were 5 % of a 1→[20]×3→1 pass as one chain.
// Only where SplitK: the products whose outputs are per-row values (the forward, the backward of
// the data, the jets) keep one chain per output, since the tile a row falls in depends on its place in
// the block (padded rows: the leftover tiles of 4, 2, 1 rows; rows in lanes: the last column group's
// vectors), and a row's prediction must not depend on which other rows share its call — one row alone
// gives the bits it gets in a batch (scikit-learn's subset-invariance check reads exactly that).
// With row_init instead of init, row i of the tile starts from the scalar row_init[i] (a bias per
// output row: the rows-in-lanes layout of BlockLayout, below).
template <typename T, int VB, int NV, int RI, bool SplitK>
FUSEDGRAD_CPU_INLINE void tile(int64_t K, const T* FUSEDGRAD_RESTRICT coef, int64_t ci, int64_t ck,
                               const T* FUSEDGRAD_RESTRICT M, int64_t ldm, const T* FUSEDGRAD_RESTRICT init,
                               T* FUSEDGRAD_RESTRICT out, int64_t ldo, const T* FUSEDGRAD_RESTRICT row_init) {
  constexpr int64_t W = VB / sizeof(T);
  constexpr int KU = !SplitK || RI * NV >= 8 ? 1 : RI * NV >= 4 ? 2 : RI * NV >= 2 ? 4 : 8;
  Vec<T, VB> acc[KU][RI][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const Vec<T, VB> b = init ? load<T, VB>(init + v * W) : Vec<T, VB>{};
#pragma GCC unroll 8
    for (int i = 0; i < RI; ++i) {
      acc[0][i][v] = row_init ? splat<T, VB>(row_init[i]) : b;
#pragma GCC unroll 8
      for (int u = 1; u < KU; ++u) acc[u][i][v] = Vec<T, VB>{};
    }
  }
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 8
    for (int u = 0; u < KU; ++u) {
      Vec<T, VB> m[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) m[v] = load<T, VB>(M + (k + u) * ldm + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < RI; ++i) {
        const T c = coef[i * ci + (k + u) * ck];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[u][i][v] += c * m[v];
      }
    }
  }
  for (; k < K; ++k) {
    Vec<T, VB> m[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) m[v] = load<T, VB>(M + k * ldm + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < RI; ++i) {
      const T c = coef[i * ci + k * ck];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][i][v] += c * m[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RI; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      Vec<T, VB> sum = acc[0][i][v];
#pragma GCC unroll 8
      for (int u = 1; u < KU; ++u) sum += acc[u][i][v];
      store<T, VB>(out + i * ldo + v * W, sum);
    }
  }
}

// Rows 0 .. rows − 1 of out (each np wide, np a multiple of the lanes), as `tile`.
// A tile holds up to 16 accumulators: 8 rows of one vector, or 4 rows of 2–4; the
// rows left over go in tiles of 4, 2 and 1.
template <typename T, int VB, int NV, bool SplitK>
FUSEDGRAD_CPU_INLINE void tile_rows(int64_t rows, int64_t K, const T* coef, int64_t ci, int64_t ck, const T* M,
                                    int64_t ldm, const T* init, T* out, int64_t ldo, const T* row_init) {
  constexpr int RI = NV == 1 ? 8 : 4;
  auto at = [&](int64_t i) { return row_init ? row_init + i : nullptr; };
  int64_t i = 0;
  for (; i + RI <= rows; i += RI) {
    tile<T, VB, NV, RI, SplitK>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo, at(i));
  }
  if constexpr (RI == 8) {
    if (i + 4 <= rows) {
      tile<T, VB, NV, 4, SplitK>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo, at(i));
      i += 4;
    }
  }
  if (i + 2 <= rows) {
    tile<T, VB, NV, 2, SplitK>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo, at(i));
    i += 2;
  }
  if (i < rows) tile<T, VB, NV, 1, SplitK>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo, at(i));
}

// The most vectors a tile spans (`product`'s max_nv): 4 with AVX-512's 32 registers, 3 with AVX2's 16
// — a tile of 4 rows × 4 vectors holds 16 accumulators and wants 21 registers with its loads and
// broadcast, and spilled (AVX2-only EPYC, Trainer.fit, interleaved: 4096×32→[64]×4→8 relu 4,948 →
// 3,387 µs a step with 3, 4,266 with 2; 16384×64→[128]×4→16 81.5 → 51.4 ms with 3, 66.0 with 2).
inline int64_t tile_vectors_max() { return cpu_vector_bytes() == 64 ? 4 : 3; }

template <typename T, int VB, bool SplitK = true>
FUSEDGRAD_CPU_INLINE void product(int64_t rows, int64_t K, const T* coef, int64_t ci, int64_t ck, const T* M,
                                  int64_t ldm, int64_t np, const T* init, T* out, int64_t ldo, int64_t max_nv,
                                  const T* row_init = nullptr) {
  constexpr int64_t W = VB / sizeof(T);
  for (int64_t c0 = 0; c0 < np; c0 += std::min<int64_t>(max_nv, (np - c0) / W) * W) {
    const T* Mc = M + c0;
    const T* ic = init ? init + c0 : nullptr;
    T* oc = out + c0;
    switch (std::min<int64_t>(max_nv, (np - c0) / W)) {
      case 1: tile_rows<T, VB, 1, SplitK>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo, row_init); break;
      case 2: tile_rows<T, VB, 2, SplitK>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo, row_init); break;
      case 3: tile_rows<T, VB, 3, SplitK>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo, row_init); break;
      default: tile_rows<T, VB, 4, SplitK>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo, row_init); break;
    }
  }
}

// The weight gradient of the rows-in-lanes layout (BlockLayout, below), a dot of two
// lines of C values (a multiple of the lanes) over each of `parts` parts:
// partials[(i·n_k + k)·W + lane], i < JR, k < KR: lane-wise Σ_part Σ_c P[part·pp + i·C + c] · Q[part·qp + k·C + c].
// Nine independent chains of multiply-adds hide their latency.
template <typename T, int VB, int JR, int KR>
FUSEDGRAD_CPU_INLINE void dot_tile(int64_t C, int64_t parts, const T* FUSEDGRAD_RESTRICT P, int64_t pp,
                                   const T* FUSEDGRAD_RESTRICT Q, int64_t qp, T* FUSEDGRAD_RESTRICT partials,
                                   int64_t n_k) {
  constexpr int64_t W = VB / sizeof(T);
  Vec<T, VB> acc[JR][KR] = {};
  for (int64_t part = 0; part < parts; ++part) {
    const T* Pp = P + part * pp;
    const T* Qp = Q + part * qp;
    for (int64_t c = 0; c < C; c += W) {
      Vec<T, VB> p[JR], q[KR];
#pragma GCC unroll 4
      for (int i = 0; i < JR; ++i) p[i] = load<T, VB>(Pp + i * C + c);
#pragma GCC unroll 4
      for (int k = 0; k < KR; ++k) q[k] = load<T, VB>(Qp + k * C + c);
#pragma GCC unroll 4
      for (int i = 0; i < JR; ++i) {
#pragma GCC unroll 4
        for (int k = 0; k < KR; ++k) acc[i][k] += p[i] * q[k];
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < JR; ++i) {
#pragma GCC unroll 4
    for (int k = 0; k < KR; ++k) store<T, VB>(partials + (i * n_k + k) * W, acc[i][k]);
  }
}

// out[j·L + l] = lane partials of line j (a + j·ld, n values, n a whole number of lane vectors) for
// j < lines, each the sum lane_row_sum takes, in its order (the same bits), four lines at a time:
// one line's adds form a single chain, each waiting on the last (3–4 cycles). Measured against one
// line at a time (the bias gradients of the rows-in-lanes layout; Trainer.fit, float32, the two
// interleaved in one process, AVX-512 EPYC): 2540×2→[20]×3→1 tanh 213.3 → 210.7 µs a step on one
// thread, 121.6 → 120.0 on two; a K = 64 ensemble of 100×1→[20]×3→1 11.55 → 11.40 and 5.76 → 5.69 µs
// a model-step.
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void lane_row_sums(const T* a, int64_t lines, int64_t ld, int64_t n, T* out) {
  constexpr int64_t L = kLanes<T, VB>;
  int64_t j = 0;
  for (; j + 4 <= lines; j += 4) {
    LaneVec<T, VB> acc[4];
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) acc[q] = lanes_splat<T, VB>(T(0));
    for (int64_t r = 0; r < n; r += L) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) acc[q] += lanes_load<T, VB>(a + (j + q) * ld + r);
    }
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) lanes_store(out + (j + q) * L, acc[q]);
  }
  for (; j < lines; ++j) lane_row_sum<VB>(a + j * ld, n, out + j * L);
}

template <typename T, int VB, int JR>
FUSEDGRAD_CPU_INLINE void dot_rows_of(int64_t K, int64_t C, int64_t parts, const T* P, int64_t pp, const T* Q,
                                      int64_t qp, T* partials) {
  constexpr int64_t W = VB / sizeof(T);
  int64_t k = 0;
  for (; k + 3 <= K; k += 3) dot_tile<T, VB, JR, 3>(C, parts, P, pp, Q + k * C, qp, partials + k * W, K);
  if (K - k == 2) dot_tile<T, VB, JR, 2>(C, parts, P, pp, Q + k * C, qp, partials + k * W, K);
  if (K - k == 1) dot_tile<T, VB, JR, 1>(C, parts, P, pp, Q + k * C, qp, partials + k * W, K);
}

// The lane partials of `rows` ≤ 3 rows of dW (every k < K) from `rows` lines of δ at P and the K lines
// of a at Q, in each of `parts` parts (P + part·pp, Q + part·qp).
template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void dot_rows(int64_t rows, int64_t K, int64_t C, int64_t parts, const T* P, int64_t pp,
                                   const T* Q, int64_t qp, T* partials) {
  if (rows == 3) dot_rows_of<T, VB, 3>(K, C, parts, P, pp, Q, qp, partials);
  if (rows == 2) dot_rows_of<T, VB, 2>(K, C, parts, P, pp, Q, qp, partials);
  if (rows == 1) dot_rows_of<T, VB, 1>(K, C, parts, P, pp, Q, qp, partials);
}

// Column sums of rows 0 .. rows − 1 of a (rows × np) block into out (np), in
// registers: four rows' vectors in flight, then added in a fixed order.
template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void column_sums(const T* a, int64_t rows, int64_t np, T* out) {
  constexpr int64_t W = VB / sizeof(T);
  for (int64_t c = 0; c < np; c += W) {
    Vec<T, VB> s[4] = {};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) s[q] += load<T, VB>(a + (r + q) * np + c);
    }
    for (; r < rows; ++r) s[0] += load<T, VB>(a + r * np + c);
    store<T, VB>(out + c, (s[0] + s[1]) + (s[2] + s[3]));
  }
}

// 32-byte vectors where the CPU has no wider ones: a 64-byte vector in the AVX2
// clone is two ymm registers, so a tile's 16 accumulators want 32 of its 16
// registers and spill (4096×32→[64]×4→8 relu, loss and backward, AVX2-only
// EPYC: 60 ms a call with 64-byte vectors, 4.8 ms native torch). Otherwise
// 32 where a network's padded widths are much shorter with 32-byte vectors than
// with 64-byte ones (narrow layers: 20 floats pad to 32 with 16 lanes, to 24
// with 8); products and activations run over the padded widths.
inline int vector_bytes_for(const NetShape& s, int64_t elt) {
  if (cpu_vector_bytes() < 64) return 32;
  int64_t with64 = 0, with32 = 0;
  for (int64_t n : s.width) {
    with64 += padded(n, 64 / elt);
    with32 += padded(n, 32 / elt);
  }
  return with64 * 10 > with32 * 11 ? 32 : 64;
}

// Whether a network's blocks hold their rows in the lanes (BlockLayout: a_l stored (n_l, rows),
// every product a loop over rows) instead of its features (mlp_engine_cpu.cpp: a_l stored (rows,
// n_l padded to whole vectors)). The features layout pads each width to whole lane vectors and its
// products run over the padding: a 1→[20]×3→1 network does 1 144 multiply-adds a row forward for
// its 840 (20 → 24 lanes, 1 → 8), its activations 72 values for 60. Rows in lanes pad nothing but a
// block's last vector of rows. Taken where the padding adds more than a tenth to the products.
inline bool rows_in_lanes(const NetShape& s, int64_t elt) {
  const int64_t lanes = vector_bytes_for(s, elt) / elt;
  int64_t padded_macs = 0;
  for (int64_t l = 0; l < s.layers(); ++l) {
    padded_macs += s.width[l] * padded(s.width[l + 1], lanes) + s.width[l + 1] * padded(s.width[l], lanes);
  }
  return padded_macs * 10 > 2 * s.macs_per_row() * 11;
}

// A network's weights in the two padded layouts `product` reads — W_lᵀ
// (n_l × np_{l+1}) for the forward, W_l (n_{l+1} × np_l) for backward-data —
// and its biases (np_{l+1}, or null), in `storage`, every segment starting on
// a lane-vector boundary; np: the widths padded to whole lane vectors.
template <typename T>
void pack_weights(const NetShape& s, const std::vector<const T*>& W, const std::vector<const T*>& b, int64_t lanes,
                  c10::SmallVectorImpl<int64_t>& np, std::vector<const T*>& WT, std::vector<const T*>& Wp,
                  std::vector<const T*>& bp, std::vector<T>& storage) {
  const int64_t L = s.layers();
  np.resize(L + 1);
  for (int64_t l = 0; l <= L; ++l) np[l] = padded(s.width[l], lanes);
  int64_t total = 0;
  for (int64_t l = 0; l < L; ++l) total += s.width[l] * np[l + 1] + s.width[l + 1] * np[l] + np[l + 1];
  storage.assign(static_cast<size_t>(total + lanes), T(0));
  T* base = storage.data();
  base += (lanes - (reinterpret_cast<uintptr_t>(base) / sizeof(T)) % lanes) % lanes;
  WT.resize(L);
  Wp.resize(L);
  bp.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    const T* w = W[l];
    T* wt = base;
    base += n_in * np[l + 1];
    T* wp = base;
    base += n_out * np[l];
    for (int64_t j = 0; j < n_out; ++j) {
      for (int64_t k = 0; k < n_in; ++k) {
        wt[k * np[l + 1] + j] = w[j * n_in + k];
        wp[j * np[l] + k] = w[j * n_in + k];
      }
    }
    WT[l] = wt;
    Wp[l] = wp;
    if (b[l]) {
      std::copy(b[l], b[l] + n_out, base);
      bp[l] = base;
    } else {
      bp[l] = nullptr;
    }
    base += np[l + 1];
  }
}

// How a block holds a layer's quantities, and the three products of a layer on it — one copy for
// the plain pass (mlp_engine_cpu.cpp) and the jet pass (mlp_jets_cpu.cpp), whose blocks hold S ≥ 1
// parts of each quantity, part q at q · part_size (the plain pass: S = 1).
//
// Padded rows (Rows = false): row r of a part is np_l values (n_l padded to whole lane vectors), and
//
//   forward          h[r, :]   = b + Σ_k a[r, k] · W_lᵀ[k, :]        (W_lᵀ packed, padded)
//   backward-data    δ'[r, :]  =     Σ_j δ[r, j]   · W_l[j, :]        (W_l packed, padded)
//   weight gradient  dW[j, :]  =     Σ_r δ[r, j]   · a[r, :]          (over every part's rows)
//
// all on `product`; padded lanes of the weights and biases are zero, so those of h, δ and g are
// zero and never reach a result. Rows in lanes (Rows = true, kernels::rows_in_lanes): feature j of
// a part is a line of C values, one per row (C = nb rounded up to whole vectors), and
//
//   forward          hᵀ[j, :]  = b[j] + Σ_k W_l[j, k] · aᵀ[k, :]     (W_l and b_l read where they lie)
//   backward-data    δ'ᵀ[k, :] =        Σ_j W_l[j, k] · δᵀ[j, :]
//   weight gradient  dW[j, k]  =        Σ_r δᵀ[j, r] · aᵀ[k, r]      (lane-wise dots, dot_rows)
//
// the columns past nb zero in x and ∂L/∂p and zeroed after each activation step in every a and δ
// (zero_columns), so they add exactly zero to every sum.
template <typename T, int VB, bool Rows>
struct BlockLayout {
  const NetShape& s;
  const std::vector<const T*>& W;  // the pass's weights (n_{l+1}, n_l) and biases (or null)
  const std::vector<const T*>& b;
  const int64_t lanes = VB / sizeof(T);
  const int64_t max_nv = tile_vectors_max();  // the most vectors a tile spans on this CPU
  c10::SmallVector<int64_t, 8> np;          // widths as a row holds them: padded, or (Rows) as they are
  std::vector<const T*> WT, Wp, bp;         // padded rows: W_lᵀ (n_l × np_{l+1}), W_l (n_{l+1} × np_l), b_l
  std::vector<T> packed;                    // storage of WT, Wp, bp

  BlockLayout(const NetShape& shape, const std::vector<const T*>& weights, const std::vector<const T*>& biases)
      : s(shape), W(weights), b(biases) {
    if constexpr (Rows) {
      np.assign(s.width.begin(), s.width.end());
    } else {
      pack_weights(s, W, b, lanes, np, WT, Wp, bp, packed);
    }
  }

  // Scratch (T's) a layer-gradient step needs (weight_grads' `work`) for a block.
  int64_t work_size() const {
    int64_t widest = 0, dw = 0;
    for (int64_t l = 0; l < s.layers(); ++l) {
      widest = std::max({widest, s.width[l], s.width[l + 1]});
      dw = std::max(dw, s.width[l + 1] * np[l]);
    }
    return Rows ? 3 * widest * lanes : dw + widest;
  }

  // The values one part of layer l's quantity holds for a block of nb rows.
  int64_t part_size(int64_t l, int64_t nb) const { return Rows ? np[l] * padded(nb, lanes) : nb * np[l]; }
  // Where row r's feature j sits in a part of layer l.
  int64_t at(int64_t r, int64_t j, int64_t l, int64_t nb) const {
    return Rows ? j * padded(nb, lanes) + r : r * np[l] + j;
  }

  // Rows: zeroes the columns past nb of `parts` parts of layer l's quantity. They are the tail of each
  // line's last vector: one masked store a line (a fill of a few values a line, ~120 a 52-row block of
  // the curve fit, cost more).
  FUSEDGRAD_CPU_INLINE void zero_columns(T* q, int64_t l, int64_t parts, int64_t nb) const {
    const int64_t C = padded(nb, lanes);
    if (!Rows || nb == C) return;
    using Bits = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
    constexpr int W = VB / sizeof(T);
    const int64_t kept = nb - (C - W);  // the lanes of the last vector that hold rows
    Vec<Bits, VB> keep;
#pragma GCC unroll 16
    for (int lane = 0; lane < W; ++lane) keep[lane] = lane < kept ? Bits(-1) : Bits(0);
    for (int64_t line = 0; line < parts * s.width[l]; ++line) {
      T* last = q + (line + 1) * C - W;
      Vec<Bits, VB> v;
      std::memcpy(&v, last, VB);
      v &= keep;
      std::memcpy(last, &v, VB);
    }
  }

  // h_l's parts from a_{l−1}'s (the bias on part 0, the values, only).
  FUSEDGRAD_CPU_INLINE void forward_product(int64_t l, int64_t nb, int64_t parts, const T* in, T* h) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      for (int64_t q = 0; q < parts; ++q) {
        product<T, VB, false>(n_out, n_in, W[l], n_in, 1, in + q * n_in * C, C, C, nullptr, h + q * n_out * C, C, max_nv,
                       q == 0 ? b[l] : nullptr);
      }
    } else {
      const int64_t ni = np[l], no = np[l + 1];
      product<T, VB, false>(nb, n_in, in, ni, 1, WT[l], no, no, bp[l], h, no, max_nv);  // the values
      if (parts > 1) {  // every other part's rows in one call
        product<T, VB, false>((parts - 1) * nb, n_in, in + nb * ni, ni, 1, WT[l], no, no, nullptr, h + nb * no, no, max_nv);
      }
    }
  }

  // δ of a_{l−1}'s first `parts` parts from δ of h_l's.
  FUSEDGRAD_CPU_INLINE void backward_product(int64_t l, int64_t nb, int64_t parts, const T* delta, T* out) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      for (int64_t q = 0; q < parts; ++q) {
        product<T, VB, false>(n_in, n_out, W[l], 1, n_in, delta + q * n_out * C, C, C, nullptr, out + q * n_in * C, C,
                       max_nv);
      }
    } else {
      product<T, VB, false>(parts * nb, n_out, delta, np[l + 1], 1, Wp[l], np[l], np[l], nullptr, out, np[l], max_nv);
    }
  }

  // dW_l += Σ over the rows of all `parts` parts δᵀ a_{l−1} (dw: n_{l+1} × n_l doubles); db_l (or null)
  // += Σ over the value rows of δ (the other parts have no bias). `work`: work_size() T's.
  FUSEDGRAD_CPU_INLINE void weight_grads(int64_t l, int64_t nb, int64_t parts, const T* delta, const T* a, T* work,
                                         double* dw, double* db) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      for (int64_t j0 = 0; j0 < n_out; j0 += 3) {
        const int64_t rows = std::min<int64_t>(3, n_out - j0);
        dot_rows<T, VB>(rows, n_in, C, parts, delta + j0 * C, n_out * C, a, n_in * C, work);
        add_lane_sums<VB>(work, rows * n_in, dw + j0 * n_in);
      }
      if (db) {
        lane_row_sums<VB>(delta, n_out, C, C, work);
        add_lane_sums<VB>(work, n_out, db);
      }
    } else {
      const int64_t ni = np[l], no = np[l + 1];
      product<T, VB>(n_out, parts * nb, delta, 1, no, a, ni, ni, nullptr, work, ni, max_nv);
      for (int64_t j = 0; j < n_out; ++j) {
        for (int64_t k = 0; k < n_in; ++k) dw[j * n_in + k] += static_cast<double>(work[j * ni + k]);
      }
      if (db) {
        T* sums = work + n_out * ni;
        column_sums<T, VB>(delta, nb, no, sums);
        for (int64_t j = 0; j < n_out; ++j) db[j] += static_cast<double>(sums[j]);
      }
    }
  }
};

// The CPU clones' entry points of a plan template PLAN<T, VB, Rows> (the plain pass's, the jet
// pass's): NAME(plan, chunk, sums) runs one chunk, compiled per CPU level for every element type,
// vector width and layout — the plan's block inlines into each.
#define FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, T, VB, ROWS) \
  FUSEDGRAD_CPU_CLONES void NAME(const PLAN<T, VB, ROWS>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
#define FUSEDGRAD_ENGINE_CHUNK_CLONES(NAME, PLAN)               \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, float, 64, false)    \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, float, 32, false)    \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, double, 64, false)   \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, double, 32, false)   \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, float, 64, true)     \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, float, 32, true)     \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, double, 64, true)    \
  FUSEDGRAD_ENGINE_CHUNK_CLONE(NAME, PLAN, double, 32, true)

// Chunk ch of a pass's plan (the plain pass's or the jet pass's): its rows, block by block —
// plan.block(scratch, r0, rows, chunk_sums) — on this thread's scratch of plan.scratch_size T's, with
// chunk_sums (plan.lay.size doubles, or null) zeroed first. The plan's blocks split its rows evenly
// (none much smaller than the others) and chunk ch takes a run of them: fixed by the row count, never
// by the threads. Where a block holds its rows in the lanes (PlanT::row_align = the lanes), the
// blocks split whole lane vectors of rows: each block's lines pad to whole vectors, so 100 rows in
// two blocks are 48 + 52 (13 vectors) rather than 50 + 50 (7 + 7), and no block exceeds B rows
// (B is a multiple of the lanes and blocks·B ≥ count). (A plan, not a lambda: the block must inline
// into the caller's CPU clone.)
template <typename T, typename PlanT>
FUSEDGRAD_CPU_INLINE void run_chunk_blocks(const PlanT& plan, int64_t ch, double* chunk_sums) {
  thread_local LaneBuffer<T> buffer;
  T* scratch = buffer.get(static_cast<size_t>(plan.scratch_size));
  if (chunk_sums) std::fill(chunk_sums, chunk_sums + plan.lay.size, 0.0);
  const int64_t blocks = plan.blocks, chunks = plan.chunks, count = plan.pass.count;
  const int64_t align = PlanT::row_align, vectors = (count + align - 1) / align;
  const bool whole_vectors = align > 1 && vectors >= blocks;  // else a block could be empty
  auto start = [&](int64_t b) {
    return whole_vectors ? std::min(count, vectors * b / blocks * align) : count * b / blocks;
  };
  for (int64_t b = blocks * ch / chunks; b < blocks * (ch + 1) / chunks; ++b) {
    const int64_t r0 = start(b), r1 = start(b + 1);
    plan.block(scratch, r0, r1 - r0, chunk_sums);
  }
}

// Runs chunk(ch, its sums) for the chunks 0 … chunks − 1 — on the threads when `threads` — each
// into partial sums of its own (`size` doubles, zeroed by the chunk), then adds those into `sums`
// in chunk order: the same bits for any number of threads. sums null: no sums.
// A runner (the trainer's thread team) takes the chunks instead of at::parallel_for.
template <typename ChunkFn>
void run_chunks(int64_t chunks, int64_t size, bool threads, const ChunkRunner* runner, double* sums,
                ChunkFn chunk) {
  // Each chunk's partial sums in memory of the thread that ran it (where[ch]), read once by this
  // thread to add them up. (Measured on the team's 100-row step, interleaved processes: against
  // one buffer of this thread's for every chunk, 11.6 against 11.0 µs in hours when a round trip
  // between the two vCPUs took ~100 ns, but 14.8–15.1 against 10.9–18.9 — worse than one thread's
  // 14.6 in most processes — in hours when it took ~450 ns.)
  TORCH_INTERNAL_ASSERT(chunks <= kMaxChunks, "run_chunks: ", chunks, " chunks, at most ", kMaxChunks);
  std::array<double*, kMaxChunks> where{};  // on the stack: no allocation per pass
  auto body = [&](int64_t c0, int64_t c1) {
    thread_local std::vector<double> partial;
    if (sums && partial.size() < static_cast<size_t>(chunks * size)) partial.resize(static_cast<size_t>(chunks * size));
    for (int64_t ch = c0; ch < c1; ++ch) {
      double* dst = sums ? partial.data() + ch * size : nullptr;
      chunk(ch, dst);
      where[ch] = dst;
    }
  };
  // The chunks' sums in chunk order, copied or added into `sums` — as each chunk is done, where a team
  // runs them: this thread adds up the chunks done so far while the others finish theirs (the same
  // adds in the same order). The PINN-sized fit (10 chunks of 256 rows, 2 threads, alternating
  // processes in four calm pairs): 111.4–112.0 → 110.0–110.5 µs a step; the curve fit (2 chunks) unchanged.
  int64_t merged = 0;
  auto merge = [&](int64_t ch) {
    if (ch == 0) {
      if (where[0] != sums) std::copy(where[0], where[0] + size, sums);
      return;
    }
    const double* cs = where[ch];
    for (int64_t e = 0; e < size; ++e) sums[e] += cs[e];
  };
  if (threads && runner) {
    std::array<std::atomic<bool>, kMaxChunks> done{};
    auto merge_done = [&] {
      while (merged < chunks && done[merged].load(std::memory_order_acquire)) merge(merged++);
    };
    // One reference captured: std::function keeps it inline (four, by [&], were a heap allocation a pass).
    const std::function<void()> waiting = [&merge_done] { merge_done(); };
    runner->run(
        chunks,
        [&](int64_t ch) {
          body(ch, ch + 1);
          done[ch].store(true, std::memory_order_release);  // its sums and where[ch] are written
        },
        sums ? &waiting : nullptr);
  } else if (threads) {
    at::parallel_for(0, chunks, 1, body);
  } else if (sums) {
    // On this thread alone, chunk 0 sums straight into `sums` — what the copy below would put there
    // (an ensemble's model-steps and the one-thread passes skip copying every sum once).
    chunk(0, sums);
    where[0] = sums;
    body(1, chunks);
  } else {
    body(0, chunks);
  }
  if (!sums) return;
  while (merged < chunks) merge(merged++);
}

}  // namespace fusedgrad::engine::kernels
