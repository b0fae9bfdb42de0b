// The ops of an MLP of any depth over lists of weights and biases (schemas and
// CPU kernels), run by the engine (engine/mlp_engine.h). Autograd, fake
// kernels and the public functions are fusedgrad/deep.py.
//
//   deep_mlp_loss_and_grads   the loss and, in the same pass, the gradients
//                             output_mask asks for: [x, parameters, target]
//   deep_mlp                  the prediction p = h_L
//   deep_mlp_backward         ∂L/∂x and ∂L/∂parameters from ∂L/∂p (the forward
//                             of each row block is recomputed, nothing kept)
//   deep_mlp_derivatives      [u, du, d2u]: the prediction and its input
//                             derivatives ∂u_o/∂x_d (and ∂²u_o/∂x_d²), order 1 or 2
//   deep_mlp_derivatives_backward
//                             ∂L/∂parameters and ∂L/∂x from ∂L/∂u, ∂L/∂du, ∂L/∂d2u
//   deep_mlp_jvp              [u, tangents, seconds]: u, its derivatives along each
//                             row's directions v_i and the mixed D²u[v_p, v_q] of the
//                             given pairs (the prediction's nested create_graph gradients)
//   deep_mlp_jvp_backward     ∂L/∂parameters, ∂L/∂x and ∂L/∂directions from the
//                             gradients of those three
//
// Gradient lists: dW_1 … dW_L, db_1 … db_L, then dx (and dt for the loss);
// an entry that is not computed (masked off, or a layer without a bias) is an
// empty tensor.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"  // dtype_name, shape_str
#include "../engine/net_args.h"
#include "deep_checks.h"

