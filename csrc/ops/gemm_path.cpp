// The GEMM path's orchestration (gemm_path.h), the same for every backend.
#include "gemm_path.h"

namespace fusedgrad {
namespace {

const ElementwiseKernels& elementwise_for(const at::Tensor& x) {
#ifdef FUSEDGRAD_WITH_CUDA
  if (x.is_cuda()) return cuda_elementwise_kernels();
#endif
  TORCH_CHECK(x.is_cpu(), "fusedgrad: no kernels for device ", x.device().str());
  return cpu_elementwise_kernels();
}

at::Tensor empty_like_unrequested(const at::Tensor& like) { return at::empty({0}, like.options()); }

// A per-column operand's gradient, written by a kernel: its own shape, contiguous.
at::Tensor per_column_grad(const Broadcast2d& op, const at::Tensor& like) {
  return at::empty(op.source.sizes(), like.options());
}

// The forward's hidden layer, (N, H) contiguous: s = act(x w1ᵀ + b1), and
// what the backward reads to differentiate the activation (`saved`: s itself,
// or h where the derivative is written from the input).
struct Hidden {
  at::Tensor s, saved;
};

Hidden forward_hidden(const Problem& p, const ElementwiseKernels& k) {
  at::Tensor h = at::empty({p.N, p.H}, p.x2.options());
  at::mm_out(h, p.x2, p.w1.t());
  if (activation_saves_input(p.activation)) {
    at::Tensor s = at::empty_like(h);
    k.bias_activation(h, p.b1, p.activation, s);
    return {s, h};
  }
  k.bias_activation(h, p.b1, p.activation, h);
  return {h, h};
}

// Gradients below the output, from g = dL/dp (N, O) and the forward's hidden
// layer: dw2 = gᵀ s, ds = g w2, dh (in place over ds), db1, dw1 = dhᵀ x,
// dx = dh w1. `g_owned`: g is this call's own buffer (then ds may be g itself).
void backprop_output_grad(
    const Problem& p, const ElementwiseKernels& k, const at::Tensor& g, bool g_owned, const Hidden& hidden,
    bool need_x, bool need_w1, bool need_b1, bool need_w2,
    at::Tensor& dx, at::Tensor& dw1, at::Tensor& db1, at::Tensor& dw2) {
  if (!(need_w2 || need_x || need_w1 || need_b1)) return;
  const auto opts = g.options();
  if (need_w2) {
    dw2 = at::empty({p.O, p.H}, opts);
    at::mm_out(dw2, g.t(), hidden.s);
  }
  if (!(need_x || need_w1 || need_b1)) return;
  at::Tensor dh;  // starts as ds, becomes dh in place
  if (!p.has_w2()) {
    // Without a second layer ds = g; reuse g's buffer only when it is ours.
    dh = g_owned ? g : g.clone(at::MemoryFormat::Contiguous);
  } else {
    dh = at::empty({p.N, p.H}, opts);
    at::mm_out(dh, g, p.w2);
  }
  const bool fused_db1 = need_b1 && p.b1.kind == Broadcast2d::Kind::PerColumn;
  at::Tensor colsum;
  if (fused_db1) colsum = per_column_grad(p.b1, dh);
  k.hidden_backward(dh, hidden.saved, p.activation, colsum);
  if (fused_db1) db1 = colsum;
  if (need_b1 && !fused_db1) db1 = reduce_to_operand(dh, p.hidden_shape, p.b1);
  if (need_w1) {
    dw1 = at::empty({p.H, p.D}, opts);
    at::mm_out(dw1, dh.t(), p.x2);
  }
  if (need_x) {
    dx = at::empty({p.N, p.D}, opts);
    at::mm_out(dx, dh, p.w1);
    dx = dx.view(p.x_shape);
  }
}

}  // namespace

LossAndGrads gemm_loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need) {
  const ElementwiseKernels& k = elementwise_for(p.x2);
  const auto opts = p.x2.options();
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  const bool need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];

  const Hidden hidden = forward_hidden(p, k);
  at::Tensor pred = hidden.s;
  if (p.has_w2()) {
    pred = at::empty({p.N, p.O}, opts);
    at::mm_out(pred, hidden.s, p.w2.t());
  }
  LossAndGrads result;
  auto& grads = result.grads;
  ResidualOutputs out;
  out.loss = at::empty({}, opts);
  // g lives in the prediction's buffer when there is a second layer; without
  // one the prediction is s, which the hidden backward still needs.
  if (need_g) out.g = p.has_w2() ? pred : at::empty({p.N, p.O}, opts);
  const bool b2_per_column = need[kB2] && p.b2.kind == Broadcast2d::Kind::PerColumn;
  const bool t_per_column = need[kTarget] && p.target.kind == Broadcast2d::Kind::PerColumn;
  if (need[kTarget] && p.target.kind == Broadcast2d::Kind::Full) out.neg_g = at::empty({p.N, p.O}, opts);
  if (b2_per_column) out.colsum = per_column_grad(p.b2, pred);
  if (t_per_column) out.neg_colsum = per_column_grad(p.target, pred);
  k.residual(pred, p.b2, p.target, math::loss_scale(reduction, p.N * p.O), out);
  result.loss = out.loss;

  const at::Tensor& g = out.g;
  if (need[kTarget]) {
    switch (p.target.kind) {
      case Broadcast2d::Kind::Full: grads[kTarget] = out.neg_g.view(p.target.source.sizes()); break;
      case Broadcast2d::Kind::PerColumn: grads[kTarget] = out.neg_colsum; break;
      default: grads[kTarget] = reduce_to_operand(g.neg(), p.out_shape, p.target);
    }
  }
  if (need[kB2]) {
    // A full-shape db2 shares g's buffer; g is only read from here on.
    grads[kB2] = b2_per_column ? out.colsum : reduce_to_operand(g, p.out_shape, p.b2);
  }
  backprop_output_grad(
      p, k, g, /*g_owned=*/true, hidden, need[kX], need[kW1], need[kB1], need[kW2],
      grads[kX], grads[kW1], grads[kB1], grads[kW2]);
  for (int i = 0; i < kNumLossInputs; ++i) {
    if (!need[i]) grads[i] = empty_like_unrequested(pred);
  }
  return result;
}

