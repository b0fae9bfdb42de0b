// The small-problem path of the loss op: direct loops, no BLAS call, and no
// intermediate tensor but s itself. A first pass computes s = act(x W1ᵀ + b1)
// for all rows (σ over the whole block by ATen's vectorised sigmoid); a second
// does every other step of the README's "Math" for row i before row i+1
// (scratch: H + O values). For the tiny networks of curve fits and surrogates
// a BLAS call, and the tensors between calls, cost more than the arithmetic;
// past the measured crossover (kSmallPathMaxMacs) the GEMM path of
// kernels_cpu.cpp is faster.
//
// Per row i (x_i, t_i rows; s, p, g, ds, dh vectors):
//   s   = act(W1 x_i + b1_i)             (computed as Σ_d x_id · W1ᵀ[d,:])
//   p   = W2 s + b2_i;   r = p − t_i;   L += r·r;   g = 2c r
//   dw2 += g sᵀ;   db2 += g;   dt_i = −g
//   ds  = W2ᵀ g;   dh = ds ⊙ act'(s)
//   dw1 += dh x_iᵀ;   db1 += dh;   dx_i = W1ᵀ dh
// Accumulation runs over rows in order, so results are deterministic.
#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <cstdlib>
#include <vector>

namespace fusedgrad {
namespace {

// Multiply-adds of one forward pass, N·(D·H + H·O), up to which the direct
// loops beat BLAS (measured: README, "Performance"). FUSEDGRAD_SMALL_PATH_MAX_MACS
// overrides it, read once, for measuring the crossover on another machine.
constexpr int64_t kSmallPathMaxMacsDefault = 1 << 16;  // measured: direct wins at 41k MACs, GEMM at 98k

int64_t small_path_max_macs() {
  static const int64_t limit = [] {
    const char* env = std::getenv("FUSEDGRAD_SMALL_PATH_MAX_MACS");
    return env ? std::atoll(env) : kSmallPathMaxMacsDefault;
  }();
  return limit;
}

bool kind_supported(const Broadcast2d& op) {
  return op.kind != Broadcast2d::Kind::Other;
}

// dst[k] += a · src[k]
template <typename T>
inline void axpy(T* dst, T a, const T* src, int64_t n) {
  for (int64_t k = 0; k < n; ++k) dst[k] += a * src[k];
}

template <typename T>
void small_loss_and_grads(const Problem& p, double c, const LossGradMask& need, LossAndGrads& out) {
  const int64_t N = p.N, D = p.D, H = p.H, O = p.O;
  const bool has_w2 = p.has_w2();
  const Activation act = p.activation;
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  const bool need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];
  const T two_c = static_cast<T>(2.0 * c);

  // Contiguous copies of the (tiny) weights in the orientation the loops
  // stream through: W1ᵀ (D, H) rows for the forward and dx, W2 (O, H) rows
  // for both p and ds. Costs D·H + O·H, not N·(…).
  std::vector<T> w1t(D * H), w2c(has_w2 ? O * H : 0);
  {
    const T* w = p.w1.const_data_ptr<T>();
    const int64_t rs = p.w1.stride(0), cs = p.w1.stride(1);
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        w1t[d * H + j] = w[j * rs + d * cs];
      }
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
  T* dw1 = need[kW1] ? g_out[kW1].data_ptr<T>() : nullptr;
  T* dw2 = need[kW2] ? g_out[kW2].data_ptr<T>() : nullptr;
  // Full-shape bias/target gradients are written row by row; the others are
  // column sums written at the end. (Kinds, not pointers, decide: an empty
  // tensor's data pointer may be null.)
  const bool db1_rows = need[kB1] && p.b1.kind == Broadcast2d::Kind::Full;
  const bool db2_rows = need[kB2] && p.b2.kind == Broadcast2d::Kind::Full;
  const bool dt_rows = need[kTarget] && p.target.kind == Broadcast2d::Kind::Full;
  T* db1_full = db1_rows ? g_out[kB1].data_ptr<T>() : nullptr;
  T* db2_full = db2_rows ? g_out[kB2].data_ptr<T>() : nullptr;
  T* dt_full = dt_rows ? g_out[kTarget].data_ptr<T>() : nullptr;
  // dw1 is accumulated transposed, (D, H), so each row update is one
  // contiguous axpy of length H (D is often 1..4 here); transposed once at the end.
  std::vector<T> dw1t(dw1 ? D * H : 0, T(0));
  if (dw2) std::fill(dw2, dw2 + O * H, T(0));

  using Acc = double;  // bias / target gradients are sums over N rows: keep them accurate in float32
  std::vector<Acc> db1_sum(H, Acc(0)), g_sum(O, Acc(0));
  std::vector<T> r(O), dh(H);
  double sum_sq = 0;

  const T* b1 = p.b1.present() ? p.b1.data<T>() : nullptr;
  const T* b2 = p.b2.present() ? p.b2.data<T>() : nullptr;
  const T* t = p.target.present() ? p.target.data<T>() : nullptr;

  // First pass, all rows: s = act(x W1ᵀ + b1), then σ over the whole (N, H)
  // block at once with ATen's vectorised sigmoid (per-element std::exp would
  // cost several times the rest of the step).
  at::Tensor s_tensor = at::empty({N, H}, p.x2.options());
  T* s_all = s_tensor.data_ptr<T>();
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * x_rs;
    T* si = s_all + i * H;
    std::fill(si, si + H, T(0));
    for (int64_t d = 0; d < D; ++d) axpy(si, xi[d * x_cs], w1t.data() + d * H, H);
    if (b1) {
      const T* bi = b1 + i * p.b1.row_stride;
      for (int64_t j = 0; j < H; ++j) si[j] += bi[j * p.b1.col_stride];
    }
  }
  apply_activation_(s_tensor, act);

