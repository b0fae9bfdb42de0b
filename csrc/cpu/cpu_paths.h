// The CPU's direct-loop kernel paths, which op_kernels.cpp takes before the
// GEMM path where they pay.
#pragma once

#include <ATen/ATen.h>

#include <array>

#include "../ops/op_kernels.h"

namespace fusedgrad {

// The direct-loop path for problems too small for BLAS to pay (small_path.cpp):
// N·(D·H + H·O) multiply-adds up to the measured crossover.
bool small_path_applies(const Problem& p);
LossAndGrads mlp_loss_and_grads_cpu_small(const Problem& p, Reduction reduction, const LossGradMask& need);
// The crossover, for benchmarks/crossover.py (fusedgrad._C._set_small_path_max_macs):
// sets it (a negative value restores the measured default) and returns the previous one.
int64_t set_small_path_max_macs(int64_t macs);

// The outputs the direct-loop paths (small, streaming) write in place: the loss
// and each requested gradient in its argument's shape, (0,) placeholders
// for the others (small_path.cpp).
LossAndGrads allocate_loss_and_grads(const Problem& p, const LossGradMask& need);

// The streaming path for tall data through narrow networks (stream_path.cpp):
// rows in cache-sized blocks, nothing that grows with N but the requested
// outputs. The loss op and the mlp op's forward and backward take it when
// stream_path_applies (widths and rows, measured).
bool stream_path_applies(const Problem& p);
LossAndGrads mlp_loss_and_grads_cpu_stream(const Problem& p, Reduction reduction, const LossGradMask& need);
std::array<at::Tensor, 2> mlp_forward_cpu_stream(const Problem& p);
std::array<at::Tensor, kNumMlpInputs> mlp_backward_cpu_stream(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need);

}  // namespace fusedgrad
