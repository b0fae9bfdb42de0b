// The schemas of every fusedgrad op, for every backend. Kernels: op_kernels.cpp
// (single model, CPU; cuda/elementwise_cuda.cpp registers the same on CUDA),
// ensemble_ops.cpp / cuda/ensemble_cuda.cpp (ensembles), autograd.cpp and
// ensemble_autograd.cpp (Autograd key); fake kernels: fusedgrad/_fake*.py.
//
// mlp_loss / mlp are the public ops; the others are the pieces their autograd
// kernels call: one fused forward that also returns the requested gradients,
// and the prediction's forward / backward pair. Options are strings, parsed in
// common/options.cpp: reduction "mean" | "sum", activation one of the
// activation table's names (common/activation.h).
#include <torch/library.h>

namespace fusedgrad {

// The loss op's gradients, in argument order.
#define FUSEDGRAD_LOSS_GRADS \
  "-> (Tensor loss, Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2, Tensor grad_target)"
#define FUSEDGRAD_MLP_GRADS "-> (Tensor grad_x, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)"
#define FUSEDGRAD_LOSS_ARGS "Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2, Tensor? target"
#define FUSEDGRAD_MLP_ARGS "Tensor x, Tensor w1, Tensor? b1, Tensor? w2, Tensor? b2"

TORCH_LIBRARY(fusedgrad, m) {
  // One model: w1 (H, D), w2 (O, H).
  m.def("mlp_loss(" FUSEDGRAD_LOSS_ARGS ", str reduction, str activation) -> Tensor");
  m.def("mlp_loss_and_grads(" FUSEDGRAD_LOSS_ARGS ", str reduction, str activation, bool[6] output_mask) "
        FUSEDGRAD_LOSS_GRADS);
  m.def("mlp(" FUSEDGRAD_MLP_ARGS ", str activation) -> Tensor");
  m.def("mlp_forward(" FUSEDGRAD_MLP_ARGS ", str activation) -> (Tensor prediction, Tensor activations)");
  m.def("mlp_backward(Tensor grad_out, " FUSEDGRAD_MLP_ARGS ", Tensor activations, str activation, "
        "bool[5] output_mask) " FUSEDGRAD_MLP_GRADS);
  // K models stacked along a leading dimension (shape rules: ensemble.h).
  // ensemble_mlp_loss_forward: as ensemble_mlp_loss_and_grads, but a shared
  // argument's gradient comes back per model, (K, *its shape), so that the
  // autograd backward can weight model k's part by the incoming gradient of L_k.
  m.def("ensemble_mlp_loss(" FUSEDGRAD_LOSS_ARGS ", str reduction, str activation) -> Tensor");
  m.def("ensemble_mlp_loss_and_grads(" FUSEDGRAD_LOSS_ARGS ", str reduction, str activation, bool[6] output_mask) "
        FUSEDGRAD_LOSS_GRADS);
  m.def("ensemble_mlp_loss_forward(" FUSEDGRAD_LOSS_ARGS ", str reduction, str activation, bool[6] output_mask) "
        FUSEDGRAD_LOSS_GRADS);
  m.def("ensemble_mlp(" FUSEDGRAD_MLP_ARGS ", str activation) -> Tensor");
  m.def("ensemble_mlp_forward(" FUSEDGRAD_MLP_ARGS ", str activation) -> (Tensor prediction, Tensor activations)");
  m.def("ensemble_mlp_backward(Tensor grad_out, " FUSEDGRAD_MLP_ARGS ", Tensor activations, str activation, "
        "bool[5] output_mask) " FUSEDGRAD_MLP_GRADS);
}

}  // namespace fusedgrad
