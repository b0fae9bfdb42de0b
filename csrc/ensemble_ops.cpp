// Schemas of the ensemble ops (K models stacked along a leading dimension;
// shape rules in ensemble.h) and their CPU kernels.
//
//   ensemble_mlp_loss            (K,) losses                       <- fusedgrad.mlp_loss
//   ensemble_mlp_loss_and_grads  (K,) losses + gradients of Σ_k L_k <- fusedgrad.mlp_loss_and_grads
//   ensemble_mlp                 (K, N, O) prediction              <- fusedgrad.mlp
// and the pieces the autograd kernels (ensemble_autograd.cpp) call:
//   ensemble_mlp_loss_forward    as ensemble_mlp_loss_and_grads, but a shared
//                                argument's gradient comes back per model,
//                                (K, *its shape), so that backward can weight
//                                model k's part by the incoming gradient of L_k
//   ensemble_mlp_forward / ensemble_mlp_backward  the prediction's pair
// Option codes as the single-model ops: reduction 1 mean / 2 sum, activation
// 0 sigmoid / 1 identity. Gradients not requested come back empty (numel 0).
#include <torch/library.h>

#include "ensemble.h"

namespace fusedgrad::ensemble {
namespace {

// Model k on the CPU: the single-model kernels of kernels.h, which pick the
// direct-loop path or the GEMM path per model.
struct CpuPerModel {
  static constexpr bool kParallel = true;
  static LossAndGrads loss_and_grads(const ModelArgs& a, Reduction r, int64_t act, const LossGradMask& need) {
    return mlp_loss_and_grads_cpu(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, a.target, act), r, need);
  }
  static std::array<Tensor, 2> forward(const ModelArgs& a, int64_t act) {
    return mlp_forward_cpu(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, std::nullopt, act));
  }
  static std::array<Tensor, kNumMlpInputs> backward(const ModelArgs& a, const Tensor& grad_out,
                                                    const Tensor& activations, int64_t act,
                                                    const MlpGradMask& need) {
    return mlp_backward_cpu(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, std::nullopt, act), grad_out,
                            activations, need);
  }
};
using Cpu = EnsembleEntryPoints<CpuPerModel>;

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedgrad, m) {
  m.def(
      "ensemble_mlp_loss(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target, "
      "int reduction, int activation) -> Tensor");
  m.def(
      "ensemble_mlp_loss_and_grads(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target, "
      "int reduction, int activation, bool[6] output_mask) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2, Tensor grad_target)");
  m.def(
      "ensemble_mlp_loss_forward(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target, "
      "int reduction, int activation, bool[6] output_mask) "
      "-> (Tensor loss, Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, "
      "Tensor grad_b2, Tensor grad_target)");
  m.def("ensemble_mlp(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, int activation) -> Tensor");
  m.def(
      "ensemble_mlp_forward(Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, int activation) "
      "-> (Tensor prediction, Tensor activations)");
  m.def(
      "ensemble_mlp_backward(Tensor grad_out, Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, "
      "Tensor activations, int activation, bool[5] output_mask) "
      "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
}

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("ensemble_mlp_loss", &Cpu::mlp_loss);
  m.impl("ensemble_mlp_loss_and_grads", &Cpu::mlp_loss_and_grads);
  m.impl("ensemble_mlp_loss_forward", &Cpu::mlp_loss_forward);
  m.impl("ensemble_mlp", &Cpu::mlp);
  m.impl("ensemble_mlp_forward", &Cpu::mlp_forward);
  m.impl("ensemble_mlp_backward", &Cpu::mlp_backward);
}

}  // namespace fusedgrad::ensemble