namespace fusedgrad {
namespace {

std::vector<std::optional<at::Tensor>> to_vector(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<std::optional<at::Tensor>> v;
  v.reserve(list.size());
  for (const auto& item : list) v.push_back(item);
  return v;
}

// The rows of a call: x (*, D) for one model; (N, D) shared or (K, N, D) per
// model for K stacked models. `other` (target or grad_out, O wide) follows the
// same rule: x's leading shape for one model, (N, O) or (K, N, O) for K.
struct Rows {
  at::Tensor x2, other2;  // (N, D) or (K, N, D); (N, O) or (K, N, O) or undefined
  int64_t N = 0, K = 0;   // K = 0: one unstacked model
  bool x_per_model = false, other_per_model = false;
};

Rows check_rows(const char* fn, const engine::NetArgs& net, int64_t K, const at::Tensor& x,
                const std::optional<at::Tensor>& other, const char* name, bool shapes_only) {
  TORCH_CHECK_TYPE(x.scalar_type() == net.dtype, fn, ": argument 'x' has dtype ", dtype_name(x.scalar_type()),
                   ", expected the weights' ", dtype_name(net.dtype));
  TORCH_CHECK_VALUE(x.device() == net.device, fn, ": argument 'x' is on ", x.device(), ", the weights on ",
                    net.device);
  TORCH_CHECK_VALUE(net.device.is_cpu() || (shapes_only && net.device.is_meta()), fn,
                    ": networks of more than one hidden layer run on the CPU; the tensors "
                    "are on ", net.device);
  const int64_t D = net.shape.in(), O = net.shape.out();
  Rows rows;
  rows.K = K;
  if (K == 0) {
    TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == D, fn, ": argument 'x' must have shape (*, in_features) = (*, ",
                      D, "), got ", shape_str(x.sizes()));
    rows.x2 = x.reshape({-1, D}).contiguous();
  } else {
    TORCH_CHECK_VALUE((x.dim() == 2 || (x.dim() == 3 && x.size(0) == K)) && x.size(-1) == D, fn,
                      ": argument 'x' must have shape (N, ", D, ") (shared by the models) or (K, N, ", D, ") = (", K,
                      ", N, ", D, "), got ", shape_str(x.sizes()));
    rows.x2 = x.contiguous();
    rows.x_per_model = x.dim() == 3;
  }
  rows.N = rows.x2.size(-2);
  if (other.has_value() && other->defined()) {
    const at::Tensor& t = *other;
    TORCH_CHECK_TYPE(t.scalar_type() == net.dtype, fn, ": argument '", name, "' has dtype ",
                     dtype_name(t.scalar_type()), ", expected the weights' ", dtype_name(net.dtype));
    TORCH_CHECK_VALUE(t.device() == net.device, fn, ": argument '", name, "' is on ", t.device(),
                      ", the weights on ", net.device);
    if (K == 0) {
      std::vector<int64_t> expected(x.sizes().begin(), x.sizes().end() - 1);
      expected.push_back(O);
      TORCH_CHECK_VALUE(t.sizes().equals(expected), fn, ": argument '", name,
                        "' must have the prediction's shape x.shape[:-1] + (out_features,) = ", shape_str(expected),
                        ", got ", shape_str(t.sizes()));
      rows.other2 = t.reshape({-1, O}).contiguous();
    } else {
      const bool ok = (t.dim() == 2 || (t.dim() == 3 && t.size(0) == K)) && t.size(-2) == rows.N && t.size(-1) == O;
      TORCH_CHECK_VALUE(ok, fn, ": argument '", name, "' must have shape (N, ", O, ") or (K, N, ", O, ") with x's N = ",
                        rows.N, " and K = ", K, ", got ", shape_str(t.sizes()));
      rows.other2 = t.contiguous();
      rows.other_per_model = t.dim() == 3;
    }
  }
  return rows;
}

int64_t models_of(at::TensorList weights) { return !weights.empty() && weights[0].dim() == 3 ? weights[0].size(0) : 0; }

// The rows' derivative outputs: x's leading shape (or (K, N)) + (O, D).
std::vector<int64_t> derivative_shape(const at::Tensor& x, const Rows& rows, int64_t O, int64_t D) {
  std::vector<int64_t> shape;
  if (rows.K == 0) {
    shape.assign(x.sizes().begin(), x.sizes().end() - 1);
  } else {
    shape = {rows.K, rows.N};
  }
  shape.push_back(O);
  shape.push_back(D);
  return shape;
}

int64_t check_order(const char* fn, int64_t order) {
  TORCH_CHECK_VALUE(order == 1 || order == 2, fn, ": argument 'order' must be 1 (u, du) or 2 (u, du, d2u), got ",
                    order);
  return order;
}

// A given ∂L/∂du or ∂L/∂d2u: the shape of du, contiguous. Undefined stays undefined (zeros).
at::Tensor check_part_grad(const char* fn, const char* name, const std::optional<at::Tensor>& g,
                           const engine::NetArgs& net, const std::vector<int64_t>& shape, const char* of = "du's") {
  if (!g.has_value() || !g->defined()) return at::Tensor();
  TORCH_CHECK_TYPE(g->scalar_type() == net.dtype, fn, ": argument '", name, "' has dtype ",
                   dtype_name(g->scalar_type()), ", expected the weights' ", dtype_name(net.dtype));
  TORCH_CHECK_VALUE(g->device() == net.device, fn, ": argument '", name, "' is on ", g->device(), ", the weights on ",
                    net.device);
  TORCH_CHECK_VALUE(g->sizes().equals(shape), fn, ": argument '", name, "' must have ", of, " shape ", shape_str(shape),
                    ", got ", shape_str(g->sizes()));
  return g->contiguous();
}

// A call's arguments, checked: what every kernel reads.
struct Call {
  int64_t K = 0;  // stacked models; 0: one unstacked model
  engine::NetArgs net;
  Rows rows;
  bool mean = true;             // the loss: reduction "mean"
  std::vector<int64_t> parts;   // the derivatives: du's shape; directional jets: tangents' shape
  std::vector<int64_t> seconds; // directional jets: the seconds' shape
  at::Tensor gdu, gd2u;         // the backward: ∂L/∂du (∂L/∂tangents), ∂L/∂d2u (∂L/∂seconds), contiguous
  at::Tensor dirs;              // directional jets: (N, T, D), contiguous
  std::vector<int64_t> pairs;   // directional jets: 2 · P tangent indices
};

// Every rule of one op's arguments (deep_checks.h): the CPU kernels run these, the fake kernels too.
// The network first (net_call), then the op's own rules, then the rows, as the kernels always checked them.
Call net_call(const char* fn, at::TensorList weights, const ops::Biases& biases, c10::string_view activation) {
  Call c;
  c.K = models_of(weights);
  c.net = engine::check_net(fn, weights, biases, parse_activation(activation), c.K);
  return c;
}

Call loss_call(const at::Tensor& x, at::TensorList weights, const ops::Biases& biases,
               const std::optional<at::Tensor>& target, c10::string_view reduction, c10::string_view activation,
               bool shapes_only) {
  const char* fn = "fusedgrad.mlp_loss";
  const bool mean = parse_reduction(reduction) == Reduction::Mean;
  Call c = net_call(fn, weights, biases, activation);
  c.rows = check_rows(fn, c.net, c.K, x, target, "target", shapes_only);
  c.mean = mean;
  return c;
}

Call mlp_call(const at::Tensor& x, at::TensorList weights, const ops::Biases& biases, c10::string_view activation,
              bool shapes_only) {
  const char* fn = "fusedgrad.mlp";
  Call c = net_call(fn, weights, biases, activation);
  c.rows = check_rows(fn, c.net, c.K, x, std::nullopt, "", shapes_only);
  return c;
}

Call backward_call(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                   const ops::Biases& biases, c10::string_view activation, bool shapes_only) {
  const char* fn = "fusedgrad.mlp (backward)";
  Call c = net_call(fn, weights, biases, activation);
  c.rows = check_rows(fn, c.net, c.K, x, grad_out, "grad_out", shapes_only);
  return c;
}

Call derivatives_call(const at::Tensor& x, at::TensorList weights, const ops::Biases& biases,
                      c10::string_view activation, int64_t order, bool shapes_only) {
  const char* fn = "fusedgrad.derivatives";
  Call c = net_call(fn, weights, biases, activation);
  check_order(fn, order);
  c.rows = check_rows(fn, c.net, c.K, x, std::nullopt, "", shapes_only);
  c.parts = derivative_shape(x, c.rows, c.net.shape.out(), c.net.shape.in());
  return c;
}

Call derivatives_backward_call(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_du,
                               const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                               at::TensorList weights, const ops::Biases& biases, c10::string_view activation,
                               int64_t order, bool shapes_only) {
  const char* fn = "fusedgrad.derivatives (backward)";
  Call c = net_call(fn, weights, biases, activation);
  check_order(fn, order);
  c.rows = check_rows(fn, c.net, c.K, x, grad_u, "grad_u", shapes_only);
  TORCH_CHECK_VALUE(c.K == 0 || !c.rows.other2.defined() || c.rows.other_per_model, fn,
                    ": argument 'grad_u' must have shape (K, N, O) for K models");
  c.parts = derivative_shape(x, c.rows, c.net.shape.out(), c.net.shape.in());
  c.gdu = check_part_grad(fn, "grad_du", grad_du, c.net, c.parts);
  c.gd2u = order == 2 ? check_part_grad(fn, "grad_d2u", grad_d2u, c.net, c.parts) : at::Tensor();
  return c;
}

// The directional jets' own arguments: `directions` x.shape[:-1] + (T, D), `pairs` 2·P indices in [0, T);
// c.parts and c.seconds the shapes x.shape[:-1] + (O, T) and + (O, P).
void check_directions(const char* fn, Call& c, const at::Tensor& x, const at::Tensor& directions,
                      at::IntArrayRef pairs) {
  TORCH_CHECK_VALUE(c.K == 0, fn, ": stacked weights (K models) are not supported; got weights of shape ",
                    shape_str(c.net.W[0].sizes()));
  TORCH_CHECK_TYPE(directions.scalar_type() == c.net.dtype, fn, ": argument 'directions' has dtype ",
                   dtype_name(directions.scalar_type()), ", expected the weights' ", dtype_name(c.net.dtype));
  TORCH_CHECK_VALUE(directions.device() == c.net.device, fn, ": argument 'directions' is on ", directions.device(),
                    ", the weights on ", c.net.device);
  const int64_t D = c.net.shape.in(), O = c.net.shape.out();
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  const bool ok = directions.dim() == x.dim() + 1 && directions.size(-1) == D &&
                  directions.sizes().slice(0, lead.size()).equals(lead);
  TORCH_CHECK_VALUE(ok, fn, ": argument 'directions' must have shape x.shape[:-1] + (T, in_features) = ",
                    shape_str(lead), " + (T, ", D, "), got ", shape_str(directions.sizes()));
  const int64_t T = directions.size(-2);
  TORCH_CHECK_VALUE(pairs.size() % 2 == 0, fn, ": argument 'pairs' must hold 2 tangent indices a pair, got ",
                    pairs.size(), " values");
  for (int64_t p : pairs) {
    TORCH_CHECK_VALUE(p >= 0 && p < T, fn, ": argument 'pairs' holds ", p, ", expected tangent indices in [0, ", T,
                      ") (T = directions.shape[-2])");
  }
  c.dirs = directions.reshape({-1, T, D}).contiguous();
  c.pairs.assign(pairs.begin(), pairs.end());
  c.parts = lead;
  c.parts.push_back(O);
  c.seconds = c.parts;
  c.parts.push_back(T);
  c.seconds.push_back(static_cast<int64_t>(pairs.size() / 2));
}

Call jvp_call(const at::Tensor& x, at::TensorList weights, const ops::Biases& biases, c10::string_view activation,
              const at::Tensor& directions, at::IntArrayRef pairs, bool shapes_only) {
  const char* fn = "fusedgrad.deep_mlp_jvp";
  Call c = net_call(fn, weights, biases, activation);
  c.rows = check_rows(fn, c.net, c.K, x, std::nullopt, "", shapes_only);
  check_directions(fn, c, x, directions, pairs);
  return c;
}

Call jvp_backward_call(const std::optional<at::Tensor>& grad_u, const std::optional<at::Tensor>& grad_tangents,
                       const std::optional<at::Tensor>& grad_seconds, const at::Tensor& x, at::TensorList weights,
                       const ops::Biases& biases, c10::string_view activation, const at::Tensor& directions,
                       at::IntArrayRef pairs, bool shapes_only) {
  const char* fn = "fusedgrad.deep_mlp_jvp (backward)";
  Call c = net_call(fn, weights, biases, activation);
  c.rows = check_rows(fn, c.net, c.K, x, grad_u, "grad_u", shapes_only);
  check_directions(fn, c, x, directions, pairs);
  c.gdu = check_part_grad(fn, "grad_tangents", grad_tangents, c.net, c.parts, "the tangents'");
  c.gd2u = check_part_grad(fn, "grad_seconds", grad_seconds, c.net, c.seconds, "the seconds'");
  return c;
}

// Runs make(k) → a pass for every model k (k = 0 alone for an unstacked model):
// one model's pass uses the threads for its row chunks; K models run in
// parallel, each pass on one thread (the chunks, and so the bits, are the same).
template <typename T, typename F>
void run_models(int64_t K, F make) {
  if (K == 0) {
    engine::Pass<T> pass = make(0);
    engine::run(pass);
    return;
  }
  at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      engine::Pass<T> pass = make(k);
      pass.parallel = false;
      engine::run(pass);
    }
  });
}

