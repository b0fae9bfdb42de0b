// Autograd for the public ops, in C++.
//
// A Python torch.autograd.Function costs ~30 µs a call on this machine, more
// than a whole small training step, so the autograd nodes are C++
// torch::autograd::Functions registered on the ops' Autograd key.
//
// mlp_loss: the forward already computes every gradient some input needs
// (the loss is a scalar, so dL/d(input) is known at forward time); the node
// only scales them by the incoming gradient, and does nothing when it is 1.
// mlp: a classic pair, forward saves s, backward runs the fused backward op.
// Both nodes are autograd_helpers.h's, shared with the ensemble ops; this
// file gives them the single model's ops and its scalar incoming gradient.
// Both keep their inputs for a create_graph=True backward, which recomputes in
// plain torch ops (autograd_helpers.h: recompute_gradients).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <limits>

#include "autograd_helpers.h"
#include "handles.h"

namespace fusedgrad {
namespace {

using at::Tensor;
using namespace autograd_helpers;

// Reads a 0-dim CPU gradient; NaN when it cannot be read (readable_on_host)
// or is not a single value.
double cpu_scalar_or_nan(const Tensor& t) {
  if (!readable_on_host(t) || t.numel() != 1) {
    return std::numeric_limits<double>::quiet_NaN();
  }
  switch (t.scalar_type()) {
    case at::kFloat: return *t.const_data_ptr<float>();
    case at::kDouble: return *t.const_data_ptr<double>();
    default: return std::numeric_limits<double>::quiet_NaN();
  }
}

// One model's loss: the incoming gradient is a scalar (ℓ'(L)).
struct ScaleByScalar {
  static bool unit(const Tensor& g) { return cpu_scalar_or_nan(g) == 1.0; }
  static Tensor scaled(const Tensor& grad, const Tensor& g) { return grad * g; }
  static Tensor summed(const Tensor& grad, const Tensor& g) { return grad * g; }  // no shared arguments here
};

using MlpLossFunction = MlpLossNode<&ops::mlp_loss_and_grads, ScaleByScalar>;
using MlpFunction = MlpPredictionNode<&ops::mlp_forward, &ops::mlp_backward, /*ContiguousGrad=*/false>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, Autograd, m) {
  m.impl("mlp_loss", &loss_autograd<&ops::mlp_loss, MlpLossFunction>);
  m.impl("mlp", &prediction_autograd<&ops::mlp, MlpFunction>);
  m.impl("mlp_loss_and_grads", &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::mlp_loss_and_grads>::call);
  m.impl("mlp_forward", &NonDifferentiable<ops::MlpForwardSig, &ops::mlp_forward>::call);
  m.impl("mlp_backward", &NonDifferentiable<ops::MlpBackwardSig, &ops::mlp_backward>::call);
}

}  // namespace fusedgrad
