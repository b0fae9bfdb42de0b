// Helpers of both trainer bindings (the one-hidden-layer train_bindings.cpp and
// the any-depth deep_train.cpp), among them the one reader of the optimizer:
// read_optimizer reads each parameter's param group options and state straight
// from the torch.optim optimizer's Python objects, through its description
// (optimizers.h: options(), kState, kStepCount). Every route reads it this way,
// at every call:
//   - Trainer.step / fit's C++ route (strict = false) declines (returns false,
//     having changed nothing) anything it does not take as it is — a first step
//     with no state yet, hooks, an odd value — and fusedgrad/trainer.py takes
//     the call;
//   - the Python route (strict = true) first makes the state torch.optim makes
//     (fusedgrad/_optimizers.py), then raises the error that names what is wrong.
#pragma once

#include <torch/python.h>

#include <string>
#include <tuple>
#include <vector>

#include "../common/problem.h"       // shape_str
#include "../python/torch_compat.h"  // exact_tensor, is_tensor, unpack, wrap
#include "train_step.h"              // ParamState, optimizers.h

namespace fusedgrad::trainer {

inline at::Tensor optional_tensor(pybind11::handle h) {
  if (h.is_none()) return at::Tensor();
  return h.cast<at::Tensor>();
}

// fusedgrad.sklearn's step terms (train_step.h: SklearnTerms) from None or the tuple
// (decay_per_row, eps_hat, weight_sq tensor or None) fusedgrad/sklearn.py passes.
inline SklearnTerms sklearn_terms(pybind11::handle h) {
  SklearnTerms sk;
  if (h.is_none()) return sk;
  const auto t = h.cast<pybind11::tuple>();
  TORCH_CHECK_VALUE(t.size() == 3, "fusedgrad: internal: sklearn_terms is (decay_per_row, eps_hat, weight_sq)");
  sk.on = true;
  sk.decay_per_row = t[0].cast<double>();
  sk.eps_hat = t[1].cast<double>();
  sk.weight_sq = optional_tensor(t[2]);
  return sk;
}

// What the reader does with what it cannot take: raise (strict) or decline.
struct Reader {
  const char* fn;
  bool strict;
  template <typename... Args>
  bool value_error(const Args&... args) const {
    TORCH_CHECK_VALUE(!strict, fn, ": ", args...);
    return false;
  }
  template <typename... Args>
  bool type_error(const Args&... args) const {
    TORCH_CHECK_TYPE(!strict, fn, ": ", args...);
    return false;
  }
};

// The tensors a read made from the first gradient (SGD's momentum buffer): stored
// in optimizer.state[param] after the run, as torch.optim stores them. Storing runs
// no Python code (a str key into the parameter's state dict, which the read made
// sure exists), so a pending Ctrl-C cannot come between a step and its state.
struct Created {
  std::vector<std::tuple<pybind11::object, PyObject*, at::Tensor>> tensors;  // state dict, key (interned), tensor

