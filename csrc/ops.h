// Typed handles to the registered fusedgrad ops, looked up once.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>

namespace fusedgrad::ops {

using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;

using MlpLossSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&, const OptTensor&, int64_t, int64_t);
using MlpLossAndGradsSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, int64_t, int64_t, std::array<bool, 6>);
using MlpSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, int64_t);
using MlpForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, int64_t);
using MlpBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const Tensor&, int64_t, std::array<bool, 5>);


inline const c10::TypedOperatorHandle<MlpLossSig>& mlp_loss() {
  static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow("fusedgrad::mlp_loss", "").typed<MlpLossSig>();
  return h;
}
inline const c10::TypedOperatorHandle<MlpLossAndGradsSig>& mlp_loss_and_grads() {
  static const auto h = c10::Dispatcher::singleton()
                            .findSchemaOrThrow("fusedgrad::mlp_loss_and_grads", "")
                            .typed<MlpLossAndGradsSig>();
  return h;
}
inline const c10::TypedOperatorHandle<MlpSig>& mlp() {
  static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow("fusedgrad::mlp", "").typed<MlpSig>();
  return h;
}
inline const c10::TypedOperatorHandle<MlpForwardSig>& mlp_forward() {
  static const auto h =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedgrad::mlp_forward", "").typed<MlpForwardSig>();
  return h;
}
inline const c10::TypedOperatorHandle<MlpBackwardSig>& mlp_backward() {
  static const auto h =
      c10::Dispatcher::singleton().findSchemaOrThrow("fusedgrad::mlp_backward", "").typed<MlpBackwardSig>();
  return h;
}

}  // namespace fusedgrad::ops
