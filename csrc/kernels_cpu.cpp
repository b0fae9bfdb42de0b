// CPU kernels. Each step is one line of the README's "Math" section:
//
//   h  = x w1ᵀ + b1      s  = act(h)                 forward_hidden (σ: apply_activation_)
//   p  = s w2ᵀ + b2      r  = p − t                  residual_pass
//   L  = c Σ r²          g  = 2c r                   residual_pass
//   dw2 = gᵀ s           db2 = Σ_rows g               backprop_output_grad
//   ds = g w2            dh = ds ⊙ act'(s)            hidden_backward_pass
//   dw1 = dhᵀ x          db1 = Σ_rows dh    dx = dh w1    dt = −g
//
// Matrix products go to BLAS through at::mm_out into buffers allocated once
// per call; every element-wise step is a single fused loop over rows, run in
// parallel with at::parallel_for. Row sums (bias gradients, the loss) are
// reduced over fixed row blocks combined in block order, so results are
// bitwise identical whatever the number of threads.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace fusedgrad {
namespace {

// Elements of work below which splitting across threads does not pay.
constexpr int64_t kElemsPerTask = 16384;

int64_t rows_per_task(int64_t cols) {
  return std::max<int64_t>(1, kElemsPerTask / std::max<int64_t>(cols, 1));
}

// Element (i, j) of a broadcast operand: row(i)[j * col_stride].
template <typename T>
struct OperandReader {
  const T* data = nullptr;
  int64_t row_stride = 0, col_stride = 0;
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

// h += b1, in place over the (N, H) GEMM output h = x w1ᵀ (also p += b2).
template <typename T>
void bias_pass(T* h, int64_t N, int64_t H, const OperandReader<T>& b) {
  if (!b.present()) return;
  at::parallel_for(0, N, rows_per_task(H), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      T* row = h + i * H;
      const T* bi = b.row(i);
      if (b.col_stride == 1) {
        for (int64_t j = 0; j < H; ++j) row[j] += bi[j];
      } else {
        for (int64_t j = 0; j < H; ++j) row[j] += bi[j * b.col_stride];
      }
    }
  });
}

// Where the residual pass writes what it derives from g = 2c r.
template <typename T>
struct ResidualOutputs {
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
    const ResidualOutputs<T>& out, std::vector<double>& colsum_g) {
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

// dh = ds ⊙ act'(s), in place over ds; optionally Σ_rows dh into colsum_dh.
template <typename T>
void hidden_backward_pass(
    T* ds, const T* s, int64_t N, int64_t H, Activation act, double* colsum_dh) {
  // Column sums run over up to N rows: accumulated in double, so float32 bias
  // gradients keep float32 accuracy (a float accumulator loses ~1e-4 relative
  // over thousands of rows, where autograd's pairwise sum does not).
  using Acc = double;
  auto rows = [&](int64_t i0, int64_t i1, Acc* acc) {
    for (int64_t i = i0; i < i1; ++i) {
      T* d = ds + i * H;
      const T* si = s + i * H;
      if (act == Activation::Sigmoid) {
        for (int64_t j = 0; j < H; ++j) d[j] = math::activation_backward(d[j], si[j], act);
      }
      if (acc) {
        for (int64_t j = 0; j < H; ++j) acc[j] += static_cast<Acc>(d[j]);
      }
    }
  };
  if (colsum_dh) {
    reduce_over_row_blocks<Acc>(N, H, H, colsum_dh, rows);
  } else if (act != Activation::Identity) {
    at::parallel_for(0, N, rows_per_task(H), [&](int64_t i0, int64_t i1) { rows(i0, i1, nullptr); });
  }
}

// A per-column operand's gradient from precomputed column sums, in its own shape.
template <typename Acc>
at::Tensor column_sums_as_operand(const std::vector<Acc>& sums, const Broadcast2d& op, Acc sign) {
  at::Tensor out = at::empty(op.source.sizes(), op.source.options().requires_grad(false));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedgrad_column_sums", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const int64_t n = out.numel();
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(sign * sums[j]);
  });
  return out;
}

}  // namespace

