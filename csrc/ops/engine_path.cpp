// The one-hidden-layer ops on the any-depth engine (engine_path.h): the
// network x → W1 → act → W2 is the engine's L = 2, so the loss, the forward and
// the backward of the depth-1 ops run the very code the deeper nets run.
#include "engine_path.h"

#include <atomic>

#include "../engine/mlp_engine.h"

namespace fusedgrad {
namespace {

// Above this many multiply-adds a row (D·H + H·O) the GEMM path's BLAS products
// beat the engine's blocks. Measured (benchmarks/crossover.py's shapes, 2 threads,
// AVX2 guest, loss + every gradient, the engine's speed-up over GEMM, float32 /
// float64): 2048×64→128→16 1.16× / 1.55×, 1024×16→512→16 (16 384 a row) 1.11× /
// 1.80×, 1000×256→32→1 0.93× / 0.90× (its forward 1.31× / 1.58×); beyond,
// 4096×128→128→128 (32 768) 0.96× / 1.34× and 4096×256→256→64 0.98× / 0.88×.
constexpr int64_t kEngineMaxRowMacs = 16 * 1024;
std::atomic<int64_t> engine_max_row_macs{kEngineMaxRowMacs};

// A bias the engine reads as one value per column: absent, per column, or of the full shape over one row.
bool engine_operand(const Broadcast2d& op, int64_t cols) {
  return op.kind == Broadcast2d::Kind::Absent || op.kind == Broadcast2d::Kind::PerColumn ||
      (op.kind == Broadcast2d::Kind::Full && op.source.numel() == cols);
}

// The engine's view of a problem: its shape and the contiguous tensors its pass reads.
struct EngineNet {
  engine::NetShape shape;
  at::Tensor x, w1, w2, b1, b2;  // b1, b2 undefined without a bias

  explicit EngineNet(const Problem& p) {
    shape.width = {p.D, p.H, p.O};
    shape.bias = {static_cast<char>(p.b1.present()), static_cast<char>(p.b2.present())};
    shape.act = p.activation;
    x = p.x2.contiguous();
    w1 = p.w1.contiguous();
    w2 = p.w2.contiguous();
    if (p.b1.present()) b1 = p.b1.source.contiguous();
    if (p.b2.present()) b2 = p.b2.source.contiguous();
  }

  template <typename T>
  engine::Pass<T> pass(int64_t N) const {
    engine::Pass<T> ps;
    ps.shape = &shape;
    ps.W = {w1.const_data_ptr<T>(), w2.const_data_ptr<T>()};
    ps.b = {b1.defined() ? b1.const_data_ptr<T>() : nullptr, b2.defined() ? b2.const_data_ptr<T>() : nullptr};
    ps.x = x.const_data_ptr<T>();
    ps.count = N;
    return ps;
  }
};

// The engine's double sums of dW1, db1, dW2, db2 into those of the gradients the flags ask for, in
// their arguments' shapes (a per-column bias's own shape), in the kernel's type.
template <typename T>
void write_param_grads(const Problem& p, const engine::SumLayout& lay, const std::vector<double>& sums,
                       bool w1, bool b1, bool w2, bool b2, at::Tensor* out_w1, at::Tensor* out_b1,
                       at::Tensor* out_w2, at::Tensor* out_b2) {
  const auto opts = p.x2.options();
  auto take = [&](int64_t off, at::IntArrayRef shape, int64_t count) {
    at::Tensor g = at::empty(shape, opts);
    T* dst = g.data_ptr<T>();
    for (int64_t e = 0; e < count; ++e) dst[e] = static_cast<T>(sums[off + e]);
    return g;
  };
  if (w1) *out_w1 = take(lay.dw[0], {p.H, p.D}, p.H * p.D);
  if (b1) *out_b1 = take(lay.db[0], p.b1.source.sizes(), p.H);
  if (w2) *out_w2 = take(lay.dw[1], {p.O, p.H}, p.O * p.H);
  if (b2) *out_b2 = take(lay.db[1], p.b2.source.sizes(), p.O);
}

at::Tensor placeholder(const Problem& p) { return at::empty({0}, p.x2.options()); }

}  // namespace

bool engine_path_applies(const Problem& p) {
  return p.x2.is_cpu() && p.has_w2() && p.D > 0 && p.H > 0 && p.O > 0 && engine_operand(p.b1, p.H) &&
      engine_operand(p.b2, p.O) && (p.target.kind == Broadcast2d::Kind::Absent || p.target.kind == Broadcast2d::Kind::Full) &&
      p.D * p.H + p.H * p.O <= engine_max_row_macs.load(std::memory_order_relaxed);
}

int64_t set_engine_path_max_macs(int64_t macs) {
  return engine_max_row_macs.exchange(macs < 0 ? kEngineMaxRowMacs : macs);
}

LossAndGrads engine_loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need) {
  const EngineNet net(p);
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(lay.size, 0.0);
  const double c = math::loss_scale(reduction, p.N * p.O);
  const auto opts = p.x2.options();
  const bool has_target = p.target.present();
  const at::Tensor t = has_target ? p.target.source.contiguous() : at::Tensor();
  LossAndGrads out;
  auto& g = out.grads;
  g[kX] = need[kX] ? at::empty(p.x_shape, opts) : placeholder(p);
  g[kTarget] = need[kTarget] ? at::empty(p.target.source.sizes(), opts) : placeholder(p);
  const bool params = need[kW1] || need[kB1] || need[kW2] || need[kB2];
  AT_DISPATCH_FLOATING_TYPES(p.x2.scalar_type(), "fusedgrad.mlp_loss", [&] {
    engine::Pass<scalar_t> pass = net.pass<scalar_t>(p.N);
    pass.target = has_target ? t.const_data_ptr<scalar_t>() : nullptr;
    pass.two_c = static_cast<scalar_t>(2.0 * c);
    pass.epilogue = engine::Epilogue::LossGrads;
    pass.param_grads = params;
    pass.dx = need[kX] ? g[kX].data_ptr<scalar_t>() : nullptr;
    pass.dt = need[kTarget] ? g[kTarget].data_ptr<scalar_t>() : nullptr;
    pass.sums = sums.data();
    engine::run(pass);
    // Mean over no rows is NaN, as nn.MSELoss gives it (c = 1/0).
    out.loss = at::scalar_tensor(p.N == 0 ? c * 0.0 : c * sums[lay.loss], opts);
    write_param_grads<scalar_t>(p, lay, sums, need[kW1], need[kB1], need[kW2], need[kB2], &g[kW1], &g[kB1],
                                &g[kW2], &g[kB2]);
  });
  for (int i : {kW1, kB1, kW2, kB2}) {
    if (!need[i]) g[i] = placeholder(p);
  }
  return out;
}

