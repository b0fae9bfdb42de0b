// The CPU engine of mlp_engine.h: the plain pass (loss + gradients, forward,
// backward) over blocks of rows.
//
// Every product of a layer is one kernel (`tile`, engine_kernels.h),
//
//   out[i, :] = init + Σ_k c(i, k) · M[k, :]
//
// which keeps a tile of `out` in registers while it walks k: each step loads
// one row of M (≤ 4 vectors) and broadcasts one coefficient per row of the
// tile — the shape of a BLAS micro-kernel. A block holds its quantities in one
// of two layouts (BlockLayout, engine_kernels.h): rows padded to whole lane
// vectors, where M is W_lᵀ or W_l and the coefficients a block's values; or,
// for networks whose widths pad badly (rows_in_lanes), each feature as a line of
// the block's rows, where M is a block's lines and the coefficients the weights.
#include "mlp_engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "../cpu/activation_cpu.h"   // activate_n, activation_backward_n: the activation table's vector forms
#include "engine_kernels.h"           // BlockLayout: the products of a layer in either layout

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

// The padded-rows layout's scratch budget: twice kScratchBytes. Its per-row count holds every layer's
// h and a, but a pass walks them a layer at a time; and each block adds its weight gradients (an
// n_{l+1} × n_l tile a layer) into the double sums at the same cost whatever its rows, so wide nets
// want more rows a block. Trainer.fit of 16384×64→[128]×4→16 relu (Adam, float32, 2 threads, the
// budgets interleaved in one process, three runs): 32-row blocks (192 KB) against 64-row (384 KB)
// 133.8 → 144.7, 98.5 → 106.9, 109.3 → 118.1 GFLOP/s, 8 % in each run; 4096×32→[64]×4→8 relu, 64
// against 128 rows: 2 927 against 2 887 µs a step (flat). The jet pass (mlp_jets_cpu.cpp) was no
// faster with the larger budget (976.7 against 991.6 µs, forward and backward of the PINN step's
// 2 700 points): it keeps kScratchBytes.
constexpr int64_t kPaddedScratchBytes = 2 * kScratchBytes;

