// The engine's input-derivative pass (mlp_engine.h, "Input derivatives"): the
// forward and backward epilogues on jets.
//
// Layout: a block of nb rows (samples) holds, for every layer, S = 1 + T1 + T2
// stacked parts — part 0 the values (h or a), part 1 + i the tangents ∂/∂x_d
// for d = tdim[i], part 1 + T1 + j (order 2) the second derivatives ∂²/∂x_d²
// for d = sdim[j] — each part laid out as the plain pass lays out a layer: its
// nb rows padded to whole lane vectors (mlp_engine_cpu.cpp), or, where
// kernels::rows_in_lanes picks it (Rows), its features as lines of C ≥ nb
// values (mlp_rows_cpu.cpp: every product over the lines, the weight gradient
// a dot over each part's lines; columns past nb zero in every a and δ). The forward carries every part (T1 = D, T2 = order
// 2 ? D : 0); a backward may drop the parts Pass::carry_du / carry_d2u leave out. A layer's
// product then maps all S·nb rows in one call of the same micro-kernel
// (engine_kernels.h); only the value rows get the bias. The activation step
// couples the parts of a row: it reads act and its first three derivatives at
// the value h (the activation table's jet()) and writes
//
//   a = act(h),   ∂a_d = act' ∂h_d,   ∂²a_d = act'' ∂h_d² + act' ∂²h_d
//
// The backward recomputes the forward of the block (nothing of size N is kept)
// and reverses each step: the products transposed, the activation step by the
// formulas of mlp_engine.h (jet_forward_step, jet_backward_step: one copy for
// both layouts). Sums over rows follow the plain pass (in T within a block, in
// double across blocks, chunks fixed by the row count), so results are the same
// bit for bit for any number of threads.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "../common/lane_vector.h"   // add_lane_sums, lane_row_sum (the rows layout's weight gradient)
#include "../cpu/activation_cpu.h"   // activation_jet_n: the activation table's jet() in vector loops
#include "engine_kernels.h"
#include "mlp_engine.h"

namespace fusedgrad::engine {
namespace {

using namespace kernels;

// The activation step of a hidden layer on jets, forward, over parts of n values each (part p of h
// and a at p·n): a = act(h) and act's first three derivatives j1, j2, j3 at h, then
// ∂a_d = j1 ∂h_d and ∂²a_d = j2 ∂h_d² + j1 ∂²h_d.
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_step(Activation act, const T* h, T* a, T* j1, T* j2, T* j3, int64_t n,
                                           int64_t T1, const std::vector<int64_t>& second_of) {
  activation_jet_n(act, h, a, j1, j2, j3, n);
  for (int64_t i = 0; i < T1; ++i) {
    const T* dh = h + (1 + i) * n;
    T* da = a + (1 + i) * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) da[k] = j1[k] * dh[k];
    if (second_of[i] >= 0) {
      const T* d2h = h + (1 + T1 + second_of[i]) * n;
      T* d2a = a + (1 + T1 + second_of[i]) * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) d2a[k] = j2[k] * dh[k] * dh[k] + j1[k] * d2h[k];
    }
  }
}

// The same step reversed, in place: g holds ḡ (the gradient of a's parts) and becomes δ (that of h's).
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_step(T* g, const T* h, const T* j1, const T* j2, const T* j3, int64_t n,
                                            int64_t T1, const std::vector<int64_t>& second_of) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) g[k] *= j1[k];
  for (int64_t i = 0; i < T1; ++i) {
    const T* dh = h + (1 + i) * n;
    T* g1 = g + (1 + i) * n;
    if (second_of[i] >= 0) {
      const T* d2h = h + (1 + T1 + second_of[i]) * n;
      T* g2 = g + (1 + T1 + second_of[i]) * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        g[k] += g1[k] * j2[k] * dh[k] + g2[k] * (j3[k] * dh[k] * dh[k] + j2[k] * d2h[k]);
        g1[k] = g1[k] * j1[k] + T(2) * g2[k] * j2[k] * dh[k];
        g2[k] *= j1[k];
      }
    } else {
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        g[k] += g1[k] * j2[k] * dh[k];
        g1[k] *= j1[k];
      }
    }
  }
}

