// The ops' argument handling, shared by every backend: validate (make_problem),
// drop gradient requests for arguments that are None, call the backend's
// kernels, pack the results in schema order. `Kernels` supplies
//   LossAndGrads loss_and_grads(const Problem&, Reduction, const LossGradMask&)
//   std::array<Tensor, 2> forward(const Problem&)
//   std::array<Tensor, kNumMlpInputs> backward(const Problem&, grad_out, activations, const MlpGradMask&)
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

#include "kernels.h"
#include "problem.h"

namespace fusedgrad {

template <class Kernels>
struct EntryPoints {
  using Tensor = at::Tensor;
  using OptTensor = std::optional<at::Tensor>;

  static Tensor mlp_loss(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                         const OptTensor& b2, const OptTensor& target, int64_t reduction, int64_t activation) {
    const Reduction red = check_reduction(reduction);
    const Problem p = make_problem(x, w1, b1, w2, b2, target, activation);
    return Kernels::loss_and_grads(p, red, LossGradMask{}).loss;
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_and_grads(
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
    LossAndGrads r = Kernels::loss_and_grads(p, red, need);
    auto& g = r.grads;
    return {r.loss, g[kX], g[kW1], g[kB1], g[kW2], g[kB2], g[kTarget]};
  }

  static Tensor mlp(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                    const OptTensor& b2, int64_t activation) {
    const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, activation);
    return Kernels::forward(p)[0];
  }

  static std::tuple<Tensor, Tensor> mlp_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                                const OptTensor& w2, const OptTensor& b2, int64_t activation) {
    const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, activation);
    auto out = Kernels::forward(p);
    return {out[0], out[1]};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward(
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
    // The dispatcher routes by all tensor arguments, so a device kernel could
    // otherwise be handed a grad_out on another device.
    TORCH_CHECK_VALUE(
        grad_out.device() == x.device() && activations.device() == x.device(),
        "fusedgrad: arguments 'grad_out' and 'activations' must be on x's device ", x.device().str(),
        ", got ", grad_out.device().str(), " and ", activations.device().str());
    MlpGradMask need = output_mask;
    need[kMb1] = need[kMb1] && p.b1.present();
    need[kMw2] = need[kMw2] && p.has_w2();
    need[kMb2] = need[kMb2] && p.b2.present();
    auto g = Kernels::backward(p, grad_out, activations, need);
    return {g[kMx], g[kMw1], g[kMb1], g[kMw2], g[kMb2]};
  }
};

}  // namespace fusedgrad
