// The autograd nodes of the loss, the prediction and the input derivatives of
// a network of any depth, in C++: fusedgrad._C.deep_mlp_loss, deep_mlp and
// deep_derivatives, called by fusedgrad/deep.py outside
// torch.func transforms and torch.compile (which take deep.py's
// torch.autograd.Functions, with their vmap rules and traceable bodies).
//
// Why: a Python torch.autograd.Function costs ~30 µs a call and ~50 µs a
// backward on this machine. A PINN step runs three of them (the derivatives,
// the initial and the boundary points): more than its whole fused arithmetic
// for the small point sets; loss().backward() on 10 000 rows spent ~150 µs
// in them, a quarter of the call.
//
// The nodes compute exactly what the Python Functions compute, through the
// same registered ops (deep_ops.cpp): forward by the op, backward by its fused
// backward op (the loss: its forward already computed every gradient, which
// backward scales by the incoming one). A backward with create_graph=True
// (grad mode on inside backward) must return gradients that are themselves
// differentiable: the node hands it to the Python function fusedgrad.deep
// registers with _set_differentiable_backward, which recomputes in plain torch
// ops (one copy of that math, shared with the Python Functions).
//
// Like the direct calls (direct_calls.cpp), a call is taken only when every
// argument is an exact dense tensor (or None for a bias or the loss's target),
// no TorchFunctionMode is active and the options are known names (and, for the
// loss, the weights are one model's); otherwise None is returned and deep.py
// takes its Python route, which also raises the argument errors.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/graph_task.h>

#include <optional>
#include <string>
#include <vector>

#include "../common/options.h"
#include "../ops/autograd_helpers.h"  // readable_on_host
#include "../ops/deep_checks.h"
#include "../ops/handles.h"
#include "torch_compat.h"

