// CUDA element-wise passes of fusedgrad (README, "Math"), as plain launchers.
//
// This header is deliberately light (no ATen tensors): kernels_cuda.cu only
// needs raw pointers, sizes and a stream, so nvcc never parses ATen/ATen.h and
// the .cu compiles in seconds rather than minutes. Tensors, GEMMs (cuBLAS via
// at::mm_out), device guards and streams are handled by elementwise_cuda.cpp and the GEMM path (ops/gemm_path.cpp), which
// passes the current stream of the tensors' device to every launcher here.
//
// Every launcher checks its launch with C10_CUDA_KERNEL_LAUNCH_CHECK and
// never synchronises with the host.
#pragma once

#include <c10/core/ScalarType.h>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "../common/formulas.h"

namespace fusedgrad::cuda {

// A broadcast operand (Broadcast2d) as the kernels read it: element (i, j) of
// the (rows, cols) matrix it broadcasts to is data[i * row_stride + j *
// col_stride], in the kernel's dtype. data == nullptr: the operand is absent
// (reads as 0).
struct OperandView {
  const void* data = nullptr;
  int64_t row_stride = 0;
  int64_t col_stride = 0;
};

// h += bias, s = act(h) over a contiguous (rows, cols) matrix (the GEMM
// output x w1ᵀ, or s w2ᵀ with Activation::Identity for the second bias); s
// may be h (in place).
void bias_activation(
    c10::ScalarType dtype, void* h, void* s, int64_t rows, int64_t cols, OperandView bias,
    Activation act, cudaStream_t stream);

// What the residual pass reads and writes. pred is a contiguous (rows, cols)
// prediction before its bias; every output pointer may be null (not wanted).
struct ResidualArgs {
  const void* pred = nullptr;
  OperandView b2;
  OperandView target;
  double loss_scale = 1.0;  // c in L = c Σ r²
  void* loss = nullptr;     // 0-dim output: L, always written
  void* g = nullptr;        // (rows, cols) g = 2c r; may alias pred
  void* neg_g = nullptr;    // (rows, cols) −g (a full-shape target's gradient)
  // Column sums of g (needs g): Σ_rows g into colsum (a per-column b2's
  // gradient) and −Σ_rows g into neg_colsum (a per-column target's), `cols`
  // contiguous elements each.
  void* colsum = nullptr;
  void* neg_colsum = nullptr;
};

// Bytes of device workspace residual() needs (partial sums of the fixed row
// blocks; see the .cu for why the reduction is two-stage).
int64_t residual_workspace_bytes(int64_t rows, int64_t cols, bool column_sums);

// r = pred + b2 − t, L = c Σ r² (accumulated in double, as on the CPU),
// g = 2c r, −g and column sums of g, all in one pass over the prediction.
void residual(
    c10::ScalarType dtype, int64_t rows, int64_t cols, const ResidualArgs& args,
    void* workspace, cudaStream_t stream);

// Bytes of device workspace hidden_backward() needs when colsum is wanted.
int64_t hidden_backward_workspace_bytes(c10::ScalarType dtype, int64_t rows, int64_t cols);

// dh = ds ⊙ act'(saved) in place over the contiguous (rows, cols) ds, with act'
// written from the saved s (or h: common/activation.h); optionally Σ_rows dh into colsum (`cols`
// contiguous elements; accumulated in the dtype's opmath type, as on the CPU).
void hidden_backward(
    c10::ScalarType dtype, void* ds, const void* saved, int64_t rows, int64_t cols,
    Activation act, void* colsum, void* workspace, cudaStream_t stream);

}  // namespace fusedgrad::cuda