void apply_activation_(at::Tensor& s, Activation act) {
  if (act == Activation::Sigmoid) at::sigmoid_(s);
}

namespace {

// s = act(x w1ᵀ + b1), (N, H), contiguous.
at::Tensor forward_hidden(const Problem& p) {
  at::Tensor s = at::empty({p.N, p.H}, p.x2.options());
  at::mm_out(s, p.x2, p.w1.t());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fusedgrad_forward_hidden", [&] {
    bias_pass<scalar_t>(s.data_ptr<scalar_t>(), p.N, p.H, OperandReader<scalar_t>(p.b1));
  });
  apply_activation_(s, p.activation);
  return s;
}

// Gradients below the output, from g = dL/dp (N, O) and the saved s (N, H):
// dw2, ds = g w2, dh, dw1, db1, dx. `g_owned` says whether g is this call's
// own buffer (then it may be reused in place and returned as a gradient).
void backprop_output_grad(
    const Problem& p, const at::Tensor& g, bool g_owned, const at::Tensor& s,
    bool need_x, bool need_w1, bool need_b1, bool need_w2,
    at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2) {
  // dh starts as ds and becomes dh in place.
  at::Tensor dh = output_layer_grads(p, g, g_owned, s, need_w2, need_x || need_w1 || need_b1, dw2);
  if (!dh.defined()) return;
  const bool fused_db1 = need_b1 && p.b1.kind == Broadcast2d::Kind::PerColumn;
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "fusedgrad_hidden_backward", [&] {
    using Acc = double;
    std::vector<Acc> colsum(fused_db1 ? p.H : 0);
    hidden_backward_pass<scalar_t>(
        dh.data_ptr<scalar_t>(), s.const_data_ptr<scalar_t>(), p.N, p.H, p.activation,
        fused_db1 ? colsum.data() : nullptr);
    if (fused_db1) db1 = column_sums_as_operand<Acc>(colsum, p.b1, Acc(1));
  });
  if (need_b1 && !fused_db1) db1 = reduce_to_operand(dh, p.hidden_shape, p.b1);
  first_layer_grads(p, dh, need_w1, need_x, dw1, dx);
}

at::Tensor empty_like_unrequested(const at::Tensor& like) {
  return at::empty({0}, like.options());
}

}  // namespace

