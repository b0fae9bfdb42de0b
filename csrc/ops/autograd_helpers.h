// What the autograd kernels of the single-model ops (autograd.cpp) and of the
// ensemble ops (ensemble_autograd.cpp) share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <vector>

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

}  // namespace fusedgrad::autograd_helpers
