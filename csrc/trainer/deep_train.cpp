// fusedgrad._C.deep_train_steps: fusedgrad.Trainer's steps for networks of any
// depth — each step the engine's loss-and-gradients pass (engine/mlp_engine.h)
// over the step's rows, the gradients written into the parameters' .grad, then
// the optimizer's element-wise update (optimizers.h), all in one C++
// call with the GIL released.
//
// Arguments (Python, built by fusedgrad/trainer.py):
//   fn, optimizer, name  as train_bindings.cpp's train_steps: the optimizer is read
//                   here (binding_helpers.h: read_optimizer)
//   params, grads   2L-lists (W_1, b_1, …, W_L, b_L) of tensors or None (no bias)
//   names           2L-list of the parameters' names (for messages)
//   x, target       (N, D), (N, O) — or (K, N, ·) per model of an ensemble
//   batch_size, order, first_step, num_steps, mean, lr_scale, losses, steps_done,
//   activation, models (K; 0 for one unstacked model)
//   process_group   None, or the torch.distributed ProcessGroup of the data-parallel route:
//                   each step's sums are all-reduced before the update (step_reducer.h)
//   rank_means      with a process group: DistributedDataParallel's semantics (the mean over
//                   ranks of each rank's loss), else the reduction over all ranks' rows
//   sklearn         None, or fusedgrad.sklearn's step terms (train_step.h: SklearnTerms)
// The rows of a step, the loss history and the step counting are those of the
// one-hidden-layer trainer (train_step.h); with a process group, each rank takes the rows
// of the step from its own shard.
#include <ATen/Parallel.h>
#include <torch/python.h>

#include <algorithm>
#include <chrono>
#include <string>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"  // shape_str
#include "../engine/net_args.h"
#include "../engine/thread_team.h"
#include "binding_helpers.h"
#include "optimizers.h"
#include "plain_call.h"
#include "step_reducer.h"

namespace fusedgrad::trainer {
namespace {

// A call of fewer steps keeps no thread team: the team's probe (engine::TeamProbe: 8 steps timed) would
// be most of it. Its steps put their chunks on at::parallel_for where that pays.
constexpr int64_t kMinTeamSteps = 16;
// Models of an ensemble that step together: their updates run as one slice a parameter
// (update_kernel's fixed cost and tail paid once a group, not once a model).
constexpr int64_t kModelGroup = 16;

namespace py = pybind11;

struct DeepCall {
  engine::NetArgs net;
  int64_t K = 1;
  std::vector<at::Tensor> params, grads;  // 2L, undefined where a layer has no bias
  std::vector<ParamState> state;
  at::Tensor x, target, order, lr_scale, losses, steps_done;
  int64_t batch_size = 0, first_step = 0, num_steps = 0;
  bool mean = true;
  std::unique_ptr<StepReducer> reducer;  // the data-parallel route's all-reduce, or null
  SklearnTerms sklearn;                  // fusedgrad.sklearn's step terms (train_step.h), off by default
};

void check_state_tensor(const char* fn, const std::string& name, const char* key, const at::Tensor& t,
                        const at::Tensor& p) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": the optimizer state of '", name, "' has no '", key, "'");
  TORCH_CHECK_VALUE(t.scalar_type() == p.scalar_type() && t.device() == p.device() && t.sizes().equals(p.sizes()) &&
                        t.is_contiguous(),
                    fn, ": the optimizer state '", key, "' of '", name, "' must be a contiguous tensor of its "
                    "parameter's shape ", shape_str(p.sizes()), " and dtype, got ", shape_str(t.sizes()));
}

