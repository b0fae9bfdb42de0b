// The small-problem path of the loss op: direct loops, no BLAS call, and no
// allocation but the outputs (intermediates live in per-thread scratch). A first pass
// computes s = act(x W1ᵀ + b1) for all rows (the activation over the whole
// block at once, vectorised: cpu/activation_cpu.h); a second does every other step of the README's "Math"
// for row i before row i+1. For the tiny networks of curve fits and
// surrogates a BLAS call, and the tensors between calls, cost more than the
// arithmetic; past the measured crossover (kSmallPathMaxMacs) the GEMM path of
// ops/gemm_path.cpp is faster.
//
// Per row i (x_i, t_i rows; s, p, g, ds, dh vectors):
//   s   = act(W1 x_i + b1_i)             (computed as Σ_d x_id · W1ᵀ[d,:])
//   p   = W2 s + b2_i;   r = p − t_i;   L += r·r;   g = 2c r
//   dw2 += g sᵀ;   db2 += g;   dt_i = −g
//   ds  = W2ᵀ g;   dh = ds ⊙ act'(s)
//   dw1 += dh x_iᵀ;   db1 += dh;   dx_i = W1ᵀ dh
// (act' is written from s, or from h for the activations that save their
// input: then h is kept beside s.)
// The sums over rows (dw1, db1, dw2, db2, dt) run over rows in order, in
// blocks of kBlockRows rows summed in T and blocks summed in double: results
// are deterministic, and float32 sums stay accurate at any N.
//
// The loops over H are written for the vectoriser: restrict pointers, and
// `omp simd` (enabled by -fopenmp, setup.py) on the dot products so that
// their sums may be reassociated into vector lanes — the same reassociation a
// BLAS dot product makes. With GCC on x86-64 the kernel is also compiled for
// AVX2 + FMA (x86-64-v3), picked at load time on CPUs that have them
// (target_clones), as ATen picks its own kernels by CPU capability.
#include <atomic>
#include <vector>

#include "activation_cpu.h"
#include "cpu_paths.h"

namespace fusedgrad {
namespace {

// Multiply-adds of one forward pass, N·(D·H + H·O), up to which the direct
// loops beat BLAS (measured: README, "Performance"; benchmarks/crossover.py
// moves it through set_small_path_max_macs to measure the crossover again).
constexpr int64_t kSmallPathMaxMacsDefault = 1 << 16;  // measured: direct wins at 41k MACs, GEMM at 98k

std::atomic<int64_t> small_path_max_macs{kSmallPathMaxMacsDefault};

bool kind_supported(const Broadcast2d& op) {
  return op.kind != Broadcast2d::Kind::Other;
}

// Rows per block of the row sums (see the top of the file): error of order
// (kBlockRows + N / kBlockRows) ε rather than N ε.
constexpr int64_t kBlockRows = 64;

// totals[k] += block[k]; block[k] = 0 — the end of one block of rows.
template <typename T>
FUSEDGRAD_CPU_INLINE void flush_block(double* FUSEDGRAD_RESTRICT totals, T* FUSEDGRAD_RESTRICT block, int64_t n) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    totals[k] += static_cast<double>(block[k]);
    block[k] = T(0);
  }
}

// Per-thread scratch, grown on demand and kept: a step allocates nothing for
// its intermediates (the small path's are at most a few hundred KiB).
template <typename T>
struct Scratch {
  std::vector<T> values;
  std::vector<double> sums;
};

template <typename T>
Scratch<T>& thread_scratch(size_t n_values, size_t n_sums) {
  thread_local Scratch<T> scratch;
  if (scratch.values.size() < n_values) scratch.values.resize(n_values);
  if (scratch.sums.size() < n_sums) scratch.sums.resize(n_sums);
  return scratch;
}

