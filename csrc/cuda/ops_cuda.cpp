// CUDA kernels of the fusedgrad ops (schemas in ops_cpu.cpp), registered on
// the CUDA dispatch key. Same algorithm, semantics and return conventions as
// kernels_cpu.cpp, step by step:
//
//   h  = x w1ᵀ (cuBLAS)    s  = act(h + b1)              forward_hidden
//   p  = s w2ᵀ (cuBLAS)    r  = p + b2 − t, L, g = 2c r   cuda::residual
//   dw2 = gᵀ s             db2 = Σ_rows g                 (column sums fused in the residual pass)
//   ds = g w2              dh = ds ⊙ act'(s), Σ_rows dh   cuda::hidden_backward
//   dw1 = dhᵀ x            dx = dh w1      dt = −g
//
// Matrix products go to cuBLAS through at::mm_out (in the tensors' own dtype,
// float16/bfloat16 included; cuBLAS accumulates those in float32); the fused
// element-wise passes are the kernels of kernels_cuda.cu. Every op
//   * validates its arguments first (make_problem),
//   * then sets the tensors' device (CUDAGuard) and launches everything on
//     that device's current stream (at::cuda::getCurrentCUDAStream()), where
//     at::mm_out and every other ATen call used here run too,
//   * never synchronises with the host: the loss stays a 0-dim device tensor,
//     workspaces come from the caching allocator, nothing is read back.
// Gradients that are not requested come back as empty (numel 0) tensors.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../kernels.h"
#include "../ops.h"
#include "../entry_points.h"
#include "../problem.h"
#include "kernels_cuda.h"

#include <algorithm>

