// Autograd for the public ops, in C++.
//
// A Python torch.autograd.Function costs ~30 µs a call on this machine, more
// than a whole small training step, so the autograd nodes are C++
// torch::autograd::Functions registered on the ops' Autograd key.
//
// mlp_loss: the forward already computes every gradient some input needs
// (the loss is a scalar, so dL/d(input) is known at forward time); the node
// only scales them by the incoming gradient, and does nothing when it is 1.
// mlp: a classic pair, forward saves s, backward runs the fused backward op
// (autograd_helpers.h: MlpPairFunction, shared with the ensemble op).
// Both keep their inputs for a create_graph=True backward, which recomputes in
// plain torch ops (autograd_helpers.h: recompute_gradients).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "../common/options.h"
#include "autograd_helpers.h"
#include "handles.h"

namespace fusedgrad {
namespace {

using at::Tensor;
using ops::OptTensor;
using ops::Str;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
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

class MlpLossFunction : public torch::autograd::Function<MlpLossFunction> {
 public:
  static Tensor forward(
      AutogradContext* ctx, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
      const OptTensor& b2, const OptTensor& target, Str reduction, Str activation) {
    const std::array<bool, 6> need = {
        x.requires_grad(), w1.requires_grad(), requires_grad(b1),
        requires_grad(w2), requires_grad(b2), requires_grad(target)};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, dx, dw1, db1, dw2, db2, dt] =
        ops::mlp_loss_and_grads().call(x, w1, b1, w2, b2, target, reduction, activation, need);
    std::array<Tensor, 6> grads = {dx, dw1, db1, dw2, db2, dt};
    variable_list to_save(6);
    for (size_t k = 0; k < 6; ++k) {
      if (need[k]) to_save[k] = grads[k];
    }
    ctx->save_for_backward(to_save);
    const std::array<bool, 6> present = {true, true, b1.has_value() && b1->defined(),
                                         w2.has_value() && w2->defined(), b2.has_value() && b2->defined(),
                                         target.has_value() && target->defined()};
    int64_t present_bits = 0;
    for (size_t k = 0; k < 6; ++k) present_bits |= int64_t(present[k]) << k;
    ctx->saved_data["present"] = present_bits;  // which optional arguments were given
    keep_inputs<6>(ctx, {x, w1, b1, w2, b2, target});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["activation"] = std::string(activation);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& grad_loss = grad_outputs[0];
    const int64_t present_bits = ctx->saved_data["present"].toInt();
    std::array<bool, 6> present;
    for (size_t k = 0; k < 6; ++k) present[k] = (present_bits >> k) & 1;
    const auto needs = needs_grad_by_position(ctx, present);
    variable_list grads(8);  // 6 tensors + reduction + activation
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients (autograd_helpers.h)
      const variable_list got = recompute_gradients(ctx, "mlp_loss", ctx->saved_data["reduction"].toStringRef(),
                                                    ctx->saved_data["activation"].toStringRef(), grad_loss,
                                                    std::vector<bool>(needs.begin(), needs.end()));
      std::copy(got.begin(), got.end(), grads.begin());
      return grads;
    }
    const bool unit = cpu_scalar_or_nan(grad_loss) == 1.0;
    variable_list saved = ctx->get_saved_variables();
    // The saved gradients can be handed over as they are only when this
    // graph is freed after this backward; with retain_graph=True a later
    // backward needs them again, and the caller may modify what it receives.
    const bool hand_over = unit && !torch::autograd::get_current_graph_task_keep_graph();
    for (size_t k = 0; k < 6; ++k) {
      if (!saved[k].defined() || !needs[k]) continue;
      if (hand_over) {
        grads[k] = saved[k];
      } else {
        grads[k] = unit ? saved[k].clone() : saved[k] * grad_loss;
      }
    }
    return grads;
  }
};

Tensor mlp_loss_autograd(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    const OptTensor& target, Str reduction, Str activation) {
  const bool any_grad = at::GradMode::is_enabled() &&
      (x.requires_grad() || w1.requires_grad() || requires_grad(b1) || requires_grad(w2) ||
       requires_grad(b2) || requires_grad(target));
  if (!any_grad) {  // no graph to build: skip the node and compute the loss alone
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::mlp_loss().call(x, w1, b1, w2, b2, target, reduction, activation);
  }
  return MlpLossFunction::apply(x, w1, b1, w2, b2, target, reduction, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, Autograd, m) {
  m.impl("mlp_loss", &mlp_loss_autograd);
  m.impl("mlp", &prediction_autograd<&ops::mlp, MlpPairFunction<&ops::mlp_forward, &ops::mlp_backward, false>>);
  m.impl("mlp_loss_and_grads", &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::mlp_loss_and_grads>::call);
  m.impl("mlp_forward", &NonDifferentiable<ops::MlpForwardSig, &ops::mlp_forward>::call);
  m.impl("mlp_backward", &NonDifferentiable<ops::MlpBackwardSig, &ops::mlp_backward>::call);
}

}  // namespace fusedgrad
