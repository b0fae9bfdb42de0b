// Autograd of the ensemble ops, in C++ (why C++: see autograd.cpp).
//
// ensemble_mlp_loss returns K losses L_k. Its forward already computes every
// gradient some input needs, model by model; backward gets dℓ/dL_k = w_k and
//   * for an argument stacked per model (slice k belongs to model k): scales
//     slice k by w_k (nothing at all when every w_k is 1, as for loss.sum());
//   * for an argument shared by all models: Σ_k w_k · (model k's gradient),
//     from the per-model gradients the forward op returned, (K, *shape).
// ensemble_mlp: the classic pair, forward saves s, backward runs the fused
// backward op of every model. Both nodes are autograd_helpers.h's, shared with
// the single-model ops; this file gives them the ensemble ops and the rules above.
#include <torch/library.h>

#include "autograd_helpers.h"
#include "handles.h"
#include "op_kernels.h"

namespace fusedgrad {
namespace {

using at::Tensor;
using namespace autograd_helpers;

// True when `w` is a CPU tensor of ones that can be read (under tracing its
// data cannot be read and a traced graph must not branch on a value: false).
bool all_ones(const Tensor& w) {
  if (!readable_on_host(w) || w.dim() != 1) return false;
  bool ones = true;
  // loss.sum().backward() hands over ones expanded from a scalar (stride 0).
  const int64_t stride = w.stride(0);
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "fusedgrad_all_ones", [&] {
    const scalar_t* p = w.const_data_ptr<scalar_t>();
    for (int64_t k = 0; k < w.numel() && ones; ++k) ones = p[k * stride] == scalar_t(1);
  });
  return ones;
}

// w (K,) as (K, 1, ..., 1) against a gradient of `dim` dimensions.
Tensor per_model_weights(const Tensor& w, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(std::max<int64_t>(dim, 1)), 1);
  shape[0] = -1;
  return w.reshape(shape);
}

// K models' losses: the incoming gradient is w (K,), w_k = dℓ/dL_k.
struct ScaleByModel {
  static bool unit(const Tensor& w) { return all_ones(w); }
  static Tensor scaled(const Tensor& grad, const Tensor& w) { return grad * per_model_weights(w, grad.dim()); }
  static Tensor summed(const Tensor& grad, const Tensor& w) {
    return (grad * per_model_weights(w, grad.dim())).sum(0);
  }
};

using EnsembleMlpLossFunction = MlpLossNode<&ops::ensemble_mlp_loss_forward, ScaleByModel>;
using EnsembleMlpFunction = MlpPredictionNode<&ops::ensemble_mlp_forward, &ops::ensemble_mlp_backward,
                                            /*ContiguousGrad=*/true>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, Autograd, m) {
  m.impl("ensemble_mlp_loss", &loss_autograd<&ops::ensemble_mlp_loss, EnsembleMlpLossFunction>);
  m.impl("ensemble_mlp", &prediction_autograd<&ops::ensemble_mlp, EnsembleMlpFunction>);
  m.impl("ensemble_mlp_loss_and_grads",
         &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::ensemble_mlp_loss_and_grads>::call);
  m.impl("ensemble_mlp_loss_forward",
         &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::ensemble_mlp_loss_forward>::call);
  m.impl("ensemble_mlp_forward", &NonDifferentiable<ops::MlpForwardSig, &ops::ensemble_mlp_forward>::call);
  m.impl("ensemble_mlp_backward", &NonDifferentiable<ops::MlpBackwardSig, &ops::ensemble_mlp_backward>::call);
}

}  // namespace fusedgrad
