// Schemas of the fusedgrad ops and their CPU kernels.
//
// mlp_loss / mlp are the public ops (autograd in autograd.cpp); the others are
// the pieces the autograd kernels call: one fused forward that also returns the
// requested gradients, and the prediction's forward / backward pair.
#include <torch/library.h>

#include "kernels.h"
#include "ops.h"
#include "problem.h"

namespace fusedgrad {
namespace {

using ops::OptTensor;
using at::Tensor;

Tensor mlp_loss_cpu(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                    const OptTensor& b2, const OptTensor& target, int64_t reduction, int64_t activation) {
  const Reduction red = check_reduction(reduction);
  const Problem p = make_problem(x, w1, b1, w2, b2, target, activation);
  return mlp_loss_and_grads_cpu(p, red, LossGradMask{}).loss;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_and_grads_op_cpu(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    const OptTensor& target, int64_t reduction, int64_t activation, std::array<bool, 6> output_mask) {
  const Reduction red = check_reduction(reduction);
  const Problem p = make_problem(x, w1, b1, w2, b2, target, activation);
  LossGradMask need = output_mask;
  // A gradient for an argument that is None does not exist.
  need[kB1] = need[kB1] && p.b1.present();
  need[kW2] = need[kW2] && p.has_w2();
  need[kB2] = need[kB2] && p.b2.present();
  need[kTarget] = need[kTarget] && p.target.present();
  LossAndGrads r = mlp_loss_and_grads_cpu(p, red, need);
  auto& g = r.grads;
  return {r.loss, g[kX], g[kW1], g[kB1], g[kW2], g[kB2], g[kTarget]};
}

Tensor mlp_cpu(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
               const OptTensor& b2, int64_t activation) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, activation);
  return mlp_forward_cpu(p)[0];
}

std::tuple<Tensor, Tensor> mlp_forward_op_cpu(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                              const OptTensor& w2, const OptTensor& b2, int64_t activation) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, activation);
  auto out = mlp_forward_cpu(p);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward_op_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const Tensor& activations, int64_t activation, std::array<bool, 5> output_mask) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, activation);
  TORCH_CHECK_VALUE(
      grad_out.sizes().equals(p.out_shape),
      "fusedgrad: argument 'grad_out' must have the prediction's shape ", c10::IntArrayRef(p.out_shape),
      ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(
      activations.numel() == p.N * p.H,
      "fusedgrad: argument 'activations' must hold N*H = ", p.N * p.H, " elements, got ",
      activations.numel());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == x.scalar_type() && activations.scalar_type() == x.scalar_type(),
      "fusedgrad: arguments 'grad_out' and 'activations' must have x's dtype");
  MlpGradMask need = output_mask;
  need[kMb1] = need[kMb1] && p.b1.present();
  need[kMw2] = need[kMw2] && p.has_w2();
  need[kMb2] = need[kMb2] && p.b2.present();
  auto g = mlp_backward_cpu(p, grad_out, activations, need);
  return {g[kMx], g[kMw1], g[kMb1], g[kMw2], g[kMb2]};
}

}  // namespace

TORCH_LIBRARY(fusedgrad, m) {
  m.def(
      "mlp_loss(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target, "
      "int reduction, int activation) -> Tensor");
  m.def(
      "mlp_loss_and_grads(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target, "
      "int reduction, int activation, bool[6] output_mask) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2, Tensor grad_target)");
  m.def("mlp(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, int activation) -> Tensor");
  m.def(
      "mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, int activation) "
      "-> (Tensor prediction, Tensor activations)");
  m.def(
      "mlp_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, "
      "Tensor activations, int activation, bool[5] output_mask) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
}

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("mlp_loss", &mlp_loss_cpu);
  m.impl("mlp_loss_and_grads", &mlp_loss_and_grads_op_cpu);
  m.impl("mlp", &mlp_cpu);
  m.impl("mlp_forward", &mlp_forward_op_cpu);
  m.impl("mlp_backward", &mlp_backward_op_cpu);
}

}  // namespace fusedgrad