namespace fusedgrad {
namespace {

namespace py = pybind11;
using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

using ops::BiasList;

// fusedgrad.deep._double_backward(kind, x, params, activation, order, target, reduction, grads, needs)
// → [dx, *dparams(, dtarget)].
// A tensor for a Python call (None where undefined); the GIL held.
py::object to_py(const Tensor& t) {
  if (!t.defined()) return py::none();
  return py::reinterpret_steal<py::object>(compat::wrap(t));
}

py::object& differentiable_backward() {
  static py::object* fn = new py::object();  // leaked: never destroyed after the interpreter
  return *fn;
}

// The parameters as the ops take them. The nodes' inputs hold only the tensors
// given — W_1 … W_L, then the biases that exist — because an autograd input
// must be a defined tensor; `has_bias` ("1" or "0" per layer) places them.
struct Params {
  std::vector<Tensor> weights;
  BiasList biases;
};
Params split(at::TensorList params, const std::string& has_bias) {
  Params p;
  const size_t L = has_bias.size();
  p.weights.assign(params.begin(), params.begin() + L);
  p.biases.reserve(L);
  size_t next = L;
  for (size_t l = 0; l < L; ++l) {
    p.biases.push_back(has_bias[l] == '1' ? std::optional<Tensor>(params[next++]) : std::nullopt);
  }
  return p;
}

// All 2L parameters in the Python functions' order (undefined: no bias).
std::vector<Tensor> all_params(const std::vector<Tensor>& given, const std::string& has_bias) {
  const size_t L = has_bias.size();
  std::vector<Tensor> out(given.begin(), given.begin() + L);
  out.resize(2 * L);
  size_t next = L;
  for (size_t l = 0; l < L; ++l) {
    if (has_bias[l] == '1') out[L + l] = given[next++];
  }
  return out;
}

// The given parameters' entries out of a 2L list in the Python order (the inverse of all_params).
template <typename V>
std::vector<V> given_of(const std::vector<V>& full, const std::string& has_bias) {
  const size_t L = has_bias.size();
  std::vector<V> out(full.begin(), full.begin() + L);
  for (size_t l = 0; l < L; ++l) {
    if (has_bias[l] == '1') out.push_back(full[L + l]);
  }
  return out;
}

// What a node's backward reads back: x, the given parameters, the options.
struct Saved {
  Tensor x, target;  // target: the loss's, when given
  std::vector<Tensor> params;  // given: W_1 … W_L, then the biases that exist
  std::string activation, has_bias;
  std::vector<bool> needs;     // x, then each given parameter (then the loss's target, when given)
};
Saved saved_of(AutogradContext* ctx) {
  Saved s;
  variable_list saved = ctx->get_saved_variables();
  s.x = saved[0];
  s.params.assign(saved.begin() + 1, saved.end());
  s.activation = ctx->saved_data["activation"].toStringRef();
  s.has_bias = ctx->saved_data["has_bias"].toStringRef();
  s.needs.resize(1 + s.params.size());
  for (size_t i = 0; i < s.needs.size(); ++i) s.needs[i] = ctx->needs_input_grad(i);
  return s;
}

void save(AutogradContext* ctx, const Tensor& x, at::TensorList params, const std::string& activation,
          const std::string& has_bias) {
  std::vector<Tensor> to_save{x};
  to_save.insert(to_save.end(), params.begin(), params.end());
  ctx->save_for_backward(to_save);
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["has_bias"] = has_bias;
}

bool any_param_needed(const Saved& s) {
  for (size_t i = 1; i < s.needs.size(); ++i) {
    if (s.needs[i]) return true;
  }
  return false;
}

// The node's gradients: x, the given parameters (from a 2L list), none for the `trailing` options.
// With a target (the loss), its gradient dt follows the parameters'.
variable_list node_grads(const Saved& s, Tensor dx, const std::vector<Tensor>& full_param_grads, size_t trailing,
                         Tensor dt = Tensor()) {
  std::vector<Tensor> given = given_of(full_param_grads, s.has_bias);
  variable_list out;
  out.reserve(s.needs.size() + trailing + 1);
  out.push_back(s.needs[0] ? std::move(dx) : Tensor());
  for (size_t i = 0; i < given.size(); ++i) out.push_back(s.needs[1 + i] ? given[i] : Tensor());
  // The loss's target is the first of the trailing slots (undefined when it is absent).
  if (s.target.defined()) out.push_back(s.needs.back() ? std::move(dt) : Tensor());
  out.resize(1 + s.params.size() + trailing);
  return out;
}

// The create_graph=True backward, in Python (see the file comment).
// The loss (kind "loss") passes its target and reduction; its last gradient is the target's.
// The nested gradients of the prediction ("input_vjp", "hvp") pass their extra tensors (ḡ, v) in
// `extras`, whose gradients follow the parameters' (`extra_needs`).
variable_list python_backward(const Saved& s, const char* kind, int64_t order, const variable_list& grads,
                              size_t trailing, const std::string& reduction = "",
                              const std::vector<Tensor>& extras = {}, const std::vector<bool>& extra_needs = {}) {
  const size_t L = s.has_bias.size();
  const std::vector<Tensor> params = all_params(s.params, s.has_bias);
  std::vector<bool> needs(1 + 2 * L, false);
  needs[0] = s.needs[0];
  for (size_t l = 0, next = L; l < L; ++l) {
    needs[1 + l] = s.needs[1 + l];
    if (s.has_bias[l] == '1') needs[1 + L + l] = s.needs[1 + next++];
  }
  const bool has_target = s.target.defined();
  if (has_target) needs.push_back(s.needs.back());
  needs.insert(needs.end(), extra_needs.begin(), extra_needs.end());
  variable_list got;
  {
    py::gil_scoped_acquire gil;
    TORCH_CHECK(differentiable_backward(), "fusedgrad: double backward needs fusedgrad.deep imported (it registers "
                "the torch-op backward with fusedgrad._C._set_differentiable_backward)");
    py::list py_params, py_grads, py_extras;
    for (const Tensor& t : params) py_params.append(to_py(t));
    for (const Tensor& t : grads) py_grads.append(to_py(t));
    for (const Tensor& t : extras) py_extras.append(to_py(t));
    py::object out = differentiable_backward()(kind, to_py(s.x), py_params, s.activation, order, to_py(s.target),
                                               reduction, py_grads, needs, py_extras);
    for (py::handle g : out) got.push_back(g.is_none() ? Tensor() : compat::unpack(g.ptr()));
  }
  if (!extras.empty()) {  // the nested nodes: [dx, *dparams, *dextras] → x, the given parameters, the extras
    const std::vector<Tensor> extra_grads(got.end() - extras.size(), got.end());
    got.resize(got.size() - extras.size());
    variable_list out = node_grads(s, got[0], std::vector<Tensor>(got.begin() + 1, got.end()), 0);
    out.insert(out.end(), extra_grads.begin(), extra_grads.end());
    out.resize(out.size() + trailing);
    return out;
  }
  Tensor dt = has_target ? got.back() : Tensor();
  if (has_target) got.pop_back();
  return node_grads(s, got[0], std::vector<Tensor>(got.begin() + 1, got.end()), trailing, dt);
}

// A backward op's list (dW…, db…, dx) as the node's gradients; x shared by K
// stacked models gets the sum of their parts.
variable_list from_op(const Saved& s, std::vector<Tensor> grads, size_t trailing) {
  const size_t L = s.has_bias.size();
  Tensor dx = s.needs[0] ? grads[2 * L] : Tensor();
  if (dx.defined() && s.params[0].dim() == 3 && s.x.dim() == 2) dx = dx.sum(0);
  grads.resize(2 * L);
  return node_grads(s, std::move(dx), grads, trailing);
}

// The loss c Σ (p − t)² of one model: its forward already computes the
// gradient of every input that needs one; backward scales them by the incoming
// gradient (and hands them over as they are for a plain loss.backward(), as the
// one-hidden-layer node does: csrc/ops/autograd.cpp).
class DeepLossFunction : public torch::autograd::Function<DeepLossFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::TensorList params,
                        const std::optional<Tensor>& target, const std::string& reduction,
                        const std::string& activation, const std::string& has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Params p = split(params, has_bias);
    bool any_param = false;
    for (const Tensor& t : params) any_param = any_param || t.requires_grad();
    const bool has_target = target.has_value() && target->defined();
    const std::array<bool, 3> mask = {x.requires_grad(), any_param, has_target && target->requires_grad()};
    auto [loss, grads] = ops::deep_mlp_loss_and_grads().call(x, p.weights, p.biases, target, reduction, activation, mask);
    // Saved: x, the parameters, the target (when given), then the op's dW…, db…, dx, dt.
    std::vector<Tensor> to_save{x};
    to_save.insert(to_save.end(), params.begin(), params.end());
    if (has_target) to_save.push_back(*target);
    to_save.insert(to_save.end(), grads.begin(), grads.end());
    ctx->save_for_backward(to_save);
    ctx->saved_data["activation"] = activation;
    ctx->saved_data["has_bias"] = has_bias;
    ctx->saved_data["reduction"] = reduction;
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    ctx->saved_data["has_target"] = has_target;
    return loss;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    constexpr size_t trailing = 4;  // target, reduction, activation, has_bias
    const variable_list saved = ctx->get_saved_variables();
    const size_t P = static_cast<size_t>(ctx->saved_data["params"].toInt());
    const bool has_target = ctx->saved_data["has_target"].toBool();
    Saved s;
    s.x = saved[0];
    s.params.assign(saved.begin() + 1, saved.begin() + 1 + P);
    if (has_target) s.target = saved[1 + P];
    s.activation = ctx->saved_data["activation"].toStringRef();
    s.has_bias = ctx->saved_data["has_bias"].toStringRef();
    s.needs.resize(1 + P + (has_target ? 1 : 0));
    for (size_t i = 0; i < s.needs.size(); ++i) s.needs[i] = ctx->needs_input_grad(i);
    const std::string reduction = ctx->saved_data["reduction"].toStringRef();
    if (at::GradMode::is_enabled()) return python_backward(s, "loss", 0, grad_outputs, trailing, reduction);
    // The op's gradients, scaled by ∂out/∂loss: as they are when that is exactly 1 and this graph is
    // freed after this backward (with retain_graph=True a later backward reads them again).
    const Tensor& grad_loss = grad_outputs[0];
    const bool unit = autograd_helpers::readable_on_host(grad_loss) && grad_loss.numel() == 1 &&
                      grad_loss.item<double>() == 1.0;
    const bool hand_over = unit && !torch::autograd::get_current_graph_task_keep_graph();
    auto scaled = [&](const Tensor& g) { return hand_over ? g : unit ? g.clone() : g * grad_loss; };
    const size_t L = s.has_bias.size(), first = 1 + P + (has_target ? 1 : 0);
    std::vector<Tensor> full(2 * L);
    for (size_t l = 0; l < L; ++l) {
      if (s.needs[1 + l]) full[l] = scaled(saved[first + l]);
    }
    for (size_t l = 0, next = L; l < L; ++l) {
      if (s.has_bias[l] == '1' && s.needs[1 + next++]) full[L + l] = scaled(saved[first + L + l]);
    }
    Tensor dx = s.needs[0] ? scaled(saved[first + 2 * L]) : Tensor();
    Tensor dt = has_target && s.needs.back() ? scaled(saved[first + 2 * L + 1]) : Tensor();
    return node_grads(s, std::move(dx), full, trailing, std::move(dt));
  }
};

