// fusedgrad._C.train_steps: the Python face of the fused training step
// (train_step.h), called by fusedgrad.Trainer (fusedgrad/trainer.py), which
// has made the optimizer state torch.optim makes (fusedgrad/_optimizers.py);
// the optimizer's param_groups and state are read here (binding_helpers.h:
// read_optimizer, through the optimizer's description in optimizers.h).
//
// Arguments (Python):
//   fn              the name errors start with
//   optimizer, name the torch.optim optimizer and its description's name
//   params, grads   4-lists (w1, b1, w2, b2) of tensors or None
//   names           4-list of the parameters' names (for messages)
//   x, target, batch_size, order, first_step, num_steps, mean, lr_scale, losses, steps_done, activation
// The steps run with the GIL released.
#include <torch/csrc/autograd/anomaly_mode.h>
#include <torch/python.h>

#include <algorithm>
#include <string>

#include "../python/grad_hooks.h"
#include "../python/torch_compat.h"  // every private torch internal the bindings read
#include "../common/options.h"  // parse_activation, find_activation
#include "train_step.h"
#include "binding_helpers.h"  // read_optimizer, optional_tensor, translating_errors
#include "plain_call.h"

namespace fusedgrad::trainer {
namespace {

namespace py = pybind11;

// What a call runs, besides the model and its optimizer (train_step.h).
void set_run(TrainCall& call, const at::Tensor& x, const at::Tensor& target, int64_t batch_size, py::handle order,
             int64_t first_step, int64_t num_steps, bool mean, py::handle lr_scale, const at::Tensor& losses,
             const at::Tensor& steps_done) {
  call.x = x;
  call.target = target;
  call.batch_size = batch_size;
  call.order = optional_tensor(order);
  call.first_step = first_step;
  call.num_steps = num_steps;
  call.mean = mean;
  call.lr_scale = optional_tensor(lr_scale);
  call.losses = losses;
  call.steps_done = steps_done;
}

void train_steps_py(const std::string& fn, py::handle optimizer, const std::string& name, py::sequence params,
                    py::sequence grads, py::sequence names, const at::Tensor& x, const at::Tensor& target,
                    int64_t batch_size, py::handle order, int64_t first_step, int64_t num_steps, bool mean,
                    py::handle lr_scale, const at::Tensor& losses, py::handle steps_done,
                    const std::string& activation, py::handle process_group, bool rank_means,
                    py::handle sklearn) {
  TORCH_CHECK_VALUE(params.size() == kNumParams && grads.size() == kNumParams && names.size() == kNumParams,
                    "fusedgrad: internal: train_steps takes 4 parameters, gradients and names");
  TrainCall call;
  Created created;
  const std::vector<ParamState> states = read_strict(fn.c_str(), optimizer, name, params, names, created);
  for (int p = 0; p < kNumParams; ++p) {
    call.params[p] = optional_tensor(params[p]);
    call.grads[p] = optional_tensor(grads[p]);
    call.state[p] = states[p];
  }
  set_run(call, x, target, batch_size, order, first_step, num_steps, mean, lr_scale, losses, optional_tensor(steps_done));
  call.act = parse_activation(activation);
  call.sklearn = sklearn_terms(sklearn);
  std::unique_ptr<StepReducer> reducer;  // the data-parallel route (step_reducer.h)
  if (!process_group.is_none()) {
    reducer = make_step_reducer(fn.c_str(), process_group);
    reducer->rank_means = rank_means;
    call.reducer = reducer.get();
  }
  {
    py::gil_scoped_release no_gil;
    train_steps(fn.c_str(), call);
  }
  created.store();
}

// fusedgrad._C.read_optimizer: what the reader reads for each parameter (None where the model has
// none), as dicts {"optimizer", "options", "state"}; raises what the Python route would raise.
py::list read_optimizer_py(const std::string& fn, py::handle optimizer, const std::string& name,
                           py::sequence params, py::sequence names) {
  Created created;  // nothing is stored: a read, not a step
  const std::vector<ParamState> states = read_strict(fn.c_str(), optimizer, name, params, names, created);
  py::list out;
  for (size_t p = 0; p < states.size(); ++p) {
    if (params[p].is_none()) {
      out.append(py::none());
    } else {
      out.append(describe(states[p]));
    }
  }
  return out;
}

// fusedgrad._C.optimizer_descriptions: {name: {"options": [...], "state": [...], "step_count": bool}}.
py::dict optimizer_descriptions() {
  py::dict out;
  for_each_description([&](auto index) {
    using D = std::variant_alternative_t<decltype(index)::value, AnyOptimizer>;
    py::list options, state;
    for (const auto& o : D::options()) options.append(o.key);
    for (const char* key : D::kState) state.append(key);
    py::dict d;
    d["options"] = options;
    d["state"] = state;
    d["step_count"] = D::kStepCount;
    d["first_gradient_fills_state"] = D::kFirstGradientFillsState;
    out[D::kName] = d;
  });
  return out;
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

// A Python string made (and interned) once per key: item<"lr">(group) costs
// one dict lookup, where PyDict_GetItemString would build and hash a new str
// at every call (a third of this function's time when it did).
template <size_t N>
struct Key {
  char text[N];
  constexpr Key(const char (&literal)[N]) { std::copy_n(literal, N, text); }
};

template <Key K>
PyObject* interned() {
  static PyObject* const name = PyUnicode_InternFromString(K.text);  // held for the life of the process
  return name;
}

template <Key K>
PyObject* item(PyObject* dict) {
  return PyDict_GetItem(dict, interned<K>());  // borrowed
}

// A global optimizer hook dict of torch.optim.optimizer (the module is looked
// up once and held for the life of the process: a static py::object would be
// released after the interpreter has finalised).
template <Key K>
PyObject* global_hooks() {
  static PyObject* module = py::module_::import("torch.optim.optimizer").release().ptr();
  PyObject* d = PyObject_GetAttr(module, interned<K>());  // new reference
  if (!d) {
    PyErr_Clear();
    return nullptr;
  }
  Py_DECREF(d);  // the module keeps it alive
  return d;
}

// Unknown objects count as hooks (the Python route then looks closer).
bool nonempty_dict(PyObject* d) { return !d || !PyDict_Check(d) || PyDict_Size(d) > 0; }

// A missing attribute counts as hooks too (fail closed: the Python route then refuses by
// fusedgrad/_compat.py's check, never skips a hook torch moved elsewhere).
template <Key K>
bool nonempty_dict_attr(PyObject* obj) {
  PyObject* d = PyObject_GetAttr(obj, interned<K>());
  if (!d) {
    PyErr_Clear();
    return true;
  }
  const bool nonempty = !PyDict_Check(d) || PyDict_Size(d) > 0;
  Py_DECREF(d);
  return nonempty;
}

using compat::exact_tensor;

}  // namespace

bool plain_optimizer(PyObject* opt) {
  return !torch::autograd::AnomalyMode::is_enabled() && !nonempty_dict_attr<"_optimizer_step_pre_hooks">(opt) &&
         !nonempty_dict_attr<"_optimizer_step_post_hooks">(opt) &&
         !nonempty_dict(global_hooks<"_global_optimizer_pre_hooks">()) &&
         !nonempty_dict(global_hooks<"_global_optimizer_post_hooks">());
}

void mark_stepped(PyObject* opt) {
  if (PyObject_SetAttr(opt, interned<"_opt_called">(), Py_True) != 0) throw py::error_already_set();
}

bool plain_param(PyObject* obj, NewGrads& new_grads, at::Tensor& param, at::Tensor& grad) {
  if (!exact_tensor(obj)) return false;
  const at::Tensor& t = compat::unpack(obj);
  if (!t.requires_grad() || !t.is_leaf() || grad_hook_flags(obj) != 0) return false;
  param = t;
  grad = t.grad();
  if (!grad.defined()) grad = new_grads.make(t);
  return true;
}

void raise_partly_applied(const std::string& fn, const std::string& failure) {
  throw std::runtime_error(fn + ": failed after the step had begun writing (parameters, .grad and optimizer state "
                           "may be partly updated; the step was not retried): " + failure);
}

namespace {

// Fills call's parameters, gradients and optimizer options and state from the
// optimizer's Python objects; false: not the plain case (nothing is changed). A
// .grad of None gets a gradient from new_grads, so that a new Trainer's first
// call takes this route too.
bool read_plain(PyObject* opt, const std::string& name, py::tuple params, TrainCall& call, Created& created,
                NewGrads& new_grads) {
  if (params.size() != kNumParams || !plain_optimizer(opt)) return false;
  std::vector<PyObject*> ptrs(kNumParams, nullptr);
  for (int p = 0; p < kNumParams; ++p) {
    PyObject* obj = params[p].ptr();
    if (obj == Py_None) continue;
    if (!plain_param(obj, new_grads, call.params[p], call.grads[p])) return false;
    ptrs[p] = obj;
  }
  static const std::vector<std::string> names{"w1", "b1", "w2", "b2"};  // never shown: declines say nothing
  std::vector<ParamState> states;
  if (!read_optimizer(Reader{"fusedgrad.Trainer", false}, opt, name, ptrs, names, states, created)) return false;
  for (int p = 0; p < kNumParams; ++p) call.state[p] = std::move(states[p]);
  return call.params[kW1].defined();
}

// Runs the call's steps with the GIL released; false if its checks refused it
// — they run before anything is written, so the Python route may then take
// the call (and raise the error that names the problem). An error after the
// first write (train_steps' `started`: losses, gradients, parameters,
// optimizer state or step counts may be partly updated) is never declined: a
// rerun would apply the step a second time. It is raised as a RuntimeError
// that says so (tests/test_no_double_update.py).
bool run_released(const char* fn, TrainCall& call) {
  bool started = false;
  std::string failure;
  {
    py::gil_scoped_release no_gil;
    try {
      train_steps(fn, call, &started);
      return true;
    } catch (const c10::Error& e) {
      if (!started) return false;
      failure = e.what_without_backtrace();
    }
  }
  raise_partly_applied(fn, failure);
}

py::object train_step_fast(py::handle optimizer, const std::string& name, py::tuple params, py::handle x,
                           py::handle target, bool mean, py::handle lr_scale, const std::string& activation) {
  if (!exact_tensor(x.ptr()) || !exact_tensor(target.ptr())) return py::none();
  const std::optional<Activation> act = find_activation(activation);
  if (!act) return py::none();
  TrainCall call;
  call.act = *act;
  Created created;
  NewGrads new_grads;
  if (!read_plain(optimizer.ptr(), name, params, call, created, new_grads)) return py::none();
  const at::Tensor& xt = compat::unpack(x.ptr());
  const at::Tensor& tt = compat::unpack(target.ptr());
  const bool ensemble = call.params[kW1].dim() == 3;
  const int64_t K = ensemble ? call.params[kW1].size(0) : 1;
  if (!ensemble && (xt.dim() != 2 || tt.dim() != 2)) return py::none();  // (*, D) inputs: the Python route
  if (xt.requires_grad() || tt.requires_grad()) return py::none();
  // The loss of the one step, allocated in the shape returned (K,) or () — no view to make after.
  const at::Tensor losses =
      ensemble ? at::empty({K}, call.params[kW1].options()) : at::empty({}, call.params[kW1].options());
  set_run(call, xt, tt, /*batch_size=*/0, py::none(), /*first_step=*/0, /*num_steps=*/1, mean, lr_scale, losses,
          /*steps_done=*/at::Tensor());
  if (!run_released("fusedgrad.Trainer.step", call)) return py::none();
  created.store();
  new_grads.store();
  mark_stepped(optimizer.ptr());
  return py::cast(losses);
}

// Trainer.fit's calls, the same way: x and target come prepared by fit();
// false sends the call to the Python route.
bool train_steps_fast(py::handle optimizer, const std::string& name, py::tuple params, const at::Tensor& x,
                      const at::Tensor& target, int64_t batch_size, py::handle order, int64_t first_step,
                      int64_t num_steps, bool mean, py::handle lr_scale, const at::Tensor& losses,
                      const at::Tensor& steps_done, const std::string& activation) {
  const std::optional<Activation> act = find_activation(activation);
  if (!act) return false;
  TrainCall call;
  call.act = *act;
  Created created;
  NewGrads new_grads;
  if (!read_plain(optimizer.ptr(), name, params, call, created, new_grads)) return false;
  set_run(call, x, target, batch_size, order, first_step, num_steps, mean, lr_scale, losses, steps_done);
  if (!run_released("fusedgrad.Trainer.fit", call)) return false;
  created.store();
  new_grads.store();
  mark_stepped(optimizer.ptr());
  return true;
}

}  // namespace

void register_trainer(py::module& m) {
  m.def(
      "train_steps",
      [](const std::string& fn, py::handle optimizer, const std::string& name, py::sequence params,
         py::sequence grads, py::sequence names, const at::Tensor& x, const at::Tensor& target, int64_t batch_size,
         py::handle order, int64_t first_step, int64_t num_steps, bool mean, py::handle lr_scale,
         const at::Tensor& losses, py::handle steps_done, const std::string& activation, py::handle process_group,
         bool rank_means, py::handle sklearn) {
        translating_errors(train_steps_py)(fn, optimizer, name, params, grads, names, x, target, batch_size, order,
                                           first_step, num_steps, mean, lr_scale, losses, steps_done, activation,
                                           process_group, rank_means, sklearn);
      },
      "Fused training steps of fusedgrad.Trainer (see csrc/trainer/train_bindings.cpp).");
  m.def("_testing_fail_after_first_update", &set_fail_after_first_update,
        "TEST-ONLY: while on, every fused training run raises right after the first parameter's optimizer update "
        "(tests/test_no_double_update.py). Never use outside the tests.");
  m.def(
      "read_optimizer",
      [](const std::string& fn, py::handle optimizer, const std::string& name, py::sequence params,
         py::sequence names) { return translating_errors(read_optimizer_py)(fn, optimizer, name, params, names); },
      "What the fused trainer reads from the optimizer for each parameter (see csrc/trainer/binding_helpers.h).");
  m.def("optimizer_descriptions", &optimizer_descriptions,
        "The fused trainer's optimizer descriptions: options, state names (csrc/trainer/optimizers.h).");
  m.def("train_step_fast", &train_step_fast,
        "Trainer.step's common case, read straight from the optimizer; None: take the Python route.");
  m.def("train_steps_fast", &train_steps_fast,
        "Trainer.fit's calls in the common case, read straight from the optimizer; False: take the Python route.");
}

}  // namespace fusedgrad::trainer