template <typename T, int VB, bool Rows>
struct JetPlan {
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  int64_t L, D, O, S, T1, T2, B, blocks, chunks, lanes, widest = 0;
  const int64_t max_nv = tile_vectors_max();  // the most vectors a tile spans on this CPU
  std::vector<int64_t> np;          // the widths as a part holds them: padded to whole vectors, or (Rows) as they are
  std::vector<int64_t> tdim, sdim;  // the dimension of each tangent / second-derivative part
  std::vector<int64_t> second_of;   // per tangent part: its second-derivative part, or −1
  std::vector<const T*> WT, Wp, bp;  // the features layout's packed weights (Rows reads pass.W, pass.b in place)
  std::vector<T> packed;
  std::vector<int64_t> a_off, h_off, j_off;  // per block: parts of a_l (l < L), h_l (l ≥ 1), act's jet at h_l
  int64_t d0_off, d1_off, dw_off, db_off, scratch_size;

  explicit JetPlan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape) {
    L = s.layers();
    D = s.in();
    O = s.out();
    for (int64_t d = 0; d < D; ++d) {
      const bool second = p.order == 2 && (!p.carry_d2u || p.carry_d2u[d]);
      if (!second && p.carry_du && !p.carry_du[d]) continue;
      second_of.push_back(second ? static_cast<int64_t>(sdim.size()) : -1);
      tdim.push_back(d);
      if (second) sdim.push_back(d);
    }
    T1 = static_cast<int64_t>(tdim.size());
    T2 = static_cast<int64_t>(sdim.size());
    S = 1 + T1 + T2;
    lanes = VB / sizeof(T);
    if constexpr (Rows) {
      np = s.width;
    } else {
      pack_weights(s, p.W, p.b, lanes, np, WT, Wp, bp, packed);
    }
    int64_t per_row = 0;
    for (int64_t l = 0; l <= L; ++l) {
      widest = std::max(widest, np[l]);
      if (l < L) per_row += S * np[l];               // a_l
      if (l > 0) per_row += S * np[l];               // h_l
      if (l > 0 && l < L) per_row += 3 * np[l];      // the first three derivatives of act at h_l
    }
    per_row += 2 * S * widest;  // two δ buffers
    // Rows: a multiple of every lane count, so that a block's lines are B values at most.
    const int64_t multiple = Rows ? 16 : 8;
    B = std::clamp<int64_t>(kScratchBytes / (static_cast<int64_t>(sizeof(T)) * per_row) / multiple * multiple,
                            multiple, 256);
    blocks = std::max<int64_t>((p.count + B - 1) / B, 1);
    chunks = std::min(blocks, kMaxChunks);
    int64_t off = 0;
    a_off.assign(L + 1, 0);
    h_off.assign(L + 1, 0);
    j_off.assign(L + 1, 0);
    for (int64_t l = 0; l <= L; ++l) {
      if (l < L) {
        a_off[l] = off;
        off += S * B * np[l];
      }
      if (l > 0) {
        h_off[l] = off;
        off += S * B * np[l];
      }
      if (l > 0 && l < L) {
        j_off[l] = off;
        off += 3 * B * np[l];
      }
    }
    d0_off = off;
    off += S * B * widest;
    d1_off = off;
    off += S * B * widest;
    dw_off = off;  // a layer's weight gradient in T, or (Rows) the lane partials of three of its rows
    int64_t dw_max = 3 * widest * lanes;
    for (int64_t l = 0; l < L && !Rows; ++l) dw_max = std::max(dw_max, s.width[l + 1] * np[l]);
    off += dw_max;
    db_off = off;
    off += widest;
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // The values one part of layer l holds for a block of nb rows: nb rows of np[l], or (Rows) np[l] lines of C.
  int64_t part_size(int64_t l, int64_t nb) const { return Rows ? np[l] * padded(nb, lanes) : nb * np[l]; }
  // Where row r's feature j sits in a part of layer l.
  int64_t at(int64_t r, int64_t j, int64_t l, int64_t nb) const {
    return Rows ? j * padded(nb, lanes) + r : r * np[l] + j;
  }

  // Rows: zeroes the columns past nb of every line of S parts of n lines.
  void zero_columns(T* parts, int64_t n, int64_t nb) const {
    const int64_t C = padded(nb, lanes);
    if (!Rows || nb == C) return;
    for (int64_t line = 0; line < S * n; ++line) std::fill(parts + line * C + nb, parts + (line + 1) * C, T(0));
  }

  // h_l's parts from a_{l−1}'s (the bias on the values only); the features layout maps all the parts'
  // rows in one call.
  FUSEDGRAD_CPU_INLINE void forward_product(int64_t l, int64_t nb, const T* in, T* h) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      for (int64_t q = 0; q < S; ++q) {
        product<T, VB>(n_out, n_in, pass.W[l], n_in, 1, in + q * n_in * C, C, C, nullptr, h + q * n_out * C, C,
                       max_nv, q == 0 ? pass.b[l] : nullptr);
      }
    } else {
      const int64_t ni = np[l], no = np[l + 1];
      product<T, VB>(nb, n_in, in, ni, 1, WT[l], no, no, bp[l], h, no, max_nv);                           // values
      product<T, VB>((S - 1) * nb, n_in, in + nb * ni, ni, 1, WT[l], no, no, nullptr, h + nb * no, no, max_nv);  // parts
    }
  }

  // δ of a_{l−1}'s first `parts` parts from δ of h_l's.
  FUSEDGRAD_CPU_INLINE void backward_product(int64_t l, int64_t nb, int64_t parts, const T* delta, T* out) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      for (int64_t q = 0; q < parts; ++q) {
        product<T, VB>(n_in, n_out, pass.W[l], 1, n_in, delta + q * n_out * C, C, C, nullptr, out + q * n_in * C, C,
                       max_nv);
      }
    } else {
      product<T, VB>(parts * nb, n_out, delta, np[l + 1], 1, Wp[l], np[l], np[l], nullptr, out, np[l], max_nv);
    }
  }

  // dW_l += Σ over all S·nb jet rows δᵀ a_{l−1}; db_l over the value rows only (the parts have no bias).
  FUSEDGRAD_CPU_INLINE void add_param_grads(int64_t l, int64_t nb, const T* delta, const T* a, T* scratch,
                                            double* sums) const {
    const int64_t n_in = s.width[l], n_out = s.width[l + 1];
    if constexpr (Rows) {
      const int64_t C = padded(nb, lanes);
      T* part = scratch + dw_off;
      for (int64_t j0 = 0; j0 < n_out; j0 += 3) {
        const int64_t rows = std::min<int64_t>(3, n_out - j0);
        dot_rows<T, VB>(rows, n_in, C, S, delta + j0 * C, n_out * C, a, n_in * C, part);
        add_lane_sums<VB>(part, rows * n_in, sums + lay.dw[l] + j0 * n_in);
      }
      if (lay.db[l] >= 0) {
        for (int64_t j = 0; j < n_out; ++j) lane_row_sum<VB>(delta + j * C, C, part + j * lanes);
        add_lane_sums<VB>(part, n_out, sums + lay.db[l]);
      }
    } else {
      const int64_t ni = np[l], no = np[l + 1];
      T* dw = scratch + dw_off;
      product<T, VB>(n_out, S * nb, delta, 1, no, a, ni, ni, nullptr, dw, ni, max_nv);
      double* dst = sums + lay.dw[l];
      for (int64_t j = 0; j < n_out; ++j) {
        for (int64_t k = 0; k < n_in; ++k) dst[j * n_in + k] += static_cast<double>(dw[j * ni + k]);
      }
      if (lay.db[l] >= 0) {
        T* db = scratch + db_off;
        column_sums<T, VB>(delta, nb, no, db);
        double* dbs = sums + lay.db[l];
        for (int64_t j = 0; j < n_out; ++j) dbs[j] += static_cast<double>(db[j]);
      }
    }
  }

  // The forward of rows r0 .. r0 + nb − 1 on jets: h_L's parts at scratch + h_off[L].
  FUSEDGRAD_CPU_INLINE void forward(T* scratch, int64_t r0, int64_t nb) const {
    T* a0 = scratch + a_off[0];
    const int64_t n0 = part_size(0, nb);
    std::fill(a0, a0 + S * n0, T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      for (int64_t k = 0; k < D; ++k) a0[at(r, k, 0, nb)] = src[k];
      for (int64_t i = 0; i < T1; ++i) a0[(1 + i) * n0 + at(r, tdim[i], 0, nb)] = T(1);  // ∂x/∂x_d = e_d
    }
    for (int64_t l = 0; l < L; ++l) {
      T* h = scratch + h_off[l + 1];
      forward_product(l, nb, scratch + a_off[l], h);
      if (l + 1 == L) break;
      T* a = scratch + a_off[l + 1];
      T* j1 = scratch + j_off[l + 1];
      const int64_t jstride = B * np[l + 1];
      jet_forward_step(s.act, h, a, j1, j1 + jstride, j1 + 2 * jstride, part_size(l + 1, nb), T1, second_of);
      zero_columns(a, s.width[l + 1], nb);
    }
  }

  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    forward(scratch, r0, nb);
    const T* hL = scratch + h_off[L];
    const int64_t nL = part_size(L, nb);
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t dst = row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) {
          const int64_t e = at(r, o, L, nb);
          pass.pred[dst + o] = hL[e];
          for (int64_t i = 0; i < T1; ++i) pass.du[(dst + o) * D + tdim[i]] = hL[(1 + i) * nL + e];
          for (int64_t j = 0; j < T2; ++j) pass.d2u[(dst + o) * D + sdim[j]] = hL[(1 + T1 + j) * nL + e];
        }
      }
      return;
    }
    // δ of h_L's parts: the incoming gradients (zeros where not given), padding zero.
    T* delta = scratch + d0_off;
    std::fill(delta, delta + S * nL, T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t src = row(r0 + r) * O;
      for (int64_t o = 0; o < O; ++o) {
        const int64_t e = at(r, o, L, nb);
        if (pass.grad_out) delta[e] = pass.grad_out[src + o];
        if (pass.grad_du) {
          for (int64_t i = 0; i < T1; ++i) delta[(1 + i) * nL + e] = pass.grad_du[(src + o) * D + tdim[i]];
        }
        if (pass.grad_d2u) {
          for (int64_t j = 0; j < T2; ++j) delta[(1 + T1 + j) * nL + e] = pass.grad_d2u[(src + o) * D + sdim[j]];
        }
      }
    }
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      if (pass.param_grads) add_param_grads(l, nb, delta, scratch + a_off[l], scratch, sums);
      if (l == 0) {
        // x reaches only the value rows of a_0 (its parts are the constants e_d and 0).
        if (pass.dx) {
          backward_product(0, nb, 1, delta, next);
          for (int64_t r = 0; r < nb; ++r) {
            for (int64_t k = 0; k < D; ++k) pass.dx[row(r0 + r) * D + k] = next[at(r, k, 0, nb)];
          }
        }
        break;
      }
      backward_product(l, nb, S, delta, next);
      const T* j1 = scratch + j_off[l];
      const int64_t jstride = B * np[l];
      jet_backward_step(next, scratch + h_off[l], j1, j1 + jstride, j1 + 2 * jstride, part_size(l, nb), T1,
                        second_of);
      zero_columns(next, s.width[l], nb);
      std::swap(delta, next);
    }
  }

  // Chunk ch of the pass: its rows, block by block, summed into chunk_sums.
  FUSEDGRAD_CPU_INLINE void chunk(int64_t ch, double* chunk_sums) const {
    run_chunk_blocks<T>(*this, ch, chunk_sums);
  }
};