// The nested gradients of the prediction u = net(x) (PINN code: autograd.grad(u, x, ḡ,
// create_graph=True), then autograd.grad of that with respect to x again, then loss.backward()),
// each a node whose backward is the engine's directional jets (mlp_engine.h) instead of a graph of
// plain torch ops:
//
//   DeepInputVjpFunction   dx = J(x)ᵀḡ                 (the prediction's backward, made differentiable)
//     its backward along v: ∂/∂x = ḡᵀH v, ∂/∂θ of ḡᵀJ v, ∂/∂ḡ = J v    (the reverse of the jet along v)
//   DeepHvpFunction        y = ḡᵀH v                   (that backward's x part, made differentiable)
//     its backward along w: ∂/∂x = ḡᵀD³u[v, w, ·], ∂/∂θ of ḡᵀD²u[v, w], ∂/∂ḡ = D²u[v, w],
//                           ∂/∂v = ḡᵀH w               (the reverse of the mixed jet D²u[v, w])
//
// A create_graph backward past these (a third nested gradient, or one that wants the parameters'
// or ḡ's part differentiable) recomputes in plain torch ops, as every other create_graph backward.

// The one input dimension d off which every row of v and w is zero, if there is one (DeepXDE's
// hessian(u, x, i=d, j=d) and the PINN code's u_xx = grad(u_x, x)[:, d]: v = e_d, w ∥ e_d).
std::optional<int64_t> common_axis(const Tensor& v, const Tensor& w) {
  const int64_t D = v.size(-1);
  const Tensor vv = v.reshape({-1, D}).contiguous(), ww = w.reshape({-1, D}).contiguous();
  std::vector<char> used(D, 0);
  AT_DISPATCH_FLOATING_TYPES(vv.scalar_type(), "fusedgrad.common_axis", [&] {
    const scalar_t *a = vv.const_data_ptr<scalar_t>(), *b = ww.const_data_ptr<scalar_t>();
    for (int64_t e = 0; e < vv.numel(); ++e) used[e % D] |= static_cast<char>(!(a[e] == 0) || !(b[e] == 0));
  });
  std::optional<int64_t> axis;
  for (int64_t d = 0; d < D; ++d) {
    if (!used[d]) continue;
    if (axis) return std::nullopt;
    axis = d;
  }
  return axis ? axis : std::optional<int64_t>(0);
}

