// The CPU's element-wise passes of the GEMM path (ops/gemm_path.h): each one
// fused loop over rows, run in parallel with at::parallel_for. Row sums (bias
// gradients, the loss) are reduced over fixed row blocks combined in block
// order, so results are bitwise identical whatever the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../ops/gemm_path.h"
#include "activation_cpu.h"

namespace fusedgrad {
namespace {

// Element (i, j) of a broadcast operand: row(i)[j * col_stride].
template <typename T>
struct OperandReader {
  const T* data = nullptr;
  int64_t row_stride = 0, col_stride = 0;
  OperandReader() = default;
  explicit OperandReader(const Broadcast2d& op) {
    if (op.present()) {
      data = op.data<T>();
      row_stride = op.row_stride;
      col_stride = op.col_stride;
    }
  }
  bool present() const { return data != nullptr; }
  const T* row(int64_t i) const { return data + i * row_stride; }
};

// Elements of work below which splitting across threads does not pay.
constexpr int64_t kElemsPerTask = 16384;

int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(cols, 1));
}

// Runs block_fn(row_begin, row_end, partial) over fixed blocks of rows (their
// size depends only on `cols`, never on the thread count), then sums the
// blocks' `width` partial results into out in block order: deterministic.
template <typename Acc, typename BlockFn>
void reduce_over_row_blocks(int64_t rows, int64_t cols, int64_t width, Acc* out, const BlockFn& block_fn) {
  std::fill(out, out + width, Acc(0));
  const int64_t block_rows = rows_per_task(cols);
  const int64_t blocks = (rows + block_rows - 1) / block_rows;
  if (blocks <= 1) {
    if (rows > 0) block_fn(int64_t(0), rows, out);
    return;
  }
  std::vector<Acc> partial(static_cast<size_t>(blocks * width), Acc(0));
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      block_fn(b * block_rows, std::min(rows, (b + 1) * block_rows), partial.data() + b * width);
    }
  });
  for (int64_t b = 0; b < blocks; ++b) {
    const Acc* pb = partial.data() + b * width;
    for (int64_t k = 0; k < width; ++k) out[k] += pb[k];
  }
}

// Rows [i0, i1) of h (H columns): h += b, then s = act(h) (s may be h).
template <typename T>
FUSEDGRAD_CPU_INLINE void bias_activation_rows(T* h, T* s, int64_t i0, int64_t i1, int64_t H,
                                               const OperandReader<T>& b, Activation act) {
  for (int64_t i = i0; i < i1; ++i) {
    T* row = h + i * H;
    if (b.present()) {
      const T* bi = b.row(i);
      if (b.col_stride == 1) {
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) row[j] += bi[j];
      } else {
        for (int64_t j = 0; j < H; ++j) row[j] += bi[j * b.col_stride];
      }
    }
    if (act != Activation::Identity || s != h) activate_n(act, row, s + i * H, H);
  }
}

// Rows [i0, i1) of ds (H columns): dh = ds ⊙ act'(saved) in place, and Σ_rows dh into acc (if any).
template <typename T>
FUSEDGRAD_CPU_INLINE void hidden_backward_rows(T* ds, const T* saved, int64_t i0, int64_t i1, int64_t H,
                                               Activation act, double* acc) {
  for (int64_t i = i0; i < i1; ++i) {
    T* d = ds + i * H;
    if (act != Activation::Identity) activation_backward_n(act, d, saved + i * H, H);
    if (acc) {
      for (int64_t j = 0; j < H; ++j) acc[j] += static_cast<double>(d[j]);
    }
  }
}

