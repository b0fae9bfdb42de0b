// What the autograd kernels of the single-model ops (autograd.cpp) and of the
// ensemble ops (ensemble_autograd.cpp) share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>  // get_current_graph_task_keep_graph

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "../common/options.h"  // parse_activation, activation_saves_input
#include "handles.h"

namespace fusedgrad::autograd_helpers {

using OptTensor = std::optional<at::Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
inline bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }

// The engine runs backward with grad mode on only for create_graph=True, i.e.
// when a differentiable gradient is asked for (a PINN's u_x, a gradient
// penalty, gradgradcheck). The gradients the fused ops compute are not
// functions of the inputs in any graph, so the one-hidden-layer nodes then
// recompute: the op in plain torch ops from its inputs, differentiated with
// create_graph=True — native autograd's own formulas, second derivatives
// included, at native speed — by the Python function fusedgrad.functional
// registers at import (_C._set_recompute_backward):
//   fn(kind, inputs, reduction, activation, grad, needs) → one gradient per input
// with kind "mlp_loss" (inputs x, w1, b1, w2, b2, target) or "mlp" (x … b2),
// undefined where an input is absent or needs none. The same route as the
// deeper nets' nodes (csrc/python/deep_autograd.cpp).
using RecomputeBackward = std::function<torch::autograd::variable_list(
    const std::string& kind, const torch::autograd::variable_list& inputs, const std::string& reduction,
    const std::string& activation, const at::Tensor& grad, const std::vector<bool>& needs)>;

inline RecomputeBackward& recompute_backward() {
  static RecomputeBackward* fn = new RecomputeBackward();  // leaked: it holds a Python object past the interpreter
  return *fn;
}

// Keeps a node's inputs for the recompute, with their versions at forward time.
// In saved_data, not as version-checked saved variables: a first-order backward
// reads only what the forward computed and behaves as before if an input is
// modified in place afterwards; the recompute checks the versions itself.
// An inference tensor has no version counter (-1: not checked; it cannot be
// modified outside inference mode, where no graph is built).
inline int64_t version_of(const OptTensor& t) {
  return present(t) && !t->is_inference() ? t->_version() : -1;
}

template <size_t N>
void keep_inputs(torch::autograd::AutogradContext* ctx, const std::array<OptTensor, N>& inputs) {
  c10::List<OptTensor> list;
  std::vector<int64_t> versions;
  for (const OptTensor& t : inputs) {
    list.push_back(present(t) ? t : std::nullopt);
    versions.push_back(version_of(t));
  }
  ctx->saved_data["inputs"] = std::move(list);
  ctx->saved_data["versions"] = std::move(versions);
}

// The create_graph=True backward of a node that kept its inputs (keep_inputs):
// the gradients of the inputs that need one, themselves differentiable.
// `op` ("mlp_loss" or "mlp") is also the kind the recompute is told.
inline torch::autograd::variable_list recompute_gradients(torch::autograd::AutogradContext* ctx, const char* op,
                                                          const std::string& reduction,
                                                          const std::string& activation, const at::Tensor& grad,
                                                          std::vector<bool> needs) {
  const c10::List<OptTensor> list = ctx->saved_data["inputs"].toOptionalTensorList();
  const std::vector<int64_t> versions = ctx->saved_data["versions"].toIntVector();
  torch::autograd::variable_list inputs;
  for (size_t k = 0; k < list.size(); ++k) {
    const OptTensor t = list.get(k);
    TORCH_CHECK(versions[k] < 0 || version_of(t) == versions[k], "fusedgrad.", op, ": an input of the forward "
                "(argument ", k, ") was modified in place before this create_graph=True backward, which recomputes "
                "from it (version ", versions[k], " then, ", version_of(t), " now)");
    inputs.push_back(present(t) ? *t : at::Tensor());
  }
  TORCH_CHECK(static_cast<bool>(recompute_backward()), "fusedgrad.", op, ": a create_graph=True backward needs the "
              "fusedgrad Python package imported (it registers the recompute with _C._set_recompute_backward)");
  return recompute_backward()(op, inputs, reduction, activation, grad, needs);
}