  void store() const {  // with the GIL
    for (const auto& [dict, key, tensor] : tensors) {
      pybind11::object t = pybind11::reinterpret_steal<pybind11::object>(compat::wrap(tensor));
      if (!t || PyDict_SetItem(dict.ptr(), key, t.ptr()) != 0) throw pybind11::error_already_set();
    }
  }
};

namespace detail {

template <size_t N>
std::array<PyObject*, N> intern_all(const std::array<const char*, N>& keys) {
  std::array<PyObject*, N> out{};
  for (size_t i = 0; i < N; ++i) out[i] = PyUnicode_InternFromString(keys[i]);  // held for the process
  return out;
}

template <class Options>
auto option_keys(const Options& opts) {
  std::array<const char*, std::tuple_size_v<Options>> keys{};
  for (size_t i = 0; i < keys.size(); ++i) keys[i] = opts[i].key;
  return keys;
}

// A number option: a Python float or int, or a one-element tensor (its value, as torch.optim's
// single-tensor functions take it); `label` names it, e.g. "lr" or "betas[0]".
inline bool read_number(const Reader& r, PyObject* v, Py_ssize_t gi, const char* label, double& out, bool& f32) {
  f32 = false;
  if (PyFloat_Check(v) || (PyLong_Check(v) && !PyBool_Check(v))) {
    out = PyFloat_AsDouble(v);
    if (PyErr_Occurred()) {
      PyErr_Clear();
      return r.value_error("param_groups[", gi, "]['", label, "'] does not fit a float");
    }
    return true;
  }
  if (compat::is_tensor(v)) {
    const at::Tensor& t = compat::unpack(v);
    if (t.numel() != 1) {
      return r.value_error("param_groups[", gi, "]['", label, "'] must be a number or a one-element tensor, got a "
                           "tensor of shape ", shape_str(t.sizes()));
    }
    if (t.requires_grad()) {
      return r.value_error("param_groups[", gi, "]['", label, "'] requires grad (differentiable optimizer options "
                           "are not supported)");
    }
    if (t.is_complex() || !t.device().is_cpu()) {
      return r.value_error("param_groups[", gi, "]['", label, "'] must be a real CPU tensor");
    }
    out = t.item<double>();
    f32 = t.scalar_type() == at::kFloat;
    return true;
  }
  if (!r.strict) return false;
  out = PyFloat_AsDouble(v);  // what float(value) takes (numpy scalars, ...)
  if (PyErr_Occurred()) {
    PyErr_Clear();
    return r.type_error("param_groups[", gi, "]['", label, "'] must be a number, got ", Py_TYPE(v)->tp_name);
  }
  return true;
}

// A flag option: missing or None keeps the default; strict takes what bool(value) takes.
inline bool read_flag(const Reader& r, PyObject* v, bool& out) {
  if (!v || v == Py_None) return true;
  if (PyBool_Check(v)) {
    out = v == Py_True;
    return true;
  }
  if (!r.strict) return false;
  const int truth = PyObject_IsTrue(v);
  if (truth < 0) throw pybind11::error_already_set();
  out = truth == 1;
  return true;
}

// The options of description D from param_groups[gi].
template <class D>
bool read_options(const Reader& r, PyObject* group, Py_ssize_t gi, D& d) {
  static constexpr auto opts = D::options();
  static const auto keys = intern_all(option_keys(opts));
  for (size_t i = 0; i < opts.size(); ++i) {
    const Option<D>& o = opts[i];
    PyObject* v = PyDict_GetItem(group, keys[i]);  // borrowed
    if (o.flag) {
      if (!read_flag(r, v, d.*o.flag)) return false;
      continue;
    }
    if (!v) {
      if (o.required) return r.value_error("param_groups[", gi, "] has no '", o.key, "'");
      continue;
    }
    bool f32 = false;
    if (o.second) {  // a pair, e.g. betas
      if (!(PyTuple_Check(v) || PyList_Check(v)) || PySequence_Fast_GET_SIZE(v) != 2) {
        return r.value_error("param_groups[", gi, "]['", o.key, "'] must be a pair of numbers");
      }
      const std::string k0 = std::string(o.key) + "[0]", k1 = std::string(o.key) + "[1]";
      bool f32b = false;
      if (!read_number(r, PySequence_Fast_GET_ITEM(v, 0), gi, k0.c_str(), d.*o.number, f32) ||
          !read_number(r, PySequence_Fast_GET_ITEM(v, 1), gi, k1.c_str(), d.*o.second, f32b)) {
        return false;
      }
      continue;
    }
    if (!read_number(r, v, gi, o.key, d.*o.number, f32)) return false;
    if (o.float32_tensor) d.*o.float32_tensor = f32;
  }
  return true;
}

// optimizer.state[param] without inserting (state is a defaultdict) and, for the few
// entries of a model's optimizer, without hashing (a tensor's __hash__ is a Python
// call): compared by identity.
inline PyObject* state_of(PyObject* state, PyObject* param) {
  if (PyDict_Size(state) > 64) return PyDict_GetItem(state, param);  // borrowed
  Py_ssize_t pos = 0;
  PyObject *key, *value;
  while (PyDict_Next(state, &pos, &key, &value)) {
    if (key == param) return value;  // borrowed
  }
  return nullptr;
}

// Parameter `param`'s state for description D's options: the state tensors they use
// and the step count.
template <class D>
bool read_state(const Reader& r, const D& d, PyObject* opt_state, PyObject* param, const at::Tensor& p,
                const std::string& pname, ParamState& st, Created& created) {
  static const auto keys = intern_all(D::kState);
  static PyObject* const step_key = PyUnicode_InternFromString("step");
  PyObject* ps = state_of(opt_state, param);
  if (ps && !PyDict_Check(ps)) return r.type_error("the optimizer state of '", pname, "' is not a dict");
  const auto used = d.uses();
  for (size_t i = 0; i < D::kState.size(); ++i) {
    if (!used[i]) continue;
    PyObject* v = ps ? PyDict_GetItem(ps, keys[i]) : nullptr;
    if (v && compat::is_tensor(v)) {
      st.state[i] = compat::unpack(v);
      continue;
    }
    if constexpr (D::kFirstGradientFillsState) {
      if (!v || v == Py_None) {
        if (!ps) {  // optimizer.state[param]: the defaultdict makes the entry (torch.optim's step does too)
          pybind11::object made = pybind11::reinterpret_steal<pybind11::object>(PyObject_GetItem(opt_state, param));
          if (!made) throw pybind11::error_already_set();
          ps = made.ptr();  // held by opt_state
          if (!PyDict_Check(ps)) return r.type_error("the optimizer state of '", pname, "' is not a dict");
        }
        st.state[i] = at::empty_like(p, at::MemoryFormat::Contiguous);
        st.fresh = true;
        created.tensors.emplace_back(pybind11::reinterpret_borrow<pybind11::object>(ps), keys[i], st.state[i]);
        continue;
      }
    }
    return r.value_error("the optimizer state of '", pname, "' has no '", D::kState[i], "' tensor, which its param "
                         "group's options use (the state was created with other options)");
  }
  if constexpr (D::kStepCount) {
    PyObject* v = ps ? PyDict_GetItem(ps, step_key) : nullptr;
    if (!v || !compat::is_tensor(v)) {
      return r.value_error("the optimizer state of '", pname, "' has no 'step' tensor");
    }
    st.step = compat::unpack(v);
  }
  return true;
}

}  // namespace detail

// Reads `opt` (a torch.optim optimizer of description `name`) for `params` (null where
// the model has no such parameter): each one's group options and state into states[p].
// `names` name the parameters in messages. False: declined (never when strict).
inline bool read_optimizer(const Reader& r, PyObject* opt, const std::string& name,
                           const std::vector<PyObject*>& params, const std::vector<std::string>& names,
                           std::vector<ParamState>& states, Created& created) {
  static PyObject* const groups_key = PyUnicode_InternFromString("param_groups");
  static PyObject* const state_key = PyUnicode_InternFromString("state");
  static PyObject* const params_key = PyUnicode_InternFromString("params");
  static PyObject* const capturable_key = PyUnicode_InternFromString("capturable");
  static PyObject* const differentiable_key = PyUnicode_InternFromString("differentiable");
  AnyOptimizer fresh;
  if (!make_optimizer(name.c_str(), fresh)) return r.value_error("internal: no optimizer description '", name, "'");
  pybind11::object groups_obj = pybind11::reinterpret_steal<pybind11::object>(PyObject_GetAttr(opt, groups_key));
  pybind11::object state_obj = pybind11::reinterpret_steal<pybind11::object>(PyObject_GetAttr(opt, state_key));
  if (!groups_obj || !state_obj) {
    PyErr_Clear();
    return r.type_error("the optimizer has no param_groups or state");
  }
  PyObject* groups = groups_obj.ptr();
  PyObject* state = state_obj.ptr();
  if (!PyList_Check(groups) || !PyDict_Check(state)) return r.type_error("the optimizer's param_groups or state is odd");
  // Each parameter's group, found by identity; the optimizer holds exactly the model's parameters.
  Py_ssize_t held = 0, present = 0;
  for (Py_ssize_t gi = 0; gi < PyList_GET_SIZE(groups); ++gi) {
    PyObject* group = PyList_GET_ITEM(groups, gi);
    PyObject* plist = PyDict_Check(group) ? PyDict_GetItem(group, params_key) : nullptr;
    if (!plist || !PyList_Check(plist)) return r.type_error("param_groups[", gi, "]['params'] is not a list");
    held += PyList_GET_SIZE(plist);
  }
  std::vector<std::pair<Py_ssize_t, AnyOptimizer>> read_groups;  // groups read so far
  states.assign(params.size(), ParamState{});
  for (size_t p = 0; p < params.size(); ++p) {
    PyObject* obj = params[p];
    if (!obj) continue;
    ++present;
    Py_ssize_t gi = -1;
    for (Py_ssize_t g = 0; g < PyList_GET_SIZE(groups) && gi < 0; ++g) {
      PyObject* plist = PyDict_GetItem(PyList_GET_ITEM(groups, g), params_key);
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(plist); ++i) {
        if (PyList_GET_ITEM(plist, i) == obj) {
          gi = g;
          break;
        }
      }
    }
    if (gi < 0) return r.value_error("parameter '", names[p], "' is not in the optimizer");
    PyObject* group = PyList_GET_ITEM(groups, gi);
    ParamState& st = states[p];
    bool have = false;
    for (const auto& [g, rule] : read_groups) {
      if (g == gi) {
        st.rule = rule;
        have = true;
        break;
      }
    }
    if (!have) {
      for (PyObject* key : {capturable_key, differentiable_key}) {
        bool on = false;
        if (!detail::read_flag(r, PyDict_GetItem(group, key), on)) return false;
        if (on) {
          return r.value_error("param_groups[", gi, "] has ", PyUnicode_AsUTF8(key), "=True, which the fused trainer "
                               "does not support; train with opt.step()");
        }
      }
      st.rule = fresh;
      if (!std::visit([&](auto& d) { return detail::read_options(r, group, gi, d); }, st.rule)) return false;
      read_groups.emplace_back(gi, st.rule);
    }
    const at::Tensor& t = compat::unpack(obj);
    if (!std::visit([&](const auto& d) { return detail::read_state(r, d, state, obj, t, names[p], st, created); },
                    st.rule)) {
      return false;
    }
  }
  if (held != present) {
    return r.value_error("the optimizer holds ", held - present, " parameter(s) that are not part of the network");
  }
  return true;
}

