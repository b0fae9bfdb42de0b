// Direct Python calls of the ops: fusedgrad._C.{mlp_loss, mlp,
// mlp_loss_and_grads, loss_backward}.
//
// Calling torch.ops.fusedgrad.<op> from Python parses every argument against
// the schema into a boxed stack (isinstance checks, IValue conversions): about
// a third of the whole small-shape op. These functions unpack the arguments
// themselves and call the *same* dispatcher ops through their typed handles,
// so autograd, dispatch modes (FakeTensorMode, FlopCounterMode, ...) and every
// backend behave exactly as through torch.ops.
//
// They take a call only when it needs nothing that only the Python path does,
// and otherwise return None so that fusedgrad.functional takes torch.ops
// (which also raises the argument errors): every tensor must be an exact
// torch.Tensor or nn.Parameter (a subclass may override __torch_function__),
// dense, with no TorchFunctionMode active, and the options must be known strings.
#include <torch/csrc/autograd/anomaly_mode.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <atomic>
#include <memory>
#include <optional>

#include "../common/options.h"
#include "../ops/handles.h"
#include "../ops/ensemble.h"    // check_ensemble_args, check_ensemble_backward_args
#include "../ops/op_kernels.h"  // check_problem_args, check_backward_args
#include "direct_calls.h"
#include "grad_hooks.h"
#include "torch_compat.h"  // every private torch internal this file reads
#include "../ops/engine_path.h"

