// The engine's plain pass (mlp_engine.h: loss + gradients, forward only,
// backward) on blocks that hold their rows in the lanes, for the networks whose
// widths pad badly to lane vectors (kernels::rows_in_lanes: 1-wide inputs and
// outputs, widths of 20 — curve fits, PINNs, tall regressions). The same math
// and the same sums as mlp_engine_cpu.cpp; only the layout of a block differs.
//
// Layout: within a block of nb rows, every per-row quantity of width n is held
// transposed, (n, C): one line of C values per feature, C = nb rounded up to a
// whole number of lane vectors. The two products of a layer that map lines to
// lines are then the micro-kernel of engine_kernels.h with the weights as its
// broadcast coefficients, read in place (nothing packed):
//
//   forward          hᵀ_l[j, :]     = b_l[j] + Σ_k W_l[j, k] · aᵀ_{l−1}[k, :]
//   backward-data    δᵀ_{l−1}[k, :] =          Σ_j W_l[j, k] · δᵀ_l[j, :]
//
// and the weight gradient is a dot of two lines over the block's rows,
//
//   dW_l[j, k] = Σ_r δᵀ_l[j, r] · aᵀ_{l−1}[k, r],      db_l[j] = Σ_r δᵀ_l[j, r]
//
// taken lane-wise (tiles of 3 × 3 dots in registers), its lanes folded by a
// fixed tree (add_lane_sums, lane_vector.h) and added in double across blocks.
// The columns past nb are zero in x, in ∂L/∂p and — set after each activation
// step — in every a_l and δ_l, so they add exactly zero to every sum.
#include <ATen/Parallel.h>

#include <algorithm>
#include <utility>

#include "../common/lane_vector.h"   // add_lane_sums, lane_row_sum: lane partials folded into double sums
#include "../cpu/activation_cpu.h"   // activate_n, activation_backward_n
#include "engine_kernels.h"
#include "mlp_engine.h"

namespace fusedgrad::engine {
namespace {

using namespace kernels;

template <typename T, int VB>
struct RowsPlan {
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  int64_t L, B, blocks, chunks, lanes, widest = 0;
  const int64_t max_nv = tile_vectors_max();  // the most vectors a tile spans on this CPU
  std::vector<int64_t> a_off, h_off;          // scratch offsets of aᵀ_l and hᵀ_l (h_l is a_l where the activation keeps no input)
  int64_t d0_off, d1_off, part_off, scratch_size;

