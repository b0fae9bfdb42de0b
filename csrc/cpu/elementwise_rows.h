// Element-wise passes over rows of a contiguous (rows, cols) matrix that the
// ops' GEMM path (elementwise_cpu.cpp) and the fused trainer's GEMM path
// (trainer/train_cpu.cpp) both run: the bias and the activation, and the
// activation's backward with the bias gradient's row sums. Compiled once per
// CPU capability in elementwise_cpu.cpp.
#pragma once

#include <cstdint>

#include "../common/activation.h"
#include "../common/problem.h"

namespace fusedgrad {

// Element (i, j) of a broadcast operand: row(i)[j * col_stride].
template <typename T>
struct OperandReader {
  const T* data = nullptr;
  int64_t row_stride = 0, col_stride = 0;
  OperandReader() = default;
  // A per-column vector (a model's bias), or nothing when `vec` is null.
  static OperandReader per_column(const T* vec) {
    OperandReader r;
    r.data = vec;
    r.col_stride = 1;
    return r;
  }
  explicit OperandReader(const Broadcast2d& op) {
    if (op.present()) {
      data = op.data<T>();
      row_stride = op.row_stride;
      col_stride = op.col_stride;
    }
  }
  bool present() const { return data != nullptr; }
  const T* row(int64_t i) const { return data + i * row_stride; }
};

// Rows [i0, i1) of h (H columns): h += b, then s = act(h) (s may be h).
void run_bias_activation_rows(float* h, float* s, int64_t i0, int64_t i1, int64_t H, const OperandReader<float>& b,
                              Activation act);
void run_bias_activation_rows(double* h, double* s, int64_t i0, int64_t i1, int64_t H,
                              const OperandReader<double>& b, Activation act);

// Rows [i0, i1) of ds (H columns): dh = ds ⊙ act'(saved) in place (saved: s, or
// h where the activation saves its input), and Σ_rows dh into acc (if not null).
void run_hidden_backward_rows(float* ds, const float* saved, int64_t i0, int64_t i1, int64_t H, Activation act,
                              double* acc);
void run_hidden_backward_rows(double* ds, const double* saved, int64_t i0, int64_t i1, int64_t H, Activation act,
                              double* acc);

}  // namespace fusedgrad