// Everything the loop relies on; the network's own checks are check_net's.
void check_call(const char* fn, const DeepCall& c, const std::vector<std::string>& names) {
  const int64_t P = static_cast<int64_t>(c.params.size());
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& t = c.params[p];
    if (!t.defined()) continue;
    TORCH_CHECK_VALUE(t.device().is_cpu(), fn, ": the fused trainer runs on the CPU; parameter '", names[p],
                      "' is on ", t.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": parameter '", names[p], "' must be contiguous");
    const at::Tensor& g = c.grads[p];
    TORCH_CHECK_VALUE(g.defined() && g.scalar_type() == t.scalar_type() && g.sizes().equals(t.sizes()) &&
                          g.is_contiguous(),
                      fn, ": internal: the gradient buffer of '", names[p], "' does not match its parameter");
    const ParamState& st = c.state[p];
    const auto used = used_state(st.rule);
    for (int i = 0; i < kMaxState; ++i) {
      if (used[i]) check_state_tensor(fn, names[p], used[i], st.state[i], t);
    }
    if (has_step_count(st.rule)) {
      TORCH_CHECK_VALUE(st.step.defined() && st.step.numel() == 1 && st.step.device().is_cpu() &&
                            (st.step.scalar_type() == at::kFloat || st.step.scalar_type() == at::kDouble),
                        fn, ": the optimizer state 'step' of '", names[p], "' must be a one-element float tensor "
                        "on the CPU");
    }
  }
  const engine::NetShape& s = c.net.shape;
  const bool stacked = c.x.dim() == 3;
  for (const auto& [name, t, width] : {std::tuple{"x", &c.x, s.in()}, std::tuple{"target", &c.target, s.out()}}) {
    TORCH_CHECK_TYPE(t->scalar_type() == c.net.dtype, fn, ": argument '", name, "' must have the parameters' dtype");
    TORCH_CHECK_VALUE(t->is_contiguous() && t->device().is_cpu(), fn, ": argument '", name,
                      "' must be a contiguous CPU tensor");
    TORCH_CHECK_VALUE((t->dim() == 2 || (t->dim() == 3 && t->size(0) == c.K)) && t->size(-1) == width &&
                          t->size(-2) == c.x.size(-2),
                      fn, ": argument '", name, "' has shape ", shape_str(t->sizes()), ", expected (N, ", width,
                      ") or (K, N, ", width, ") with x's N");
  }
  (void)stacked;
  TORCH_CHECK_VALUE(c.x.size(-2) > 0, fn, ": argument 'x' has no rows");
  TORCH_CHECK_VALUE(c.num_steps >= 0, fn, ": the number of steps must be >= 0");
  TORCH_CHECK_VALUE(c.losses.is_contiguous() && c.losses.scalar_type() == c.net.dtype &&
                        c.losses.numel() == c.num_steps * c.K,
                    fn, ": internal: the loss buffer must hold num_steps × K values");
  const int64_t N = c.x.size(-2);
  if (c.batch_size > 0 && c.order.defined()) {
    const int64_t per_epoch = (N + c.batch_size - 1) / c.batch_size;
    const int64_t last_epoch = (c.first_step + std::max<int64_t>(c.num_steps, 1) - 1) / per_epoch;
    TORCH_CHECK_VALUE(c.order.scalar_type() == at::kLong && c.order.is_contiguous() &&
                          c.order.numel() >= (last_epoch + 1) * N,
                      fn, ": internal: the batch order is too short");
    const bool in_range = (c.order.min().item<int64_t>() >= 0) && (c.order.max().item<int64_t>() < N);
    TORCH_CHECK_VALUE(in_range, fn, ": internal: the batch order holds a row index outside [0, ", N, ")");
  }
  TORCH_CHECK_VALUE(!c.sklearn.on || c.K == 1, fn, ": internal: scikit-learn's step terms are for one model");
  TORCH_CHECK_VALUE(!c.sklearn.weight_sq.defined() ||
                        (c.sklearn.weight_sq.scalar_type() == at::kDouble && c.sklearn.weight_sq.is_contiguous() &&
                         c.sklearn.weight_sq.numel() >= c.num_steps),
                    fn, ": internal: the ||W||^2 buffer must be float64 with a value per step");
  TORCH_CHECK_VALUE(!c.reducer || c.K == 1, fn, ": the data-parallel route trains one model; shard an ensemble's "
                    "models over the ranks instead (fusedgrad.distributed.shard_ensemble)");
  if (c.lr_scale.defined()) {
    TORCH_CHECK_VALUE(c.lr_scale.scalar_type() == at::kDouble && c.lr_scale.is_contiguous() &&
                          c.lr_scale.numel() == c.K,
                      fn, ": internal: lr_scale must be a contiguous float64 (K,) tensor");
  }
}

