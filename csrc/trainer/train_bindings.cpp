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
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/python.h>

#include <string>
#include <unordered_map>

#include "../python/grad_hooks.h"
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


// ---------------------------------------------------------------------------
// fusedgrad._C.train_step_fast: Trainer.step's common case read straight from
// the optimizer's Python objects — param_groups, state, the parameters' .grad —
// with no Python in between (the Python route costs ~25 µs a step, ten times
// the tiny step itself). It reads exactly what the Python route reads, at every
// call, and takes only the plain case: anything else (a first step with no
// state or .grad yet, a tensor lr or betas, hooks, anomaly mode, unusual
// tensors, a bad argument) returns None, and fusedgrad/trainer.py runs the
// Python route, which handles it or raises the error that names it.

// dict[key] with the key an interned Python string made once (PyDict_GetItemString
// would build and hash a new str at every lookup: a third of this function's time).
PyObject* item(PyObject* dict, const char* key) {
  static std::unordered_map<const char*, PyObject*> keys;  // keyed by the literal's address
  auto it = keys.find(key);
  if (it == keys.end()) it = keys.emplace(key, PyUnicode_InternFromString(key)).first;
  return PyDict_GetItem(dict, it->second);  // borrowed
}

// The global optimizer hook dicts of torch.optim.optimizer, looked up once.
// Held for the life of the process (a static py::object would be released after
// the interpreter has finalised).
PyObject* global_hooks(const char* name) {
  static PyObject* module = py::module_::import("torch.optim.optimizer").release().ptr();
  PyObject* d = PyObject_GetAttrString(module, name);  // new reference
  if (!d) {
    PyErr_Clear();
    return nullptr;
  }
  Py_DECREF(d);  // the module keeps it alive
  return d;
}

// Unknown objects count as hooks (the Python route then looks closer).
bool nonempty_dict(PyObject* d) { return !d || !PyDict_Check(d) || PyDict_Size(d) > 0; }

bool nonempty_dict_attr(PyObject* obj, const char* name) {
  PyObject* d = PyObject_GetAttrString(obj, name);
  if (!d) {
    PyErr_Clear();
    return false;
  }
  const bool nonempty = !PyDict_Check(d) || PyDict_Size(d) > 0;
  Py_DECREF(d);
  return nonempty;
}

// A Python float or int (not a tensor, not a bool-like object), as double.
bool number(PyObject* obj, double& out) {
  if (!obj || !(PyFloat_Check(obj) || (PyLong_Check(obj) && !PyBool_Check(obj)))) return false;
  out = PyFloat_AsDouble(obj);
  return !PyErr_Occurred();
}

bool flag(PyObject* dict, const char* key, bool fallback, bool& out) {
  PyObject* v = item(dict, key);  // borrowed
  if (!v || v == Py_None) {
    out = fallback;
    return true;
  }
  if (!PyBool_Check(v)) return false;
  out = v == Py_True;
  return true;
}

bool exact_tensor(PyObject* obj) {
  PyTypeObject* type = Py_TYPE(obj);
  return type == reinterpret_cast<PyTypeObject*>(THPVariableClass) ||
      type == reinterpret_cast<PyTypeObject*>(ParameterClass);
}

at::Tensor state_tensor(PyObject* state, const char* key) {
  PyObject* v = item(state, key);
  if (!v || !exact_tensor(v)) return at::Tensor();
  return THPVariable_Unpack(v);
}