// One model's weights (the nested nodes take no stacked ensembles).
bool one_model(const std::vector<Tensor>& params) { return params[0].dim() == 2; }

std::optional<Tensor> none() { return std::nullopt; }

// The nested nodes' saved state: Saved, then their extra inputs ḡ (and v).
Saved nested_saved(AutogradContext* ctx, size_t extras, std::vector<Tensor>& extra, std::vector<bool>& extra_needs) {
  variable_list saved = ctx->get_saved_variables();
  Saved s;
  s.x = saved[0];
  s.params.assign(saved.begin() + 1, saved.end() - extras);
  extra.assign(saved.end() - extras, saved.end());
  s.activation = ctx->saved_data["activation"].toStringRef();
  s.has_bias = ctx->saved_data["has_bias"].toStringRef();
  s.needs.resize(1 + s.params.size());
  for (size_t i = 0; i < s.needs.size(); ++i) s.needs[i] = ctx->needs_input_grad(i);
  extra_needs.clear();
  for (size_t e = 0; e < extras; ++e) extra_needs.push_back(ctx->needs_input_grad(1 + s.params.size() + e));
  return s;
}

void nested_save(AutogradContext* ctx, const Tensor& x, at::TensorList params, std::vector<Tensor> extras,
                 const std::string& activation, const std::string& has_bias) {
  std::vector<Tensor> to_save{x};
  to_save.insert(to_save.end(), params.begin(), params.end());
  to_save.insert(to_save.end(), extras.begin(), extras.end());
  ctx->save_for_backward(to_save);
  ctx->saved_data["activation"] = activation;
  ctx->saved_data["has_bias"] = has_bias;
}