// One parameter slice's update (optimizers.h), compiled per CPU level.
FUSEDGRAD_CPU_CLONES void update_kernel(const AnyOptimizer& o, const AnyTerms& terms, double lr, float* p,
                                        const float* g, const StatePtrs<float>& st, bool fresh, int64_t n) {
  apply_update<float>(o, &terms, 0, lr, p, g, st, fresh, n);
}
FUSEDGRAD_CPU_CLONES void update_kernel(const AnyOptimizer& o, const AnyTerms& terms, double lr, double* p,
                                        const double* g, const StatePtrs<double>& st, bool fresh, int64_t n) {
  apply_update<double>(o, &terms, 0, lr, p, g, st, fresh, n);
}

double step_count(const at::Tensor& step) {
  if (!step.defined()) return 0;
  return step.scalar_type() == at::kFloat ? static_cast<double>(*step.data_ptr<float>()) : *step.data_ptr<double>();
}

template <typename T>
void run_steps(DeepCall& c) {
  const engine::NetShape& s = c.net.shape;
  const int64_t L = s.layers(), P = 2 * L, K = c.K, N = c.x.size(-2), D = s.in(), O = s.out();
  const engine::SumLayout lay(s);
  std::vector<int64_t> per_model(P, 0), sum_off(P, -1);
  std::vector<double> step0(P, 0);
  for (int64_t p = 0; p < P; ++p) {
    if (!c.params[p].defined()) continue;
    per_model[p] = c.params[p].numel() / K;
    sum_off[p] = p % 2 == 0 ? lay.dw[p / 2] : lay.db[p / 2];
    step0[p] = step_count(c.state[p].step);
  }
  const T* x = c.x.data_ptr<T>();
  const T* t = c.target.data_ptr<T>();
  const int64_t x_stride = c.x.dim() == 3 ? N * D : 0, t_stride = c.target.dim() == 3 ? N * O : 0;
  const int64_t* order = c.order.defined() ? c.order.data_ptr<int64_t>() : nullptr;
  const double* lr_scale = c.lr_scale.defined() ? c.lr_scale.data_ptr<double>() : nullptr;
  T* losses = c.losses.data_ptr<T>();

  const bool fail_injected = testing_fail_after_first_update();  // test-only (plain_call.h), read once a call
  // Every parameter's, gradient's and optimizer state's data, read once a call (model k's slice at
  // k · per_model): a model-step of a K = 256 ensemble is ~6 µs, and each data_ptr() a check.
  std::vector<T*> param_data(P, nullptr), grad_data(P, nullptr);
  std::vector<StatePtrs<T>> state_data(P, StatePtrs<T>{});
  for (int64_t p = 0; p < P; ++p) {
    if (!c.params[p].defined()) continue;
    param_data[p] = c.params[p].data_ptr<T>();
    grad_data[p] = c.grads[p].data_ptr<T>();
    for (int i = 0; i < kMaxState; ++i) {
      if (c.state[p].state[i].defined()) state_data[p][i] = c.state[p].state[i].data_ptr<T>();
    }
  }
  // Model k's step `step`: loss and gradients over the step's rows, the gradients written into .grad;
  // returns the step's row count. `pass`: the calling thread's, reused from step to step (its weight
  // lists allocated once).
  auto model_grads = [&](engine::Pass<T>& pass, int64_t k, int64_t step, double* sums, bool parallel,
                         const engine::ChunkRunner* team) -> int64_t {
    pass.shape = &s;
    pass.W.resize(L);
    pass.b.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      pass.W[l] = param_data[2 * l] + k * per_model[2 * l];
      pass.b[l] = param_data[2 * l + 1] ? param_data[2 * l + 1] + k * per_model[2 * l + 1] : nullptr;
    }
    // The rows of the step: full batch, or batch b of epoch e (train_step.h).
    const int64_t run_step = c.first_step + step;
    int64_t first = 0, count = N;
    const int64_t* index = nullptr;
    if (c.batch_size > 0) {
      const int64_t per_epoch = (N + c.batch_size - 1) / c.batch_size;
      const int64_t epoch = run_step / per_epoch, b = run_step % per_epoch;
      first = b * c.batch_size;
      count = std::min(c.batch_size, N - first);
      if (order) {
        index = order + epoch * N + first;
        first = 0;
      }
    }
    // c: the reduction's factor on the squared-error sum of this rank's rows; the pass scales the
    // gradients by `pre`, and `post` finishes the loss and gradients after an all-reduce.
    const double pre = c.reducer ? c.reducer->pre_scale(c.mean, count, O)
                                 : (c.mean ? 1.0 / static_cast<double>(count * O) : 1.0);
    double post = 1.0;
    pass.x = x + k * x_stride;
    pass.target = t + k * t_stride;
    pass.index = index;
    pass.first = first;
    pass.count = count;
    pass.two_c = static_cast<T>(2.0 * pre);
    pass.epilogue = engine::Epilogue::LossGrads;
    pass.sums = sums;
    pass.parallel = parallel;
    pass.runner = team;
    engine::run(pass);
    double loss = pre * sums[lay.loss];
    if (c.reducer) {  // the ranks' sums added (step_reducer.h)
      post = c.reducer->reduce(sums, lay.size, lay.loss, pre, count, c.mean, O);
      loss = post * sums[lay.loss];
    }
    losses[step * K + k] = static_cast<T>(loss);
    if (c.sklearn.weight_sq.defined()) {  // ‖W‖² before the update (one model: check_call)
      double sq = 0;
      for (int64_t p = 0; p < P; p += 2) {
        const T* w = c.params[p].data_ptr<T>();
        for (int64_t e = 0; e < per_model[p]; ++e) sq += static_cast<double>(w[e]) * w[e];
      }
      c.sklearn.weight_sq.data_ptr<double>()[step] = sq;
    }
    for (int64_t p = 0; p < P; ++p) {
      if (!c.params[p].defined()) continue;
      T* g = grad_data[p] + k * per_model[p];
      const double* from = sums + sum_off[p];
      for (int64_t e = 0; e < per_model[p]; ++e) g[e] = static_cast<T>(from[e] * post);
    }
    return count;
  };
  // The update of step `step` for models k0 … k1 − 1 (`count` rows a model): one update_kernel call a
  // parameter over the models' adjacent slices (an element-wise rule: each element's numbers are the
  // same as in a slice of its own model alone) — one call a model where each has its own lr scale.
  auto update = [&](int64_t k0, int64_t k1, int64_t step, int64_t count) {
    const int64_t run = lr_scale ? 1 : k1 - k0;  // models that share their lr
    for (int64_t r0 = k0; r0 < k1; r0 += run) {
      const double scale = lr_scale ? lr_scale[r0] : 1.0;
      // The step's terms (Adam: two pow) once for the parameters that share their
      // group's options and step count — usually all of them.
      const AnyOptimizer* last_rule = nullptr;
      double last_t = -1;
      AnyTerms last;
      for (int64_t p = 0; p < P; ++p) {
        if (!c.params[p].defined()) continue;
        const int64_t n = per_model[p], off = r0 * n;
        const ParamState& st = c.state[p];
        const double lr = optimizer_lr(st.rule) * scale;
        const double t_p = step0[p] + static_cast<double>(step + 1);
        if (!(last_rule && t_p == last_t && *last_rule == st.rule)) {
          last = step_terms(st.rule, t_p);
          last_rule = &st.rule;
          last_t = t_p;
        }
        // fusedgrad.sklearn's step terms change the rule's weight decay and eps, not its terms
        AnyOptimizer sklearn_rule;
        if (c.sklearn.on) sklearn_rule = c.sklearn.rule_of(st.rule, p % 2 == 0, count, t_p);
        const AnyOptimizer& rule = c.sklearn.on ? sklearn_rule : st.rule;
        StatePtrs<T> sp{};
        for (int i = 0; i < kMaxState; ++i) sp[i] = state_data[p][i] ? state_data[p][i] + off : nullptr;
        update_kernel(rule, last, lr, param_data[p] + off, grad_data[p] + off, sp, st.fresh && step == 0, run * n);
        TORCH_CHECK(!fail_injected, "fusedgrad: test-only failure injected after the update of parameter ", p,
                    " (fusedgrad._C._testing_fail_after_first_update)");
      }
    }
  };
  if (K == 1) {
    std::vector<double> sums(lay.size);
    engine::Pass<T> pass;
    const int64_t rows = c.batch_size > 0 ? std::min(c.batch_size, N) : N;
    auto steps = [&](const engine::ChunkRunner* team) {
      engine::TeamProbe probe(static_cast<const engine::ThreadTeam*>(team), !engine::team_always_pays(s, rows));
      for (int64_t step = 0; step < c.num_steps; ++step) {
        const bool timed = probe.timing(step);  // the clock is read only for the probe's steps
        const auto start = timed ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
        update(0, 1, step, model_grads(pass, 0, step, sums.data(), /*parallel=*/true, probe.runner(step)));
        if (timed) {
          probe.record(step, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
        }
        if (c.steps_done.defined()) c.steps_done.data_ptr<int64_t>()[0] += 1;
      }
    };
    // Several steps whose rows split into chunks: one thread team for the whole call, which runs
    // each step's chunks without at::parallel_for's fork and join (thread_team.h). Not under the
    // data-parallel route, whose steps wait on an all-reduce anyway.
    const int64_t team = c.num_steps >= kMinTeamSteps && !c.reducer ? engine::team_threads(s, rows, sizeof(T)) : 1;
    if (team > 1) {
      engine::ThreadTeam::lead(team, steps);
    } else {
      steps(nullptr);
    }
  } else {
    // Whole models in parallel, each model's steps on one thread: the chunks of
    // a pass are the same either way, so are the bits. A group of kModelGroup models
    // steps together: each model's gradients, then one update of the group's slices.
    at::parallel_for(0, K, 1, [&](int64_t k0, int64_t k1) {
      std::vector<double> sums(lay.size);
      engine::Pass<T> pass;
      for (int64_t g0 = k0; g0 < k1; g0 += kModelGroup) {
        const int64_t g1 = std::min(k1, g0 + kModelGroup);
        for (int64_t step = 0; step < c.num_steps; ++step) {
          int64_t count = 0;  // the same for every model: the step's rows
          for (int64_t k = g0; k < g1; ++k) {
            count = model_grads(pass, k, step, sums.data(), /*parallel=*/false, nullptr);
          }
          update(g0, g1, step, count);
        }
      }
    });
    if (c.steps_done.defined()) c.steps_done.data_ptr<int64_t>()[0] += c.num_steps;
  }
  // The step counts, once per parameter tensor (all models share it).
  for (int64_t p = 0; p < P; ++p) {
    const at::Tensor& st = c.state[p].step;
    if (!c.params[p].defined() || !st.defined()) continue;
    write_step_count(st, step0[p] + static_cast<double>(c.num_steps));
  }
}