LossAndGrads mlp_loss_and_grads_cpu(const Problem& p, Reduction reduction, const LossGradMask& need) {
  if (stream_path_applies(p)) return mlp_loss_and_grads_cpu_stream(p, reduction, need);
  if (small_path_applies(p)) return mlp_loss_and_grads_cpu_small(p, reduction, need);
  const auto opts = p.x2.options();
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  const bool need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];

  at::Tensor s = forward_hidden(p);
  at::Tensor pred = s;
  if (p.has_w2()) {
    pred = at::empty({p.N, p.O}, opts);
    at::mm_out(pred, s, p.w2.t());
  }
  // g lives in the prediction's buffer when there is a second layer; without
  // one the prediction is s, which the hidden backward still needs.
  at::Tensor g;
  if (need_g) g = p.has_w2() ? pred : at::empty({p.N, p.O}, opts);

  const bool b2_per_column = need[kB2] && p.b2.kind == Broadcast2d::Kind::PerColumn;
  const bool t_per_column = need[kTarget] && p.target.kind == Broadcast2d::Kind::PerColumn;
  at::Tensor neg_g_full;
  if (need[kTarget] && p.target.kind == Broadcast2d::Kind::Full) {
    neg_g_full = at::empty({p.N, p.O}, opts);
  }

  const double c = math::loss_scale(reduction, p.N * p.O);
  LossAndGrads result;
  std::vector<double> colsum_g;
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fusedgrad_mlp_loss", [&] {
    ResidualOutputs<scalar_t> out;
    out.g = need_g ? g.data_ptr<scalar_t>() : nullptr;
    out.neg_g = neg_g_full.defined() ? neg_g_full.data_ptr<scalar_t>() : nullptr;
    out.column_sums = b2_per_column || t_per_column;
    const double sum_sq = residual_pass<scalar_t>(
        pred.const_data_ptr<scalar_t>(), p.N, p.O, OperandReader<scalar_t>(p.b2),
        OperandReader<scalar_t>(p.target), static_cast<scalar_t>(2.0 * c), out, colsum_g);
    result.loss = at::empty({}, opts);
    *result.loss.data_ptr<scalar_t>() = static_cast<scalar_t>(c * sum_sq);
  });

  auto& grads = result.grads;
  if (need[kTarget]) {
    switch (p.target.kind) {
      case Broadcast2d::Kind::Full: grads[kTarget] = neg_g_full.view(p.target.source.sizes()); break;
      case Broadcast2d::Kind::PerColumn: grads[kTarget] = column_sums_as_operand<double>(colsum_g, p.target, -1.0); break;
      default: grads[kTarget] = reduce_to_operand(g.neg(), p.out_shape, p.target);
    }
  }
  if (need[kB2]) {
    grads[kB2] = b2_per_column ? column_sums_as_operand<double>(colsum_g, p.b2, 1.0)
                               : reduce_to_operand(g, p.out_shape, p.b2);
    // A full-shape db2 shares g's buffer; g is only read from here on.
  }
  backprop_output_grad(
      p, g, /*g_owned=*/true, s, need[kX], need[kW1], need[kB1], need[kW2],
      grads[kX], grads[kW1], grads[kB1], grads[kW2]);
  for (int k = 0; k < kNumLossInputs; ++k) {
    if (!need[k]) grads[k] = empty_like_unrequested(s);
  }
  return result;
}

std::array<at::Tensor, 2> mlp_forward_cpu(const Problem& p) {
  if (stream_path_applies(p)) return mlp_forward_cpu_stream(p);
  at::Tensor s = forward_hidden(p);
  if (!p.has_w2()) {
    // The prediction is s itself; the autograd kernel saves the output instead
    // of a second copy, so the activations slot stays empty.
    return {s.view(p.out_shape), empty_like_unrequested(s)};
  }
  at::Tensor pred = at::empty({p.N, p.O}, s.options());
  at::mm_out(pred, s, p.w2.t());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "fusedgrad_mlp_forward", [&] {
    bias_pass<scalar_t>(pred.data_ptr<scalar_t>(), p.N, p.O, OperandReader<scalar_t>(p.b2));
  });
  return {pred.view(p.out_shape), s};
}

std::array<at::Tensor, kNumMlpInputs> mlp_backward_cpu(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations,
    const MlpGradMask& need) {
  if (stream_path_applies(p)) return mlp_backward_cpu_stream(p, grad_out, activations, need);
  std::array<at::Tensor, kNumMlpInputs> grads;
  const at::Tensor g = grad_out.reshape({p.N, p.O});
  const at::Tensor s = activations.reshape({p.N, p.H}).contiguous();
  if (need[kMb2]) {
    grads[kMb2] = reduce_to_operand(g, p.out_shape, p.b2);
    // An op's output must never alias its input (grad_out): copy the view.
    if (p.b2.kind == Broadcast2d::Kind::Full) grads[kMb2] = grads[kMb2].clone();
  }
  backprop_output_grad(
      p, g, /*g_owned=*/false, s, need[kMx], need[kMw1], need[kMb1], need[kMw2],
      grads[kMx], grads[kMw1], grads[kMb1], grads[kMw2]);
  for (int k = 0; k < kNumMlpInputs; ++k) {
    if (!need[k]) grads[k] = empty_like_unrequested(s);
  }
  return grads;
}

}  // namespace fusedgrad