// One function per dtype, each compiled per CPU capability (cpu_vector.h).
FUSEDGRAD_CPU_CLONES void bias_activation_rows_float(float* h, float* s, int64_t i0, int64_t i1, int64_t H,
                                                     const OperandReader<float>& b, Activation act) {
  bias_activation_rows<float>(h, s, i0, i1, H, b, act);
}
FUSEDGRAD_CPU_CLONES void bias_activation_rows_double(double* h, double* s, int64_t i0, int64_t i1, int64_t H,
                                                      const OperandReader<double>& b, Activation act) {
  bias_activation_rows<double>(h, s, i0, i1, H, b, act);
}
FUSEDGRAD_CPU_CLONES void hidden_backward_rows_float(float* ds, const float* saved, int64_t i0, int64_t i1,
                                                     int64_t H, Activation act, double* acc) {
  hidden_backward_rows<float>(ds, saved, i0, i1, H, act, acc);
}
FUSEDGRAD_CPU_CLONES void hidden_backward_rows_double(double* ds, const double* saved, int64_t i0, int64_t i1,
                                                      int64_t H, Activation act, double* acc) {
  hidden_backward_rows<double>(ds, saved, i0, i1, H, act, acc);
}
// One overload per element type, for the dispatch macros below.
inline void run_bias_activation_rows(float* h, float* s, int64_t i0, int64_t i1, int64_t H,
                              const OperandReader<float>& b, Activation act) {
  bias_activation_rows_float(h, s, i0, i1, H, b, act);
}
inline void run_bias_activation_rows(double* h, double* s, int64_t i0, int64_t i1, int64_t H,
                              const OperandReader<double>& b, Activation act) {
  bias_activation_rows_double(h, s, i0, i1, H, b, act);
}
inline void run_hidden_backward_rows(float* ds, const float* saved, int64_t i0, int64_t i1, int64_t H,
                              Activation act, double* acc) {
  hidden_backward_rows_float(ds, saved, i0, i1, H, act, acc);
}
inline void run_hidden_backward_rows(double* ds, const double* saved, int64_t i0, int64_t i1, int64_t H,
                              Activation act, double* acc) {
  hidden_backward_rows_double(ds, saved, i0, i1, H, act, acc);
}

// Where the residual pass writes what it derives from g = 2c r.
template <typename T>
struct ResidualPointers {
  T* g = nullptr;          // (N, O), may alias the prediction; null: loss only
  T* neg_g = nullptr;      // (N, O) −g, the gradient of a full-shape target
  bool column_sums = false;  // also Σ_rows g (bias / per-column target gradients)
};

// r = pred + b2 − t; returns Σ r² and writes g = 2c r (and its row sums into
// colsum_g[0..O), −g into neg_g) as requested. Σ r² is accumulated in double.
template <typename T>
double residual_pass(
    const T* pred, int64_t N, int64_t O,
    const OperandReader<T>& b2, const OperandReader<T>& target, T two_c,
    const ResidualPointers<T>& out, std::vector<double>& colsum_g) {
  const int64_t width = O + 1;  // O column sums, then Σ r²
  std::vector<double> totals(static_cast<size_t>(width));
  reduce_over_row_blocks<double>(N, O, width, totals.data(), [&](int64_t i0, int64_t i1, double* acc) {
    std::vector<T> scratch(out.g ? 0 : O);
    for (int64_t i = i0; i < i1; ++i) {
      T* r = out.g ? out.g + i * O : scratch.data();
      const T* p = pred + i * O;
      const T* b = b2.present() ? b2.row(i) : nullptr;
      const T* t = target.present() ? target.row(i) : nullptr;
      for (int64_t j = 0; j < O; ++j) {
        r[j] = math::residual(p[j], b ? b[j * b2.col_stride] : T(0), t ? t[j * target.col_stride] : T(0));
      }
      double sq = 0;
      for (int64_t j = 0; j < O; ++j) sq += static_cast<double>(r[j]) * static_cast<double>(r[j]);
      acc[O] += sq;
      if (!out.g) continue;
      for (int64_t j = 0; j < O; ++j) r[j] = math::loss_grad(r[j], two_c);  // r becomes g
      if (out.column_sums) {
        for (int64_t j = 0; j < O; ++j) acc[j] += static_cast<double>(r[j]);
      }
      if (out.neg_g) {
        T* d = out.neg_g + i * O;
        for (int64_t j = 0; j < O; ++j) d[j] = -r[j];
      }
    }
  });
  colsum_g.assign(totals.begin(), totals.begin() + O);
  return totals[O];
}