// What a call runs, besides the network and its optimizer.
void set_run(DeepCall& c, const at::Tensor& x, const at::Tensor& target, int64_t batch_size, py::handle order,
             int64_t first_step, int64_t num_steps, bool mean, const at::Tensor& losses, py::handle steps_done) {
  c.x = x;
  c.target = target;
  c.batch_size = batch_size;
  c.order = optional_tensor(order);
  c.first_step = first_step;
  c.num_steps = num_steps;
  c.mean = mean;
  c.losses = losses;
  c.steps_done = optional_tensor(steps_done);
}

// The call's steps, with the GIL released.
// A failure once the steps began (after the checks: parameters, .grad and optimizer state may
// be partly written) is raised as such and never declined to the Python route (plain_call.h).
void run_released(const std::string& fn, DeepCall& c) {
  try {
    py::gil_scoped_release no_gil;
    if (c.net.dtype == at::kFloat) {
      run_steps<float>(c);
    } else {
      run_steps<double>(c);
    }
  } catch (const c10::Error& e) {
    raise_partly_applied(fn, e.what_without_backtrace());
  }
}

void deep_train_steps(const std::string& fn, py::handle optimizer, const std::string& name, py::sequence params,
                      py::sequence grads, py::sequence names, const at::Tensor& x, const at::Tensor& target, int64_t batch_size,
                      py::handle order, int64_t first_step, int64_t num_steps, bool mean, py::handle lr_scale,
                      const at::Tensor& losses, py::handle steps_done, const std::string& activation, int64_t models,
                      py::handle process_group, bool rank_means, py::handle sklearn) {
  const int64_t P = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(P >= 2 && P % 2 == 0 && static_cast<int64_t>(grads.size()) == P &&
                        static_cast<int64_t>(names.size()) == P,
                    "fusedgrad: internal: deep_train_steps takes 2L parameters, gradients and names");
  DeepCall c;
  Created created;
  c.state = read_strict(fn.c_str(), optimizer, name, params, names, created);
  std::vector<at::Tensor> weights;
  std::vector<std::optional<at::Tensor>> biases;
  std::vector<std::string> pnames;
  NewGrads new_grads;  // for a parameter whose .grad is None (plain_call.h)
  for (int64_t p = 0; p < P; ++p) {
    c.params.push_back(optional_tensor(params[p]));
    c.grads.push_back(optional_tensor(grads[p]));
    if (c.params[p].defined() && !c.grads[p].defined()) c.grads[p] = new_grads.make(c.params[p]);
    pnames.push_back(names[p].cast<std::string>());
    if (p % 2 == 0) {
      TORCH_CHECK_VALUE(c.params[p].defined(), fn, ": parameter '", pnames[p], "' is missing");
      weights.push_back(c.params[p]);
    } else {
      biases.push_back(c.params[p].defined() ? std::optional<at::Tensor>(c.params[p]) : std::nullopt);
    }
  }
  c.net = engine::check_net(fn.c_str(), weights, biases, parse_activation(activation), models);
  c.K = std::max<int64_t>(models, 1);
  set_run(c, x, target, batch_size, order, first_step, num_steps, mean, losses, steps_done);
  c.lr_scale = optional_tensor(lr_scale);
  c.sklearn = sklearn_terms(sklearn);
  if (!process_group.is_none()) {
    c.reducer = make_step_reducer(fn.c_str(), process_group);
    c.reducer->rank_means = rank_means;
  }
  check_call(fn.c_str(), c, pnames);
  run_released(fn, c);
  created.store();
  new_grads.store();
}