// ctx->needs_input_grad(k) counts only tensor arguments that were given
// (a None optional has no edge); map it back to argument positions.
template <size_t K>
std::array<bool, K> needs_grad_by_position(torch::autograd::AutogradContext* ctx, const std::array<bool, K>& given) {
  std::array<bool, K> needs{};
  size_t edge = 0;
  for (size_t k = 0; k < K; ++k) {
    if (given[k]) needs[k] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

// Whether the backward may read a gradient's values on the host: a CPU tensor
// with memory. Under torch.compile / export / opcheck the backward is traced
// with FakeTensors and FunctionalTensors (Python / Functionalize keys), whose
// data cannot be read — and a traced graph must not branch on a value.
inline bool readable_on_host(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return t.device().is_cpu() && !keys.has_any(c10::python_ks) && !keys.has(c10::DispatchKey::Functionalize);
}

// The Autograd kernel of a helper op that returns gradients as plain values:
// not itself differentiable, it computes below autograd and returns tensors
// that do not require grad (like torch.argmax).
template <class Sig, const c10::TypedOperatorHandle<Sig>& (*Handle)()>
struct NonDifferentiable;

template <class Ret, class... Args, const c10::TypedOperatorHandle<Ret(Args...)>& (*Handle)()>
struct NonDifferentiable<Ret(Args...), Handle> {
  static Ret call(Args... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Handle().call(args...);
  }
};

// The autograd node of a loss op over (x, w1, b1, w2, b2, target, reduction, activation) — `mlp_loss`
// for one model (one loss), `ensemble_mlp_loss` for K stacked ones (K losses). The loss is a scalar
// per model, so its forward op (Forward) already returns every gradient an input needs; the node saves
// them and its backward only scales them by the incoming gradient — nothing at all when that is 1.
// A gradient that came back with one more dimension than its input is a shared argument's, per model
// (the ensemble's (K, *shape)): backward weights and sums it. Scale holds the model count's rules:
//   Scale::unit(g)          whether the incoming gradient is known to be all ones (read on the host);
//   Scale::scaled(grad, g)  a saved gradient scaled by it;
//   Scale::summed(grad, g)  a shared argument's per-model gradients weighted by it and summed.
template <const c10::TypedOperatorHandle<ops::MlpLossAndGradsSig>& (*Forward)(), class Scale>
class MlpLossNode : public torch::autograd::Function<MlpLossNode<Forward, Scale>> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const OptTensor& b1, const OptTensor& w2, const OptTensor& b2, const OptTensor& target,
                            ops::Str reduction, ops::Str activation) {
    const std::array<bool, 6> need = {x.requires_grad(), w1.requires_grad(), requires_grad(b1),
                                      requires_grad(w2),  requires_grad(b2), requires_grad(target)};
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [loss, dx, dw1, db1, dw2, db2, dt] = Forward().call(x, w1, b1, w2, b2, target, reduction, activation, need);
    const std::array<at::Tensor, 6> grads = {dx, dw1, db1, dw2, db2, dt};
    const std::array<const at::Tensor*, 6> inputs = {&x, &w1, present(b1) ? &*b1 : nullptr,
                                                     present(w2) ? &*w2 : nullptr, present(b2) ? &*b2 : nullptr,
                                                     present(target) ? &*target : nullptr};
    torch::autograd::variable_list to_save(6);
    int64_t shared_bits = 0, given_bits = 0;
    for (size_t k = 0; k < 6; ++k) {
      if (inputs[k]) given_bits |= int64_t(1) << k;  // which optional arguments were given
      if (!need[k]) continue;
      to_save[k] = grads[k];
      if (grads[k].dim() == inputs[k]->dim() + 1) shared_bits |= int64_t(1) << k;
    }
    ctx->save_for_backward(to_save);
    ctx->saved_data["given"] = given_bits;
    ctx->saved_data["shared"] = shared_bits;
    keep_inputs<6>(ctx, {x, w1, b1, w2, b2, target});
    ctx->saved_data["reduction"] = std::string(reduction);
    ctx->saved_data["activation"] = std::string(activation);
    return loss;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    const at::Tensor& g = grad_outputs[0];
    const int64_t given_bits = ctx->saved_data["given"].toInt();
    std::array<bool, 6> given;
    for (size_t k = 0; k < 6; ++k) given[k] = (given_bits >> k) & 1;
    const auto needs = needs_grad_by_position(ctx, given);
    torch::autograd::variable_list grads(8);  // 6 tensors + reduction + activation
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients (above)
      grads = recompute_gradients(ctx, "mlp_loss", ctx->saved_data["reduction"].toStringRef(),
                                  ctx->saved_data["activation"].toStringRef(), g,
                                  std::vector<bool>(needs.begin(), needs.end()));
      grads.resize(8);
      return grads;
    }
    const bool unit = Scale::unit(g);
    torch::autograd::variable_list saved = ctx->get_saved_variables();
    const int64_t shared_bits = ctx->saved_data["shared"].toInt();
    // The saved gradients can be handed over as they are only when this
    // graph is freed after this backward; with retain_graph=True a later
    // backward needs them again, and the caller may modify what it receives.
    const bool hand_over = unit && !torch::autograd::get_current_graph_task_keep_graph();
    for (size_t k = 0; k < 6; ++k) {
      const at::Tensor& grad = saved[k];
      if (!grad.defined() || !needs[k]) continue;
      if ((shared_bits >> k) & 1) {
        grads[k] = Scale::summed(grad, g);
      } else if (hand_over) {
        grads[k] = grad;
      } else {
        grads[k] = unit ? grad.clone() : Scale::scaled(grad, g);
      }
    }
    return grads;
  }
};

