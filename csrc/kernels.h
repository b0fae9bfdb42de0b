// CPU kernels of the fused two-layer perceptron (README, "Math").
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "problem.h"

namespace fusedgrad {

// Gradients in the order of the loss op's tensor arguments.
enum LossInput { kX = 0, kW1, kB1, kW2, kB2, kTarget, kNumLossInputs };
using LossGradMask = std::array<bool, kNumLossInputs>;

struct LossAndGrads {
  at::Tensor loss;                        // 0-dim
  std::array<at::Tensor, kNumLossInputs> grads;  // empty (numel 0) where not requested
};

// L = c · Σ (s w2ᵀ + b2 − t)², s = act(x w1ᵀ + b1), and, in the same pass,
// dL/d(input) for every input whose mask entry is true.
LossAndGrads mlp_loss_and_grads_cpu(const Problem& p, Reduction reduction, const LossGradMask& need);

// The direct-loop path for problems too small for BLAS to pay
// (kernels_cpu_small.cpp); mlp_loss_and_grads_cpu takes it when it applies.
bool small_path_applies(const Problem& p);
LossAndGrads mlp_loss_and_grads_cpu_small(const Problem& p, Reduction reduction, const LossGradMask& need);

// The outputs the direct-loop paths (small, streaming) write in place: the loss
// and each requested gradient in its argument's shape, (0,) placeholders
// for the others (kernels_cpu_small.cpp).
LossAndGrads allocate_loss_and_grads(const Problem& p, const LossGradMask& need);

// The streaming path for tall data through narrow networks
// (kernels_cpu_stream.cpp): rows in cache-sized blocks, nothing that grows
// with N but the requested outputs. The loss op and the mlp op's forward and
// backward take it when stream_path_applies (widths and rows, measured).
bool stream_path_applies(const Problem& p);
LossAndGrads mlp_loss_and_grads_cpu_stream(const Problem& p, Reduction reduction, const LossGradMask& need);
std::array<at::Tensor, 2> mlp_forward_cpu_stream(const Problem& p);
std::array<at::Tensor, 5> mlp_backward_cpu_stream(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const std::array<bool, 5>& need);

// s = act(s) in place. σ is ATen's vectorised torch.sigmoid — the very
// function native autograd evaluates (math::sigmoid is the same formula,
// written for device kernels); a scalar std::exp loop costs several times more.
void apply_activation_(at::Tensor& s, Activation act);

// The backward's GEMMs, any device (backward_gemms.cpp). output_layer_grads:
// dw2 = gᵀ s if requested and, when the hidden layer needs gradients, ds = g w2
// (g itself without a second layer; g's buffer only when `g_owned`) in a
// buffer the caller turns into dh in place; undefined otherwise.
at::Tensor output_layer_grads(const Problem& p, const at::Tensor& g, bool g_owned, const at::Tensor& s,
                              bool need_w2, bool need_hidden, at::Tensor& dw2);
// first_layer_grads: dw1 = dhᵀ x and dx = dh w1 (x's shape), for the requested ones.
void first_layer_grads(const Problem& p, const at::Tensor& dh, bool need_w1, bool need_x,
                       at::Tensor& dw1, at::Tensor& dx);

// Prediction (shape (*, O)) and the saved activations s (N, H).
std::array<at::Tensor, 2> mlp_forward_cpu(const Problem& p);

// Gradients of Σ grad_out ⊙ pred for (x, w1, b1, w2, b2), given the saved s.
enum MlpInput { kMx = 0, kMw1, kMb1, kMw2, kMb2, kNumMlpInputs };
using MlpGradMask = std::array<bool, kNumMlpInputs>;
std::array<at::Tensor, kNumMlpInputs> mlp_backward_cpu(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations,
    const MlpGradMask& need);

}  // namespace fusedgrad