// Trainer.fit's and Trainer.step's common case for one network of any depth, read
// straight from its parameters and optimizer as train_bindings.cpp's train_steps_fast
// does for one hidden layer: false (nothing written) sends the call to the Python
// route, which then raises what is wrong — or runs what needs it (hooks, anomaly mode,
// a tensor lr, a parameter's .grad of another layout). An error after the steps began
// is raised, never declined (a rerun would apply a step twice).
bool deep_train_steps_fast(const std::string& fn, py::handle optimizer, const std::string& name, py::tuple params, const at::Tensor& x,
                           const at::Tensor& target, int64_t batch_size, py::handle order, int64_t first_step,
                           int64_t num_steps, bool mean, const at::Tensor& losses, py::handle steps_done,
                           const std::string& activation) {
  const int64_t P = static_cast<int64_t>(params.size());
  if (P < 4 || P % 2 != 0 || !plain_optimizer(optimizer.ptr())) return false;
  const std::optional<Activation> act = find_activation(activation);
  if (!act) return false;
  DeepCall c;
  std::vector<PyObject*> ptrs(P, nullptr);
  NewGrads new_grads;  // as deep_train_steps makes them
  std::vector<at::Tensor> weights;
  std::vector<std::optional<at::Tensor>> biases;
  for (int64_t p = 0; p < P; ++p) {
    PyObject* obj = params[p].ptr();
    if (obj == Py_None) {
      if (p % 2 == 0) return false;  // a weight is never missing
      c.params.emplace_back();
      c.grads.emplace_back();
      biases.push_back(std::nullopt);
      continue;
    }
    at::Tensor t, g;
    if (!plain_param(obj, new_grads, t, g)) return false;
    // The engine's steps read both in place: a CPU parameter and a .grad of its layout.
    if (!t.device().is_cpu() || !t.is_contiguous() || g.scalar_type() != t.scalar_type() ||
        !g.sizes().equals(t.sizes()) || !g.is_contiguous() || g.device() != t.device()) {
      return false;
    }
    c.params.push_back(t);
    c.grads.push_back(g);
    ptrs[p] = obj;
    if (p % 2 == 0) {
      weights.push_back(t);
    } else {
      biases.push_back(t);
    }
  }
  // Names only for the checks' messages, which a declined call never shows.
  std::vector<std::string> names;
  for (int64_t p = 0; p < P; ++p) names.push_back(p % 2 == 0 ? "weight" : "bias");
  Created created;
  if (!read_optimizer(Reader{"fusedgrad.Trainer", false}, optimizer.ptr(), name, ptrs, names, c.state, created)) {
    return false;
  }
  set_run(c, x, target, batch_size, order, first_step, num_steps, mean, losses, steps_done);
  try {
    c.net = engine::check_net("fusedgrad.Trainer", weights, biases, *act, /*models=*/0);
    check_call("fusedgrad.Trainer", c, names);
  } catch (const c10::Error&) {
    return false;  // nothing written: the Python route raises the error with the parameters' names
  }
  run_released(fn, c);
  created.store();
  new_grads.store();
  mark_stepped(optimizer.ptr());
  return true;
}

