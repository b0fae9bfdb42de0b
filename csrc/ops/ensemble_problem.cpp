// Argument checking of the ensemble ops (ensemble.h has the shape rules).
//
// Everything is checked once for the whole ensemble, before any model runs,
// with messages that name the function the user called and the argument; the
// per-model single-model problems built from the slices then cannot fail.
// fusedgrad/_fake_ensemble.py repeats these rules with the same messages.
#include <c10/util/Exception.h>

#include <sstream>
#include <string>

#include "ensemble.h"

namespace fusedgrad::ensemble {
namespace {

struct Checker {
  const char* fn;
  const at::Tensor* x = nullptr;

  // Dense layout, and x's dtype and device (x itself: float32 / float64, or
  // float16 / bfloat16 on CUDA, where kernels exist for them).
  void tensor(const char* name, const at::Tensor& t) const {
    TORCH_CHECK_VALUE(t.layout() == at::kStrided, "fusedgrad.", fn, ": argument '", name,
                      "' must be a dense (torch.strided) tensor");
    if (&t == x) {
      const bool reduced = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
      TORCH_CHECK_TYPE(
          t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || (reduced && t.is_cuda()),
          "fusedgrad.", fn, ": argument 'x' must have dtype torch.float32 or torch.float64, got ",
          dtype_name(t.scalar_type()));
      return;
    }
    TORCH_CHECK_TYPE(t.scalar_type() == x->scalar_type(), "fusedgrad.", fn, ": argument '", name,
                     "' has dtype ", dtype_name(t.scalar_type()), " but x has dtype ",
                     dtype_name(x->scalar_type()), "; all tensor arguments must share one dtype");
    TORCH_CHECK_VALUE(t.device() == x->device(), "fusedgrad.", fn, ": argument '", name, "' is on device ",
                      t.device().str(), " but x is on device ", x->device().str(),
                      "; all tensor arguments must be on one device");
  }