// Model k's pass over the call's rows (weights, biases, x at model k).
template <typename T>
engine::Pass<T> model_pass(const engine::NetArgs& net, const Rows& rows, int64_t k) {
  engine::Pass<T> pass;
  pass.shape = &net.shape;
  for (int64_t l = 0; l < net.shape.layers(); ++l) {
    const int64_t nw = net.shape.width[l] * net.shape.width[l + 1], nb = net.shape.width[l + 1];
    pass.W.push_back(net.W[l].const_data_ptr<T>() + k * nw);
    pass.b.push_back(net.b[l].defined() ? net.b[l].const_data_ptr<T>() + k * nb : nullptr);
  }
  pass.x = rows.x2.const_data_ptr<T>() + (rows.x_per_model ? k * rows.N * net.shape.in() : 0);
  pass.count = rows.N;
  return pass;
}

// The parameter gradients (dW…, db…) out of the engine's double sums (one
// SumLayout per model), in the dtype of the weights, (K, ·) stacked for K models:
// one loop per gradient (a narrow / reshape / to() per gradient were ~5 ATen calls
// each, a tenth of a small PINN step's time).
std::vector<at::Tensor> param_grads(const engine::NetArgs& net, int64_t K, const std::vector<double>& sums,
                                    bool wanted) {
  const int64_t L = net.shape.layers(), M = std::max<int64_t>(K, 1);
  const engine::SumLayout lay(net.shape);
  const auto opts = net.W[0].options();
  std::vector<at::Tensor> out(2 * L);
  auto take = [&](int64_t off, std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t n : shape) count *= n;
    if (K > 0) shape.insert(shape.begin(), K);
    at::Tensor g = at::empty(shape, opts);
    AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.param_grads", [&] {
      scalar_t* dst = g.data_ptr<scalar_t>();
      for (int64_t k = 0; k < M; ++k) {
        const double* src = sums.data() + k * lay.size + off;
        for (int64_t e = 0; e < count; ++e) dst[k * count + e] = static_cast<scalar_t>(src[e]);
      }
    });
    return g;
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n_in = net.shape.width[l], n_out = net.shape.width[l + 1];
    out[l] = wanted ? take(lay.dw[l], {n_out, n_in}) : at::empty({0}, opts);
    out[L + l] = wanted && lay.db[l] >= 0 ? take(lay.db[l], {n_out}) : at::empty({0}, opts);
  }
  return out;
}

