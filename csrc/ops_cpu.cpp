// Schemas of the fusedgrad ops and their CPU kernels.
//
// mlp_loss / mlp are the public ops (autograd in autograd.cpp); the others are
// the pieces the autograd kernels call: one fused forward that also returns the
// requested gradients, and the prediction's forward / backward pair.
#include <torch/library.h>

#include "entry_points.h"
#include "kernels.h"

namespace fusedgrad {
namespace {

struct CpuKernels {
  static LossAndGrads loss_and_grads(const Problem& p, Reduction r, const LossGradMask& need) {
    return mlp_loss_and_grads_cpu(p, r, need);
  }
  static std::array<at::Tensor, 2> forward(const Problem& p) { return mlp_forward_cpu(p); }
  static std::array<at::Tensor, kNumMlpInputs> backward(
      const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need) {
    return mlp_backward_cpu(p, grad_out, activations, need);
  }
};
using Cpu = EntryPoints<CpuKernels>;

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
  m.impl("mlp_loss", &Cpu::mlp_loss);
  m.impl("mlp_loss_and_grads", &Cpu::mlp_loss_and_grads);
  m.impl("mlp", &Cpu::mlp);
  m.impl("mlp_forward", &Cpu::mlp_forward);
  m.impl("mlp_backward", &Cpu::mlp_backward);
}

}  // namespace fusedgrad