  // view3 (Km, R, C) must broadcast to (K, rows, cols) without enlarging it.
  Operand operand(const char* name, const at::Tensor& t, const at::Tensor& view3, int64_t K, int64_t rows,
                  int64_t cols, const char* meaning, const char* forms, bool has_model_dim) const {
    const int64_t km = view3.size(0);
    TORCH_CHECK_VALUE(
        km == K || km == 1, "fusedgrad.", fn, ": argument '", name, "' has shape ", shape_str(t.sizes()),
        ", which holds ", km, " models in its model dimension but w1 holds K = ", K,
        " models; every per-model argument must have the same K (or 1 to share it)");
    const bool fits = (view3.size(1) == rows || view3.size(1) == 1) && (view3.size(2) == cols || view3.size(2) == 1);
    TORCH_CHECK_VALUE(fits, "fusedgrad.", fn, ": argument '", name, "' has shape ", shape_str(t.sizes()),
                      ", which does not broadcast to ", meaning, " ",
                      shape_str({K, rows, cols}), " (", forms, ")");
    Operand op;
    op.source = t;
    op.view3 = view3;
    op.stacked = has_model_dim && km == K;
    if (!op.stacked) op.fixed = view3.select(0, 0);
    return op;
  }
};

Operand weight(const at::Tensor& w) {
  Operand op;
  op.source = w;
  op.view3 = w;
  op.stacked = true;
  return op;
}

}  // namespace

EnsembleProblem make_ensemble_problem(
    const char* fn, const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const OptTensor& target, Activation activation) {
  EnsembleProblem e;
  e.activation = activation;
  Checker check{fn, &x};

  TORCH_CHECK_VALUE(x.defined(), "fusedgrad.", fn, ": argument 'x' must be a tensor, got None");
  check.tensor("x", x);
  TORCH_CHECK_VALUE(w1.defined(), "fusedgrad.", fn, ": argument 'w1' must be a tensor, got None");
  check.tensor("w1", w1);
  TORCH_CHECK_VALUE(w1.dim() == 3, "fusedgrad.", fn,
                    ": argument 'w1' of an ensemble must have shape (K, hidden_features, in_features), got ",
                    shape_str(w1.sizes()));
  e.K = w1.size(0);
  e.H = w1.size(1);
  TORCH_CHECK_VALUE(
      x.dim() == 2 || x.dim() == 3, "fusedgrad.", fn, ": argument 'x' of an ensemble must have shape (N, D), "
      "shared by all models, or (K, N, D), one per model; got ", shape_str(x.sizes()));
  e.D = x.size(-1);
  e.N = x.size(-2);
  TORCH_CHECK_VALUE(w1.size(2) == e.D, "fusedgrad.", fn, ": argument 'w1' must have shape (K, H, ", e.D,
                    ") to match the last dimension of x, got ", shape_str(w1.sizes()));
  e.w1 = weight(w1);
  const at::Tensor x3 = x.dim() == 2 ? x.unsqueeze(0) : x;
  e.x = check.operand("x", x, x3, e.K, e.N, e.D, "the ensemble's input (K, N, D) =",
                      "(N, D) shared by all models, or (K, N, D) one per model", x.dim() == 3);
  // x's rows and columns are its own: only its model dimension may broadcast.
  TORCH_CHECK_VALUE(x3.size(1) == e.N && x3.size(2) == e.D, "internal: x's shape");

  const bool has_w2 = w2.has_value() && w2->defined();
  if (has_w2) {
    check.tensor("w2", *w2);
    TORCH_CHECK_VALUE(w2->dim() == 3 && w2->size(2) == e.H, "fusedgrad.", fn,
                      ": argument 'w2' must have shape (K, out_features, hidden_features) = (K, O, ", e.H,
                      ") to match w1's hidden_features, got ", shape_str(w2->sizes()),
                      w2->dim() == 2 ? " (w1 is 3-D, (K, H, D): an ensemble of K models, whose weights are all "
                                       "stacked; for one model pass w1 as (H, D))"
                                     : "");
    TORCH_CHECK_VALUE(w2->size(0) == e.K, "fusedgrad.", fn, ": argument 'w2' has shape ",
                      shape_str(w2->sizes()), ", which holds ", w2->size(0), " models but w1 holds K = ", e.K,
                      " models; every per-model argument must have the same K");
    e.O = w2->size(1);
    e.w2 = weight(*w2);
  } else {
    TORCH_CHECK_VALUE(!(b2.has_value() && b2->defined()), "fusedgrad.", fn,
                      ": argument 'b2' was given without 'w2'; b2 is the second layer's bias and needs w2 "
                      "(pass w2, or drop b2)");
    e.O = e.H;
  }

  // Biases: 2-D is one bias per model, (K, C) read as (K, 1, C) — the stacked
  // nn.Linear biases; 3-D broadcasts against (K, N, C).
  auto bias = [&](const char* name, const OptTensor& b, int64_t cols, const char* meaning) {
    if (!b.has_value() || !b->defined()) return Operand{};
    check.tensor(name, *b);
    TORCH_CHECK_VALUE(b->dim() == 2 || b->dim() == 3, "fusedgrad.", fn, ": argument '", name,
                      "' of an ensemble must have shape (K, ", cols, "), one bias per model, or be 3-D, "
                      "broadcasting to (K, N, ", cols, ") (per-sample biases); got ", shape_str(b->sizes()));
    const at::Tensor v = b->dim() == 2 ? b->unsqueeze(1) : *b;
    return check.operand(name, *b, v, e.K, e.N, cols, meaning,
                         b->dim() == 2 ? "a 2-D bias is read as (K, C), one per model"
                                       : "a 3-D bias broadcasts to (K, N, C): (K, N, C), (K, 1, C), (1, N, C), ...",
                         true);
  };
  e.b1 = bias("b1", b1, e.H, "the ensemble's hidden activations (K, N, H) =");
  e.b2 = bias("b2", b2, e.O, "the ensemble's prediction (K, N, O) =");

  if (target.has_value() && target->defined()) {
    const at::Tensor& t = *target;
    check.tensor("target", t);
    TORCH_CHECK_VALUE(t.dim() == 2 || t.dim() == 3, "fusedgrad.", fn,
                      ": argument 'target' of an ensemble must have shape (N, O), shared by all models, or "
                      "(K, N, O), one per model; got ", shape_str(t.sizes()));
    const at::Tensor v = t.dim() == 2 ? t.unsqueeze(0) : t;
    e.target = check.operand("target", t, v, e.K, e.N, e.O, "the ensemble's prediction (K, N, O) =",
                             "(N, O) shared by all models, or (K, N, O) one per model; dimensions of size 1 "
                             "broadcast", t.dim() == 3);
  }
  return e;
}

void check_backward_args(const char* fn, const EnsembleProblem& e, const at::Tensor& grad_out,
                         const at::Tensor& activations) {
  TORCH_CHECK_VALUE(grad_out.sizes().equals({e.K, e.N, e.O}), "fusedgrad.", fn,
                    ": argument 'grad_out' must have the prediction's shape ", shape_str({e.K, e.N, e.O}),
                    ", got ", shape_str(grad_out.sizes()));
  const int64_t want = e.has_w2() ? e.H : e.O;
  TORCH_CHECK_VALUE(activations.sizes().equals({e.K, e.N, want}), "fusedgrad.", fn,
                    ": argument 'activations' must have shape ", shape_str({e.K, e.N, want}), ", got ",
                    shape_str(activations.sizes()));
  const at::Tensor& x = e.x.source;
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type() && activations.scalar_type() == x.scalar_type(),
                   "fusedgrad.", fn, ": arguments 'grad_out' and 'activations' must have x's dtype");
  TORCH_CHECK_VALUE(grad_out.device() == x.device() && activations.device() == x.device(), "fusedgrad.", fn,
                    ": arguments 'grad_out' and 'activations' must be on x's device ", x.device().str());
}

void check_ensemble_args(const std::string& fn, const at::Tensor& x, const at::Tensor& w1, const OptTensor& b1,
                         const OptTensor& w2, const OptTensor& b2, const OptTensor& target,
                         const std::optional<std::string>& reduction, const std::string& activation) {
  if (reduction) parse_reduction(*reduction);
  make_ensemble_problem(fn.c_str(), x, w1, b1, w2, b2, target, parse_activation(activation));
}

void check_ensemble_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                                  const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
                                  const at::Tensor& activations, const std::string& activation) {
  const EnsembleProblem e =
      make_ensemble_problem("mlp", x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
  check_backward_args("mlp", e, grad_out, activations);
}

}  // namespace fusedgrad::ensemble