  // Second pass, row by row: everything else.
  for (int64_t i = 0; i < N; ++i) {
    const T* xi = x + i * x_rs;
    const T* s = s_all + i * H;  // act(W1 x_i + b1_i), from the first pass
    // r = W2 s + b2_i − t_i   (or s − t_i without a second layer)
    for (int64_t o = 0; o < O; ++o) {
      T v;
      if (has_w2) {
        const T* w2o = w2c.data() + o * H;
        v = T(0);
        for (int64_t j = 0; j < H; ++j) v += w2o[j] * s[j];
      } else {
        v = s[o];
      }
      r[o] = v = math::residual(v, b2 ? b2[i * p.b2.row_stride + o * p.b2.col_stride] : T(0),
                                t ? t[i * p.target.row_stride + o * p.target.col_stride] : T(0));
      sum_sq += static_cast<double>(v) * static_cast<double>(v);
    }
    if (!need_g) continue;
    for (int64_t o = 0; o < O; ++o) r[o] = math::loss_grad(r[o], two_c);  // r becomes g
    for (int64_t o = 0; o < O; ++o) g_sum[o] += static_cast<Acc>(r[o]);
    if (db2_full) std::copy(r.begin(), r.end(), db2_full + i * O);
    if (dt_full) {
      for (int64_t o = 0; o < O; ++o) dt_full[i * O + o] = -r[o];
    }
    if (dw2) {
      for (int64_t o = 0; o < O; ++o) axpy(dw2 + o * H, r[o], s, H);
    }
    if (!need_hidden) continue;
    // ds = W2ᵀ g (= g without a second layer), dh = ds ⊙ act'(s)
    if (has_w2) {
      std::fill(dh.begin(), dh.end(), T(0));
      for (int64_t o = 0; o < O; ++o) axpy(dh.data(), r[o], w2c.data() + o * H, H);
    } else {
      std::copy(r.begin(), r.end(), dh.begin());
    }
    if (act == Activation::Sigmoid) {
      for (int64_t j = 0; j < H; ++j) dh[j] = math::activation_backward(dh[j], s[j], act);
    }
    for (int64_t j = 0; j < H; ++j) db1_sum[j] += static_cast<Acc>(dh[j]);
    if (db1_full) std::copy(dh.begin(), dh.end(), db1_full + i * H);
    if (dw1) {  // dw1ᵀ[d, :] += x_id · dh: contiguous rows of length H, whatever x's strides
      for (int64_t d = 0; d < D; ++d) axpy(dw1t.data() + d * H, xi[d * x_cs], dh.data(), H);
    }
    if (dx) {  // dx_i[d] = W1ᵀ[d, :] · dh
      T* dxi = dx + i * D;
      for (int64_t d = 0; d < D; ++d) {
        const T* w1t_d = w1t.data() + d * H;
        T v = T(0);
        for (int64_t j = 0; j < H; ++j) v += w1t_d[j] * dh[j];
        dxi[d] = v;
      }
    }
  }

  if (dw1) {
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t d = 0; d < D; ++d) dw1[j * D + d] = dw1t[d * H + j];
    }
  }
  *out.loss.data_ptr<T>() = static_cast<T>(c * sum_sq);
  auto write_column_sums = [](at::Tensor& dst, const std::vector<Acc>& sums, Acc sign) {
    T* d = dst.data_ptr<T>();
    for (size_t k = 0; k < sums.size(); ++k) d[k] = static_cast<T>(sign * sums[k]);
  };
  if (need[kB1] && !db1_rows) write_column_sums(g_out[kB1], db1_sum, Acc(1));
  if (need[kB2] && !db2_rows) write_column_sums(g_out[kB2], g_sum, Acc(1));
  if (need[kTarget] && !dt_rows) write_column_sums(g_out[kTarget], g_sum, Acc(-1));
}

}  // namespace

bool small_path_applies(const Problem& p) {
  const int64_t macs = p.N * (p.D * p.H + p.H * p.O);
  return macs <= small_path_max_macs() && kind_supported(p.b1) && kind_supported(p.b2) &&
      kind_supported(p.target);
}

LossAndGrads mlp_loss_and_grads_cpu_small(const Problem& p, Reduction reduction, const LossGradMask& need) {
  const auto opts = p.x2.options();
  LossAndGrads out;
  out.loss = at::empty({}, opts);
  auto& g = out.grads;
  // Each gradient is allocated in its argument's shape (contiguous) and
  // written in place by the row loop; the rest stay empty placeholders.
  g[kX] = at::empty(need[kX] ? at::IntArrayRef(p.x_shape) : at::IntArrayRef({0}), opts);
  g[kW1] = at::empty(need[kW1] ? at::IntArrayRef({p.H, p.D}) : at::IntArrayRef({0}), opts);
  g[kB1] = at::empty(need[kB1] ? p.b1.source.sizes() : at::IntArrayRef({0}), opts);
  g[kW2] = at::empty(need[kW2] ? at::IntArrayRef({p.O, p.H}) : at::IntArrayRef({0}), opts);
  g[kB2] = at::empty(need[kB2] ? p.b2.source.sizes() : at::IntArrayRef({0}), opts);
  g[kTarget] = at::empty(need[kTarget] ? p.target.source.sizes() : at::IntArrayRef({0}), opts);
  const double c = math::loss_scale(reduction, p.N * p.O);
  AT_DISPATCH_FLOATING_TYPES(opts.dtype().toScalarType(), "fusedgrad_small_loss", [&] {
    small_loss_and_grads<scalar_t>(p, c, need, out);
  });
  return out;
}

}  // namespace fusedgrad
