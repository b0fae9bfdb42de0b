// The GEMM path of the single-model ops, written once for every backend.
//
// The matrix products go through at::mm_out (BLAS on the CPU, cuBLAS on CUDA);
// a backend supplies only the element-wise passes between them
// (ElementwiseKernels). Each step is one line of the README's "Math":
//
//   h  = x w1ᵀ (GEMM)      s  = act(h + b1)               bias_activation
//   p  = s w2ᵀ (GEMM)      r  = p + b2 − t, L, g = 2c r    residual
//   dw2 = gᵀ s (GEMM)      db2 = Σ_rows g                  residual (column sums)
//   ds = g w2 (GEMM)       dh = ds ⊙ act'(s), Σ_rows dh    hidden_backward
//   dw1 = dhᵀ x (GEMM)     dx = dh w1 (GEMM)     dt = −g   residual
#pragma once

#include <ATen/ATen.h>

#include "op_kernels.h"

namespace fusedgrad {

// What the residual pass writes; an undefined tensor is not wanted.
struct ResidualOutputs {
  at::Tensor loss;        // 0-dim, always written: c Σ r²
  at::Tensor g;           // (N, O) g = 2c r; may be the prediction's own buffer
  at::Tensor neg_g;       // (N, O) −g: a full-shape target's gradient
  at::Tensor colsum;      // Σ_rows g in the per-column b2's own shape
  at::Tensor neg_colsum;  // −Σ_rows g in the per-column target's own shape
};

// A backend's element-wise passes over contiguous (rows, cols) matrices.
struct ElementwiseKernels {
  // h += bias (if present), then s = act(h); `s` may be `h` itself (in place).
  virtual void bias_activation(at::Tensor& h, const Broadcast2d& bias, Activation act, at::Tensor& s) const = 0;
  // r = pred + b2 − t and everything derived from it, in one pass (ResidualOutputs).
  virtual void residual(const at::Tensor& pred, const Broadcast2d& b2, const Broadcast2d& target, double c,
                        ResidualOutputs& out) const = 0;
  // dh = ds ⊙ act'(saved) in place over ds (saved: s, or h where the
  // derivative is written from the input); Σ_rows dh into `colsum` (a
  // per-column b1's own shape) when it is defined.
  virtual void hidden_backward(at::Tensor& ds, const at::Tensor& saved, Activation act,
                               at::Tensor& colsum) const = 0;

 protected:
  ~ElementwiseKernels() = default;
};

// The element-wise kernels of the CPU (cpu/elementwise_cpu.cpp) and, in a CUDA build, of CUDA.
const ElementwiseKernels& cpu_elementwise_kernels();
#ifdef FUSEDGRAD_WITH_CUDA
const ElementwiseKernels& cuda_elementwise_kernels();
#endif

LossAndGrads gemm_loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need);
std::array<at::Tensor, 2> gemm_forward(const Problem& p);
std::array<at::Tensor, kNumMlpInputs> gemm_backward(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need);

}  // namespace fusedgrad