template <typename T>
FUSEDGRAD_CPU_INLINE void small_loss_and_grads(const Problem& p, double c, const LossGradMask& need,
                                           LossAndGrads& out) {
  const int64_t N = p.N, D = p.D, H = p.H, O = p.O;
  const bool has_w2 = p.has_w2();
  const Activation act = p.activation;
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  const bool need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];
  const T two_c = static_cast<T>(2.0 * c);

  // Scratch layout (T): s (N·H) | W1ᵀ (D·H) | W2 (O·H) | r/g (O) | dh (H) |
  // block sums dw1ᵀ (D·H), dw2 (O·H), db1 (H), g (O) | h (N·H, only for an
  // activation that saves its input). Sums (double): the same four, over all blocks.
  const int64_t n_sums = D * H + O * H + H + O;
  const bool keep_h = activation_saves_input(act);
  Scratch<T>& scratch =
      thread_scratch<T>(N * H + D * H + O * H + O + H + n_sums + (keep_h ? N * H : 0), n_sums);
  T* s_all = scratch.values.data();
  T* w1t = s_all + N * H;
  T* w2c = w1t + D * H;
  T* g = w2c + O * H;
  T* dh = g + O;
  T* blk_dw1t = dh + H;
  T* blk_dw2 = blk_dw1t + D * H;
  T* blk_db1 = blk_dw2 + O * H;
  T* blk_g = blk_db1 + H;
  std::fill(blk_dw1t, blk_dw1t + n_sums, T(0));
  T* h_all = keep_h ? blk_g + O : s_all;  // h, where act' reads it; else h becomes s in place
  const T* saved_all = keep_h ? h_all : s_all;  // what act' is written from
  double* sum_dw1t = scratch.sums.data();
  double* sum_dw2 = sum_dw1t + D * H;
  double* sum_db1 = sum_dw2 + O * H;
  double* sum_g = sum_db1 + H;
  std::fill(sum_dw1t, sum_dw1t + n_sums, 0.0);

  // The (tiny) weights in the orientation the loops stream through: W1ᵀ (D, H)
  // rows for the forward and dx, W2 (O, H) rows for both p and ds.
  {
    const T* w = p.w1.const_data_ptr<T>();
    const int64_t rs = p.w1.stride(0), cs = p.w1.stride(1);
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t d = 0; d < D; ++d) w1t[d * H + j] = w[j * rs + d * cs];
    }
    if (has_w2) {
      const T* w2 = p.w2.const_data_ptr<T>();
      const int64_t rs2 = p.w2.stride(0), cs2 = p.w2.stride(1);
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t j = 0; j < H; ++j) w2c[o * H + j] = w2[o * rs2 + j * cs2];
      }
    }
  }
  const T* x = p.x2.const_data_ptr<T>();
  const int64_t x_rs = p.x2.stride(0), x_cs = p.x2.stride(1);

  // Outputs written in place as the rows stream by.
  auto& g_out = out.grads;
  T* dx = need[kX] ? g_out[kX].data_ptr<T>() : nullptr;  // contiguous (N, D)
  // Full-shape bias/target gradients are written row by row; the others are
  // column sums written at the end. (Kinds, not pointers, decide: an empty
  // tensor's data pointer may be null.)
  const bool db1_rows = need[kB1] && p.b1.kind == Broadcast2d::Kind::Full;
  const bool db2_rows = need[kB2] && p.b2.kind == Broadcast2d::Kind::Full;
  const bool dt_rows = need[kTarget] && p.target.kind == Broadcast2d::Kind::Full;
  T* db1_full = db1_rows ? g_out[kB1].data_ptr<T>() : nullptr;
  T* db2_full = db2_rows ? g_out[kB2].data_ptr<T>() : nullptr;
  T* dt_full = dt_rows ? g_out[kTarget].data_ptr<T>() : nullptr;

  const T* b1 = p.b1.present() ? p.b1.data<T>() : nullptr;
  const T* b2 = p.b2.present() ? p.b2.data<T>() : nullptr;
  const T* t = p.target.present() ? p.target.data<T>() : nullptr;

  // First pass, all rows: h = x W1ᵀ + b1, then act over the whole (N, H)
  // block at once (vectorised; per-element std::exp would cost several times
  // the rest of the step).
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * x_rs;
    T* FUSEDGRAD_RESTRICT si = h_all + i * H;
    if (b1) {
      const T* bi = b1 + i * p.b1.row_stride;
      const int64_t bs = p.b1.col_stride;
      for (int64_t j = 0; j < H; ++j) si[j] = bi[j * bs];
    } else {
      std::fill(si, si + H, T(0));
    }
    for (int64_t d = 0; d < D; ++d) axpy(si, xi[d * x_cs], w1t + d * H, H);
  }
  if (act != Activation::Identity) activate_n(act, h_all, s_all, N * H);

  // Second pass, row by row: everything else.
  double sum_sq = 0;
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * x_rs;
    const T* s = s_all + i * H;  // act(W1 x_i + b1_i), from the first pass
    // r = W2 s + b2_i − t_i   (or s − t_i without a second layer)
    for (int64_t o = 0; o < O; ++o) {
      const T pred = has_w2 ? dot(w2c + o * H, s, H) : s[o];
      const T r = math::residual(pred, b2 ? b2[i * p.b2.row_stride + o * p.b2.col_stride] : T(0),
                                 t ? t[i * p.target.row_stride + o * p.target.col_stride] : T(0));
      sum_sq += static_cast<double>(r) * static_cast<double>(r);
      g[o] = math::loss_grad(r, two_c);
    }
    if (need_g) {
      for (int64_t o = 0; o < O; ++o) blk_g[o] += g[o];
      if (db2_full) std::copy(g, g + O, db2_full + i * O);
      if (dt_full) {
        for (int64_t o = 0; o < O; ++o) dt_full[i * O + o] = -g[o];
      }
      if (need[kW2]) {
        for (int64_t o = 0; o < O; ++o) axpy(blk_dw2 + o * H, g[o], s, H);
      }
    }
    if (need_hidden) {
      // ds = W2ᵀ g (= g without a second layer), dh = ds ⊙ act'(s)
      if (has_w2) {
        std::fill(dh, dh + H, T(0));
        for (int64_t o = 0; o < O; ++o) axpy(dh, g[o], w2c + o * H, H);
      } else {
        std::copy(g, g + O, dh);
      }
      if (act != Activation::Identity) activation_backward_n(act, dh, saved_all + i * H, H);
      axpy(blk_db1, T(1), dh, H);
      if (db1_full) std::copy(dh, dh + H, db1_full + i * H);
      if (need[kW1]) {  // dw1ᵀ[d, :] += x_id · dh: contiguous rows of length H, whatever x's strides
        for (int64_t d = 0; d < D; ++d) axpy(blk_dw1t + d * H, xi[d * x_cs], dh, H);
      }
      if (dx) {  // dx_i[d] = W1ᵀ[d, :] · dh
        for (int64_t d = 0; d < D; ++d) dx[i * D + d] = dot(w1t + d * H, dh, H);
      }
    }
    if ((i + 1) % kBlockRows == 0 || i + 1 == N) flush_block(sum_dw1t, blk_dw1t, n_sums);
  }

  *out.loss.data_ptr<T>() = static_cast<T>(c * sum_sq);
  if (need[kW1]) {  // dw1 = (dw1ᵀ)ᵀ
    T* dw1 = g_out[kW1].data_ptr<T>();
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t d = 0; d < D; ++d) dw1[j * D + d] = static_cast<T>(sum_dw1t[d * H + j]);
    }
  }
  auto write_sums = [](at::Tensor& dst, const double* sums, int64_t n, double sign) {
    T* d = dst.data_ptr<T>();
    for (int64_t k = 0; k < n; ++k) d[k] = static_cast<T>(sign * sums[k]);
  };
  if (need[kW2]) write_sums(g_out[kW2], sum_dw2, O * H, 1.0);
  if (need[kB1] && !db1_rows) write_sums(g_out[kB1], sum_db1, H, 1.0);
  if (need[kB2] && !db2_rows) write_sums(g_out[kB2], sum_g, O, 1.0);
  if (need[kTarget] && !dt_rows) write_sums(g_out[kTarget], sum_g, O, -1.0);
}