// The jvp backward op's list (dW…, db…, dx, ddirections) as x's and the given parameters' gradients.
variable_list jvp_grads(const Saved& s, std::vector<Tensor> out) {
  const size_t L = s.has_bias.size();
  Tensor dx = s.needs[0] ? out[2 * L] : Tensor();
  out.resize(2 * L);
  return node_grads(s, std::move(dx), out, 0);
}

class DeepHvpFunction : public torch::autograd::Function<DeepHvpFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::TensorList params, const Tensor& gbar,
                        const Tensor& v, const std::string& activation, const std::string& has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Params p = split(params, has_bias);
    std::vector<Tensor> out = ops::deep_mlp_jvp_backward().call(none(), gbar.unsqueeze(-1), none(), x, p.weights,
                                                                p.biases, activation, v.unsqueeze(-2), {},
                                                                {true, false, false});
    nested_save(ctx, x, params, {gbar, v}, activation, has_bias);
    return out[2 * has_bias.size()];
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::vector<Tensor> extra;
    std::vector<bool> extra_needs;
    const Saved s = nested_saved(ctx, 2, extra, extra_needs);
    const Tensor &gbar = extra[0], &v = extra[1];
    const Tensor& w = grads[0];
    if (!w.defined()) return variable_list(s.needs.size() + 4);
    if (at::GradMode::is_enabled()) return python_backward(s, "hvp", 0, grads, 2, "", extra, extra_needs);
    const Params p = split(s.params, s.has_bias);
    if (!extra_needs[0] && !extra_needs[1]) {
      if (const std::optional<int64_t> d = common_axis(v, w)) {
        // D²u[v, w] = v_d w_d ∂²u/∂x_d²: the derivatives' diagonal jet, 3 parts where the mixed pair takes 4.
        std::vector<int64_t> shape = gbar.sizes().vec();  // d2u's: x.shape[:-1] + (O, D)
        shape.push_back(s.x.size(-1));
        Tensor g2 = at::zeros(shape, gbar.options());
        g2.select(-1, *d).copy_(gbar * (v.select(-1, *d) * w.select(-1, *d)).unsqueeze(-1));
        std::vector<Tensor> out = ops::deep_mlp_derivatives_backward().call(
            none(), none(), g2, s.x, p.weights, p.biases, s.activation, 2, {s.needs[0], any_param_needed(s)});
        variable_list result = jvp_grads(s, std::move(out));
        result.resize(result.size() + 4);  // ḡ, v, activation, has_bias
        return result;
      }
    }
    const Tensor dirs = at::stack({v, w}, -2);
    const std::vector<int64_t> pairs{0, 1};
    std::vector<Tensor> out = ops::deep_mlp_jvp_backward().call(
        none(), none(), gbar.unsqueeze(-1), s.x, p.weights, p.biases, s.activation, dirs, pairs,
        {s.needs[0], any_param_needed(s), static_cast<bool>(extra_needs[1])});
    const Tensor ddirs = out.back();
    variable_list result = jvp_grads(s, std::move(out));
    Tensor dgbar;
    if (extra_needs[0]) {
      dgbar = ops::deep_mlp_jvp().call(s.x, p.weights, p.biases, s.activation, dirs, pairs)[2].squeeze(-1);
    }
    result.push_back(dgbar);
    result.push_back(extra_needs[1] ? ddirs.select(-2, 0) : Tensor());
    result.resize(result.size() + 2);  // activation, has_bias
    return result;
  }
};