int64_t block_rows_for(const NetShape& s, int64_t elt) {
  if (rows_in_lanes(s, elt)) {  // every a_l (and h_l where kept) and two δ lines, unpadded
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
  const int64_t rows = kPaddedScratchBytes / (elt * per_row);
  return std::clamp<int64_t>(rows / 8 * 8, 16, 256);
}

int64_t blocks_for(const NetShape& s, int64_t count, int64_t element_size) {
  const int64_t B = block_rows_for(s, element_size);
  const int64_t blocks = std::max<int64_t>((count + B - 1) / B, 1);
  // Work two threads can share (kMinSplitMacs) is never one block: a step's team splits it.
  if (blocks == 1 && count >= kMinSplitRows && count * s.macs_per_row() >= kMinSplitMacs) return 2;
  return blocks;
}


// A pass's block layout (engine_kernels.h: padded rows, or rows in lanes) and its per-block
// scratch. Built once per pass, read by every chunk.
template <typename T, int VB, bool Rows>
struct Plan {
  // Block boundaries fall on whole lane vectors of rows in the rows-in-lanes layout (run_chunk_blocks).
  static constexpr int64_t row_align = Rows ? VB / static_cast<int64_t>(sizeof(T)) : 1;
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  BlockLayout<T, VB, Rows> layout;
  int64_t L, B, blocks, chunks;
  c10::SmallVector<int64_t, 8> a_off, h_off;  // scratch offsets of a_l and h_l (per row block)
  int64_t d0_off, d1_off, work_off, scratch_size;

  explicit Plan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape), layout(*p.shape, p.W, p.b) {
    L = s.layers();
    B = block_rows_for(s, sizeof(T));
    blocks = blocks_for(s, p.count, sizeof(T));
    chunks = std::min(blocks, kMaxChunks);
    const bool saves_input = activation_saves_input(s.act);
    const auto& np = layout.np;
    int64_t widest = 0;
    for (int64_t n : np) widest = std::max(widest, n);
    // Scratch of one block: a_0 … a_{L−1}, h_1 … h_L (h_l is a_l where the
    // activation does not keep its input), two δ buffers, the weight gradient's work.
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
    work_off = off;
    off += layout.work_size();
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // Rows r0 .. r0 + nb − 1 of the pass; parameter sums and Σ r² added into `sums`.
  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    const int64_t D = s.in(), O = s.out();
    T* a0 = scratch + a_off[0];
    std::fill(a0, a0 + layout.part_size(0, nb), T(0));
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      for (int64_t k = 0; k < D; ++k) a0[layout.at(r, k, 0, nb)] = src[k];
    }
    // Forward.
    for (int64_t l = 0; l < L; ++l) {
      T* h = scratch + h_off[l + 1];
      layout.forward_product(l, nb, 1, scratch + a_off[l], h);
      if (l + 1 == L) break;
      T* a = scratch + a_off[l + 1];
      if (!(s.act == Activation::Identity && a == h)) activate_n(s.act, h, a, layout.part_size(l + 1, nb));
      layout.zero_columns(a, l + 1, 1, nb);
      if (l == 0 && pass.hidden) {
        const T* src = activation_saves_input(s.act) ? h : a;
        const int64_t n1 = s.width[1];
        for (int64_t r = 0; r < nb; ++r) {
          T* dst = pass.hidden + row(r0 + r) * n1;
          for (int64_t j = 0; j < n1; ++j) dst[j] = src[layout.at(r, j, 1, nb)];
        }
      }
    }
    const T* p = scratch + h_off[L];
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) {
        T* dst = pass.pred + row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) dst[o] = p[layout.at(r, o, L, nb)];
      }
      return;
    }
    // ∂L/∂p of the block's rows (zero in the padding).
    T* g = scratch + d0_off;
    std::fill(g, g + layout.part_size(L, nb), T(0));
    if (pass.epilogue == Epilogue::LossGrads) {
      double loss = 0;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t src = row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) {
          const int64_t e = layout.at(r, o, L, nb);
          const T res = p[e] - (pass.target ? pass.target[src + o] : T(0));
          loss += static_cast<double>(res) * static_cast<double>(res);
          g[e] = pass.two_c * res;
          if (pass.dt) pass.dt[src + o] = -g[e];
        }
      }
      sums[lay.loss] += loss;
    } else {
      for (int64_t r = 0; r < nb; ++r) {
        const T* src = pass.grad_out + row(r0 + r) * O;
        for (int64_t o = 0; o < O; ++o) g[layout.at(r, o, L, nb)] = src[o];
      }
    }
    // Backward, layer by layer from the top.
    T* delta = g;
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      if (pass.param_grads) {
        layout.weight_grads(l, nb, 1, delta, scratch + a_off[l], scratch + work_off, sums + lay.dw[l],
                            lay.db[l] >= 0 ? sums + lay.db[l] : nullptr);
      }
      if (l == 0 && !pass.dx) break;
      layout.backward_product(l, nb, 1, delta, next);
      if (l > 0) {
        activation_backward_n(s.act, next, scratch + h_off[l], layout.part_size(l, nb));
        layout.zero_columns(next, l, 1, nb);
      } else {
        for (int64_t r = 0; r < nb; ++r) {
          for (int64_t k = 0; k < D; ++k) pass.dx[row(r0 + r) * D + k] = next[layout.at(r, k, 0, nb)];
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

FUSEDGRAD_ENGINE_CHUNK_CLONES(chunk_kernel, Plan)

template <typename T, int VB, bool Rows>
void run_plan(const Pass<T>& pass) {
  const Plan<T, VB, Rows> plan(pass);
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
  const bool rows = rows_in_lanes(*pass.shape, sizeof(T));
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    rows ? run_plan<T, 32, true>(pass) : run_plan<T, 32, false>(pass);
  } else {
    rows ? run_plan<T, 64, true>(pass) : run_plan<T, 64, false>(pass);
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

bool team_always_pays(const NetShape& s, int64_t count) { return count * s.macs_per_row() >= kMinParallelMacs; }

void run(const Pass<float>& pass) { run_pass(pass); }
void run(const Pass<double>& pass) { run_pass(pass); }

}  // namespace fusedgrad::engine
