// What the autograd kernels of the single-model ops (autograd.cpp) and of the
// ensemble ops (ensemble_autograd.cpp) share.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <optional>

namespace fusedgrad::autograd_helpers {

using OptTensor = std::optional<at::Tensor>;

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }
inline bool requires_grad(const OptTensor& t) { return present(t) && t->requires_grad(); }

// The engine runs backward with grad mode on only for create_graph=True, i.e.
// when a differentiable gradient is asked for. The saved gradients are not
// functions of the inputs in any graph, so refuse rather than return a
// gradient whose own derivative would silently be wrong. `what` is appended to
// "is not supported" (e.g. " for ensembles").
inline void refuse_double_backward(const char* op, const char* what = "") {
  TORCH_CHECK(
      !at::GradMode::is_enabled(),
      "fusedgrad.", op, ": double backward (create_graph=True, e.g. a gradient penalty or a Hessian) "
      "is not supported", what, "; use native autograd for higher-order derivatives");
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
