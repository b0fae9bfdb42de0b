// Argument checking and the 2-D view of one fusedgrad problem.
//
// The public shapes follow F.linear: x is (*, D), w1 is (H, D), w2 is (O, H).
// Leading dimensions of x are flattened to N rows. Biases and the target may
// be any shape that broadcasts to the hidden activations (*, H) or the
// prediction (*, O) without enlarging it; their gradients come back in their
// own shape.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

#include "formulas.h"
#include "options.h"

namespace fusedgrad {

// A tensor broadcast to a (rows, cols) matrix, read element (i, j) at
// data[i * row_stride + j * col_stride]. Zero strides express broadcasting, so
// an (H,) bias is read without materialising its (N, H) expansion.
struct Broadcast2d {
  enum class Kind {
    Absent,     // argument was None
    PerColumn,  // one value per column, e.g. (H,), (1, H): gradient = column sums
    Full,       // exactly the full shape: gradient = the (rows, cols) matrix itself
    Other,      // anything else that broadcasts: gradient through at::sum_to
  };
  Kind kind = Kind::Absent;
  at::Tensor source;  // the user's tensor (its shape is the gradient's shape)
  at::Tensor view;    // what `data` points into: source itself, or a copy
  int64_t row_stride = 0;
  int64_t col_stride = 0;

  bool present() const { return kind != Kind::Absent; }
  template <typename T>
  const T* data() const { return view.const_data_ptr<T>(); }
};

struct Problem {
  at::Tensor x2;   // (N, D) view of x (a copy only when no view exists)
  at::Tensor w1;   // (H, D)
  at::Tensor w2;   // (O, H), undefined when the chain ends at the activation
  Broadcast2d b1;  // against (N, H)
  Broadcast2d b2;  // against (N, O)
  Broadcast2d target;  // against (N, O)
  int64_t N = 0, D = 0, H = 0, O = 0;
  std::vector<int64_t> x_shape;       // (*, D)
  std::vector<int64_t> hidden_shape;  // (*, H)
  std::vector<int64_t> out_shape;     // (*, O)
  Activation activation = Activation::Sigmoid;

  bool has_w2() const { return w2.defined(); }
};

// Names as a Python user writes them ("torch.float32", "(2, 3)"), for the
// messages of every argument check (problem.cpp, ensemble_problem.cpp).
std::string dtype_name(at::ScalarType t);
std::string shape_str(at::IntArrayRef shape);

// Validates every argument (dtype, device, layout, rank, shape) and raises a
// ValueError / TypeError naming the argument before any kernel runs.
Problem make_problem(
    const at::Tensor& x,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2,
    const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& target,
    Activation activation);

// Sums a (rows, cols) gradient down to the shape of the broadcast operand it
// belongs to (the rule autograd applies to broadcast arguments).
at::Tensor reduce_to_operand(
    const at::Tensor& grad2d,
    const std::vector<int64_t>& full_shape,
    const Broadcast2d& operand);

}  // namespace fusedgrad