// An (N, width) or per-model (K, N, width) buffer for dx / dt (per model always when K > 0).
at::Tensor per_model_rows(const Rows& rows, int64_t width, const at::TensorOptions& opts) {
  if (rows.K == 0) return at::empty({rows.N, width}, opts);
  return at::empty({rows.K, rows.N, width}, opts);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> loss_and_grads_cpu(
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    const std::optional<at::Tensor>& target, c10::string_view reduction, c10::string_view activation,
    std::array<bool, 3> mask) {
  const Call call = loss_call(x, weights, to_vector(biases), target, reduction, activation, false);
  const engine::NetArgs& net = call.net;
  const Rows& rows = call.rows;
  const int64_t K = call.K;
  const bool mean = call.mean;
  const int64_t D = net.shape.in(), O = net.shape.out(), M = std::max<int64_t>(K, 1);
  const double c = mean ? 1.0 / static_cast<double>(rows.N * O) : 1.0;
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(M * lay.size, 0.0);
  const bool has_target = rows.other2.defined();
  const auto opts = rows.x2.options();
  at::Tensor dx = mask[0] ? per_model_rows(rows, D, opts) : at::empty({0}, opts);
  at::Tensor dt = mask[2] && has_target ? per_model_rows(rows, O, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp_loss", [&] {
    run_models<scalar_t>(K, [&](int64_t k) {
      engine::Pass<scalar_t> pass = model_pass<scalar_t>(net, rows, k);
      pass.target = has_target ? rows.other2.const_data_ptr<scalar_t>() + (rows.other_per_model ? k * rows.N * O : 0)
                               : nullptr;
      pass.two_c = static_cast<scalar_t>(2.0 * c);
      pass.epilogue = engine::Epilogue::LossGrads;
      pass.param_grads = mask[1];
      pass.dx = mask[0] ? dx.data_ptr<scalar_t>() + k * rows.N * D : nullptr;
      pass.dt = dt.numel() ? dt.data_ptr<scalar_t>() + k * rows.N * O : nullptr;
      pass.sums = sums.data() + k * lay.size;
      return pass;
    });
  });
  at::Tensor loss = at::empty({M}, opts.dtype(at::kDouble));
  double* lp = loss.data_ptr<double>();
  for (int64_t k = 0; k < M; ++k) {
    // Mean over no rows is NaN, as nn.MSELoss gives it.
    lp[k] = rows.N == 0 && mean ? std::nan("") : c * sums[k * lay.size + lay.loss];
  }
  loss = loss.to(net.dtype);
  std::vector<at::Tensor> grads = param_grads(net, K, sums, mask[1]);
  grads.push_back(mask[0] && K == 0 ? dx.view(x.sizes()) : dx);
  grads.push_back(dt.numel() && K == 0 ? dt.view(target->sizes()) : dt);
  return {K == 0 ? loss.squeeze(0) : loss, std::move(grads)};
}

