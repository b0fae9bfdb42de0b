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

// The forward activation step below in one pass over the values, for at most kFusedTangents tangent
// parts whose second parts are their own diagonals (derivatives() with D ≤ 3; a direction's jet with a
// common axis): act's jet stays in registers between the parts, and the step's forward-only form keeps
// none of it. Measured on a 48-row block of 20 features, 2 tangents and their diagonals (float, AVX-512
// clone): 0.93 ns a value for the loops of jet_forward_step, 0.64 here keeping j1 … j3 (the backward's
// recomputed forward), 0.54 not keeping them (the forward op); the same bits.
constexpr int kFusedTangents = 3;

template <typename T>
struct FusedJetStep {
  const T* h;
  T* a;
  T *j1, *j2, *j3;  // act's derivatives at h, kept for the backward step (null: the forward op)
  int64_t n;
  int tangents;  // T1
  bool second;   // whether the parts carry second derivatives
  // Per tangent i: its second part's h and a (a tangent without one writes a scratch part, `sink`).
  const T* d2h[kFusedTangents];
  T* d2a[kFusedTangents];
};

template <class A, int T1, bool Second, bool Keep, typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_fused(const FusedJetStep<T>& st) {
  const int64_t n = st.n;
  const T* FUSEDGRAD_RESTRICT h = st.h;
  T* FUSEDGRAD_RESTRICT a = st.a;
  T *FUSEDGRAD_RESTRICT j1 = st.j1, *FUSEDGRAD_RESTRICT j2 = st.j2, *FUSEDGRAD_RESTRICT j3 = st.j3;
  const T* d2h[T1];  // local copies: stores through them cannot move them
  T* d2a[T1];
  for (int i = 0; i < T1; ++i) {
    d2h[i] = st.d2h[i];
    d2a[i] = st.d2a[i];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    T d0, d1, d2, d3;
    A::template jet<VectorMath>(h[k], d0, d1, d2, d3);
    a[k] = d0;
    if constexpr (Keep) {
      j1[k] = d1;
      j2[k] = d2;
      j3[k] = d3;
    }
    for (int i = 0; i < T1; ++i) {
      const T dh = h[(1 + i) * n + k];
      a[(1 + i) * n + k] = d1 * dh;
      if constexpr (Second) d2a[i][k] = d2 * dh * dh + d1 * d2h[i][k];
    }
  }
}

// The loop above for T1 tangents, with or without second parts and kept derivatives.
template <class A, int T1, typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_fused_tangents(const FusedJetStep<T>& st) {
  const bool keep = st.j1 != nullptr;
  if (st.second) {
    keep ? jet_forward_fused<A, T1, true, true>(st) : jet_forward_fused<A, T1, true, false>(st);
  } else {
    keep ? jet_forward_fused<A, T1, false, true>(st) : jet_forward_fused<A, T1, false, false>(st);
  }
}

template <class A, typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_fused(const FusedJetStep<T>& st) {
  switch (st.tangents) {
    case 1:
      return jet_forward_fused_tangents<A, 1>(st);
    case 2:
      return jet_forward_fused_tangents<A, 2>(st);
    case 3:
      return jet_forward_fused_tangents<A, 3>(st);
  }
}

// One function a value type and CPU level (not inlined into each of the jet pass's eight chunk kernels):
// the activation chosen at run time, outside the loop.
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_fused_any(Activation act, const FusedJetStep<T>& st) {
  switch (act) {
#define FUSEDGRAD_ACTIVATION_CASE(E, S) \
  case Activation::E:                   \
    jet_forward_fused<S>(st);           \
    return;
    FUSEDGRAD_ACTIVATIONS(FUSEDGRAD_ACTIVATION_CASE)
#undef FUSEDGRAD_ACTIVATION_CASE
  }
}
FUSEDGRAD_CPU_CLONES void jet_forward_fused_step(Activation act, const FusedJetStep<float>& st) {
  jet_forward_fused_any(act, st);
}
FUSEDGRAD_CPU_CLONES void jet_forward_fused_step(Activation act, const FusedJetStep<double>& st) {
  jet_forward_fused_any(act, st);
}