namespace fusedgrad {
namespace {

using at::Tensor;
using ops::OptTensor;

cuda::OperandView operand_view(const Broadcast2d& op) {
  cuda::OperandView v;
  if (op.present()) {
    v.data = op.view.const_data_ptr();
    v.row_stride = op.row_stride;
    v.col_stride = op.col_stride;
  }
  return v;
}

// A byte workspace for the reductions' partial sums, from the caching
// allocator (stream-ordered: no synchronisation).
Tensor workspace(int64_t bytes, const Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

Tensor empty_like_unrequested(const Tensor& like) { return at::empty({0}, like.options()); }

// Device guard + current stream of x's device. make_problem has checked that
// every tensor argument is on x's device.
struct OnDevice {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit OnDevice(const Tensor& x)
      : guard(checked_cuda_device(x)),
        stream(at::cuda::getCurrentCUDAStream(x.device().index()).stream()) {}
  static c10::Device checked_cuda_device(const Tensor& x) {
    TORCH_CHECK_VALUE(
        x.is_cuda(), "fusedgrad: the CUDA kernel got x on device ", x.device().str(),
        "; all tensor arguments must be on one CUDA device");
    return x.device();
  }
};

// s = act(x w1ᵀ + b1), (N, H), contiguous.
Tensor forward_hidden(const Problem& p, cudaStream_t stream) {
  Tensor s = at::empty({p.N, p.H}, p.x2.options());
  at::mm_out(s, p.x2, p.w1.t());
  if (p.b1.present() || p.activation != Activation::Identity) {
    cuda::bias_activation(
        s.scalar_type(), s.data_ptr(), p.N, p.H, operand_view(p.b1), p.activation, stream);
  }
  return s;
}

// A per-column operand's gradient, filled by a kernel: a fresh tensor of the
// operand's own shape (numel = cols, contiguous).
Tensor per_column_grad(const Broadcast2d& op, const Tensor& like) {
  return at::empty(op.source.sizes(), like.options());
}

// As kernels_cpu.cpp's backprop_output_grad: from g = dL/dp (N, O) and the
// saved s (N, H), dw2, ds = g w2, dh (in place), db1, dw1, dx.
void backprop_output_grad(
    const Problem& p, const Tensor& g, bool g_owned, const Tensor& s, cudaStream_t stream,
    bool need_x, bool need_w1, bool need_b1, bool need_w2,
    Tensor& dx, Tensor& dw1, Tensor& db1, Tensor& dw2) {
  // dh starts as ds and becomes dh in place.
  Tensor dh = output_layer_grads(p, g, g_owned, s, need_w2, need_x || need_w1 || need_b1, dw2);
  if (!dh.defined()) return;
  const bool fused_db1 = need_b1 && p.b1.kind == Broadcast2d::Kind::PerColumn;
  Tensor ws;
  if (fused_db1) {
    db1 = per_column_grad(p.b1, s);
    ws = workspace(cuda::hidden_backward_workspace_bytes(dh.scalar_type(), p.N, p.H), s);
  }
  cuda::hidden_backward(
      dh.scalar_type(), dh.data_ptr(), s.const_data_ptr(), p.N, p.H, p.activation,
      fused_db1 ? db1.data_ptr() : nullptr, fused_db1 ? ws.data_ptr() : nullptr, stream);
  if (need_b1 && !fused_db1) db1 = reduce_to_operand(dh, p.hidden_shape, p.b1);
  first_layer_grads(p, dh, need_w1, need_x, dw1, dx);
}

LossAndGrads mlp_loss_and_grads_cuda(const Problem& p, Reduction reduction, const LossGradMask& need) {
  const OnDevice on(p.x2);
  const auto opts = p.x2.options();
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  const bool need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];

  Tensor s = forward_hidden(p, on.stream);
  Tensor pred = s;
  if (p.has_w2()) {
    pred = at::empty({p.N, p.O}, opts);
    at::mm_out(pred, s, p.w2.t());
  }
  // g lives in the prediction's buffer when there is a second layer; without
  // one the prediction is s, which the hidden backward still needs.
  Tensor g;
  if (need_g) g = p.has_w2() ? pred : at::empty({p.N, p.O}, opts);

  const bool b2_per_column = need[kB2] && p.b2.kind == Broadcast2d::Kind::PerColumn;
  const bool t_per_column = need[kTarget] && p.target.kind == Broadcast2d::Kind::PerColumn;
  LossAndGrads result;
  auto& grads = result.grads;
  Tensor neg_g_full;
  if (need[kTarget] && p.target.kind == Broadcast2d::Kind::Full) neg_g_full = at::empty({p.N, p.O}, opts);
  if (b2_per_column) grads[kB2] = per_column_grad(p.b2, s);
  if (t_per_column) grads[kTarget] = per_column_grad(p.target, s);
  result.loss = at::empty({}, opts);

  cuda::ResidualArgs args;
  args.pred = pred.const_data_ptr();
  args.b2 = operand_view(p.b2);
  args.target = operand_view(p.target);
  args.loss_scale = math::loss_scale(reduction, p.N * p.O);
  args.loss = result.loss.data_ptr();
  args.g = need_g ? g.data_ptr() : nullptr;
  args.neg_g = neg_g_full.defined() ? neg_g_full.data_ptr() : nullptr;
  args.colsum = b2_per_column ? grads[kB2].data_ptr() : nullptr;
  args.neg_colsum = t_per_column ? grads[kTarget].data_ptr() : nullptr;
  const Tensor ws = workspace(cuda::residual_workspace_bytes(p.N, p.O, b2_per_column || t_per_column), s);
  cuda::residual(s.scalar_type(), p.N, p.O, args, ws.data_ptr(), on.stream);

  if (need[kTarget] && !t_per_column) {
    grads[kTarget] = p.target.kind == Broadcast2d::Kind::Full
        ? neg_g_full.view(p.target.source.sizes())
        : reduce_to_operand(g.neg(), p.out_shape, p.target);
  }
  if (need[kB2] && !b2_per_column) {
    grads[kB2] = reduce_to_operand(g, p.out_shape, p.b2);
    // A full-shape db2 shares g's buffer; g is only read from here on.
  }
  backprop_output_grad(
      p, g, /*g_owned=*/true, s, on.stream, need[kX], need[kW1], need[kB1], need[kW2],
      grads[kX], grads[kW1], grads[kB1], grads[kW2]);
  for (int k = 0; k < kNumLossInputs; ++k) {
    if (!need[k]) grads[k] = empty_like_unrequested(s);
  }
  return result;
}

std::array<Tensor, 2> mlp_forward_cuda(const Problem& p) {
  const OnDevice on(p.x2);
  Tensor s = forward_hidden(p, on.stream);
  if (!p.has_w2()) {
    // The prediction is s itself (the autograd kernel saves the output).
    return {s.view(p.out_shape), empty_like_unrequested(s)};
  }
  Tensor pred = at::empty({p.N, p.O}, s.options());
  at::mm_out(pred, s, p.w2.t());
  if (p.b2.present()) {
    cuda::bias_activation(
        pred.scalar_type(), pred.data_ptr(), p.N, p.O, operand_view(p.b2), Activation::Identity, on.stream);
  }
  return {pred.view(p.out_shape), s};
}

std::array<Tensor, kNumMlpInputs> mlp_backward_cuda(
    const Problem& p, const Tensor& grad_out, const Tensor& activations, const MlpGradMask& need) {
  const OnDevice on(p.x2);
  std::array<Tensor, kNumMlpInputs> grads;
  const Tensor g = grad_out.reshape({p.N, p.O});
  const Tensor s = activations.reshape({p.N, p.H}).contiguous();
  if (need[kMb2]) {
    grads[kMb2] = reduce_to_operand(g, p.out_shape, p.b2);
    // An op's output must never alias its input (grad_out): copy the view.
    if (p.b2.kind == Broadcast2d::Kind::Full) grads[kMb2] = grads[kMb2].clone();
  }
  backprop_output_grad(
      p, g, /*g_owned=*/false, s, on.stream, need[kMx], need[kMw1], need[kMb1], need[kMw2],
      grads[kMx], grads[kMw1], grads[kMb1], grads[kMw2]);
  for (int k = 0; k < kNumMlpInputs; ++k) {
    if (!need[k]) grads[k] = empty_like_unrequested(s);
  }
  return grads;
}

struct CudaKernels {
  static LossAndGrads loss_and_grads(const Problem& p, Reduction r, const LossGradMask& need) {
    return mlp_loss_and_grads_cuda(p, r, need);
  }
  static std::array<Tensor, 2> forward(const Problem& p) { return mlp_forward_cuda(p); }
  static std::array<Tensor, kNumMlpInputs> backward(
      const Problem& p, const Tensor& grad_out, const Tensor& activations, const MlpGradMask& need) {
    return mlp_backward_cuda(p, grad_out, activations, need);
  }
};
using Cuda = EntryPoints<CudaKernels>;  // argument handling shared with the CPU ops

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, CUDA, m) {
  m.impl("mlp_loss", &Cuda::mlp_loss);
  m.impl("mlp_loss_and_grads", &Cuda::mlp_loss_and_grads);
  m.impl("mlp", &Cuda::mlp);
  m.impl("mlp_forward", &Cuda::mlp_forward);
  m.impl("mlp_backward", &Cuda::mlp_backward);
}

}  // namespace fusedgrad