at::Tensor mlp_cpu(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                   c10::string_view activation) {
  const Call call = mlp_call(x, weights, to_vector(biases), activation, false);
  const engine::NetArgs& net = call.net;
  const Rows& rows = call.rows;
  const int64_t K = call.K;
  const int64_t O = net.shape.out();
  at::Tensor pred = per_model_rows(rows, O, rows.x2.options());
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp", [&] {
    run_models<scalar_t>(K, [&](int64_t k) {
      engine::Pass<scalar_t> pass = model_pass<scalar_t>(net, rows, k);
      pass.epilogue = engine::Epilogue::Forward;
      pass.pred = pred.data_ptr<scalar_t>() + k * rows.N * O;
      return pass;
    });
  });
  if (K > 0) return pred;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(O);
  return pred.view(shape);
}

std::vector<at::Tensor> mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                         const c10::List<std::optional<at::Tensor>>& biases,
                                         c10::string_view activation, std::array<bool, 2> mask) {
  const Call call = backward_call(grad_out, x, weights, to_vector(biases), activation, false);
  const engine::NetArgs& net = call.net;
  const Rows& rows = call.rows;
  const int64_t K = call.K;
  const int64_t D = net.shape.in(), O = net.shape.out(), M = std::max<int64_t>(K, 1);
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(M * lay.size, 0.0);
  const auto opts = rows.x2.options();
  at::Tensor dx = mask[0] ? per_model_rows(rows, D, opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp_backward", [&] {
    run_models<scalar_t>(K, [&](int64_t k) {
      engine::Pass<scalar_t> pass = model_pass<scalar_t>(net, rows, k);
      pass.grad_out = rows.other2.const_data_ptr<scalar_t>() + (rows.other_per_model ? k * rows.N * O : 0);
      pass.epilogue = engine::Epilogue::Backward;
      pass.param_grads = mask[1];
      pass.dx = mask[0] ? dx.data_ptr<scalar_t>() + k * rows.N * D : nullptr;
      pass.sums = sums.data() + k * lay.size;
      return pass;
    });
  });
  std::vector<at::Tensor> grads = param_grads(net, K, sums, mask[1]);
  grads.push_back(mask[0] && K == 0 ? dx.view(x.sizes()) : dx);
  return grads;
}