// One function per dtype, so that each can be cloned per CPU capability.
FUSEDGRAD_CPU_CLONES void small_loss_and_grads_float(const Problem& p, double c, const LossGradMask& need,
                                                     LossAndGrads& out) {
  small_loss_and_grads<float>(p, c, need, out);
}
FUSEDGRAD_CPU_CLONES void small_loss_and_grads_double(const Problem& p, double c, const LossGradMask& need,
                                                      LossAndGrads& out) {
  small_loss_and_grads<double>(p, c, need, out);
}

}  // namespace

bool small_path_applies(const Problem& p) {
  const int64_t macs = p.N * (p.D * p.H + p.H * p.O);
  return macs <= small_path_max_macs.load(std::memory_order_relaxed) && kind_supported(p.b1) && kind_supported(p.b2) &&
      kind_supported(p.target);
}

int64_t set_small_path_max_macs(int64_t macs) {
  return small_path_max_macs.exchange(macs < 0 ? kSmallPathMaxMacsDefault : macs);
}

LossAndGrads allocate_loss_and_grads(const Problem& p, const LossGradMask& need) {
  const auto opts = p.x2.options();
  LossAndGrads out;
  out.loss = at::empty({}, opts);
  // Each requested gradient in its argument's shape (contiguous), written in
  // place by the row loops; the others are (0,) placeholders. Each has its own
  // storage: the outputs of a registered op must not alias each other.
  auto& g = out.grads;
  auto alloc = [&](LossInput k, at::IntArrayRef shape) { return at::empty(need[k] ? shape : at::IntArrayRef({0}), opts); };
  g[kX] = alloc(kX, p.x_shape);
  g[kW1] = alloc(kW1, {p.H, p.D});
  g[kB1] = alloc(kB1, need[kB1] ? p.b1.source.sizes() : at::IntArrayRef());
  g[kW2] = alloc(kW2, {p.O, p.H});
  g[kB2] = alloc(kB2, need[kB2] ? p.b2.source.sizes() : at::IntArrayRef());
  g[kTarget] = alloc(kTarget, need[kTarget] ? p.target.source.sizes() : at::IntArrayRef());
  return out;
}

LossAndGrads mlp_loss_and_grads_cpu_small(const Problem& p, Reduction reduction, const LossGradMask& need) {
  LossAndGrads out = allocate_loss_and_grads(p, need);
  const double c = math::loss_scale(reduction, p.N * p.O);
  if (p.x2.scalar_type() == at::kFloat) {
    small_loss_and_grads_float(p, c, need, out);
  } else {
    TORCH_INTERNAL_ASSERT(p.x2.scalar_type() == at::kDouble, "make_problem admits float32/float64 on the CPU");
    small_loss_and_grads_double(p, c, need, out);
  }
  return out;
}

}  // namespace fusedgrad
