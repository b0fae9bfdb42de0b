// The one-hidden-layer ops on the any-depth engine (csrc/engine/), L = 2: the
// CPU kernels of the loss, the prediction and its backward for every problem
// the engine reads directly — a second layer, biases absent or one value per
// column, a target absent or of the prediction's full shape — up to the row
// width where BLAS pays (engine_path.cpp). The rest takes the GEMM path.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "op_kernels.h"

namespace fusedgrad {

bool engine_path_applies(const Problem& p);
// The crossover, for benchmarks/crossover.py and the tests that run the GEMM path on small problems
// (fusedgrad._C._set_engine_path_max_macs): the most multiply-adds of one row's forward (D·H + H·O)
// the engine takes; sets it (a negative value restores the measured default), returns the previous one.
int64_t set_engine_path_max_macs(int64_t macs);
LossAndGrads engine_loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need);
// The prediction (*, O) and, with `activations`, what mlp_backward's contract saves (N, H): s, or h
// where the activation's derivative reads its input; else a (0,) placeholder.
std::array<at::Tensor, 2> engine_forward(const Problem& p, bool activations);
// The gradients of Σ grad_out ⊙ p; each row block's forward is recomputed (the saved activations
// are not read).
std::array<at::Tensor, kNumMlpInputs> engine_backward(const Problem& p, const at::Tensor& grad_out,
                                                      const MlpGradMask& need);

}  // namespace fusedgrad
