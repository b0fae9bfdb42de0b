#include "problem.h"

#include <c10/util/Exception.h>

#include <cctype>
#include <sstream>
#include <string>

namespace fusedgrad {
namespace {

std::string layout_name(at::Layout layout) {
  std::ostringstream out;
  out << "torch." << layout;  // c10 prints e.g. "Sparse" / "Strided"
  std::string s = out.str();
  for (auto& c : s) c = static_cast<char>(std::tolower(c));
  return s;
}

// The checks every tensor argument shares: dense layout, the dtype and device
// of x (x itself must be float32 or float64).
void check_tensor(const char* name, const at::Tensor& t, const at::Tensor& x) {
  TORCH_CHECK_VALUE(
      t.layout() == at::kStrided,
      "fusedgrad: argument '", name, "' must be a dense (torch.strided) tensor, got layout ",
      layout_name(t.layout()));
  if (&t == &x) {
    // float16 / bfloat16 only where kernels exist for them: CUDA (csrc/cuda).
    const bool reduced = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
    TORCH_CHECK_TYPE(
        t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || (reduced && t.is_cuda()),
        "fusedgrad: argument 'x' must have dtype torch.float32 or torch.float64, got ",
        dtype_name(t.scalar_type()),
        reduced ? " (torch.float16 and torch.bfloat16 are supported on CUDA only)" : "");
    return;
  }
  TORCH_CHECK_TYPE(
      t.scalar_type() == x.scalar_type(),
      "fusedgrad: argument '", name, "' has dtype ", dtype_name(t.scalar_type()),
      " but x has dtype ", dtype_name(x.scalar_type()),
      "; all tensor arguments must share one dtype");
  TORCH_CHECK_VALUE(
      t.device() == x.device(),
      "fusedgrad: argument '", name, "' is on device ", t.device().str(),
      " but x is on device ", x.device().str(), "; all tensor arguments must be on one device");
}

// An operand added to a (rows, cols) matrix whose user-visible shape is
// `full_shape` = (*, cols): it must broadcast to full_shape without enlarging it.
Broadcast2d make_operand(
    const char* name,
    const std::optional<at::Tensor>& maybe_t,
    const at::Tensor& x,
    const std::vector<int64_t>& full_shape,
    const char* full_shape_meaning) {
  Broadcast2d op;
  if (!maybe_t.has_value() || !maybe_t->defined()) return op;
  const at::Tensor& t = *maybe_t;
  check_tensor(name, t, x);

  const int64_t rank = static_cast<int64_t>(full_shape.size());
  const int64_t cols = full_shape.back();
  int64_t n_rows = 1;
  for (int64_t k = 0; k + 1 < rank; ++k) n_rows *= full_shape[k];

  bool broadcasts = t.dim() <= rank;
  for (int64_t k = 1; broadcasts && k <= t.dim(); ++k) {
    const int64_t have = t.size(-k), want = full_shape[rank - k];
    broadcasts = have == want || have == 1;
  }
  TORCH_CHECK_VALUE(
      broadcasts,
      "fusedgrad: argument '", name, "' has shape ", shape_str(t.sizes()),
      ", which does not broadcast to ", full_shape_meaning, " ", shape_str(full_shape),
      " (it may have any shape that broadcasts to it without enlarging it, e.g. (",
      cols, ",) or ", shape_str(full_shape), ")");

  op.source = t;
  // Read through the user's tensor wherever strides can express the
  // broadcast; only the "Other" kind may materialise a copy.
  if (t.sizes().equals(full_shape)) {
    op.kind = Broadcast2d::Kind::Full;
    if (t.dim() <= 2) {
      op.view = t;
    } else {
      op.view = t.reshape({n_rows, cols});
    }
  } else if (t.numel() == cols && (t.dim() == 0 ? cols == 1 : t.size(-1) == cols)) {
    op.kind = Broadcast2d::Kind::PerColumn;  // (cols,), (1, cols), (1, 1, cols), ...
    op.view = t;
  } else {
    op.kind = Broadcast2d::Kind::Other;
    op.view = t.expand(full_shape).reshape({n_rows, cols});
  }
  const at::Tensor& v = op.view;
  const bool one_row = op.kind == Broadcast2d::Kind::PerColumn || v.dim() < 2 || v.size(0) == 1;
  op.row_stride = one_row ? 0 : v.stride(0);
  op.col_stride = (v.dim() == 0 || v.size(-1) == 1) ? 0 : v.stride(-1);
  return op;
}

}  // namespace

std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

std::string shape_str(at::IntArrayRef shape) {
  std::ostringstream out;
  out << "(";
  for (size_t i = 0; i < shape.size(); ++i) {
    out << (i ? ", " : "") << shape[i];
  }
  out << (shape.size() == 1 ? ",)" : ")");
  return out.str();
}

Problem make_problem(
    const at::Tensor& x,
    const at::Tensor& w1,
    const std::optional<at::Tensor>& b1,
    const std::optional<at::Tensor>& w2,
    const std::optional<at::Tensor>& b2,
    const std::optional<at::Tensor>& target,
    Activation activation) {
  Problem p;
  p.activation = activation;

  TORCH_CHECK_VALUE(x.defined(), "fusedgrad: argument 'x' must be a tensor, got None");
  check_tensor("x", x, x);
  TORCH_CHECK_VALUE(
      x.dim() >= 1,
      "fusedgrad: argument 'x' must have shape (*, in_features) with at least one dimension, "
      "got a 0-dimensional tensor");
  TORCH_CHECK_VALUE(w1.defined(), "fusedgrad: argument 'w1' must be a tensor, got None");
  check_tensor("w1", w1, x);
  p.D = x.size(-1);
  TORCH_CHECK_VALUE(
      w1.dim() == 2 && w1.size(1) == p.D,
      "fusedgrad: argument 'w1' must have shape (hidden_features, in_features) = (H, ", p.D,
      ") to match the last dimension of x, got ", shape_str(w1.sizes()));
  p.H = w1.size(0);

  p.x_shape = x.sizes().vec();
  p.N = 1;
  for (int64_t k = 0; k + 1 < x.dim(); ++k) p.N *= x.size(k);
  p.hidden_shape = p.x_shape;
  p.hidden_shape.back() = p.H;

  if (x.dim() == 2) {
    p.x2 = x;
  } else if (x.dim() == 1) {
    p.x2 = x.unsqueeze(0);
  } else {
    p.x2 = x.reshape({p.N, p.D});
  }
  p.w1 = w1;
  p.b1 = make_operand("b1", b1, x, p.hidden_shape, "the hidden activations' shape x.shape[:-1] + (H,) =");

  const bool has_w2 = w2.has_value() && w2->defined();
  if (has_w2) {
    check_tensor("w2", *w2, x);
    TORCH_CHECK_VALUE(
        w2->dim() == 2 && w2->size(1) == p.H,
        "fusedgrad: argument 'w2' must have shape (out_features, hidden_features) = (O, ", p.H,
        ") to match w1's hidden_features, got ", shape_str(w2->sizes()));
    p.w2 = *w2;
    p.O = w2->size(0);
  } else {
    TORCH_CHECK_VALUE(
        !(b2.has_value() && b2->defined()),
        "fusedgrad: argument 'b2' was given without 'w2'; b2 is the second layer's bias and "
        "needs w2 (pass w2, or drop b2)");
    p.O = p.H;
  }
  p.out_shape = p.x_shape;
  p.out_shape.back() = p.O;
  p.b2 = make_operand("b2", b2, x, p.out_shape, "the prediction's shape x.shape[:-1] + (O,) =");
  p.target = make_operand("target", target, x, p.out_shape, "the prediction's shape x.shape[:-1] + (O,) =");
  return p;
}

at::Tensor reduce_to_operand(
    const at::Tensor& grad2d,
    const std::vector<int64_t>& full_shape,
    const Broadcast2d& operand) {
  const auto shape = operand.source.sizes();
  switch (operand.kind) {
    case Broadcast2d::Kind::Full:
      return grad2d.view(shape);
    case Broadcast2d::Kind::PerColumn:
      return grad2d.sum(0).view(shape);
    default:
      return at::sum_to(grad2d.view(full_shape), shape).reshape(shape);
  }
}

}  // namespace fusedgrad
