// The CPU engine of mlp_engine.h.
//
// Layout: within a block, every per-row quantity is stored row-major with its
// width padded to a whole number of lane vectors (np = n rounded up to 16
// floats / 8 doubles), so that the three products of a layer are one kernel,
//
//   out[i, :] = init + Σ_k c(i, k) · M[k, :]          (a row of M is np wide)
//
//   forward          h_l[r, :]   = b_l + Σ_k a_{l−1}[r, k] · W_lᵀ[k, :]
//   backward-data    δ_{l−1}[r, :] =     Σ_j δ_l[r, j]     · W_l[j, :]
//   weight gradient  dW_l[j, :]  =       Σ_r δ_l[r, j]     · a_{l−1}[r, :]
//
// and that kernel (`tile`) keeps a tile of `out` in registers while it walks
// k: each step loads one row of M (≤ 4 vectors) and broadcasts one coefficient
// per row of the tile — the shape of a BLAS micro-kernel. Padded lanes of the
// weights and biases are zero, so padded lanes of h, δ and g are zero and
// never reach a result; padded lanes of dW are computed and dropped.
#include "mlp_engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "../cpu/activation_cpu.h"   // activate_n, activation_backward_n: the activation table's vector forms
#include "engine_kernels.h"           // tile, product, column_sums: the micro-kernel

namespace fusedgrad::engine {

SumLayout::SumLayout(const NetShape& s) {
  const int64_t L = s.layers();
  dw.resize(L);
  db.resize(L);
  int64_t off = 0;
  for (int64_t l = 0; l < L; ++l) {
    dw[l] = off;
    off += s.width[l + 1] * s.width[l];
    db[l] = s.bias[l] ? off : -1;
    if (s.bias[l]) off += s.width[l + 1];
  }
  loss = off;
  size = off + 1;
}

namespace {

using namespace kernels;

int64_t block_rows_for(const NetShape& s, int64_t elt) {
  if (rows_in_lanes(s, elt)) {  // mlp_rows_cpu.cpp: every a_l (and h_l where kept) and two δ lines, unpadded
    const bool saves_input = activation_saves_input(s.act);
    int64_t per_row = 0, widest = 0;
    for (int64_t l = 0; l <= s.layers(); ++l) {
      per_row += s.width[l] * (l > 0 && l < s.layers() && saves_input ? 2 : 1);
      widest = std::max(widest, s.width[l]);
    }
    per_row += 2 * widest;
    return std::clamp<int64_t>(kScratchBytes / (elt * per_row) / 16 * 16, 16, 256);
  }
  const int64_t lanes = 64 / elt;
  int64_t per_row = 0, widest = 0;
  for (int64_t n : s.width) {
    per_row += 2 * padded(n, lanes);  // h and a of each layer
    widest = std::max(widest, padded(n, lanes));
  }
  per_row += 2 * widest;  // two δ buffers
  const int64_t rows = kScratchBytes / (elt * per_row);
  return std::clamp<int64_t>(rows / 8 * 8, 16, 256);
}

int64_t blocks_for(const NetShape& s, int64_t count, int64_t element_size) {
  const int64_t B = block_rows_for(s, element_size);
  const int64_t blocks = std::max<int64_t>((count + B - 1) / B, 1);
  // Work two threads can share (kMinSplitMacs) is never one block: a step's team splits it.
  if (blocks == 1 && count >= kMinSplitRows && count * s.macs_per_row() >= kMinSplitMacs) return 2;
  return blocks;
}


// A pass's weights in the two padded layouts the kernel reads, and its layout
// of per-block scratch. Built once per pass, read by every chunk.
template <typename T, int VB>
struct Plan {
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  int64_t L, B, blocks, chunks, lanes;
  const int64_t max_nv = tile_vectors_max();  // the most vectors a tile spans on this CPU
  bool saves_input;
  std::vector<int64_t> np;                  // padded widths
  std::vector<const T*> WT, Wp, bp;         // W_lᵀ (n_l × np_{l+1}), W_l (n_{l+1} × np_l), b_l (np_{l+1}) or null
  std::vector<int64_t> a_off, h_off;        // scratch offsets of a_l and h_l (per row block)
  int64_t d0_off, d1_off, dw_off, db_off, scratch_size;
  std::vector<T> packed;                    // storage of WT, Wp, bp