namespace fusedgrad {
namespace {

namespace py = pybind11;
using at::Tensor;
using ops::OptTensor;

// An exact Tensor or Parameter, dense: the only objects taken here.
bool plain_tensor(PyObject* obj) {
  return compat::exact_tensor(obj) && compat::unpack(obj).layout() == at::kStrided;
}

// The tensor arguments of one call, unpacked; `ok` is false when the call must
// go through torch.ops instead.
struct TensorArgs {
  Tensor x, w1;
  OptTensor b1, w2, b2, target;
  bool ok = false;
};

bool unpack_optional(py::handle obj, OptTensor& out) {
  if (obj.is_none()) return true;
  if (!plain_tensor(obj.ptr())) return false;
  out = compat::unpack(obj.ptr());
  return true;
}

TensorArgs unpack(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
                  py::handle target) {
  TensorArgs a;
  if (compat::torch_function_mode_active()) return a;
  if (!plain_tensor(x.ptr()) || !plain_tensor(w1.ptr())) return a;
  a.x = compat::unpack(x.ptr());
  a.w1 = compat::unpack(w1.ptr());
  a.ok = unpack_optional(b1, a.b1) && unpack_optional(w2, a.w2) && unpack_optional(b2, a.b2) &&
      unpack_optional(target, a.target);
  return a;
}

// A string option as the op takes it; nullopt for anything but a known name
// (common/options.h), so that the Python path raises the error.
std::optional<c10::string_view> option_str(py::handle obj, bool activation) {
  if (!PyUnicode_Check(obj.ptr())) return std::nullopt;
  Py_ssize_t size = 0;
  const char* data = PyUnicode_AsUTF8AndSize(obj.ptr(), &size);
  if (data == nullptr) {
    PyErr_Clear();
    return std::nullopt;
  }
  const c10::string_view name(data, static_cast<size_t>(size));
  const bool known = activation ? find_activation(name).has_value() : find_reduction(name).has_value();
  return known ? std::optional<c10::string_view>(name) : std::nullopt;
}
std::optional<c10::string_view> reduction_code(py::handle obj) { return option_str(obj, false); }
std::optional<c10::string_view> activation_code(py::handle obj) { return option_str(obj, true); }

py::object wrap(Tensor t) {
  return py::reinterpret_steal<py::object>(compat::wrap(std::move(t)));
}

py::object mlp_loss(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
                    py::handle target, py::handle reduction, py::handle activation) {
  const TensorArgs a = unpack(x, w1, b1, w2, b2, target);
  const auto red = reduction_code(reduction);
  const auto act = activation_code(activation);
  if (!a.ok || !red || !act) return py::none();
  Tensor loss;
  {
    py::gil_scoped_release no_gil;
    loss = ops::mlp_loss().call(a.x, a.w1, a.b1, a.w2, a.b2, a.target, *red, *act);
  }
  return wrap(std::move(loss));
}

py::object mlp(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
               py::handle activation) {
  const TensorArgs a = unpack(x, w1, b1, w2, b2, py::none());
  const auto act = activation_code(activation);
  if (!a.ok || !act) return py::none();
  Tensor pred;
  {
    py::gil_scoped_release no_gil;
    pred = ops::mlp().call(a.x, a.w1, a.b1, a.w2, a.b2, *act);
  }
  return wrap(std::move(pred));
}

// The loss and the six gradients in argument order, moved out of the op's tuple.
struct LossAndGradList {
  Tensor loss;
  std::array<Tensor, 6> grads;
};

LossAndGradList call_loss_and_grads(const TensorArgs& a, c10::string_view red, c10::string_view act,
                                    const std::array<bool, 6>& mask) {
  py::gil_scoped_release no_gil;
  auto [loss, dx, dw1, db1, dw2, db2, dt] =
      ops::mlp_loss_and_grads().call(a.x, a.w1, a.b1, a.w2, a.b2, a.target, red, act, mask);
  return {std::move(loss),
          {std::move(dx), std::move(dw1), std::move(db1), std::move(dw2), std::move(db2), std::move(dt)}};
}

// (loss, (dx, dw1, db1, dw2, db2, dtarget)) with None where mask is false, as
// fusedgrad.mlp_loss_and_grads returns; `mask` comes from the Python wrapper,
// which resolves its `wrt` argument.
py::object mlp_loss_and_grads(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
                              py::handle target, py::handle reduction, py::handle activation,
                              std::array<bool, 6> mask) {
  const TensorArgs a = unpack(x, w1, b1, w2, b2, target);
  const auto red = reduction_code(reduction);
  const auto act = activation_code(activation);
  if (!a.ok || !red || !act) return py::none();
  LossAndGradList r = call_loss_and_grads(a, *red, *act, mask);
  py::tuple grads_out(6);
  for (size_t k = 0; k < 6; ++k) {
    grads_out[k] = mask[k] ? wrap(std::move(r.grads[k])) : py::none();
  }
  return py::make_tuple(wrap(std::move(r.loss)), grads_out);
}

// param.grad = grad if it has none, else param.grad += grad — what backward()
// does to a leaf (AccumulateGrad), without the engine.
void accumulate_grad(const Tensor& param, Tensor&& grad) {
  Tensor& slot = param.mutable_grad();
  if (!slot.defined()) {
    slot = std::move(grad);
  } else {
    at::NoGradGuard no_grad;
    slot.add_(grad);
  }
}

// Whether a Python hook dictionary (None or a dict) holds any hook.
bool has_entries(PyObject* dict) {
  return dict != nullptr && dict != Py_None && PyDict_Check(dict) && PyDict_Size(dict) > 0;
}

}  // namespace

unsigned grad_hook_flags(PyObject* obj) {
  namespace ag = torch::autograd;
  const Tensor& t = compat::unpack(obj);
  unsigned flags = 0;
  if (has_entries(compat::tensor_hook_dict(obj))) flags |= kTensorHook;
  if (has_entries(compat::post_accumulate_grad_hook_dict(obj))) flags |= kPostAccumulateGradHook;
  if (!t.requires_grad() || !t.is_leaf()) return flags;
  for (const auto& hook : ag::impl::hooks(t)) {
    if (!compat::is_python_tensor_pre_hook(*hook)) flags |= kCppTensorHook;
  }
  // A post-accumulate-grad hook set from C++ (impl::set_post_acc_grad_hooks): backward() runs it
  // after writing .grad, and Python's dictionary above does not show it.
  const std::unique_ptr<ag::PostAccumulateGradHook>& post = ag::impl::post_acc_grad_hooks(t);
  if (post && !compat::is_python_post_acc_grad_hooks(*post)) flags |= kCppTensorHook;
  // An accumulator exists only while something holds it (DDP's reducer does).
  const c10::intrusive_ptr<ag::Node> acc = ag::impl::try_get_grad_accumulator(t);
  if (!acc) return flags;
  for (const auto& hook : acc->pre_hooks()) {
    if (!compat::is_python_pre_hook(*hook)) {
      flags |= kAccumulatorCppHook;
    } else if (has_entries(static_cast<const ag::PyFunctionPreHook&>(*hook).dict)) {
      flags |= kAccumulatorPyHook;
    }
  }
  for (const auto& hook : acc->post_hooks()) {
    if (!compat::is_python_post_hook(*hook)) {
      flags |= kAccumulatorCppHook;
    } else if (has_entries(static_cast<const ag::PyFunctionPostHook&>(*hook).dict)) {
      flags |= kAccumulatorPyHook;
    }
  }
  return flags;
}

// For tests: a post-accumulate-grad hook set from C++, as a C++ extension would set one; it counts its calls.
std::atomic<int64_t> cpp_post_acc_hook_calls{0};
struct CountingPostAccumulateGradHook : torch::autograd::PostAccumulateGradHook {
  void operator()(const torch::autograd::Variable&) override { ++cpp_post_acc_hook_calls; }
};

unsigned accumulator_cpp_hook_count(PyObject* obj) {
  namespace ag = torch::autograd;
  const Tensor& t = compat::unpack(obj);
  if (!t.requires_grad() || !t.is_leaf()) return 0;
  const c10::intrusive_ptr<ag::Node> acc = ag::impl::try_get_grad_accumulator(t);
  if (!acc) return 0;
  unsigned count = 0;
  for (const auto& hook : acc->pre_hooks()) count += compat::is_python_pre_hook(*hook) ? 0 : 1;
  for (const auto& hook : acc->post_hooks()) count += compat::is_python_post_hook(*hook) ? 0 : 1;
  return count;
}

namespace {

// FusedMLP.loss_backward: the loss, and each parameter that requires grad
// accumulates its gradient in .grad. x and target get no gradient.
py::object loss_backward(py::handle x, py::handle w1, py::handle b1, py::handle w2, py::handle b2,
                         py::handle target, py::handle reduction, py::handle activation) {
  const TensorArgs a = unpack(x, w1, b1, w2, b2, target);
  const auto red = reduction_code(reduction);
  const auto act = activation_code(activation);
  if (!a.ok || !red || !act) return py::none();
  // backward() would run hooks (or anomaly mode's checks) that a direct .grad
  // write skips: the Python path takes the autograd route or explains.
  if (torch::autograd::AnomalyMode::is_enabled()) return py::none();
  for (py::handle p : {w1, b1, w2, b2}) {
    if (!p.is_none() && grad_hook_flags(p.ptr()) != 0) return py::none();
  }
  // Parameters in the op's argument order (x and target take no gradient).
  const std::array<const Tensor*, 6> params = {nullptr, &a.w1, a.b1 ? &*a.b1 : nullptr,
                                               a.w2 ? &*a.w2 : nullptr, a.b2 ? &*a.b2 : nullptr, nullptr};
  std::array<bool, 6> mask{};
  for (size_t k = 0; k < 6; ++k) {
    mask[k] = params[k] != nullptr && params[k]->requires_grad();
    // Gradients go to leaves; a computed weight (e.g. a parametrization) has
    // no .grad of its own to fill: the Python path explains.
    if (mask[k] && !params[k]->is_leaf()) return py::none();
  }
  LossAndGradList r = call_loss_and_grads(a, *red, *act, mask);
  for (size_t k = 0; k < 6; ++k) {
    if (mask[k]) accumulate_grad(*params[k], std::move(r.grads[k]));
  }
  return wrap(std::move(r.loss));
}

}  // namespace

void register_direct_calls(py::module_& m) {
  const char* declined = " Returns None when the call must go through torch.ops instead.";
  m.def("mlp_loss", &mlp_loss, (std::string("fusedgrad.mlp_loss without torch.ops' argument boxing.") + declined).c_str());
  m.def("mlp", &mlp, (std::string("fusedgrad.mlp without torch.ops' argument boxing.") + declined).c_str());
  m.def("mlp_loss_and_grads", &mlp_loss_and_grads,
        (std::string("fusedgrad.mlp_loss_and_grads with a resolved mask.") + declined).c_str());
  m.def("loss_backward", &loss_backward,
        (std::string("FusedMLP.loss_backward: loss, gradients accumulated into .grad.") + declined).c_str());
  m.def("grad_hook_flags", [](py::handle param) -> unsigned {
        if (!compat::is_tensor(param.ptr())) throw py::type_error("grad_hook_flags: expected a torch.Tensor");
        return grad_hook_flags(param.ptr());
      },
      "The GradHook bits (csrc/python/grad_hooks.h) of a tensor: hooks backward() would run that a direct "
      ".grad write skips. fusedgrad._hooks describes them.");
  m.def("_testing_set_cpp_post_accumulate_grad_hook", [](py::handle param) {
        if (!compat::is_tensor(param.ptr())) throw py::type_error("expected a torch.Tensor");
        const Tensor& t = compat::unpack(param.ptr());
        if (!t.requires_grad() || !t.is_leaf()) throw py::value_error("expected a leaf that requires grad");
        torch::autograd::impl::set_post_acc_grad_hooks(t, std::make_unique<CountingPostAccumulateGradHook>());
      },
      "For tests: sets a post-accumulate-grad hook from C++ on a leaf (replacing any Python ones); "
      "_testing_cpp_post_accumulate_grad_hook_calls() counts its calls.");
  m.def("_testing_cpp_post_accumulate_grad_hook_calls", [] { return cpp_post_acc_hook_calls.load(); });
  m.def("accumulator_cpp_hook_count", [](py::handle param) -> unsigned {
        if (!compat::is_tensor(param.ptr())) {
          throw py::type_error("accumulator_cpp_hook_count: expected a torch.Tensor");
        }
        return accumulator_cpp_hook_count(param.ptr());
      },
      "How many C++ hooks a leaf's gradient accumulator holds (DistributedDataParallel's reducer adds "
      "one per parameter): the fused trainer's DDP route replaces exactly that one.");
  m.attr("activations") = py::cast(activation_names());
  m.def("check_options",
        [](const std::optional<std::string>& reduction, const std::string& activation) {
          if (reduction) parse_reduction(*reduction);
          return activation_saves_input(parse_activation(activation));
        },
        "The ops' string options checked as the kernels check them (ValueError for an unknown name; "
        "reduction None: not checked), for the fake kernels. Returns whether the activation saves its input "
        "h (then mlp_forward's activations output holds h, even without w2).");
  m.def("check_problem_args", &check_problem_args,
        "The one-model ops' argument rules (csrc/ops/op_kernels.h), run by their fake kernels on fake or meta "
        "tensors: raises what the kernel would (reduction None: not checked), returns None.");
  m.def("check_backward_args", &check_backward_args,
        "mlp_backward's argument rules (csrc/ops/op_kernels.h), run by its fake kernel: raises what the kernel "
        "would, returns None.");
  m.def("check_ensemble_args", &ensemble::check_ensemble_args,
        "The ensemble ops' argument rules (csrc/ops/ensemble.h), run by their fake kernels; fn: the function "
        "named in messages (mlp_loss, mlp_loss_and_grads, mlp). Raises what the kernel would, returns None.");
  m.def("check_ensemble_backward_args", &ensemble::check_ensemble_backward_args,
        "ensemble_mlp_backward's argument rules (csrc/ops/ensemble.h), run by its fake kernel.");
  m.def("_set_engine_path_max_macs", &set_engine_path_max_macs,
        "Moves the CPU's engine/GEMM crossover of the one-hidden-layer ops (multiply-adds of one row's "
        "forward, D·H + H·O; 0: the GEMM path always; negative: the measured default) and returns the "
        "previous value. For benchmarks/crossover.py and the tests.");
}

}  // namespace fusedgrad