std::vector<at::Tensor> derivatives_cpu(const at::Tensor& x, at::TensorList weights,
                                        const c10::List<std::optional<at::Tensor>>& biases,
                                        c10::string_view activation, int64_t order) {
  const Call call = derivatives_call(x, weights, to_vector(biases), activation, order, false);
  const engine::NetArgs& net = call.net;
  const Rows& rows = call.rows;
  const int64_t K = call.K;
  const int64_t D = net.shape.in(), O = net.shape.out();
  const auto opts = rows.x2.options();
  at::Tensor u = per_model_rows(rows, O, opts);
  const std::vector<int64_t>& part_shape = call.parts;
  at::Tensor du = at::empty(part_shape, opts);
  at::Tensor d2u = order == 2 ? at::empty(part_shape, opts) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.derivatives", [&] {
    run_models<scalar_t>(K, [&](int64_t k) {
      engine::Pass<scalar_t> pass = model_pass<scalar_t>(net, rows, k);
      pass.epilogue = engine::Epilogue::Forward;
      pass.order = static_cast<int>(order);
      pass.pred = u.data_ptr<scalar_t>() + k * rows.N * O;
      pass.du = du.data_ptr<scalar_t>() + k * rows.N * O * D;
      pass.d2u = order == 2 ? d2u.data_ptr<scalar_t>() + k * rows.N * O * D : nullptr;
      return pass;
    });
  });
  if (K == 0) {
    std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
    shape.push_back(O);
    u = u.view(shape);
  }
  std::vector<at::Tensor> out{u, du};
  if (order == 2) out.push_back(d2u);
  return out;
}

// Per input dimension d, whether a given ∂L/∂du or ∂L/∂d2u (·, O, D) is non-zero
// anywhere at [..., d] (NaN counts as non-zero); an undefined one is zero.
std::vector<char> nonzero_dims(const at::Tensor& g, int64_t D) {
  std::vector<char> any(D, 0);
  if (!g.defined()) return any;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "fusedgrad.nonzero_dims", [&] {
    const scalar_t* p = g.const_data_ptr<scalar_t>();
    const int64_t rows = g.numel() / std::max<int64_t>(D, 1);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t d = 0; d < D; ++d) any[d] |= static_cast<char>(!(p[r * D + d] == scalar_t(0)));
    }
  });
  return any;
}