class DeepInputVjpFunction : public torch::autograd::Function<DeepInputVjpFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::TensorList params, const Tensor& gbar,
                        const std::string& activation, const std::string& has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Params p = split(params, has_bias);
    std::vector<Tensor> out =
        ops::deep_mlp_backward().call(gbar, x, p.weights, p.biases, activation, {true, false});
    nested_save(ctx, x, params, {gbar}, activation, has_bias);
    return out.back();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    std::vector<Tensor> extra;
    std::vector<bool> extra_needs;
    const Saved s = nested_saved(ctx, 1, extra, extra_needs);
    const Tensor& gbar = extra[0];
    const Tensor& v = grads[0];
    if (!v.defined()) return variable_list(s.needs.size() + 3);
    if (at::GradMode::is_enabled()) {
      // x alone (the PINN's second derivative): ḡᵀH v as a node of its own; anything more in plain torch.
      if (any_param_needed(s) || extra_needs[0]) {
        return python_backward(s, "input_vjp", 0, grads, 2, "", extra, extra_needs);
      }
      variable_list result(s.needs.size() + 3);
      result[0] = DeepHvpFunction::apply(s.x, at::TensorList(s.params), gbar, v, s.activation, s.has_bias);
      return result;
    }
    const Params p = split(s.params, s.has_bias);
    const Tensor dirs = v.contiguous().unsqueeze(-2);
    std::vector<Tensor> out = ops::deep_mlp_jvp_backward().call(none(), gbar.unsqueeze(-1), none(), s.x, p.weights,
                                                                p.biases, s.activation, dirs, {},
                                                                {s.needs[0], any_param_needed(s), false});
    variable_list result = jvp_grads(s, std::move(out));
    Tensor dgbar;
    if (extra_needs[0]) dgbar = ops::deep_mlp_jvp().call(s.x, p.weights, p.biases, s.activation, dirs, {})[1].squeeze(-1);
    result.push_back(dgbar);
    result.resize(result.size() + 2);  // activation, has_bias
    return result;
  }
};

class DeepMlpFunction : public torch::autograd::Function<DeepMlpFunction> {
 public:
  static Tensor forward(AutogradContext* ctx, const Tensor& x, at::TensorList params, const std::string& activation,
                        const std::string& has_bias) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Params p = split(params, has_bias);
    Tensor pred = ops::deep_mlp().call(x, p.weights, p.biases, activation);
    save(ctx, x, params, activation, has_bias);
    return pred;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const Saved s = saved_of(ctx);
    if (at::GradMode::is_enabled()) {
      // autograd.grad(u, x, ḡ, create_graph=True) of one model: J(x)ᵀḡ as a node whose own backward is fused.
      if (s.needs[0] && !any_param_needed(s) && one_model(s.params) && grad_outputs[0].defined()) {
        variable_list result(s.needs.size() + 2);
        result[0] = DeepInputVjpFunction::apply(s.x, at::TensorList(s.params), grad_outputs[0].contiguous(),
                                                s.activation, s.has_bias);
        return result;
      }
      return python_backward(s, "mlp", 0, grad_outputs, 2);
    }
    const Params p = split(s.params, s.has_bias);
    std::vector<Tensor> grads = ops::deep_mlp_backward().call(grad_outputs[0].contiguous(), s.x, p.weights, p.biases,
                                                            s.activation, {s.needs[0], any_param_needed(s)});
    return from_op(s, std::move(grads), 2);
  }
};

class DeepDerivativesFunction : public torch::autograd::Function<DeepDerivativesFunction> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& x, at::TensorList params,
                               const std::string& activation, const std::string& has_bias, int64_t order) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const Params p = split(params, has_bias);
    variable_list out = ops::deep_mlp_derivatives().call(x, p.weights, p.biases, activation, order);
    save(ctx, x, params, activation, has_bias);
    ctx->saved_data["order"] = order;
    ctx->set_materialize_grads(false);  // an output the loss does not use is a zero the kernel skips
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Saved s = saved_of(ctx);
    const int64_t order = ctx->saved_data["order"].toInt();
    bool any_grad = false;
    for (const Tensor& g : grads) any_grad = any_grad || g.defined();
    if (!any_grad) return variable_list(s.needs.size() + 3);
    if (at::GradMode::is_enabled()) return python_backward(s, "derivatives", order, grads, 3);
    auto opt = [](const Tensor& t) { return t.defined() ? std::optional<Tensor>(t) : std::nullopt; };
    const Params p = split(s.params, s.has_bias);
    std::vector<Tensor> out = ops::deep_mlp_derivatives_backward().call(
        opt(grads[0]), opt(grads[1]), order == 2 ? opt(grads[2]) : std::nullopt, s.x, p.weights, p.biases,
        s.activation, order, {s.needs[0], any_param_needed(s)});
    return from_op(s, std::move(out), 3);
  }
};

// The call's tensors, or nullopt when it must take the Python route.
struct DeepArgs {
  Tensor x;
  std::vector<Tensor> params;  // given: W_1 … W_L, then the biases that exist
  std::string activation, has_bias;
  bool any_grad = false;
};

bool plain_tensor(py::handle obj) {
  return compat::exact_tensor(obj.ptr()) && compat::unpack(obj.ptr()).layout() == at::kStrided;
}