std::array<at::Tensor, 2> gemm_forward(const Problem& p) {
  const ElementwiseKernels& k = elementwise_for(p.x2);
  const Hidden hidden = forward_hidden(p, k);
  // The activations slot holds what the backward differentiates the
  // activation with (hidden.saved); without a second layer, where the
  // prediction is s and the autograd kernel saves the output, it is empty
  // unless the derivative needs h.
  const bool saves_input = activation_saves_input(p.activation);
  if (!p.has_w2()) {
    return {hidden.s.view(p.out_shape), saves_input ? hidden.saved : empty_like_unrequested(hidden.s)};
  }
  at::Tensor pred = at::empty({p.N, p.O}, hidden.s.options());
  at::mm_out(pred, hidden.s, p.w2.t());
  if (p.b2.present()) k.bias_activation(pred, p.b2, Activation::Identity, pred);
  return {pred.view(p.out_shape), hidden.saved};
}

std::array<at::Tensor, kNumMlpInputs> gemm_backward(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need) {
  const ElementwiseKernels& k = elementwise_for(p.x2);
  std::array<at::Tensor, kNumMlpInputs> grads;
  const at::Tensor g = grad_out.reshape({p.N, p.O});
  Hidden hidden;
  hidden.saved = activations.reshape({p.N, p.H}).contiguous();
  hidden.s = hidden.saved;
  if (activation_saves_input(p.activation) && need[kMw2] && p.has_w2()) {
    // dw2 = gᵀ s needs s itself: s = act(h) from the saved h.
    hidden.s = at::empty_like(hidden.saved);
    at::Tensor h = hidden.saved;
    k.bias_activation(h, Broadcast2d{}, p.activation, hidden.s);
  }
  if (need[kMb2]) {
    grads[kMb2] = reduce_to_operand(g, p.out_shape, p.b2);
    // An op's output must never alias its input (grad_out): copy the view.
    if (p.b2.kind == Broadcast2d::Kind::Full) grads[kMb2] = grads[kMb2].clone();
  }
  backprop_output_grad(
      p, k, g, /*g_owned=*/false, hidden, need[kMx], need[kMw1], need[kMb1], need[kMw2],
      grads[kMx], grads[kMw1], grads[kMb1], grads[kMw2]);
  for (int i = 0; i < kNumMlpInputs; ++i) {
    if (!need[i]) grads[i] = empty_like_unrequested(g);
  }
  return grads;
}

}  // namespace fusedgrad
