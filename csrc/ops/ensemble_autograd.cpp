// Autograd of the ensemble ops, in C++ (why C++: see autograd.cpp).
//
// ensemble_mlp_loss returns K losses L_k. Its forward already computes every
// gradient some input needs, model by model; backward gets dℓ/dL_k = w_k and
//   * for an argument stacked per model (slice k belongs to model k): scales
//     slice k by w_k (nothing at all when every w_k is 1, as for loss.sum());
//   * for an argument shared by all models: Σ_k w_k · (model k's gradient),
//     from the per-model gradients the forward op returned, (K, *shape).
// ensemble_mlp: the classic pair, forward saves s, backward runs the fused
// backward op of every model (autograd_helpers.h: MlpPairFunction, shared with mlp).
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/library.h>

#include "../common/options.h"
#include "autograd_helpers.h"
#include "handles.h"
#include "op_kernels.h"

namespace fusedgrad {
namespace {

using at::Tensor;
using ops::OptTensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
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

class EnsembleMlpLossFunction : public torch::autograd::Function<EnsembleMlpLossFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                        const OptTensor& w2, const OptTensor& b2, const OptTensor& target, ops::Str reduction,
                        ops::Str activation) {
    const std::array<bool, 6> need = {x.requires_grad(), w1.requires_grad(), requires_grad(b1),
                                      requires_grad(w2),  requires_grad(b2), requires_grad(target)};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, dx, dw1, db1, dw2, db2, dt] =
        ops::ensemble_mlp_loss_forward().call(x, w1, b1, w2, b2, target, reduction, activation, need);
    const std::array<Tensor, 6> grads = {dx, dw1, db1, dw2, db2, dt};
    const std::array<const Tensor*, 6> inputs = {&x, &w1, b1 ? &*b1 : nullptr, w2 ? &*w2 : nullptr,
                                                 b2 ? &*b2 : nullptr, target ? &*target : nullptr};
    variable_list to_save(6);
    int64_t shared_bits = 0;
    for (size_t k = 0; k < 6; ++k) {
      if (!need[k]) continue;
      to_save[k] = grads[k];
      // A shared argument's gradient came back per model: one more dimension.
      if (grads[k].dim() == inputs[k]->dim() + 1) shared_bits |= int64_t(1) << k;
    }
    ctx->save_for_backward(to_save);
    const std::array<bool, 6> given = {true, true, present(b1), present(w2), present(b2), present(target)};
    int64_t given_bits = 0;
    for (size_t k = 0; k < 6; ++k) given_bits |= int64_t(given[k]) << k;
    ctx->saved_data["given"] = given_bits;
    ctx->saved_data["shared"] = shared_bits;
    keep_inputs<6>(ctx, {x, w1, b1, w2, b2, target});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["activation"] = std::string(activation);
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Tensor& w = grad_outputs[0];  // (K,): dℓ/dL_k
    const int64_t given_bits = ctx->saved_data["given"].toInt();
    std::array<bool, 6> given;
    for (size_t k = 0; k < 6; ++k) given[k] = (given_bits >> k) & 1;
    const auto needs = needs_grad_by_position(ctx, given);
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients (autograd_helpers.h)
      variable_list out = recompute_gradients(ctx, "mlp_loss", ctx->saved_data["reduction"].toStringRef(),
                                              ctx->saved_data["activation"].toStringRef(), w,
                                              std::vector<bool>(needs.begin(), needs.end()));
      out.resize(8);  // 6 tensors + reduction + activation
      return out;
    }
    const bool unit = all_ones(w);
    variable_list saved = ctx->get_saved_variables();
    const int64_t shared_bits = ctx->saved_data["shared"].toInt();
    // Saved gradients are handed over as they are only when the graph is freed
    // after this backward (see autograd.cpp).
    const bool hand_over = unit && !torch::autograd::get_current_graph_task_keep_graph();
    variable_list grads(8);  // 6 tensors + reduction + activation
    for (size_t k = 0; k < 6; ++k) {
      const Tensor& g = saved[k];
      if (!g.defined() || !needs[k]) continue;
      if ((shared_bits >> k) & 1) {
        grads[k] = (g * per_model_weights(w, g.dim())).sum(0);
      } else if (hand_over) {
        grads[k] = g;
      } else {
        grads[k] = unit ? g.clone() : g * per_model_weights(w, g.dim());
      }
    }
    return grads;
  }
};

Tensor ensemble_mlp_loss_autograd(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                                  const OptTensor& b2, const OptTensor& target, ops::Str reduction,
                                  ops::Str activation) {
  const bool any_grad = at::GradMode::is_enabled() &&
      (x.requires_grad() || w1.requires_grad() || requires_grad(b1) || requires_grad(w2) ||
       requires_grad(b2) || requires_grad(target));
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return ops::ensemble_mlp_loss().call(x, w1, b1, w2, b2, target, reduction, activation);
  }
  return EnsembleMlpLossFunction::apply(x, w1, b1, w2, b2, target, reduction, activation);
}

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, Autograd, m) {
  m.impl("ensemble_mlp_loss", &ensemble_mlp_loss_autograd);
  m.impl("ensemble_mlp", &prediction_autograd<&ops::ensemble_mlp,
                                              MlpPairFunction<&ops::ensemble_mlp_forward, &ops::ensemble_mlp_backward, true>>);
  m.impl("ensemble_mlp_loss_and_grads",
         &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::ensemble_mlp_loss_and_grads>::call);
  m.impl("ensemble_mlp_loss_forward",
         &NonDifferentiable<ops::MlpLossAndGradsSig, &ops::ensemble_mlp_loss_forward>::call);
  m.impl("ensemble_mlp_forward", &NonDifferentiable<ops::MlpForwardSig, &ops::ensemble_mlp_forward>::call);
  m.impl("ensemble_mlp_backward", &NonDifferentiable<ops::MlpBackwardSig, &ops::ensemble_mlp_backward>::call);
}

}  // namespace fusedgrad