std::optional<DeepArgs> unpack(py::handle x, py::handle weights, py::handle biases, py::handle activation) {
  if (compat::torch_function_mode_active() || !plain_tensor(x)) return std::nullopt;
  if (!PyList_Check(weights.ptr()) || !PyList_Check(biases.ptr())) return std::nullopt;
  const Py_ssize_t L = PyList_GET_SIZE(weights.ptr());
  if (L < 1 || PyList_GET_SIZE(biases.ptr()) != L || !PyUnicode_Check(activation.ptr())) return std::nullopt;
  DeepArgs a;
  a.activation = activation.cast<std::string>();
  if (!find_activation(a.activation).has_value()) return std::nullopt;
  a.x = compat::unpack(x.ptr());
  a.any_grad = a.x.requires_grad();
  for (Py_ssize_t l = 0; l < L; ++l) {
    py::handle w = PyList_GET_ITEM(weights.ptr(), l);
    if (!plain_tensor(w)) return std::nullopt;
    a.params.push_back(compat::unpack(w.ptr()));
  }
  for (Py_ssize_t l = 0; l < L; ++l) {
    py::handle b = PyList_GET_ITEM(biases.ptr(), l);
    a.has_bias.push_back(b.is_none() ? '0' : '1');
    if (b.is_none()) continue;
    if (!plain_tensor(b)) return std::nullopt;
    a.params.push_back(compat::unpack(b.ptr()));
  }
  for (const Tensor& t : a.params) a.any_grad = a.any_grad || t.requires_grad();
  a.any_grad = a.any_grad && at::GradMode::is_enabled();
  return a;
}

py::object wrap(Tensor t) { return py::reinterpret_steal<py::object>(compat::wrap(std::move(t))); }

// fusedgrad.deep.mlp_loss for one model (stacked weights take the Python route).
py::object deep_mlp_loss(py::handle x, py::handle weights, py::handle biases, py::handle target,
                         py::handle reduction, py::handle activation) {
  std::optional<DeepArgs> a = unpack(x, weights, biases, activation);
  if (!a || a->params[0].dim() != 2 || !PyUnicode_Check(reduction.ptr())) return py::none();
  const std::string red = reduction.cast<std::string>();
  if (!find_reduction(red).has_value()) return py::none();
  std::optional<Tensor> t;
  if (!target.is_none()) {
    if (!plain_tensor(target)) return py::none();
    t = compat::unpack(target.ptr());
    a->any_grad = a->any_grad || (t->requires_grad() && at::GradMode::is_enabled());
  }
  Tensor loss;
  {
    py::gil_scoped_release no_gil;
    if (a->any_grad) {
      loss = DeepLossFunction::apply(a->x, at::TensorList(a->params), t, red, a->activation, a->has_bias);
    } else {
      const Params p = split(a->params, a->has_bias);
      loss = std::get<0>(ops::deep_mlp_loss_and_grads().call(a->x, p.weights, p.biases, t, red, a->activation, {false, false, false}));
    }
  }
  return wrap(std::move(loss));
}

py::object deep_mlp(py::handle x, py::handle weights, py::handle biases, py::handle activation) {
  std::optional<DeepArgs> a = unpack(x, weights, biases, activation);
  if (!a) return py::none();
  Tensor pred;
  {
    py::gil_scoped_release no_gil;
    if (a->any_grad) {
      pred = DeepMlpFunction::apply(a->x, at::TensorList(a->params), a->activation, a->has_bias);
    } else {
      const Params p = split(a->params, a->has_bias);
      pred = ops::deep_mlp().call(a->x, p.weights, p.biases, a->activation);
    }
  }
  return wrap(std::move(pred));
}

py::object deep_derivatives(py::handle x, py::handle weights, py::handle biases, py::handle activation,
                            int64_t order) {
  std::optional<DeepArgs> a = unpack(x, weights, biases, activation);
  if (!a) return py::none();
  variable_list out;
  {
    py::gil_scoped_release no_gil;
    if (a->any_grad) {
      out = DeepDerivativesFunction::apply(a->x, at::TensorList(a->params), a->activation, a->has_bias, order);
    } else {
      const Params p = split(a->params, a->has_bias);
      out = ops::deep_mlp_derivatives().call(a->x, p.weights, p.biases, a->activation, order);
    }
  }
  py::tuple result(out.size());
  for (size_t i = 0; i < out.size(); ++i) result[i] = wrap(std::move(out[i]));
  return std::move(result);
}