// Trainer.step's common case for any depth, as train_bindings.cpp's train_step_fast
// for one hidden layer: x and target taken as given (2-D, no Python preparation),
// the one step run through deep_train_steps_fast, its loss returned (0-dim). None
// sends the call to the Python route (which prepares (*, D) inputs, handles the
// rest or raises); like the route it takes, it declines only before writing anything.
// (1→[20]×3→1, 100 rows: 63.5 µs a step() through the Python route, 34 of them the
// C++ call, 11 preparing x and target.)
py::object deep_train_step_fast(py::handle optimizer, const std::string& name, py::tuple params, py::handle x,
                                py::handle target, bool mean, const std::string& activation) {
  if (!compat::exact_tensor(x.ptr()) || !compat::exact_tensor(target.ptr())) return py::none();
  const at::Tensor& xt = compat::unpack(x.ptr());
  const at::Tensor& tt = compat::unpack(target.ptr());
  if (xt.dim() != 2 || tt.dim() != 2 || xt.requires_grad() || tt.requires_grad()) return py::none();
  const at::Tensor losses = at::empty({}, xt.options());  // check_call declines a dtype not the parameters'
  if (!deep_train_steps_fast("fusedgrad.Trainer.step", optimizer, name, params, xt, tt, /*batch_size=*/0,
                             py::none(), /*first_step=*/0, /*num_steps=*/1, mean, losses, py::none(), activation)) {
    return py::none();
  }
  return py::cast(losses);
}

}  // namespace

