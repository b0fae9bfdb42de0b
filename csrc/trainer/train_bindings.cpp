// fusedgrad._C.train_steps: the Python face of the fused training step
// (train_step.h), called by fusedgrad.Trainer (fusedgrad/trainer.py), which
// reads the optimizer's param_groups and state and hands over the tensors.
//
// Arguments (Python):
//   params, grads   4-lists (w1, b1, w2, b2) of tensors or None
//   rules           4-list of None or a tuple
//                   (kind "sgd" | "adam", lr, weight_decay, maximize, momentum, dampening,
//                    nesterov, beta1, beta2, eps, amsgrad, decoupled_weight_decay,
//                    step, exp_avg_or_buffer, exp_avg_sq, max_exp_avg_sq, buffer_fresh,
//                    lr_is_float32_tensor)
//   x, target, batch_size, order, first_step, num_steps, mean, lr_scale, losses, steps_done
// The steps run with the GIL released.
#include <torch/python.h>

#include <string>

#include "train_step.h"

namespace fusedgrad::trainer {
namespace {

namespace py = pybind11;

at::Tensor optional_tensor(py::handle h) {
  if (h.is_none()) return at::Tensor();
  return h.cast<at::Tensor>();
}

ParamState parse_rule(py::handle obj) {
  auto t = obj.cast<py::tuple>();
  TORCH_CHECK_VALUE(t.size() == 18, "fusedgrad: internal: an update rule has 18 fields, got ", t.size());
  ParamState st;
  UpdateRule& u = st.rule;
  const std::string kind = t[0].cast<std::string>();
  TORCH_CHECK_VALUE(kind == "sgd" || kind == "adam", "fusedgrad: internal: unknown optimizer kind ", kind);
  u.kind = kind == "sgd" ? OptimizerKind::SGD : OptimizerKind::Adam;
  u.lr = t[1].cast<double>();
  u.weight_decay = t[2].cast<double>();
  u.maximize = t[3].cast<bool>();
  u.momentum = t[4].cast<double>();
  u.dampening = t[5].cast<double>();
  u.nesterov = t[6].cast<bool>();
  u.beta1 = t[7].cast<double>();
  u.beta2 = t[8].cast<double>();
  u.eps = t[9].cast<double>();
  u.amsgrad = t[10].cast<bool>();
  u.decoupled_weight_decay = t[11].cast<bool>();
  st.step = optional_tensor(t[12]);
  st.exp_avg = optional_tensor(t[13]);
  st.exp_avg_sq = optional_tensor(t[14]);
  st.max_exp_avg_sq = optional_tensor(t[15]);
  st.buffer_fresh = t[16].cast<bool>();
  u.lr_float32_tensor = t[17].cast<bool>();
  return st;
}

void train_steps_py(const std::string& fn, py::sequence params, py::sequence grads, py::sequence rules, const at::Tensor& x,
                    const at::Tensor& target, int64_t batch_size, py::handle order, int64_t first_step,
                    int64_t num_steps, bool mean, py::handle lr_scale, const at::Tensor& losses,
                    py::handle steps_done) {
  TORCH_CHECK_VALUE(params.size() == kNumParams && grads.size() == kNumParams && rules.size() == kNumParams,
                    "fusedgrad: internal: train_steps takes 4 parameters, gradients and rules");
  TrainCall call;
  for (int p = 0; p < kNumParams; ++p) {
    call.params[p] = optional_tensor(params[p]);
    call.grads[p] = optional_tensor(grads[p]);
    if (!rules[p].is_none()) call.state[p] = parse_rule(rules[p]);
  }
  call.x = x;
  call.target = target;
  call.batch_size = batch_size;
  call.order = optional_tensor(order);
  call.first_step = first_step;
  call.num_steps = num_steps;
  call.mean = mean;
  call.lr_scale = optional_tensor(lr_scale);
  call.losses = losses;
  call.steps_done = optional_tensor(steps_done);
  py::gil_scoped_release no_gil;
  train_steps(fn.c_str(), call);
}

// c10's errors as the Python exceptions torch raises for them.
template <typename F>
auto translating_errors(F f) {
  return [f](auto&&... args) {
    try {
      return f(std::forward<decltype(args)>(args)...);
    } catch (const c10::ValueError& e) {
      throw py::value_error(e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      throw py::type_error(e.what_without_backtrace());
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  };
}

}  // namespace

void register_trainer(py::module& m) {
  m.def(
      "train_steps",
      [](const std::string& fn, py::sequence params, py::sequence grads, py::sequence rules, const at::Tensor& x,
         const at::Tensor& target, int64_t batch_size, py::handle order, int64_t first_step, int64_t num_steps,
         bool mean, py::handle lr_scale, const at::Tensor& losses, py::handle steps_done) {
        translating_errors(train_steps_py)(fn, params, grads, rules, x, target, batch_size, order, first_step,
                                           num_steps, mean, lr_scale, losses, steps_done);
      },
      "Fused training steps of fusedgrad.Trainer (see csrc/trainer/train_bindings.cpp).");
}

}  // namespace fusedgrad::trainer