// The Autograd kernel of a loss op: its node (Node, above) where an input needs a gradient, else the
// op itself below autograd (no graph to build: the loss alone).
template <const c10::TypedOperatorHandle<ops::MlpLossSig>& (*Op)(), class Node>
at::Tensor loss_autograd(const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                         const OptTensor& b2, const OptTensor& target, ops::Str reduction, ops::Str activation) {
  const bool any_grad = at::GradMode::is_enabled() &&
      (x.requires_grad() || w1.requires_grad() || requires_grad(b1) || requires_grad(w2) || requires_grad(b2) ||
       requires_grad(target));
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Op().call(x, w1, b1, w2, b2, target, reduction, activation);
  }
  return Node::apply(x, w1, b1, w2, b2, target, reduction, activation);
}

// The autograd node of a prediction op over (x, w1, b1, w2, b2, activation) — `mlp` for one model,
// `ensemble_mlp` for K stacked ones: the classic pair. Forward runs the op's `_forward` (the
// prediction and the hidden activations) and saves s (or h, where the activation's derivative reads
// it); backward runs its `_backward`, or recomputes in plain torch ops for create_graph=True.
// ContiguousGrad: the backward op is handed a contiguous incoming gradient (the ensemble op's rule).
template <const c10::TypedOperatorHandle<ops::MlpForwardSig>& (*Forward)(),
          const c10::TypedOperatorHandle<ops::MlpBackwardSig>& (*Backward)(), bool ContiguousGrad>
class MlpPredictionNode : public torch::autograd::Function<MlpPredictionNode<Forward, Backward, ContiguousGrad>> {
 public:
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, const at::Tensor& w1,
                            const OptTensor& b1, const OptTensor& w2, const OptTensor& b2, ops::Str activation) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [pred, activations] = Forward().call(x, w1, b1, w2, b2, activation);
    const bool has_w2 = present(w2);
    // Without w2 the prediction is s itself: save the output, not a copy
    // (unless the activation's derivative reads h, which is then the second output).
    const bool saved_is_output = !has_w2 && !activation_saves_input(parse_activation(activation));
    ctx->save_for_backward({x, w1, has_w2 ? *w2 : at::Tensor(), saved_is_output ? pred : activations});
    // Only the biases' shapes matter to backward; keep them out of the
    // version-checked saved tensors.
    ctx->saved_data["b1"] = b1;
    ctx->saved_data["b2"] = b2;
    ctx->saved_data["activation"] = std::string(activation);
    keep_inputs<5>(ctx, {x, w1, b1, w2, b2});
    return pred;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    torch::autograd::variable_list saved = ctx->get_saved_variables();
    const OptTensor b1 = ctx->saved_data["b1"].toOptional<at::Tensor>();
    const OptTensor b2 = ctx->saved_data["b2"].toOptional<at::Tensor>();
    const OptTensor w2 = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
    const auto need = needs_grad_by_position<5>(ctx, {true, true, b1.has_value(), w2.has_value(), b2.has_value()});
    torch::autograd::variable_list out(6);  // 5 tensors + activation
    if (at::GradMode::is_enabled()) {  // create_graph=True: differentiable gradients (above)
      out = recompute_gradients(ctx, "mlp", "", ctx->saved_data["activation"].toStringRef(), grad_outputs[0],
                                std::vector<bool>(need.begin(), need.end()));
      out.resize(6);
      return out;
    }
    const at::Tensor grad = ContiguousGrad ? grad_outputs[0].contiguous() : grad_outputs[0];
    auto [dx, dw1, db1, dw2, db2] = Backward().call(grad, saved[0], saved[1], b1, w2, b2, saved[3],
                                                    ctx->saved_data["activation"].toStringRef(), need);
    const std::array<at::Tensor, 5> grads = {dx, dw1, db1, dw2, db2};
    for (size_t k = 0; k < 5; ++k) {
      if (need[k]) out[k] = grads[k];
    }
    return out;
  }
};

// The Autograd kernel of a prediction op: its node (Node, above) where an input needs a gradient,
// else the op itself below autograd (no graph to build).
template <const c10::TypedOperatorHandle<ops::MlpSig>& (*Op)(), class Node>
at::Tensor prediction_autograd(const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                               const OptTensor& b2, ops::Str activation) {
  const bool any_grad = at::GradMode::is_enabled() &&
      (x.requires_grad() || w1.requires_grad() || requires_grad(b1) || requires_grad(w2) || requires_grad(b2));
  if (!any_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return Op().call(x, w1, b1, w2, b2, activation);
  }
  return Node::apply(x, w1, b1, w2, b2, activation);
}

}  // namespace fusedgrad::autograd_helpers