std::array<at::Tensor, 2> engine_forward(const Problem& p, bool activations) {
  const EngineNet net(p);
  const auto opts = p.x2.options();
  at::Tensor pred = at::empty({p.N, p.O}, opts);
  at::Tensor hidden = activations ? at::empty({p.N, p.H}, opts) : placeholder(p);
  AT_DISPATCH_FLOATING_TYPES(p.x2.scalar_type(), "fusedgrad.mlp", [&] {
    engine::Pass<scalar_t> pass = net.pass<scalar_t>(p.N);
    pass.epilogue = engine::Epilogue::Forward;
    pass.pred = pred.data_ptr<scalar_t>();
    pass.hidden = activations ? hidden.data_ptr<scalar_t>() : nullptr;
    engine::run(pass);
  });
  return {pred.view(p.out_shape), hidden};
}

std::array<at::Tensor, kNumMlpInputs> engine_backward(const Problem& p, const at::Tensor& grad_out,
                                                      const MlpGradMask& need) {
  const EngineNet net(p);
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(lay.size, 0.0);
  const at::Tensor g_out = grad_out.reshape({p.N, p.O}).contiguous();
  std::array<at::Tensor, kNumMlpInputs> g;
  g[kMx] = need[kMx] ? at::empty(p.x_shape, p.x2.options()) : placeholder(p);
  const bool params = need[kMw1] || need[kMb1] || need[kMw2] || need[kMb2];
  AT_DISPATCH_FLOATING_TYPES(p.x2.scalar_type(), "fusedgrad.mlp_backward", [&] {
    // The engine recomputes each row block's forward rather than reading the saved activations.
    engine::Pass<scalar_t> pass = net.pass<scalar_t>(p.N);
    pass.grad_out = g_out.const_data_ptr<scalar_t>();
    pass.epilogue = engine::Epilogue::Backward;
    pass.param_grads = params;
    pass.dx = need[kMx] ? g[kMx].data_ptr<scalar_t>() : nullptr;
    pass.sums = sums.data();
    engine::run(pass);
    write_param_grads<scalar_t>(p, lay, sums, need[kMw1], need[kMb1], need[kMw2], need[kMb2], &g[kMw1],
                                &g[kMb1], &g[kMw2], &g[kMb2]);
  });
  for (int i : {kMw1, kMb1, kMw2, kMb2}) {
    if (!need[i]) g[i] = placeholder(p);
  }
  return g;
}

}  // namespace fusedgrad
