// The engine's input-derivative pass (mlp_engine.h, "Input derivatives"): the
// forward and backward epilogues on jets.
//
// Layout: a block of nb rows (samples) holds, for every layer, S = 1 + T1 + T2
// stacked parts — part 0 the values (h or a), part 1 + i the tangents (∂/∂x_d,
// or along the row's direction v_i), part 1 + T1 + j the second derivatives
// (∂²/∂x_d², or the mixed D²[v_p, v_q]) — each part laid out as the plain pass
// lays out a layer (its rows padded to whole lane vectors, or each feature a
// line of its rows: BlockLayout, engine_kernels.h). derivatives()' forward
// carries every part (T1 = D, T2 = order 2 ? D : 0); its backward may drop the
// parts Pass::carry_du / carry_d2u leave out. A layer's product maps every part
// with the same micro-kernel; only the values get the bias. The activation step
// couples the parts of a row: it reads act and its first three derivatives at
// the value h (the activation table's jet()) and writes
//
//   a = act(h),   ∂a_i = act' ∂h_i,   ∂²a_pq = act'' ∂h_p ∂h_q + act' ∂²h_pq
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

#include "../cpu/activation_cpu.h"   // activation_jet_n: the activation table's jet() in vector loops
#include "engine_kernels.h"           // BlockLayout: the products of a layer in either layout
#include "mlp_engine.h"

namespace fusedgrad::engine {
namespace {

using namespace kernels;

// A second-derivative part: D²h[v_p, v_q] for the tangent parts p and q (the diagonal ∂²/∂x_d² of
// derivatives(): p = q, the tangent of e_d).
struct SecondPart {
  int64_t p, q;
};

// The activation step of a hidden layer on jets, forward, over parts of n values each (part p of h
// and a at p·n): a = act(h) and act's first three derivatives j1, j2, j3 at h, then
// ∂a_i = j1 ∂h_i and ∂²a_pq = j2 ∂h_p ∂h_q + j1 ∂²h_pq. `diag[i]`: the second part (i, i) handled in
// tangent i's loop (−1: none); the other second parts follow.
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_step(Activation act, const T* h, T* a, T* j1, T* j2, T* j3, int64_t n,
                                           int64_t T1, const std::vector<int64_t>& diag,
                                           const std::vector<SecondPart>& second,
                                           const std::vector<int64_t>& mixed) {
  activation_jet_n(act, h, a, j1, j2, j3, n);
  for (int64_t i = 0; i < T1; ++i) {
    const T* dh = h + (1 + i) * n;
    T* da = a + (1 + i) * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) da[k] = j1[k] * dh[k];
    if (diag[i] >= 0) {
      const T* d2h = h + (1 + T1 + diag[i]) * n;
      T* d2a = a + (1 + T1 + diag[i]) * n;
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) d2a[k] = j2[k] * dh[k] * dh[k] + j1[k] * d2h[k];
    }
  }
  for (int64_t s : mixed) {
    const T* dp = h + (1 + second[s].p) * n;
    const T* dq = h + (1 + second[s].q) * n;
    const T* d2h = h + (1 + T1 + s) * n;
    T* d2a = a + (1 + T1 + s) * n;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) d2a[k] = j2[k] * dp[k] * dq[k] + j1[k] * d2h[k];
  }
}