  explicit Plan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape) {
    L = s.layers();
    lanes = VB / sizeof(T);
    B = block_rows_for(s, sizeof(T));
    blocks = blocks_for(s, p.count, sizeof(T));
    chunks = std::min(blocks, kMaxChunks);
    saves_input = activation_saves_input(s.act);
    pack_weights(s, p.W, p.b, lanes, np, WT, Wp, bp, packed);
    int64_t widest = 0;
    for (int64_t n : np) widest = std::max(widest, n);
    // Scratch of one block: a_0 … a_{L−1}, h_1 … h_L (h_l is a_l where the
    // activation does not keep its input), two δ buffers, one dW_l and db_l.
    int64_t off = 0;
    a_off.assign(L + 1, 0);
    h_off.assign(L + 1, 0);
    for (int64_t l = 0; l <= L; ++l) {
      a_off[l] = off;
      off += B * np[l];
      if (l > 0 && l < L && saves_input) {
        h_off[l] = off;
        off += B * np[l];
      } else {
        h_off[l] = a_off[l];  // h_L = p (no activation); a_0 = x has no h
      }
    }
    d0_off = off;
    off += B * widest;
    d1_off = off;
    off += B * widest;
    dw_off = off;
    int64_t dw_max = 0;
    for (int64_t l = 0; l < L; ++l) dw_max = std::max(dw_max, s.width[l + 1] * np[l]);
    off += dw_max;
    db_off = off;
    off += widest;
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // Rows r0 .. r0 + nb − 1 of the pass; parameter sums and Σ r² added into `sums`.
  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    const int64_t D = s.in(), O = s.out();
    T* a0 = scratch + a_off[0];
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      T* dst = a0 + r * np[0];
      std::copy(src, src + D, dst);
      std::fill(dst + D, dst + np[0], T(0));
    }
    // Forward.
    for (int64_t l = 0; l < L; ++l) {
      T* in = scratch + a_off[l];
      T* h = scratch + h_off[l + 1];
      product<T, VB>(nb, s.width[l], in, np[l], 1, WT[l], np[l + 1], np[l + 1], bp[l], h, np[l + 1], max_nv);
      T* a = scratch + a_off[l + 1];
      if (l + 1 < L && !(s.act == Activation::Identity && a == h)) activate_n(s.act, h, a, nb * np[l + 1]);
    }
    const T* p = scratch + h_off[L];
    const int64_t npo = np[L];
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) std::copy(p + r * npo, p + r * npo + O, pass.pred + row(r0 + r) * O);
      return;
    }
    // ∂L/∂p of the block's rows (padded lanes zero).
    T* g = scratch + d0_off;
    if (pass.epilogue == Epilogue::LossGrads) {
      double loss = 0;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t src = row(r0 + r) * O;
        T* gr = g + r * npo;
        const T* pr = p + r * npo;
        for (int64_t o = 0; o < O; ++o) {
          const T res = pr[o] - (pass.target ? pass.target[src + o] : T(0));
          loss += static_cast<double>(res) * static_cast<double>(res);
          gr[o] = pass.two_c * res;
          if (pass.dt) pass.dt[src + o] = -gr[o];
        }
        std::fill(gr + O, gr + npo, T(0));
      }
      sums[lay.loss] += loss;
    } else {
      for (int64_t r = 0; r < nb; ++r) {
        const T* src = pass.grad_out + row(r0 + r) * O;
        std::copy(src, src + O, g + r * npo);
        std::fill(g + r * npo + O, g + (r + 1) * npo, T(0));
      }
    }
    // Backward, layer by layer from the top.
    T* delta = g;
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1];
      const T* a = scratch + a_off[l];
      if (pass.param_grads) {
        T* dw = scratch + dw_off;
        product<T, VB>(n_out, nb, delta, 1, np[l + 1], a, np[l], np[l], nullptr, dw, np[l], max_nv);
        double* dst = sums + lay.dw[l];
        for (int64_t j = 0; j < n_out; ++j) {
          for (int64_t k = 0; k < n_in; ++k) dst[j * n_in + k] += static_cast<double>(dw[j * np[l] + k]);
        }
        if (lay.db[l] >= 0) {
          T* db = scratch + db_off;
          column_sums<T, VB>(delta, nb, np[l + 1], db);
          double* dbs = sums + lay.db[l];
          for (int64_t j = 0; j < n_out; ++j) dbs[j] += static_cast<double>(db[j]);
        }
      }
      if (l == 0 && !pass.dx) break;
      product<T, VB>(nb, n_out, delta, np[l + 1], 1, Wp[l], np[l], np[l], nullptr, next, np[l], max_nv);
      if (l > 0) {
        activation_backward_n(s.act, next, scratch + h_off[l], nb * np[l]);
      } else {
        for (int64_t r = 0; r < nb; ++r) std::copy(next + r * np[0], next + r * np[0] + D, pass.dx + row(r0 + r) * D);
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
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<float, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<float, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<double, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<double, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }

