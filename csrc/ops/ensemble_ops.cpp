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
// Schemas: schemas.cpp. Gradients not requested come back empty (numel 0).
#include <torch/library.h>

#include "ensemble.h"

namespace fusedgrad::ensemble {
namespace {

// Model k on the CPU: the single-model kernels of op_kernels.h, which pick the
// kernel path per model.
struct CpuPerModel {
  static constexpr bool kParallel = true;
  static LossAndGrads loss_and_grads(const ModelArgs& a, Reduction r, Activation act, const LossGradMask& need) {
    return fusedgrad::loss_and_grads(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, a.target, act), r, need);
  }
  static std::array<Tensor, 2> forward(const ModelArgs& a, Activation act) {
    return fusedgrad::forward(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, std::nullopt, act), /*activations=*/true);
  }
  static std::array<Tensor, kNumMlpInputs> backward(const ModelArgs& a, const Tensor& grad_out,
                                                    const Tensor& activations, Activation act,
                                                    const MlpGradMask& need) {
    return fusedgrad::backward(make_problem(a.x, a.w1, a.b1, a.w2, a.b2, std::nullopt, act), grad_out,
                               activations, need);
  }
};
using Cpu = EnsembleOpKernels<CpuPerModel>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("ensemble_mlp_loss", &Cpu::mlp_loss);
  m.impl("ensemble_mlp_loss_and_grads", &Cpu::mlp_loss_and_grads);
  m.impl("ensemble_mlp_loss_forward", &Cpu::mlp_loss_forward);
  m.impl("ensemble_mlp", &Cpu::mlp);
  m.impl("ensemble_mlp_forward", &Cpu::mlp_forward);
  m.impl("ensemble_mlp_backward", &Cpu::mlp_backward);
}

}  // namespace fusedgrad::ensemble