// The activation step of a hidden layer on jets, forward, over parts of n values each (part p of h
// and a at p·n): a = act(h) and act's first three derivatives j1, j2, j3 at h, then
// ∂a_i = j1 ∂h_i and ∂²a_pq = j2 ∂h_p ∂h_q + j1 ∂²h_pq. `diag[i]`: the second part (i, i) handled in
// tangent i's loop (−1: none); the other second parts follow. `keep`: j1 … j3 are wanted after the
// step (the backward's recomputed forward); `sink`: n values of scratch.
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_forward_step(Activation act, const T* h, T* a, T* j1, T* j2, T* j3, int64_t n,
                                           int64_t T1, const std::vector<int64_t>& diag,
                                           const std::vector<SecondPart>& second,
                                           const std::vector<int64_t>& mixed, bool keep, T* sink) {
  if (mixed.empty() && T1 >= 1 && T1 <= kFusedTangents) {
    FusedJetStep<T> st{h, a, keep ? j1 : nullptr, j2, j3, n, static_cast<int>(T1), !second.empty(), {}, {}};
    for (int64_t i = 0; i < T1; ++i) {
      // A tangent without a second part computes one from its own (finite) values into the sink.
      st.d2h[i] = diag[i] >= 0 ? h + (1 + T1 + diag[i]) * n : h + (1 + i) * n;
      st.d2a[i] = diag[i] >= 0 ? a + (1 + T1 + diag[i]) * n : sink;
    }
    jet_forward_fused_step(act, st);
    return;
  }
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

// The backward step below in one pass over the values, for at most kFusedTangents tangent parts whose
// second parts (those of the tangents in `diag_mask`) are their own diagonals: ḡ of the values is read
// and written once, and act's derivatives loaded once for all parts. The same sums in the same order.
template <typename T>
struct FusedJetBackStep {
  T* g;
  const T *h, *j1, *j2, *j3;
  int64_t n;
  int tangents;        // T1
  unsigned diag_mask;  // bit i: tangent i has its second part (i, i)
  T* d2g[kFusedTangents];
  const T* d2h[kFusedTangents];
};

template <int T1, unsigned Mask, typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_fused(const FusedJetBackStep<T>& st) {
  const int64_t n = st.n;
  T* FUSEDGRAD_RESTRICT g = st.g;
  const T *FUSEDGRAD_RESTRICT h = st.h, *FUSEDGRAD_RESTRICT j1 = st.j1, *FUSEDGRAD_RESTRICT j2 = st.j2,
          *FUSEDGRAD_RESTRICT j3 = st.j3;
  T* d2g[T1];
  const T* d2h[T1];
  for (int i = 0; i < T1; ++i) {
    d2g[i] = st.d2g[i];
    d2h[i] = st.d2h[i];
  }
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const T a1 = j1[k], a2 = j2[k], a3 = j3[k];
    T gv = g[k] * a1;
    for (int i = 0; i < T1; ++i) {
      const T dh = h[(1 + i) * n + k];
      T g1 = g[(1 + i) * n + k];
      if ((Mask >> i) & 1u) {  // constant once the loop over i is unrolled
        const T g2 = d2g[i][k];
        gv += g1 * a2 * dh + g2 * (a3 * dh * dh + a2 * d2h[i][k]);
        g1 = g1 * a1 + T(2) * g2 * a2 * dh;
        d2g[i][k] = g2 * a1;
      } else {
        gv += g1 * a2 * dh;
        g1 *= a1;
      }
      g[(1 + i) * n + k] = g1;
    }
    g[k] = gv;
  }
}

template <int T1, unsigned Mask = 0, typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_fused_masks(const FusedJetBackStep<T>& st) {
  if constexpr (Mask < (1u << T1)) {
    if (st.diag_mask == Mask) return jet_backward_fused<T1, Mask>(st);
    jet_backward_fused_masks<T1, Mask + 1>(st);
  }
}

template <typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_fused_any(const FusedJetBackStep<T>& st) {
  if (st.tangents == 1) jet_backward_fused_masks<1>(st);
  if (st.tangents == 2) jet_backward_fused_masks<2>(st);
  if (st.tangents == 3) jet_backward_fused_masks<3>(st);
}
FUSEDGRAD_CPU_CLONES void jet_backward_fused_step(const FusedJetBackStep<float>& st) { jet_backward_fused_any(st); }
FUSEDGRAD_CPU_CLONES void jet_backward_fused_step(const FusedJetBackStep<double>& st) { jet_backward_fused_any(st); }

// The same step reversed, in place: g holds ḡ (the gradient of a's parts) and becomes δ (that of h's):
//   δh = ḡa j1 + Σ_i ḡ∂a_i j2 ∂h_i + Σ_pq ḡ∂²a_pq (j3 ∂h_p ∂h_q + j2 ∂²h_pq)
//   δ∂h_i = ḡ∂a_i j1 + Σ_pq ḡ∂²a_pq j2 (∂h_q [p = i] + ∂h_p [q = i]),   δ∂²h_pq = ḡ∂²a_pq j1
template <typename T>
FUSEDGRAD_CPU_INLINE void jet_backward_step(T* g, const T* h, const T* j1, const T* j2, const T* j3, int64_t n,
                                            int64_t T1, const std::vector<int64_t>& diag,
                                            const std::vector<SecondPart>& second,
                                            const std::vector<int64_t>& mixed) {
  if (mixed.empty() && T1 >= 1 && T1 <= kFusedTangents) {
    FusedJetBackStep<T> st{g, h, j1, j2, j3, n, static_cast<int>(T1), 0u, {}, {}};
    for (int64_t i = 0; i < T1; ++i) {
      if (diag[i] < 0) continue;
      st.diag_mask |= 1u << i;
      st.d2g[i] = g + (1 + T1 + diag[i]) * n;
      st.d2h[i] = h + (1 + T1 + diag[i]) * n;
    }
    jet_backward_fused_step(st);
    return;
  }
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
  int64_t d0_off, d1_off, sink_off, work_off, scratch_size;

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
    per_row += 2 * S * widest + widest;  // two δ buffers, the sink
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
    sink_off = off;  // jet_forward_step's: a second part no tangent keeps
    off += B * widest;
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
                       mixed, pass.epilogue != Epilogue::Forward, scratch + sink_off);
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