  explicit RowsPlan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape) {
    L = s.layers();
    lanes = VB / sizeof(T);
    B = block_rows(s, sizeof(T));  // a multiple of every lane count
    blocks = block_count(s, p.count, sizeof(T));
    chunks = std::min(blocks, kMaxChunks);
    const bool saves_input = activation_saves_input(s.act);
    for (int64_t n : s.width) widest = std::max(widest, n);
    int64_t off = 0;
    a_off.assign(L + 1, 0);
    h_off.assign(L + 1, 0);
    for (int64_t l = 0; l <= L; ++l) {
      a_off[l] = off;
      off += s.width[l] * B;
      if (l > 0 && l < L && saves_input) {
        h_off[l] = off;
        off += s.width[l] * B;
      } else {
        h_off[l] = a_off[l];  // h_L = p (no activation); a_0 = x has no h
      }
    }
    d0_off = off;
    off += widest * B;
    d1_off = off;
    off += widest * B;
    part_off = off;  // lane partials: three rows of a dW, or a db
    off += 3 * widest * lanes;
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  static void zero_columns(T* lines, int64_t n, int64_t nb, int64_t C) {
    if (nb == C) return;
    for (int64_t j = 0; j < n; ++j) std::fill(lines + j * C + nb, lines + (j + 1) * C, T(0));
  }

  // Rows r0 .. r0 + nb − 1 of the pass; parameter sums and Σ r² added into `sums`.
  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    const int64_t D = s.in(), O = s.out(), C = padded(nb, lanes);
    T* a0 = scratch + a_off[0];
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      for (int64_t k = 0; k < D; ++k) a0[k * C + r] = src[k];
    }
    zero_columns(a0, D, nb, C);
    // Forward.
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1];
      T* h = scratch + h_off[l + 1];
      product<T, VB>(n_out, n_in, pass.W[l], n_in, 1, scratch + a_off[l], C, C, nullptr, h, C, max_nv, pass.b[l]);
      if (l + 1 == L) break;
      T* a = scratch + a_off[l + 1];
      if (!(s.act == Activation::Identity && a == h)) activate_n(s.act, h, a, n_out * C);
      zero_columns(a, n_out, nb, C);
    }
    const T* p = scratch + h_off[L];
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) {
        T* dst = pass.pred + row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) dst[o] = p[o * C + r];
      }
      return;
    }
    // ∂L/∂p of the block's rows (zero past nb).
    T* g = scratch + d0_off;
    if (pass.epilogue == Epilogue::LossGrads) {
      double loss = 0;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t src = row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) {
          const T res = p[o * C + r] - (pass.target ? pass.target[src + o] : T(0));
          loss += static_cast<double>(res) * static_cast<double>(res);
          g[o * C + r] = pass.two_c * res;
          if (pass.dt) pass.dt[src + o] = -g[o * C + r];
        }
      }
      sums[lay.loss] += loss;
    } else {
      for (int64_t r = 0; r < nb; ++r) {
        const T* src = pass.grad_out + row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) g[o * C + r] = src[o];
      }
    }
    zero_columns(g, O, nb, C);
    // Backward, layer by layer from the top.
    T* delta = g;
    T* next = scratch + d1_off;
    T* part = scratch + part_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1];
      const T* a = scratch + a_off[l];
      if (pass.param_grads) {
        double* dw = sums + lay.dw[l];
        for (int64_t j0 = 0; j0 < n_out; j0 += 3) {
          const int64_t rows = std::min<int64_t>(3, n_out - j0);
          dot_rows<T, VB>(rows, n_in, C, 1, delta + j0 * C, 0, a, 0, part);
          add_lane_sums<VB>(part, rows * n_in, dw + j0 * n_in);
        }
        if (lay.db[l] >= 0) {
          for (int64_t j = 0; j < n_out; ++j) lane_row_sum<VB>(delta + j * C, C, part + j * lanes);
          add_lane_sums<VB>(part, n_out, sums + lay.db[l]);
        }
      }
      if (l == 0 && !pass.dx) break;
      product<T, VB>(n_in, n_out, pass.W[l], 1, n_in, delta, C, C, nullptr, next, C, max_nv);
      if (l > 0) {
        activation_backward_n(s.act, next, scratch + h_off[l], n_in * C);
        zero_columns(next, n_in, nb, C);
      } else {
        for (int64_t r = 0; r < nb; ++r) {
          T* dst = pass.dx + row(r0 + r) * D;
          for (int64_t k = 0; k < D; ++k) dst[k] = next[k * C + r];
        }
      }
      std::swap(delta, next);
    }
  }

  // Chunk ch of the pass: its rows, block by block, summed into chunk_sums.
  FUSEDGRAD_CPU_INLINE void chunk(int64_t ch, double* chunk_sums) const {
    run_chunk_blocks<T>(*this, ch, chunk_sums);
  }
};

// The clones' entry points: one chunk, compiled per CPU level.
FUSEDGRAD_CPU_CLONES void rows_chunk(const RowsPlan<float, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void rows_chunk(const RowsPlan<float, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void rows_chunk(const RowsPlan<double, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void rows_chunk(const RowsPlan<double, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }

template <typename T, int VB>
void run_rows_plan(const Pass<T>& pass) {
  const RowsPlan<T, VB> plan(pass);
  // A team (pass.runner) has no fork or join to pay for: smaller passes go to it than to at::parallel_for.
  const bool threads = pass.parallel && plan.chunks > 1 &&
      pass.count * pass.shape->macs_per_row() >= (pass.runner ? kMinSplitMacs : kMinParallelMacs);
  double* sums = pass.epilogue != Epilogue::Forward ? pass.sums : nullptr;
  run_chunks(plan.chunks, plan.lay.size, threads, pass.runner, sums,
             [&](int64_t ch, double* chunk_sums) { rows_chunk(plan, ch, chunk_sums); });
}

template <typename T>
void run_rows_pass(const Pass<T>& pass) {
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    run_rows_plan<T, 32>(pass);
  } else {
    run_rows_plan<T, 64>(pass);
  }
}

}  // namespace

void run_rows(const Pass<float>& pass) { run_rows_pass(pass); }
void run_rows(const Pass<double>& pass) { run_rows_pass(pass); }

}  // namespace fusedgrad::engine