// The clones' entry points: one chunk, compiled per CPU level, per layout.
#define FUSEDGRAD_JET_CHUNK(T, VB, ROWS) \
  FUSEDGRAD_CPU_CLONES void jet_chunk(const JetPlan<T, VB, ROWS>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_JET_CHUNK(float, 64, false)
FUSEDGRAD_JET_CHUNK(float, 32, false)
FUSEDGRAD_JET_CHUNK(double, 64, false)
FUSEDGRAD_JET_CHUNK(double, 32, false)
FUSEDGRAD_JET_CHUNK(float, 64, true)
FUSEDGRAD_JET_CHUNK(float, 32, true)
FUSEDGRAD_JET_CHUNK(double, 64, true)
FUSEDGRAD_JET_CHUNK(double, 32, true)
#undef FUSEDGRAD_JET_CHUNK

template <typename T, int VB, bool Rows>
void run_jet_plan(const Pass<T>& pass) {
  const JetPlan<T, VB, Rows> plan(pass);
  const bool threads = pass.parallel && plan.chunks > 1 &&
      pass.count * plan.S * pass.shape->macs_per_row() >= kMinParallelMacs;
  double* sums = pass.epilogue == Epilogue::Backward ? pass.sums : nullptr;
  run_chunks(plan.chunks, plan.lay.size, threads, pass.runner, sums,
             [&](int64_t ch, double* chunk_sums) { jet_chunk(plan, ch, chunk_sums); });
}

template <typename T>
void run_jet_pass(const Pass<T>& pass) {
  TORCH_INTERNAL_ASSERT(pass.order == 1 || pass.order == 2, "engine: jets of order ", pass.order);
  TORCH_INTERNAL_ASSERT(pass.epilogue != Epilogue::LossGrads, "engine: jets have no loss epilogue");
  if (pass.count == 0) {
    if (pass.sums) std::fill(pass.sums, pass.sums + SumLayout(*pass.shape).size, 0.0);
    return;
  }
  const bool rows = rows_in_lanes(*pass.shape, sizeof(T));
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    rows ? run_jet_plan<T, 32, true>(pass) : run_jet_plan<T, 32, false>(pass);
  } else {
    rows ? run_jet_plan<T, 64, true>(pass) : run_jet_plan<T, 64, false>(pass);
  }
}

}  // namespace

void run_jets(const Pass<float>& pass) { run_jet_pass(pass); }
void run_jets(const Pass<double>& pass) { run_jet_pass(pass); }

}  // namespace fusedgrad::engine
