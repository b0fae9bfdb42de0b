// The ops of an MLP of any depth over lists of weights and biases (schemas and
// CPU kernels), run by the engine (engine/mlp_engine.h). Autograd, fake
// kernels and the public functions are fusedgrad/deep.py.
//
//   deep_mlp_loss_and_grads   the loss and, in the same pass, the gradients
//                             output_mask asks for: [x, parameters, target]
//   deep_mlp                  the prediction p = h_L
//   deep_mlp_backward         ∂L/∂x and ∂L/∂parameters from ∂L/∂p (the forward
//                             of each row block is recomputed, nothing kept)
//
// Gradient lists: dW_1 … dW_L, db_1 … db_L, then dx (and dt for the loss);
// an entry that is not computed (masked off, or a layer without a bias) is an
// empty tensor.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"  // dtype_name, shape_str
#include "../engine/net_args.h"

namespace fusedgrad {
namespace {

std::vector<std::optional<at::Tensor>> to_vector(const c10::List<std::optional<at::Tensor>>& list) {
  std::vector<std::optional<at::Tensor>> v;
  v.reserve(list.size());
  for (const auto& item : list) v.push_back(item);
  return v;
}

// x (*, D) and, when given, an (*, O) tensor named `name` with x's leading shape, checked and flattened.
struct Rows {
  at::Tensor x2, other2;
  int64_t N = 0;
};

Rows check_rows(const char* fn, const engine::NetArgs& net, const at::Tensor& x, const std::optional<at::Tensor>& other,
                const char* name) {
  TORCH_CHECK_TYPE(x.scalar_type() == net.dtype, fn, ": argument 'x' has dtype ", dtype_name(x.scalar_type()),
                   ", expected the weights' ", dtype_name(net.dtype));
  TORCH_CHECK_VALUE(x.device() == net.device, fn, ": argument 'x' is on ", x.device(), ", the weights on ",
                    net.device);
  TORCH_CHECK_VALUE(net.device.is_cpu(), fn, ": networks of more than one hidden layer run on the CPU; the tensors "
                    "are on ", net.device);
  const int64_t D = net.shape.in(), O = net.shape.out();
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == D, fn, ": argument 'x' must have shape (*, in_features) = (*, ", D,
                    "), got ", shape_str(x.sizes()));
  Rows rows;
  rows.x2 = x.reshape({-1, D}).contiguous();
  rows.N = rows.x2.size(0);
  if (other.has_value() && other->defined()) {
    const at::Tensor& t = *other;
    std::vector<int64_t> expected(x.sizes().begin(), x.sizes().end() - 1);
    expected.push_back(O);
    TORCH_CHECK_TYPE(t.scalar_type() == net.dtype, fn, ": argument '", name, "' has dtype ",
                     dtype_name(t.scalar_type()), ", expected the weights' ", dtype_name(net.dtype));
    TORCH_CHECK_VALUE(t.device() == net.device, fn, ": argument '", name, "' is on ", t.device(),
                      ", the weights on ", net.device);
    TORCH_CHECK_VALUE(t.sizes().equals(expected), fn, ": argument '", name,
                      "' must have the prediction's shape x.shape[:-1] + (out_features,) = ", shape_str(expected),
                      ", got ", shape_str(t.sizes()));
    rows.other2 = t.reshape({-1, O}).contiguous();
  }
  return rows;
}

template <typename T>
engine::Pass<T> make_pass(const engine::NetArgs& net, const Rows& rows) {
  engine::Pass<T> pass;
  pass.shape = &net.shape;
  for (int64_t l = 0; l < net.shape.layers(); ++l) {
    pass.W.push_back(net.W[l].const_data_ptr<T>());
    pass.b.push_back(net.b[l].defined() ? net.b[l].const_data_ptr<T>() : nullptr);
  }
  pass.x = rows.x2.const_data_ptr<T>();
  pass.count = rows.N;
  return pass;
}

// The parameter gradients (dW…, db…) out of the engine's double sums, in the dtype of the weights.
std::vector<at::Tensor> param_grads(const engine::NetArgs& net, const std::vector<double>& sums, bool wanted) {
  const int64_t L = net.shape.layers();
  const engine::SumLayout lay(net.shape);
  const auto opts = net.W[0].options();
  std::vector<at::Tensor> out(2 * L);
  for (int64_t l = 0; l < L; ++l) {
    const int64_t n_in = net.shape.width[l], n_out = net.shape.width[l + 1];
    if (!wanted) {
      out[l] = at::empty({0}, opts);
      out[L + l] = at::empty({0}, opts);
      continue;
    }
    auto from = [&](int64_t off, at::IntArrayRef shape) {
      return at::from_blob(const_cast<double*>(sums.data()) + off, shape, at::TensorOptions().dtype(at::kDouble))
          .to(net.dtype, /*non_blocking=*/false, /*copy=*/true);  // a copy: `sums` dies with the call
    };
    out[l] = from(lay.dw[l], {n_out, n_in});
    out[L + l] = lay.db[l] >= 0 ? from(lay.db[l], {n_out}) : at::empty({0}, opts);
  }
  return out;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> loss_and_grads_cpu(
    const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
    const std::optional<at::Tensor>& target, c10::string_view reduction, c10::string_view activation,
    std::array<bool, 3> mask) {
  const char* fn = "fusedgrad.mlp_loss";
  const Activation act = parse_activation(activation);
  const bool mean = parse_reduction(reduction) == Reduction::Mean;
  const engine::NetArgs net = engine::check_net(fn, weights, to_vector(biases), act);
  const Rows rows = check_rows(fn, net, x, target, "target");
  const int64_t O = net.shape.out();
  const double c = mean ? 1.0 / static_cast<double>(rows.N * O) : 1.0;
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(lay.size, 0.0);
  at::Tensor dx = mask[0] ? at::empty_like(rows.x2) : at::empty({0}, x.options());
  const bool has_target = rows.other2.defined();
  at::Tensor dt = mask[2] && has_target ? at::empty_like(rows.other2) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp_loss", [&] {
    engine::Pass<scalar_t> pass = make_pass<scalar_t>(net, rows);
    pass.target = has_target ? rows.other2.const_data_ptr<scalar_t>() : nullptr;
    pass.two_c = static_cast<scalar_t>(2.0 * c);
    pass.epilogue = engine::Epilogue::LossGrads;
    pass.param_grads = mask[1];
    pass.dx = mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
    pass.dt = dt.numel() ? dt.data_ptr<scalar_t>() : nullptr;
    pass.sums = sums.data();
    engine::run(pass);
  });
  // Mean over no rows is NaN, as nn.MSELoss gives it.
  const double loss = rows.N == 0 && mean ? std::nan("") : c * sums[lay.loss];
  std::vector<at::Tensor> grads = param_grads(net, sums, mask[1]);
  grads.push_back(mask[0] ? dx.view(x.sizes()) : dx);
  grads.push_back(dt.numel() ? dt.view(target->sizes()) : dt);
  return {at::scalar_tensor(loss, x.options()), std::move(grads)};
}