// The same step reversed, in place: g holds ḡ (the gradient of a's parts) and becomes δ (that of h's):
//   δh = ḡa j1 + Σ_i ḡ∂a_i j2 ∂h_i + Σ_pq ḡ∂²a_pq (j3 ∂h_p ∂h_q + j2 ∂²h_pq)
//   δ∂h_i = ḡ∂a_i j1 + Σ_pq ḡ∂²a_pq j2 (∂h_q [p = i] + ∂h_p [q = i]),   δ∂²h_pq = ḡ∂²a_pq j1
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_step(T* g, const T* h, const T* j1, const T* j2, const T* j3, int64_t n,
                                            int64_t T1, const std::vector<int64_t>& diag,
                                            const std::vector<SecondPart>& second,
                                            const std::vector<int64_t>& mixed) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) g[k] *= j1[k];
  for (int64_t i = 0; i < T1; ++i) {
    const T* dh = h + (1 + i) * n;
    T* g1 = g + (1 + i) * n;
    if (diag[i] >= 0) {
      const T* d2h = h + (1 + T1 + diag[i]) * n;
      T* g2 = g + (1 + T1 + diag[i]) * n;
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
  // Mixed parts after every tangent's own scaling: their terms add to δ∂h_p and δ∂h_q as they are.
  for (int64_t s : mixed) {
    const T* dp = h + (1 + second[s].p) * n;
    const T* dq = h + (1 + second[s].q) * n;
    const T* d2h = h + (1 + T1 + s) * n;
    T* gp = g + (1 + second[s].p) * n;
    T* gq = g + (1 + second[s].q) * n;
    T* g2 = g + (1 + T1 + s) * n;
    if (gp == gq) {  // a repeated diagonal pair
#pragma omp simd
      for (int64_t k = 0; k < n; ++k) {
        g[k] += g2[k] * (j3[k] * dp[k] * dp[k] + j2[k] * d2h[k]);
        gp[k] += T(2) * g2[k] * j2[k] * dp[k];
        g2[k] *= j1[k];
      }
      continue;
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      g[k] += g2[k] * (j3[k] * dp[k] * dq[k] + j2[k] * d2h[k]);
      gp[k] += g2[k] * j2[k] * dq[k];
      gq[k] += g2[k] * j2[k] * dp[k];
      g2[k] *= j1[k];
    }
  }
}

template <typename T, int VB, bool Rows>
struct JetPlan {
  // Block boundaries fall on whole lane vectors of rows in the rows-in-lanes layout (run_chunk_blocks).
  static constexpr int64_t row_align = Rows ? VB / static_cast<int64_t>(sizeof(T)) : 1;
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  BlockLayout<T, VB, Rows> layout;
  int64_t L, D, O, S, T1, T2, B, blocks, chunks;
  // Each tangent / second part's column in du, d2u and their gradients, whose rows are tcols / scols wide:
  // derivatives() keeps the carried dimensions d of (·, O, D); directional jets every part of (·, O, T1 | T2).
  std::vector<int64_t> tcol, scol;
  int64_t tcols = 0, scols = 0;
  std::vector<SecondPart> second;  // per second part: its two tangent parts
  std::vector<int64_t> diag;       // per tangent part i: the first second part (i, i), or −1
  std::vector<int64_t> mixed;      // the other second parts
  std::vector<int64_t> a_off, h_off, j_off;  // per block: parts of a_l (l < L), h_l (l ≥ 1), act's jet at h_l
  int64_t d0_off, d1_off, work_off, scratch_size;

  explicit JetPlan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape), layout(*p.shape, p.W, p.b) {
    L = s.layers();
    D = s.in();
    O = s.out();
    if (p.dirs) {
      tcols = p.ndirs;
      scols = p.npairs;
      for (int64_t i = 0; i < p.ndirs; ++i) tcol.push_back(i);
      for (int64_t j = 0; j < p.npairs; ++j) {
        second.push_back({p.pairs[2 * j], p.pairs[2 * j + 1]});
        scol.push_back(j);
      }
    } else {
      tcols = scols = D;
      for (int64_t d = 0; d < D; ++d) {
        const bool sec = p.order == 2 && (!p.carry_d2u || p.carry_d2u[d]);
        if (!sec && p.carry_du && !p.carry_du[d]) continue;
        const int64_t i = static_cast<int64_t>(tcol.size());
        tcol.push_back(d);
        if (sec) {
          second.push_back({i, i});
          scol.push_back(d);
        }
      }
    }
    T1 = static_cast<int64_t>(tcol.size());
    T2 = static_cast<int64_t>(second.size());
    diag.assign(T1, -1);
    for (int64_t j = 0; j < T2; ++j) {
      if (second[j].p == second[j].q && diag[second[j].p] < 0) {
        diag[second[j].p] = j;
      } else {
        mixed.push_back(j);
      }
    }
    S = 1 + T1 + T2;
    const auto& np = layout.np;
    int64_t per_row = 0, widest = 0;
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
    work_off = off;
    off += layout.work_size();
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // The forward of rows r0 .. r0 + nb − 1 on jets: h_L's parts at scratch + h_off[L].
  FUSEDGRAD_CPU_INLINE void forward(T* scratch, int64_t r0, int64_t nb) const {
    T* a0 = scratch + a_off[0];
    const int64_t n0 = layout.part_size(0, nb);
    std::fill(a0, a0 + S * n0, T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      for (int64_t k = 0; k < D; ++k) a0[layout.at(r, k, 0, nb)] = src[k];
      if (pass.dirs) {  // the row's own directions v_i: ∂x/∂v_i = v_i
        const T* v = pass.dirs + row(r0 + r) * T1 * D;
        for (int64_t i = 0; i < T1; ++i) {
          for (int64_t k = 0; k < D; ++k) a0[(1 + i) * n0 + layout.at(r, k, 0, nb)] = v[i * D + k];
        }
      } else {
        for (int64_t i = 0; i < T1; ++i) a0[(1 + i) * n0 + layout.at(r, tcol[i], 0, nb)] = T(1);  // ∂x/∂x_d = e_d
      }
    }
    for (int64_t l = 0; l < L; ++l) {
      T* h = scratch + h_off[l + 1];
      layout.forward_product(l, nb, S, scratch + a_off[l], h);
      if (l + 1 == L) break;
      T* a = scratch + a_off[l + 1];
      T* j1 = scratch + j_off[l + 1];
      const int64_t jstride = B * layout.np[l + 1];
      jet_forward_step(s.act, h, a, j1, j1 + jstride, j1 + 2 * jstride, layout.part_size(l + 1, nb), T1, diag, second,
                       mixed);
      layout.zero_columns(a, l + 1, S, nb);
    }
  }

  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    forward(scratch, r0, nb);
    const T* hL = scratch + h_off[L];
    const int64_t nL = layout.part_size(L, nb);
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t dst = row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) {
          const int64_t e = layout.at(r, o, L, nb);
          pass.pred[dst + o] = hL[e];
          for (int64_t i = 0; i < T1; ++i) pass.du[(dst + o) * tcols + tcol[i]] = hL[(1 + i) * nL + e];
          for (int64_t j = 0; j < T2; ++j) pass.d2u[(dst + o) * scols + scol[j]] = hL[(1 + T1 + j) * nL + e];
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
        const int64_t e = layout.at(r, o, L, nb);
        if (pass.grad_out) delta[e] = pass.grad_out[src + o];
        if (pass.grad_du) {
          for (int64_t i = 0; i < T1; ++i) delta[(1 + i) * nL + e] = pass.grad_du[(src + o) * tcols + tcol[i]];
        }
        if (pass.grad_d2u) {
          for (int64_t j = 0; j < T2; ++j) delta[(1 + T1 + j) * nL + e] = pass.grad_d2u[(src + o) * scols + scol[j]];
        }
      }
    }
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      if (pass.param_grads) {
        layout.weight_grads(l, nb, S, delta, scratch + a_off[l], scratch + work_off, sums + lay.dw[l],
                            lay.db[l] >= 0 ? sums + lay.db[l] : nullptr);
      }
      if (l == 0) {
        // x reaches only the values of a_0 (its other parts are the directions and 0); the directions
        // (ddirs) the tangent parts.
        const int64_t parts = pass.ddirs ? 1 + T1 : 1;
        if (pass.dx || pass.ddirs) layout.backward_product(0, nb, parts, delta, next);
        const int64_t n0 = layout.part_size(0, nb);
        for (int64_t r = 0; r < nb && pass.dx; ++r) {
          for (int64_t k = 0; k < D; ++k) pass.dx[row(r0 + r) * D + k] = next[layout.at(r, k, 0, nb)];
        }
        for (int64_t r = 0; r < nb && pass.ddirs; ++r) {
          T* dv = pass.ddirs + row(r0 + r) * T1 * D;
          for (int64_t i = 0; i < T1; ++i) {
            for (int64_t k = 0; k < D; ++k) dv[i * D + k] = next[(1 + i) * n0 + layout.at(r, k, 0, nb)];
          }
        }
        break;
      }
      layout.backward_product(l, nb, S, delta, next);
      const T* j1 = scratch + j_off[l];
      const int64_t jstride = B * layout.np[l];
      jet_backward_step(next, scratch + h_off[l], j1, j1 + jstride, j1 + 2 * jstride, layout.part_size(l, nb), T1,
                        diag, second, mixed);
      layout.zero_columns(next, l, S, nb);
      std::swap(delta, next);
    }
  }

  // Chunk ch of the pass: its rows, block by block, summed into chunk_sums.
  FUSEDGRAD_CPU_INLINE void chunk(int64_t ch, double* chunk_sums) const {
    run_chunk_blocks<T>(*this, ch, chunk_sums);
  }
};

FUSEDGRAD_ENGINE_CHUNK_CLONES(jet_chunk, JetPlan)

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
