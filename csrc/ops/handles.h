// Typed dispatcher handles to the registered fusedgrad ops (schemas:
// schemas.cpp), looked up once: how C++ (autograd kernels, the direct Python
// calls, the CUDA ensemble) calls an op through the dispatcher.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace fusedgrad::ops {

using OptTensor = std::optional<at::Tensor>;
using Tensor = at::Tensor;
using Str = c10::string_view;

using MlpLossSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                          const OptTensor&, const OptTensor&, Str, Str);
using MlpLossAndGradsSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, Str, Str, std::array<bool, 6>);
using MlpSig = Tensor(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                      const OptTensor&, Str);
using MlpForwardSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                                 const OptTensor&, const OptTensor&, Str);
using MlpBackwardSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
    const OptTensor&, const Tensor&, Str, std::array<bool, 5>);

// The ops of a network of any depth (deep_ops.cpp): lists of weights and biases.
using BiasList = c10::List<std::optional<Tensor>>;
using DeepLossSig = std::tuple<Tensor, std::vector<Tensor>>(const Tensor&, at::TensorList, const BiasList&,
                                                            const OptTensor&, Str, Str, std::array<bool, 3>);
using DeepMlpSig = Tensor(const Tensor&, at::TensorList, const BiasList&, Str);
using DeepMlpBackwardSig = std::vector<Tensor>(const Tensor&, const Tensor&, at::TensorList, const BiasList&, Str,
                                               std::array<bool, 2>);
using DerivativesSig = std::vector<Tensor>(const Tensor&, at::TensorList, const BiasList&, Str, int64_t);
using DerivativesBackwardSig = std::vector<Tensor>(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                                   at::TensorList, const BiasList&, Str, int64_t,
                                                   std::array<bool, 2>);
using JvpSig = std::vector<Tensor>(const Tensor&, at::TensorList, const BiasList&, Str, const Tensor&, at::IntArrayRef);
using JvpBackwardSig = std::vector<Tensor>(const OptTensor&, const OptTensor&, const OptTensor&, const Tensor&,
                                           at::TensorList, const BiasList&, Str, const Tensor&, at::IntArrayRef,
                                           std::array<bool, 3>);

#define FUSEDGRAD_OP_HANDLE(fn, Sig, name)                                                          \
  inline const c10::TypedOperatorHandle<Sig>& fn() {                                                \
    static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();    \
    return h;                                                                                       \
  }

FUSEDGRAD_OP_HANDLE(mlp_loss, MlpLossSig, "fusedgrad::mlp_loss")
FUSEDGRAD_OP_HANDLE(mlp_loss_and_grads, MlpLossAndGradsSig, "fusedgrad::mlp_loss_and_grads")
FUSEDGRAD_OP_HANDLE(mlp, MlpSig, "fusedgrad::mlp")
FUSEDGRAD_OP_HANDLE(mlp_forward, MlpForwardSig, "fusedgrad::mlp_forward")
FUSEDGRAD_OP_HANDLE(mlp_backward, MlpBackwardSig, "fusedgrad::mlp_backward")
// The ensemble ops have the single-model ops' signatures.
FUSEDGRAD_OP_HANDLE(ensemble_mlp_loss, MlpLossSig, "fusedgrad::ensemble_mlp_loss")
FUSEDGRAD_OP_HANDLE(ensemble_mlp_loss_and_grads, MlpLossAndGradsSig, "fusedgrad::ensemble_mlp_loss_and_grads")
FUSEDGRAD_OP_HANDLE(ensemble_mlp_loss_forward, MlpLossAndGradsSig, "fusedgrad::ensemble_mlp_loss_forward")
FUSEDGRAD_OP_HANDLE(ensemble_mlp, MlpSig, "fusedgrad::ensemble_mlp")
FUSEDGRAD_OP_HANDLE(ensemble_mlp_forward, MlpForwardSig, "fusedgrad::ensemble_mlp_forward")
FUSEDGRAD_OP_HANDLE(ensemble_mlp_backward, MlpBackwardSig, "fusedgrad::ensemble_mlp_backward")

FUSEDGRAD_OP_HANDLE(deep_mlp_loss_and_grads, DeepLossSig, "fusedgrad::deep_mlp_loss_and_grads")
FUSEDGRAD_OP_HANDLE(deep_mlp, DeepMlpSig, "fusedgrad::deep_mlp")
FUSEDGRAD_OP_HANDLE(deep_mlp_backward, DeepMlpBackwardSig, "fusedgrad::deep_mlp_backward")
FUSEDGRAD_OP_HANDLE(deep_mlp_derivatives, DerivativesSig, "fusedgrad::deep_mlp_derivatives")
FUSEDGRAD_OP_HANDLE(deep_mlp_derivatives_backward, DerivativesBackwardSig, "fusedgrad::deep_mlp_derivatives_backward")
FUSEDGRAD_OP_HANDLE(deep_mlp_jvp, JvpSig, "fusedgrad::deep_mlp_jvp")
FUSEDGRAD_OP_HANDLE(deep_mlp_jvp_backward, JvpBackwardSig, "fusedgrad::deep_mlp_jvp_backward")

#undef FUSEDGRAD_OP_HANDLE

}  // namespace fusedgrad::ops