struct CpuElementwise final : ElementwiseKernels {
  void bias_activation(at::Tensor& h, const Broadcast2d& bias, Activation act, at::Tensor& s) const override {
    if (!bias.present() && act == Activation::Identity && s.is_same(h)) return;
    const int64_t N = h.size(0), H = h.size(1);
    AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "fusedgrad_bias_activation", [&] {
      scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* sp = s.data_ptr<scalar_t>();
      const OperandReader<scalar_t> b(bias);
      at::parallel_for(0, N, rows_per_task(H), [&](int64_t i0, int64_t i1) {
        run_bias_activation_rows(hp, sp, i0, i1, H, b, act);
      });
    });
  }

  void residual(const at::Tensor& pred, const Broadcast2d& b2, const Broadcast2d& target, double c,
                ResidualOutputs& out) const override {
    const int64_t N = pred.size(0), O = pred.size(1);
    AT_DISPATCH_FLOATING_TYPES(pred.scalar_type(), "fusedgrad_residual", [&] {
      ResidualPointers<scalar_t> ptrs;
      ptrs.g = out.g.defined() ? out.g.data_ptr<scalar_t>() : nullptr;
      ptrs.neg_g = out.neg_g.defined() ? out.neg_g.data_ptr<scalar_t>() : nullptr;
      ptrs.column_sums = out.colsum.defined() || out.neg_colsum.defined();
      std::vector<double> colsum_g;
      const double sum_sq = residual_pass<scalar_t>(
          pred.const_data_ptr<scalar_t>(), N, O, OperandReader<scalar_t>(b2), OperandReader<scalar_t>(target),
          static_cast<scalar_t>(2.0 * c), ptrs, colsum_g);
      *out.loss.data_ptr<scalar_t>() = static_cast<scalar_t>(c * sum_sq);
      for (auto [dst, sign] : {std::pair<at::Tensor*, double>{&out.colsum, 1.0}, {&out.neg_colsum, -1.0}}) {
        if (!dst->defined()) continue;
        scalar_t* d = dst->data_ptr<scalar_t>();
        for (int64_t j = 0; j < O; ++j) d[j] = static_cast<scalar_t>(sign * colsum_g[j]);
      }
    });
  }

  void hidden_backward(at::Tensor& ds, const at::Tensor& saved, Activation act, at::Tensor& colsum) const override {
    const int64_t N = ds.size(0), H = ds.size(1);
    AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "fusedgrad_hidden_backward", [&] {
      scalar_t* d = ds.data_ptr<scalar_t>();
      const scalar_t* a = saved.const_data_ptr<scalar_t>();
      if (colsum.defined()) {
        // Column sums run over up to N rows: accumulated in double, so float32
        // bias gradients keep float32 accuracy (a float accumulator loses ~1e-4
        // relative over thousands of rows, where autograd's pairwise sum does not).
        std::vector<double> sums(static_cast<size_t>(H));
        reduce_over_row_blocks<double>(N, H, H, sums.data(), [&](int64_t i0, int64_t i1, double* acc) {
          run_hidden_backward_rows(d, a, i0, i1, H, act, acc);
        });
        scalar_t* o = colsum.data_ptr<scalar_t>();
        for (int64_t j = 0; j < H; ++j) o[j] = static_cast<scalar_t>(sums[j]);
      } else if (act != Activation::Identity) {
        at::parallel_for(0, N, rows_per_task(H), [&](int64_t i0, int64_t i1) {
          run_hidden_backward_rows(d, a, i0, i1, H, act, nullptr);
        });
      }
    });
  }
};

}  // namespace

const ElementwiseKernels& cpu_elementwise_kernels() {
  static const CpuElementwise kernels;
  return kernels;
}

}  // namespace fusedgrad