at::Tensor mlp_cpu(const at::Tensor& x, at::TensorList weights, const c10::List<std::optional<at::Tensor>>& biases,
                   c10::string_view activation) {
  const char* fn = "fusedgrad.mlp";
  const engine::NetArgs net = engine::check_net(fn, weights, to_vector(biases), parse_activation(activation));
  const Rows rows = check_rows(fn, net, x, std::nullopt, "");
  at::Tensor pred = at::empty({rows.N, net.shape.out()}, rows.x2.options());
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp", [&] {
    engine::Pass<scalar_t> pass = make_pass<scalar_t>(net, rows);
    pass.epilogue = engine::Epilogue::Forward;
    pass.pred = pred.data_ptr<scalar_t>();
    engine::run(pass);
  });
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 1);
  shape.push_back(net.shape.out());
  return pred.view(shape);
}

std::vector<at::Tensor> mlp_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, at::TensorList weights,
                                         const c10::List<std::optional<at::Tensor>>& biases,
                                         c10::string_view activation, std::array<bool, 2> mask) {
  const char* fn = "fusedgrad.mlp (backward)";
  const engine::NetArgs net = engine::check_net(fn, weights, to_vector(biases), parse_activation(activation));
  const Rows rows = check_rows(fn, net, x, grad_out, "grad_out");
  const engine::SumLayout lay(net.shape);
  std::vector<double> sums(lay.size, 0.0);
  at::Tensor dx = mask[0] ? at::empty_like(rows.x2) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(net.dtype, "fusedgrad.mlp_backward", [&] {
    engine::Pass<scalar_t> pass = make_pass<scalar_t>(net, rows);
    pass.grad_out = rows.other2.const_data_ptr<scalar_t>();
    pass.epilogue = engine::Epilogue::Backward;
    pass.param_grads = mask[1];
    pass.dx = mask[0] ? dx.data_ptr<scalar_t>() : nullptr;
    pass.sums = sums.data();
    engine::run(pass);
  });
  std::vector<at::Tensor> grads = param_grads(net, sums, mask[1]);
  grads.push_back(mask[0] ? dx.view(x.sizes()) : dx);
  return grads;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusedgrad, m) {
  m.def("deep_mlp_loss_and_grads(Tensor x, Tensor[] weights, Tensor?[] biases, Tensor? target, str reduction, "
        "str activation, bool[3] output_mask) -> (Tensor loss, Tensor[] grads)");
  m.def("deep_mlp(Tensor x, Tensor[] weights, Tensor?[] biases, str activation) -> Tensor");
  m.def("deep_mlp_backward(Tensor grad_out, Tensor x, Tensor[] weights, Tensor?[] biases, str activation, "
        "bool[2] output_mask) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("deep_mlp_loss_and_grads", &loss_and_grads_cpu);
  m.impl("deep_mlp", &mlp_cpu);
  m.impl("deep_mlp_backward", &mlp_backward_cpu);
}

}  // namespace fusedgrad
