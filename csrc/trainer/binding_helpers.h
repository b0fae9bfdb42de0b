// Helpers of both trainer bindings. The optimizer update rule as fusedgrad.Trainer hands it over from Python
// (a tuple built by Trainer._group_rule / _param_rule in fusedgrad/trainer.py),
// read by both trainer bindings (the one-hidden-layer train_bindings.cpp and
// the any-depth deep_train.cpp).
//
//   (kind "sgd" | "adam", lr, weight_decay, maximize, momentum, dampening,
//    nesterov, beta1, beta2, eps, amsgrad, decoupled_weight_decay,
//    step, exp_avg_or_buffer, exp_avg_sq, max_exp_avg_sq, buffer_fresh,
//    lr_is_float32_tensor)
#pragma once

#include <torch/python.h>

#include <string>

#include "train_step.h"  // ParamState, UpdateRule

namespace fusedgrad::trainer {

inline at::Tensor optional_tensor(pybind11::handle h) {
  if (h.is_none()) return at::Tensor();
  return h.cast<at::Tensor>();
}

inline ParamState parse_rule(pybind11::handle obj) {
  auto t = obj.cast<pybind11::tuple>();
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


// c10's errors as the Python exceptions torch raises for them.
template <typename F>
inline auto translating_errors(F f) {
  return [f](auto&&... args) {
    try {
      return f(std::forward<decltype(args)>(args)...);
    } catch (const c10::ValueError& e) {
      throw pybind11::value_error(e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      throw pybind11::type_error(e.what_without_backtrace());
    } catch (const c10::Error& e) {
      throw std::runtime_error(e.what_without_backtrace());
    }
  };
}

}  // namespace fusedgrad::trainer