// J(x)ᵀḡ of the prediction as a differentiable node (DeepInputVjpFunction): the one-hidden-layer
// ops' create_graph backward (fusedgrad/functional.py) for autograd.grad(u, x, ḡ, create_graph=True).
Tensor input_vjp(const Tensor& x, const std::vector<Tensor>& weights, const std::vector<std::optional<Tensor>>& biases,
                 const std::string& activation, const Tensor& gbar) {
  std::vector<Tensor> params = weights;
  std::string has_bias;
  for (const std::optional<Tensor>& b : biases) {
    has_bias.push_back(b.has_value() ? '1' : '0');
    if (b.has_value()) params.push_back(*b);
  }
  py::gil_scoped_release no_gil;
  return DeepInputVjpFunction::apply(x, at::TensorList(params), gbar.contiguous(), activation, has_bias);
}

}  // namespace

void register_deep_autograd(py::module_& m) {
  // The fake kernels' argument checks (ops/deep_checks.h): the CPU kernels' own rules, on fake or meta tensors.
  const char* check_doc = "The argument rules of the op's CPU kernel, run on fake or meta tensors by its fake kernel "
                          "(fusedgrad/deep.py): raises what the kernel would, returns None.";
  m.def("check_deep_mlp_loss", &ops::check_deep_mlp_loss, check_doc);
  m.def("check_deep_mlp", &ops::check_deep_mlp, check_doc);
  m.def("check_deep_mlp_backward", &ops::check_deep_mlp_backward, check_doc);
  m.def("check_deep_derivatives", &ops::check_deep_derivatives, check_doc);
  m.def("check_deep_derivatives_backward", &ops::check_deep_derivatives_backward, check_doc);
  m.def("check_deep_mlp_jvp", &ops::check_deep_mlp_jvp, check_doc);
  m.def("check_deep_mlp_jvp_backward", &ops::check_deep_mlp_jvp_backward, check_doc);
  const char* declined = " Returns None when the call must take fusedgrad.deep's Python route.";
  m.def("deep_mlp_loss", &deep_mlp_loss,
        (std::string("fusedgrad.deep.mlp_loss (one model) with its autograd node in C++.") + declined).c_str());
  m.def("deep_mlp", &deep_mlp,
        (std::string("fusedgrad.deep.mlp with its autograd node in C++.") + declined).c_str());
  m.def("deep_derivatives", &deep_derivatives,
        (std::string("fusedgrad.deep.derivatives with its autograd node in C++.") + declined).c_str());
  m.def("_input_vjp", &input_vjp, py::arg("x"), py::arg("weights"), py::arg("biases"), py::arg("activation"),
        py::arg("gbar"),
        "J(x)ᵀḡ of one model's prediction as an autograd node whose backward (and its backward's x part) "
        "are fused: the one-hidden-layer ops' create_graph backward (fusedgrad/functional.py).");
  m.def("_set_differentiable_backward", [](py::object fn) { differentiable_backward() = std::move(fn); },
        "Registers fusedgrad.deep's create_graph=True backward for the C++ nodes (see deep_autograd.cpp).");
  m.def(
      "_set_recompute_backward",
      [](py::object fn) {
        // Leaked with the std::function that holds it (autograd_helpers.h): never released after the interpreter.
        auto* held = new py::object(std::move(fn));
        autograd_helpers::recompute_backward() = [held](const std::string& kind, const variable_list& inputs,
                                                        const std::string& reduction, const std::string& activation,
                                                        const Tensor& grad, const std::vector<bool>& needs) {
          py::gil_scoped_acquire gil;
          py::list py_inputs;
          for (const Tensor& t : inputs) py_inputs.append(to_py(t));
          py::object out = (*held)(kind, py_inputs, reduction, activation, to_py(grad), needs);
          variable_list got;
          for (py::handle g : out) got.push_back(g.is_none() ? Tensor() : compat::unpack(g.ptr()));
          TORCH_CHECK(got.size() == inputs.size(), "fusedgrad: the recompute returned ", got.size(),
                      " gradients for ", inputs.size(), " inputs");
          return got;
        };
      },
      "Registers fusedgrad.functional's create_graph=True backward for the one-hidden-layer ops' nodes "
      "(csrc/ops/autograd_helpers.h).");
}

}  // namespace fusedgrad
