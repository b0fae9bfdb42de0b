// The single-model ops' kernels, one set for every device: argument handling
// (make_problem, gradients of None arguments dropped, results in schema
// order) and the choice of kernel path:
//
//   CPU   the any-depth engine at L = 2 (engine_path.cpp) for every problem it reads directly
//         up to the row width where BLAS pays, else the GEMM path (gemm_path.cpp) with the
//         CPU's element-wise kernels;
//   CUDA  the GEMM path with the CUDA element-wise kernels (cuda/elementwise_cuda.cpp).
//
// Registered on the CPU key here (op_kernels.cpp) and on the CUDA key in a CUDA
// build (cuda/elementwise_cuda.cpp).
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>

#include "../common/problem.h"

namespace fusedgrad {

// Gradients in the order of the loss op's tensor arguments.
enum LossInput { kX = 0, kW1, kB1, kW2, kB2, kTarget, kNumLossInputs };
using LossGradMask = std::array<bool, kNumLossInputs>;

struct LossAndGrads {
  at::Tensor loss;                               // 0-dim
  std::array<at::Tensor, kNumLossInputs> grads;  // empty (numel 0) where not requested
};

// Gradients of the prediction's backward, in the order of the mlp op's tensor arguments.
enum MlpInput { kMx = 0, kMw1, kMb1, kMw2, kMb2, kNumMlpInputs };
using MlpGradMask = std::array<bool, kNumMlpInputs>;

// L = c · Σ (s w2ᵀ + b2 − t)², s = act(x w1ᵀ + b1), and, in the same pass,
// dL/d(input) for every input whose mask entry is true; on the problem's device.
LossAndGrads loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need);
// The kernel path loss_and_grads, forward and backward take for p ("engine", "gemm"; "cuda" off the
// CPU): the same test as their dispatch, for fusedgrad.explain.
const char* path_name(const Problem& p);
// Prediction (shape (*, O)) and what the backward reads to differentiate the
// activation (N, H): s, or h where the activation saves its input; empty
// without w2 when it is s (the prediction itself).
// Without `activations` the second slot may be a (0,) placeholder (the prediction alone).
std::array<at::Tensor, 2> forward(const Problem& p, bool activations);
// Gradients of Σ grad_out ⊙ pred for (x, w1, b1, w2, b2), from forward's activations.
std::array<at::Tensor, kNumMlpInputs> backward(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need);

// The op kernels (schemas.cpp), as registered on the device keys.
namespace op_kernels {
using at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Str = c10::string_view;

Tensor mlp_loss(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
                const OptTensor& target, Str reduction, Str activation);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_and_grads(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    const OptTensor& target, Str reduction, Str activation, std::array<bool, 6> output_mask);
Tensor mlp(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
           Str activation);
std::tuple<Tensor, Tensor> mlp_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                       const OptTensor& w2, const OptTensor& b2, Str activation);
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const Tensor& activations, Str activation, std::array<bool, 5> output_mask);
}  // namespace op_kernels

// The ops' argument rules, run by their fake kernels (fusedgrad/_fake.py) on fake or meta tensors: the
// options (reduction nullopt: not checked), make_problem, and mlp_backward's own operands, as the kernels
// above run them, so that torch.compile, torch.export and meta tensors refuse what the kernels refuse.
void check_problem_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                        const std::optional<at::Tensor>& target, const std::optional<std::string>& reduction,
                        const std::string& activation);
void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                         const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                         const std::optional<at::Tensor>& b2, const at::Tensor& activations,
                         const std::string& activation);

}  // namespace fusedgrad