std::vector<at::Tensor> derivatives_backward_cpu(const std::optional<at::Tensor>& grad_u,
                                                 const std::optional<at::Tensor>& grad_du,
                                                 const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                                                 at::TensorList weights,
                                                 const c10::List<std::optional<at::Tensor>>& biases,
                                                 c10::string_view activation, int64_t order,
                                                 std::array<bool, 2> mask) {
  const Call call =
      derivatives_backward_call(grad_u, grad_du, grad_d2u, x, weights, to_vector(biases), activation, order, false);
  const engine::NetArgs& net = call.net;
  const Rows& rows = call.rows;
  const int64_t K = call.K;
  const int64_t D = net.shape.in(), O = net.shape.out(), M = std::max<int64_t>(K, 1);
  const at::Tensor& gdu = call.gdu;
  const at::Tensor& gd2u = call.gd2u;
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(M * lay.size, 0.0);
  const auto opts = rows.x2.options();
  at::Tensor dx = mask[0] ? per_model_rows(rows, D, opts) : at::empty({0}, opts);
  // The parts of the jets the backward carries: those with a gradient to pass back (engine: carry_du).
  const std::vector<char> carry_du = nonzero_dims(gdu, D), carry_d2u = nonzero_dims(gd2u, D);
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.derivatives_backward", [&] {
    run_models<scalar_t>(K, [&](int64_t k) {
      engine::Pass<scalar_t> pass = model_pass<scalar_t>(net, rows, k);
      pass.epilogue = engine::Epilogue::Backward;
      pass.order = static_cast<int>(order);
      pass.grad_out = rows.other2.defined() ? rows.other2.const_data_ptr<scalar_t>() + k * rows.N * O : nullptr;
      pass.grad_du = gdu.defined() ? gdu.const_data_ptr<scalar_t>() + k * rows.N * O * D : nullptr;
      pass.grad_d2u = gd2u.defined() ? gd2u.const_data_ptr<scalar_t>() + k * rows.N * O * D : nullptr;
      pass.carry_du = carry_du.data();
      pass.carry_d2u = carry_d2u.data();
      pass.param_grads = mask[1];
      pass.dx = mask[0] ? dx.data_ptr<scalar_t>() + k * rows.N * D : nullptr;
      pass.sums = sums.data() + k * lay.size;
      return pass;
    });
  });
  std::vector<at::Tensor> grads = param_grads(net, K, sums, mask[1]);
  grads.push_back(mask[0] && K == 0 ? dx.view(x.sizes()) : dx);
  return grads;
}

// The directional jets of one model: a pass with the call's directions and pairs.
template <typename T>
engine::Pass<T> jvp_pass(const Call& call) {
  engine::Pass<T> pass = model_pass<T>(call.net, call.rows, 0);
  pass.dirs = call.dirs.const_data_ptr<T>();
  pass.ndirs = call.dirs.size(1);
  pass.pairs = call.pairs.data();
  pass.npairs = static_cast<int64_t>(call.pairs.size() / 2);
  pass.order = pass.npairs > 0 ? 2 : 1;
  return pass;
}

std::vector<at::Tensor> jvp_cpu(const at::Tensor& x, at::TensorList weights,
                                const c10::List<std::optional<at::Tensor>>& biases, c10::string_view activation,
                                const at::Tensor& directions, at::IntArrayRef pairs) {
  const Call call = jvp_call(x, weights, to_vector(biases), activation, directions, pairs, false);
  const auto opts = call.rows.x2.options();
  std::vector<int64_t> u_shape(x.sizes().begin(), x.sizes().end() - 1);
  u_shape.push_back(call.net.shape.out());
  at::Tensor u = at::empty(u_shape, opts), tangents = at::empty(call.parts, opts);
  at::Tensor seconds = at::empty(call.seconds, opts);
  AT_DISPATCH_FLOATING_TYPES(call.net.dtype, "fusedgrad.deep_mlp_jvp", [&] {
    engine::Pass<scalar_t> pass = jvp_pass<scalar_t>(call);
    pass.epilogue = engine::Epilogue::Forward;
    pass.pred = u.data_ptr<scalar_t>();
    pass.du = tangents.data_ptr<scalar_t>();
    pass.d2u = seconds.data_ptr<scalar_t>();
    engine::run(pass);
  });
  return {u, tangents, seconds};
}

std::vector<at::Tensor> jvp_backward_cpu(const std::optional<at::Tensor>& grad_u,
                                         const std::optional<at::Tensor>& grad_tangents,
                                         const std::optional<at::Tensor>& grad_seconds, const at::Tensor& x,
                                         at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                                         c10::string_view activation, const at::Tensor& directions,
                                         at::IntArrayRef pairs, std::array<bool, 3> mask) {
  const Call call = jvp_backward_call(grad_u, grad_tangents, grad_seconds, x, weights, to_vector(biases), activation,
                                      directions, pairs, false);
  const engine::NetArgs& net = call.net;
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(lay.size, 0.0);
  const auto opts = call.rows.x2.options();
  at::Tensor dx = mask[0] ? at::empty(x.sizes(), opts) : at::empty({0}, opts);
  at::Tensor ddirs = mask[2] ? at::empty(directions.sizes(), opts) : at::empty({0}, opts);
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.deep_mlp_jvp_backward", [&] {
    engine::Pass<scalar_t> pass = jvp_pass<scalar_t>(call);
    pass.epilogue = engine::Epilogue::Backward;
    pass.grad_out = call.rows.other2.defined() ? call.rows.other2.const_data_ptr<scalar_t>() : nullptr;
    pass.grad_du = call.gdu.defined() ? call.gdu.const_data_ptr<scalar_t>() : nullptr;
    pass.grad_d2u = call.gd2u.defined() ? call.gd2u.const_data_ptr<scalar_t>() : nullptr;
    pass.param_grads = mask[1];
    pass.dx = mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
    pass.ddirs = mask[2] ? ddirs.data_ptr<scalar_t>() : nullptr;
    pass.sums = sums.data();
    engine::run(pass);
  });
  std::vector<at::Tensor> grads = param_grads(net, 0, sums, mask[1]);
  grads.push_back(dx);
  grads.push_back(ddirs);
  return grads;
}

}  // namespace

