// The engine's input-derivative pass (mlp_engine.h, "Input derivatives"): the
// forward and backward epilogues on jets.
//
// Layout: a block of nb rows (samples) holds, for every layer, S = 1 + T1 + T2
// stacked parts of nb rows each — part 0 the values (h or a), part 1 + i the
// tangents ∂/∂x_d for d = tdim[i], part 1 + T1 + j (order 2) the second
// derivatives ∂²/∂x_d² for d = sdim[j] — every row padded to whole lane vectors
// as in mlp_engine_cpu.cpp. The forward carries every part (T1 = D, T2 = order
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
// formulas of mlp_engine.h. Sums over rows follow the plain pass (in T within a
// block, in double across blocks, chunks fixed by the row count), so results are
// the same bit for bit for any number of threads.
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <utility>

#include "../cpu/activation_cpu.h"   // activation_jet_n: the activation table's jet() in vector loops
#include "engine_kernels.h"
#include "mlp_engine.h"

namespace fusedgrad::engine {
namespace {

using namespace kernels;

template <typename T, int VB>
struct JetPlan {
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  int64_t L, D, O, S, T1, T2, B, blocks, chunks, lanes, widest = 0;
  const int64_t max_nv = tile_vectors_max();  // the most vectors a tile spans on this CPU
  std::vector<int64_t> np;
  std::vector<int64_t> tdim, sdim;  // the dimension of each tangent / second-derivative part
  std::vector<int64_t> second_of;   // per tangent part: its second-derivative part, or −1
  std::vector<const T*> WT, Wp, bp;
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
    pack_weights(s, p.W, p.b, lanes, np, WT, Wp, bp, packed);
    int64_t per_row = 0;
    for (int64_t l = 0; l <= L; ++l) {
      widest = std::max(widest, np[l]);
      if (l < L) per_row += S * np[l];               // a_l
      if (l > 0) per_row += S * np[l];               // h_l
      if (l > 0 && l < L) per_row += 3 * np[l];      // act', act'', act''' at h_l
    }
    per_row += 2 * S * widest;  // two δ buffers
    B = std::clamp<int64_t>(kScratchBytes / (static_cast<int64_t>(sizeof(T)) * per_row) / 8 * 8, 8, 256);
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
    dw_off = off;
    int64_t dw_max = 0;
    for (int64_t l = 0; l < L; ++l) dw_max = std::max(dw_max, s.width[l + 1] * np[l]);
    off += dw_max;
    db_off = off;
    off += widest;
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // The forward of rows r0 .. r0 + nb − 1 on jets: h_L's parts at scratch + h_off[L].
  FUSEDGRAD_CPU_INLINE void forward(T* scratch, int64_t r0, int64_t nb) const {
    T* a0 = scratch + a_off[0];
    std::fill(a0, a0 + S * nb * np[0], T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      std::copy(src, src + D, a0 + r * np[0]);
      for (int64_t i = 0; i < T1; ++i) a0[((1 + i) * nb + r) * np[0] + tdim[i]] = T(1);  // ∂x/∂x_d = e_d
    }
    for (int64_t l = 0; l < L; ++l) {
      const T* in = scratch + a_off[l];
      T* h = scratch + h_off[l + 1];
      const int64_t ni = np[l], no = np[l + 1];
      product<T, VB>(nb, s.width[l], in, ni, 1, WT[l], no, no, bp[l], h, no, max_nv);                           // values
      product<T, VB>((S - 1) * nb, s.width[l], in + nb * ni, ni, 1, WT[l], no, no, nullptr, h + nb * no, no, max_nv);  // parts
      if (l + 1 == L) break;
      T* a = scratch + a_off[l + 1];
      T* j1 = scratch + j_off[l + 1];
      T* j2 = j1 + B * no;
      T* j3 = j2 + B * no;
      const int64_t n = nb * no;
      activation_jet_n(s.act, h, a, j1, j2, j3, n);
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
  }

  // The activation step of hidden layer l reversed, in place: g holds ḡ (the
  // gradient of a_l's parts) and becomes δ (that of h_l's parts).
  FUSEDGRAD_CPU_INLINE void activation_backward(T* g, int64_t l, int64_t nb, const T* scratch) const {
    const int64_t n = nb * np[l];
    const T* h = scratch + h_off[l];
    const T* j1 = scratch + j_off[l];
    const T* j2 = j1 + B * np[l];
    const T* j3 = j2 + B * np[l];
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

  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    forward(scratch, r0, nb);
    const T* hL = scratch + h_off[L];
    const int64_t npo = np[L];
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t dst = row(r0 + r) * O;
        std::copy(hL + r * npo, hL + r * npo + O, pass.pred + dst);
        for (int64_t o = 0; o < O; ++o) {
          for (int64_t i = 0; i < T1; ++i) pass.du[(dst + o) * D + tdim[i]] = hL[((1 + i) * nb + r) * npo + o];
          for (int64_t j = 0; j < T2; ++j) {
            pass.d2u[(dst + o) * D + sdim[j]] = hL[((1 + T1 + j) * nb + r) * npo + o];
          }
        }
      }
      return;
    }
    // δ of h_L's parts: the incoming gradients (zeros where not given), padded lanes zero.
    T* delta = scratch + d0_off;
    std::fill(delta, delta + S * nb * npo, T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const int64_t src = row(r0 + r) * O;
      for (int64_t o = 0; o < O; ++o) {
        if (pass.grad_out) delta[r * npo + o] = pass.grad_out[src + o];
        if (pass.grad_du) {
          for (int64_t i = 0; i < T1; ++i) delta[((1 + i) * nb + r) * npo + o] = pass.grad_du[(src + o) * D + tdim[i]];
        }
        if (pass.grad_d2u) {
          for (int64_t j = 0; j < T2; ++j) {
            delta[((1 + T1 + j) * nb + r) * npo + o] = pass.grad_d2u[(src + o) * D + sdim[j]];
          }
        }
      }
    }
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1], ni = np[l], no = np[l + 1];
      if (pass.param_grads) {
        // dW_l = Σ over all S·nb jet rows δᵀ a_{l−1}; db_l over the value rows only (the parts have no bias).
        T* dw = scratch + dw_off;
        product<T, VB>(n_out, S * nb, delta, 1, no, scratch + a_off[l], ni, ni, nullptr, dw, ni, max_nv);
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
      if (l == 0) {
        // x reaches only the value rows of a_0 (its parts are the constants e_d and 0).
        if (pass.dx) {
          product<T, VB>(nb, n_out, delta, no, 1, Wp[0], ni, ni, nullptr, next, ni, max_nv);
          for (int64_t r = 0; r < nb; ++r) std::copy(next + r * ni, next + r * ni + D, pass.dx + row(r0 + r) * D);
        }
        break;
      }
      product<T, VB>(S * nb, n_out, delta, no, 1, Wp[l], ni, ni, nullptr, next, ni, max_nv);
      activation_backward(next, l, nb, scratch);
      std::swap(delta, next);
    }
  }

  // Chunk ch of the pass: its rows, block by block, summed into chunk_sums.
  FUSEDGRAD_CPU_INLINE void chunk(int64_t ch, double* chunk_sums) const {
    run_chunk_blocks<T>(*this, ch, chunk_sums);
  }
};

FUSEDGRAD_CPU_CLONES void jet_chunk(const JetPlan<float, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void jet_chunk(const JetPlan<float, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void jet_chunk(const JetPlan<double, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void jet_chunk(const JetPlan<double, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }

template <typename T, int VB>
void run_jet_plan(const Pass<T>& pass) {
  const JetPlan<T, VB> plan(pass);
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
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    run_jet_plan<T, 32>(pass);
  } else {
    run_jet_plan<T, 64>(pass);
  }
}

}  // namespace

void run_jets(const Pass<float>& pass) { run_jet_pass(pass); }
void run_jets(const Pass<double>& pass) { run_jet_pass(pass); }

}  // namespace fusedgrad::engine