// The optimizer's state and options for `params`, read strictly (the Python route).
inline std::vector<ParamState> read_strict(const char* fn, pybind11::handle optimizer, const std::string& name,
                                    pybind11::sequence params, pybind11::sequence names, Created& created) {
  std::vector<PyObject*> ptrs;
  std::vector<std::string> pnames;
  for (size_t p = 0; p < params.size(); ++p) {
    ptrs.push_back(params[p].is_none() ? nullptr : params[p].ptr());
    pnames.push_back(names[p].cast<std::string>());
    TORCH_CHECK_VALUE(params[p].is_none() || compat::is_tensor(ptrs.back()), fn, ": internal: parameter '",
                      pnames.back(), "' is not a tensor");
  }
  std::vector<ParamState> states;
  read_optimizer(Reader{fn, true}, optimizer.ptr(), name, ptrs, pnames, states, created);
  return states;
}

// What read_optimizer read for one parameter, as Python values (fusedgrad._C.read_optimizer).
inline pybind11::dict describe(const ParamState& st) {
  namespace py = pybind11;
  py::dict out, options;
  std::visit(
      [&](const auto& d) {
        using D = std::decay_t<decltype(d)>;
        for (const auto& o : D::options()) {
          if (o.flag) {
            options[o.key] = d.*o.flag;
          } else if (o.second) {
            options[o.key] = py::make_tuple(d.*o.number, d.*o.second);
          } else {
            options[o.key] = d.*o.number;
          }
        }
      },
      st.rule);
  py::list used;
  for (const char* key : used_state(st.rule)) {
    if (key) used.append(key);
  }
  if (has_step_count(st.rule)) used.append("step");
  out["optimizer"] = optimizer_name(st.rule);
  out["options"] = options;
  out["state"] = used;
  return out;
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
