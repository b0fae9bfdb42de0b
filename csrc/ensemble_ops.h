// Typed handles to the registered ensemble ops (schemas in ensemble_ops.cpp),
// looked up once.
#pragma once

#include "ops.h"

namespace fusedgrad::ops {

#define FUSEDGRAD_ENSEMBLE_HANDLE(fn, Sig, name)                                                    \
  inline const c10::TypedOperatorHandle<Sig>& fn() {                                                \
    static const auto h = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();    \
    return h;                                                                                       \
  }

// Same signatures as the single-model ops of ops.h.
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp_loss, MlpLossSig, "fusedgrad::ensemble_mlp_loss")
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp_loss_and_grads, MlpLossAndGradsSig, "fusedgrad::ensemble_mlp_loss_and_grads")
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp_loss_forward, MlpLossAndGradsSig, "fusedgrad::ensemble_mlp_loss_forward")
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp, MlpSig, "fusedgrad::ensemble_mlp")
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp_forward, MlpForwardSig, "fusedgrad::ensemble_mlp_forward")
FUSEDGRAD_ENSEMBLE_HANDLE(ensemble_mlp_backward, MlpBackwardSig, "fusedgrad::ensemble_mlp_backward")

#undef FUSEDGRAD_ENSEMBLE_HANDLE

}  // namespace fusedgrad::ops