py::object train_step_fast(const std::string& fn, py::handle optimizer, py::tuple params, py::handle x,
                           py::handle target, bool mean, py::handle lr_scale, bool adam, bool decoupled_default) {
  if (torch::autograd::AnomalyMode::is_enabled()) return py::none();
  if (!exact_tensor(x.ptr()) || !exact_tensor(target.ptr()) || params.size() != kNumParams) return py::none();
  PyObject* opt = optimizer.ptr();
  if (nonempty_dict_attr(opt, "_optimizer_step_pre_hooks") || nonempty_dict_attr(opt, "_optimizer_step_post_hooks") ||
      nonempty_dict(global_hooks("_global_optimizer_pre_hooks")) ||
      nonempty_dict(global_hooks("_global_optimizer_post_hooks"))) {
    return py::none();
  }
  py::object groups_obj = optimizer.attr("param_groups");
  py::object state_obj = optimizer.attr("state");
  PyObject* groups = groups_obj.ptr();
  PyObject* state = state_obj.ptr();
  if (!PyList_Check(groups) || !PyDict_Check(state)) return py::none();
  // The optimizer holds exactly the model's parameters (each once).
  Py_ssize_t held = 0;
  for (Py_ssize_t gi = 0; gi < PyList_GET_SIZE(groups); ++gi) {
    PyObject* group = PyList_GET_ITEM(groups, gi);
    PyObject* plist = PyDict_Check(group) ? item(group, "params") : nullptr;
    if (!plist || !PyList_Check(plist)) return py::none();
    held += PyList_GET_SIZE(plist);
  }
  TrainCall call;
  Py_ssize_t present = 0;
  for (int p = 0; p < kNumParams; ++p) {
    PyObject* obj = params[p].ptr();
    if (obj == Py_None) continue;
    ++present;
    if (!exact_tensor(obj)) return py::none();
    PyObject* group = nullptr;
    for (Py_ssize_t gi = 0; gi < PyList_GET_SIZE(groups) && !group; ++gi) {
      PyObject* g = PyList_GET_ITEM(groups, gi);
      PyObject* plist = item(g, "params");
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(plist); ++i) {
        if (PyList_GET_ITEM(plist, i) == obj) {
          group = g;
          break;
        }
      }
    }
    if (!group) return py::none();
    const at::Tensor& t = THPVariable_Unpack(obj);
    if (!t.requires_grad() || !t.is_leaf() || grad_hook_flags(obj) != 0) return py::none();
    at::Tensor g = t.grad();
    if (!g.defined()) return py::none();
    call.params[p] = t;
    call.grads[p] = g;
    ParamState& st = call.state[p];
    UpdateRule& u = st.rule;
    bool capturable = false, differentiable = false;
    if (!flag(group, "capturable", false, capturable) || !flag(group, "differentiable", false, differentiable) ||
        capturable || differentiable) {
      return py::none();
    }
    if (!number(item(group, "lr"), u.lr)) return py::none();
    PyObject* wd = item(group, "weight_decay");
    u.weight_decay = 0;
    if (wd && !number(wd, u.weight_decay)) return py::none();
    if (!flag(group, "maximize", false, u.maximize)) return py::none();
    PyObject* pstate = PyDict_GetItem(state, obj);  // borrowed; state is a defaultdict: no insertion here
    if (!adam) {
      u.kind = OptimizerKind::SGD;
      PyObject* mom = item(group, "momentum");
      PyObject* damp = item(group, "dampening");
      if ((mom && !number(mom, u.momentum)) || (damp && !number(damp, u.dampening))) return py::none();
      if (!flag(group, "nesterov", false, u.nesterov)) return py::none();
      if (u.momentum != 0) {
        if (!pstate || !PyDict_Check(pstate)) return py::none();
        st.exp_avg = state_tensor(pstate, "momentum_buffer");
        if (!st.exp_avg.defined()) return py::none();  // the first step creates it: the Python route
      }
    } else {
      u.kind = OptimizerKind::Adam;
      PyObject* betas = item(group, "betas");
      if (!betas || !PyTuple_Check(betas) || PyTuple_GET_SIZE(betas) != 2 ||
          !number(PyTuple_GET_ITEM(betas, 0), u.beta1) || !number(PyTuple_GET_ITEM(betas, 1), u.beta2) ||
          !number(item(group, "eps"), u.eps) || !flag(group, "amsgrad", false, u.amsgrad) ||
          !flag(group, "decoupled_weight_decay", decoupled_default, u.decoupled_weight_decay)) {
        return py::none();
      }
      if (!pstate || !PyDict_Check(pstate)) return py::none();
      st.step = state_tensor(pstate, "step");
      st.exp_avg = state_tensor(pstate, "exp_avg");
      st.exp_avg_sq = state_tensor(pstate, "exp_avg_sq");
      if (u.amsgrad) st.max_exp_avg_sq = state_tensor(pstate, "max_exp_avg_sq");
      if (!st.step.defined() || !st.exp_avg.defined() || !st.exp_avg_sq.defined() ||
          (u.amsgrad && !st.max_exp_avg_sq.defined())) {
        return py::none();
      }
    }
  }
  if (held != present) return py::none();
  const at::Tensor& xt = THPVariable_Unpack(x.ptr());
  const at::Tensor& tt = THPVariable_Unpack(target.ptr());
  const bool ensemble = call.params[kW1].defined() && call.params[kW1].dim() == 3;
  const int64_t K = ensemble ? call.params[kW1].size(0) : 1;
  if (!ensemble && (xt.dim() != 2 || tt.dim() != 2)) return py::none();  // (*, D) inputs: the Python route
  call.x = xt;
  call.target = tt;
  call.num_steps = 1;
  call.mean = mean;
  call.lr_scale = optional_tensor(lr_scale);
  if (!call.params[kW1].defined() || (xt.requires_grad() || tt.requires_grad())) return py::none();
  call.losses = at::empty({1, K}, call.params[kW1].options().requires_grad(false));
  bool ran = true;
  {
    py::gil_scoped_release no_gil;
    try {
      train_steps(fn.c_str(), call);
    } catch (const c10::Error&) {
      ran = false;  // checked before anything is written: the Python route raises the error itself
    }
  }
  if (!ran) return py::none();
  // What an LR scheduler's wrapper of optimizer.step() records (see trainer.py).
  optimizer.attr("_opt_called") = true;
  return py::cast(ensemble ? call.losses.select(0, 0) : call.losses.view(at::IntArrayRef{}));  // view({}) would pick view(ScalarType)
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
  m.def("train_step_fast", &train_step_fast,
        "Trainer.step's common case, read straight from the optimizer; None: take the Python route.");
}

}  // namespace fusedgrad::trainer