template <typename T, int VB>
void run_plan(const Pass<T>& pass) {
  const Plan<T, VB> plan(pass);
  // A team (pass.runner) has no fork or join to pay for: smaller passes go to it than to at::parallel_for.
  const bool threads = pass.parallel && plan.chunks > 1 &&
      pass.count * pass.shape->macs_per_row() >= (pass.runner ? kMinSplitMacs : kMinParallelMacs);
  double* sums = pass.epilogue != Epilogue::Forward ? pass.sums : nullptr;
  run_chunks(plan.chunks, plan.lay.size, threads, pass.runner, sums,
             [&](int64_t ch, double* chunk_sums) { chunk_kernel(plan, ch, chunk_sums); });
}

template <typename T>
void run_pass(const Pass<T>& pass) {
  if (pass.order > 0) {
    run_jets(pass);
    return;
  }
  if (pass.count == 0) {
    if (pass.sums) std::fill(pass.sums, pass.sums + SumLayout(*pass.shape).size, 0.0);
    return;
  }
  if (rows_in_lanes(*pass.shape, sizeof(T))) {
    run_rows(pass);
    return;
  }
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    run_plan<T, 32>(pass);
  } else {
    run_plan<T, 64>(pass);
  }
}

}  // namespace

int64_t block_rows(const NetShape& s, int64_t element_size) { return block_rows_for(s, element_size); }

int64_t block_count(const NetShape& s, int64_t count, int64_t element_size) {
  return blocks_for(s, count, element_size);
}

int64_t chunk_count(const NetShape& s, int64_t count, int64_t element_size) {
  return std::min(blocks_for(s, count, element_size), kMaxChunks);
}

int vector_bytes(const NetShape& s, int64_t element_size) { return vector_bytes_for(s, element_size); }

bool rows_in_lanes_layout(const NetShape& s, int64_t element_size) { return rows_in_lanes(s, element_size); }

void force_cpu_vector_bytes(int bytes) {
  TORCH_CHECK(bytes == 0 || bytes == 32 || bytes == 64, "force_cpu_vector_bytes: 0, 32 or 64, got ", bytes);
  fusedgrad::detail::forced_vector_bytes.store(bytes, std::memory_order_relaxed);
}

int64_t team_threads(const NetShape& s, int64_t count, int64_t element_size) {
  if (count * s.macs_per_row() < kMinSplitMacs) return 1;
  return std::min<int64_t>(chunk_count(s, count, element_size), at::get_num_threads());
}

void run(const Pass<float>& pass) { run_pass(pass); }
void run(const Pass<double>& pass) { run_pass(pass); }

}  // namespace fusedgrad::engine