namespace ops {
void check_deep_mlp_jvp(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                        const std::string& activation, const at::Tensor& directions,
                        const std::vector<int64_t>& pairs) {
  jvp_call(x, weights, biases, activation, directions, pairs, true);
}
void check_deep_mlp_jvp_backward(const std::optional<at::Tensor>& grad_u,
                                 const std::optional<at::Tensor>& grad_tangents,
                                 const std::optional<at::Tensor>& grad_seconds, const at::Tensor& x,
                                 const std::vector<at::Tensor>& weights, const Biases& biases,
                                 const std::string& activation, const at::Tensor& directions,
                                 const std::vector<int64_t>& pairs) {
  jvp_backward_call(grad_u, grad_tangents, grad_seconds, x, weights, biases, activation, directions, pairs, true);
}
void check_deep_mlp_loss(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                         const std::optional<at::Tensor>& target, const std::string& reduction,
                         const std::string& activation) {
  loss_call(x, weights, biases, target, reduction, activation, true);
}
void check_deep_mlp(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                    const std::string& activation) {
  mlp_call(x, weights, biases, activation, true);
}
void check_deep_mlp_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const std::vector<at::Tensor>& weights, const Biases& biases,
                             const std::string& activation) {
  backward_call(grad_out, x, weights, biases, activation, true);
}
void check_deep_derivatives(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                            const std::string& activation, int64_t order) {
  derivatives_call(x, weights, biases, activation, order, true);
}
void check_deep_derivatives_backward(const std::optional<at::Tensor>& grad_u,
                                     const std::optional<at::Tensor>& grad_du,
                                     const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                                     const std::vector<at::Tensor>& weights, const Biases& biases,
                                     const std::string& activation,
                                     int64_t order) {
  derivatives_backward_call(grad_u, grad_du, grad_d2u, x, weights, biases, activation, order, true);
}
}  // namespace ops

TORCH_LIBRARY_FRAGMENT(fusedgrad, m) {
  m.def("deep_mlp_loss_and_grads(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? target, str reduction, "
        "str activation, bool[3] output_mask) -> (Tensor loss, Tensor[] grads)");
  m.def("deep_mlp(Tensor x, Tensor[] weights, Tensor?[] biases, str activation) -> Tensor");
  m.def("deep_mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor?[] biases, str activation, "
        "bool[2] output_mask) -> Tensor[]");
  m.def("deep_mlp_derivatives(Tensor x, Tensor[] weights, Tensor?[] biases, str activation, int order) -> Tensor[]");
  m.def("deep_mlp_derivatives_backward(Tensor? grad_u, Tensor? grad_du, Tensor? grad_d2u, Tensor x, "
        "Tensor[] weights, Tensor?[] biases, str activation, int order, bool[2] output_mask) -> Tensor[]");
  m.def("deep_mlp_jvp(Tensor x, Tensor[] weights, Tensor?[] biases, str activation, Tensor directions, "
        "int[] pairs) -> Tensor[]");
  m.def("deep_mlp_jvp_backward(Tensor? grad_u, Tensor? grad_tangents, Tensor? grad_seconds, Tensor x, "
        "Tensor[] weights, Tensor?[] biases, str activation, Tensor directions, int[] pairs, "
        "bool[3] output_mask) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("deep_mlp_loss_and_grads", &loss_and_grads_cpu);
  m.impl("deep_mlp", &mlp_cpu);
  m.impl("deep_mlp_backward", &mlp_backward_cpu);
  m.impl("deep_mlp_derivatives", &derivatives_cpu);
  m.impl("deep_mlp_derivatives_backward", &derivatives_backward_cpu);
  m.impl("deep_mlp_jvp", &jvp_cpu);
  m.impl("deep_mlp_jvp_backward", &jvp_backward_cpu);
}

}  // namespace fusedgrad