void register_deep_trainer(py::module& m) {
  m.def("deep_train_step_fast", &deep_train_step_fast,
        "Trainer.step's common case for any depth, read straight from the parameters and optimizer; None: take "
        "the Python route (csrc/trainer/deep_train.cpp).");
  m.def("deep_train_steps_fast", &deep_train_steps_fast,
        "Trainer's common case for any depth, read straight from the parameters and optimizer; False: take the "
        "Python route (csrc/trainer/deep_train.cpp).");
  m.def(
      "deep_train_steps",
      [](const std::string& fn, py::handle optimizer, const std::string& name, py::sequence params,
         py::sequence grads, py::sequence names, const at::Tensor& x, const at::Tensor& target, int64_t batch_size, py::handle order, int64_t first_step,
         int64_t num_steps, bool mean, py::handle lr_scale, const at::Tensor& losses, py::handle steps_done,
         const std::string& activation, int64_t models, py::handle process_group, bool rank_means,
         py::handle sklearn) {
        translating_errors(deep_train_steps)(fn, optimizer, name, params, grads, names, x, target, batch_size, order,
                                             first_step, num_steps, mean, lr_scale, losses, steps_done, activation,
                                             models, process_group, rank_means, sklearn);
      },
        "Fused training steps of fusedgrad.Trainer for any depth (see csrc/trainer/deep_train.cpp).");
}

}  // namespace fusedgrad::trainer
