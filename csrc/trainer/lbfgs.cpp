// fusedgrad._C.lbfgs_steps: torch.optim.LBFGS's step(closure) — the whole
// iteration loop, the two-loop recursion and the strong-Wolfe line search — in
// C++ with the GIL released, `num_steps` times, the closure being the full-batch
// loss and gradients of the any-depth engine (engine/mlp_engine.h). Written as
// torch/optim/lbfgs.py writes it, operation by operation. The vectors are the
// flat parameters (61 numbers for the seed net): each ATen call on them costs
// ~1–2 µs of dispatch, and an iteration makes ~60 (the two-loop recursion alone
// 4 per history entry), so they are plain loops here (`Flat` below): dot
// products, norms and sums accumulated in double, updates in T. The scalars are
// doubles, as Python floats and float64 0-dim tensors are (a float32 network's
// LBFGS computes its 0-dim scalars and dot products in float32 in torch, in
// double here). Measured on the seed net (100×1→20→1, strong Wolfe, 50 steps):
// 71.7 µs per loss evaluation with ATen's vector ops, 6.8 µs with these, 4.7 with
// the closure on the trainer's rows-in-lanes kernel (narrow_loss_sums) instead
// of the engine, which pads the 1-wide input and output to whole vectors, 3.9
// with new vectors allocated without the dispatcher (Flat::fresh). LBFGS is not element-wise (its dot
// products couple every parameter), so it is not in the optimizer registry
// (optimizers.h); its state, optimizer.state[params[0]] (func_evals, n_iter, d, t, old_dirs, old_stps, ro,
// H_diag, prev_flat_grad, prev_loss, al), is read at the start of the call and
// written back at its end, so plain opt.step(closure) continues from it.
//
// Arguments (Python, built by fusedgrad/trainer.py): fn; state (the dict);
// group_params, group_grads (the optimizer's parameter order: its flat vectors'
// order); params, grads, names (the network's 2L order, None for a missing
// bias); x, target (N, ·); num_steps, mean, losses (num_steps,), steps_done,
// activation; the group's options by name.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>  // at::detail::empty_cpu
#include <torch/python.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"  // dtype_name
#include "../engine/mlp_engine.h"
#include "../engine/net_args.h"
#include "binding_helpers.h"
#include "train_step.h"  // narrow_loss_sums

namespace fusedgrad::trainer {
namespace {

namespace py = pybind11;

struct Options {
  double lr, tolerance_grad, tolerance_change;
  int64_t max_iter, max_eval, history_size;
  bool strong_wolfe;
};

// optimizer.state[params[0]], as torch keeps it (ro, H_diag, al as numbers).
struct State {
  int64_t func_evals = 0, n_iter = 0;
  at::Tensor d, prev_flat_grad;
  std::optional<double> t, H_diag, prev_loss;
  std::vector<at::Tensor> old_dirs, old_stps;
  std::vector<double> ro;
  bool have_history = false;  // old_dirs / old_stps / ro set
  std::vector<std::optional<double>> al;
  bool have_al = false;
};

// The flat vectors' operations as loops over contiguous tensors of T (all of them are: made by
// `fresh`, clone or the closure's gather).
template <typename T>
struct Flat {
  static const T* in(const at::Tensor& t) { return t.const_data_ptr<T>(); }
  static T* out(at::Tensor& t) { return t.data_ptr<T>(); }
  // A new CPU vector of n T's, allocated without the dispatcher (at::empty's dispatch was a measurable
  // part of an evaluation: the loop makes a few new vectors per evaluation, as torch's step does).
  static at::Tensor fresh(int64_t n) {
    return at::detail::empty_cpu({n}, c10::CppTypeToScalarType<T>::value, std::nullopt, std::nullopt, std::nullopt,
                                 std::nullopt);
  }
  static at::Tensor fresh(const at::Tensor& like) { return fresh(like.numel()); }
  static double dot(const at::Tensor& a, const at::Tensor& b) {
    const T *pa = in(a), *pb = in(b);
    double s = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) s += static_cast<double>(pa[i]) * static_cast<double>(pb[i]);
    return s;
  }
  static double abs_max(const at::Tensor& a) {
    const T* p = in(a);
    double m = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) {
      const double v = std::abs(static_cast<double>(p[i]));
      if (!(v <= m)) m = v;  // NaN propagates, as torch's max does
    }
    return m;
  }
  static double abs_sum(const at::Tensor& a) {
    const T* p = in(a);
    double s = 0;
    for (int64_t i = 0, n = a.numel(); i < n; ++i) s += std::abs(static_cast<double>(p[i]));
    return s;
  }
  // y += alpha · x
  static void axpy(at::Tensor& y, const at::Tensor& x, double alpha) {
    T* py = out(y);
    const T* px = in(x);
    const T a = static_cast<T>(alpha);
    for (int64_t i = 0, n = y.numel(); i < n; ++i) py[i] += a * px[i];
  }
  // alpha · a: a new vector
  static at::Tensor scaled(const at::Tensor& a, double alpha) {
    at::Tensor r = fresh(a);
    T* pr = out(r);
    const T* pa = in(a);
    const T al = static_cast<T>(alpha);
    for (int64_t i = 0, n = a.numel(); i < n; ++i) pr[i] = al * pa[i];
    return r;
  }
  static at::Tensor difference(const at::Tensor& a, const at::Tensor& b) {
    at::Tensor r = fresh(a);
    T* pr = out(r);
    const T *pa = in(a), *pb = in(b);
    for (int64_t i = 0, n = a.numel(); i < n; ++i) pr[i] = pa[i] - pb[i];
    return r;
  }
  static at::Tensor clone(const at::Tensor& a) {
    at::Tensor r = fresh(a);
    std::copy(in(a), in(a) + a.numel(), out(r));
    return r;
  }
};

// The closure: loss and gradients of the whole batch, the gradients written into the
// parameters' .grad (as zero_grad + backward leave them).
template <typename T>
struct Closure {
  const engine::NetArgs* net;
  engine::SumLayout lay;
  std::vector<at::Tensor> params, grads;  // 2L, undefined where no bias
  std::vector<at::Tensor> group_grads;    // the flat order
  const T* x;
  const T* target;
  int64_t N;
  double cscale;
  std::vector<double> sums;
  bool narrow;  // the trainer's rows-in-lanes kernels (narrow_loss_sums), decided once; else the engine

  Closure(const engine::NetArgs& n, std::vector<at::Tensor> p, std::vector<at::Tensor> g, std::vector<at::Tensor> gg,
          const at::Tensor& xt, const at::Tensor& tt, bool mean)
      : net(&n), lay(n.shape), params(std::move(p)), grads(std::move(g)), group_grads(std::move(gg)),
        x(xt.data_ptr<T>()), target(tt.data_ptr<T>()), N(xt.size(0)),
        cscale(mean ? 1.0 / static_cast<double>(xt.size(0) * n.shape.out()) : 1.0), sums(lay.size),
        narrow(n.shape.layers() == 2 && params[1].defined() && params[3].defined() &&
               narrow_kernel(n.shape.width[0], n.shape.width[1], n.shape.width[2], n.shape.act)) {}

  // float(closure()); the gradient, flat (_gather_flat_grad: a new tensor).
  double operator()(at::Tensor& flat_grad) {
    const int64_t L = net->shape.layers();
    // The narrowest one-hidden-layer nets (the seed fit) through the trainer's rows-in-lanes kernels,
    // whose sums have the engine's layout there; every other net through the engine.
    if (narrow) {
      const auto& w = net->shape.width;
      narrow_loss_sums<T>(N, w[0], w[1], w[2], net->shape.act, params[0].data_ptr<T>(), params[1].data_ptr<T>(),
                          params[2].data_ptr<T>(), params[3].data_ptr<T>(), x, target,
                          static_cast<T>(2.0 * cscale), sums);
    } else {
      engine::Pass<T> pass;
      pass.shape = &net->shape;
      for (int64_t l = 0; l < L; ++l) {
        pass.W.push_back(params[2 * l].data_ptr<T>());
        pass.b.push_back(params[2 * l + 1].defined() ? params[2 * l + 1].data_ptr<T>() : nullptr);
      }
      pass.x = x;
      pass.target = target;
      pass.first = 0;
      pass.count = N;
      pass.two_c = static_cast<T>(2.0 * cscale);
      pass.epilogue = engine::Epilogue::LossGrads;
      pass.sums = sums.data();
      pass.parallel = true;
      engine::run(pass);
    }
    for (int64_t p = 0; p < 2 * L; ++p) {
      if (!params[p].defined()) continue;
      T* g = grads[p].data_ptr<T>();
      const double* from = sums.data() + (p % 2 == 0 ? lay.dw[p / 2] : lay.db[p / 2]);
      for (int64_t e = 0, n = grads[p].numel(); e < n; ++e) g[e] = static_cast<T>(from[e]);
    }
    int64_t total = 0;
    for (const at::Tensor& g : group_grads) total += g.numel();
    flat_grad = Flat<T>::fresh(total);
    T* dst = flat_grad.data_ptr<T>();
    for (const at::Tensor& g : group_grads) dst = std::copy(g.const_data_ptr<T>(), g.const_data_ptr<T>() + g.numel(), dst);
    return static_cast<double>(static_cast<T>(cscale * sums[lay.loss]));
  }
};


// torch/optim/lbfgs.py: _cubic_interpolate.
double cubic_interpolate(double x1, double f1, double g1, double x2, double f2, double g2,
                         std::optional<std::pair<double, double>> bounds = std::nullopt) {
  double xmin_bound, xmax_bound;
  if (bounds) {
    xmin_bound = bounds->first;
    xmax_bound = bounds->second;
  } else if (x1 <= x2) {
    xmin_bound = x1;
    xmax_bound = x2;
  } else {
    xmin_bound = x2;
    xmax_bound = x1;
  }
  const double d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2);
  const double d2_square = d1 * d1 - g1 * g2;
  if (d2_square >= 0) {
    const double d2 = std::sqrt(d2_square);
    double min_pos;
    if (x1 <= x2) {
      min_pos = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2));
    } else {
      min_pos = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2));
    }
    return std::min(std::max(min_pos, xmin_bound), xmax_bound);
  }
  return (xmin_bound + xmax_bound) / 2.0;
}

template <typename T>
struct Lbfgs {
  Options o;
  State s;
  Closure<T>& closure;
  std::vector<at::Tensor> group_params;  // contiguous (checked by lbfgs_steps)
  using F = Flat<T>;

  void add_grad(double step_size, const at::Tensor& update) {  // _add_grad: p += step_size · its slice of update
    const T* u = F::in(update);
    const T a = static_cast<T>(step_size);
    for (at::Tensor& p : group_params) {
      T* pp = F::out(p);
      for (int64_t i = 0, n = p.numel(); i < n; ++i) pp[i] += a * u[i];
      u += p.numel();
    }
  }
  std::vector<at::Tensor> clone_param() {
    std::vector<at::Tensor> out;
    for (const at::Tensor& p : group_params) out.push_back(F::clone(p));
    return out;
  }
  void set_param(const std::vector<at::Tensor>& data) {
    for (size_t i = 0; i < group_params.size(); ++i) {
      std::copy(F::in(data[i]), F::in(data[i]) + data[i].numel(), F::out(group_params[i]));
    }
  }
  double directional_evaluate(const std::vector<at::Tensor>& x, double t, const at::Tensor& d, at::Tensor& flat) {
    add_grad(t, d);
    const double loss = closure(flat);
    set_param(x);
    return loss;
  }

  // _strong_wolfe: (f_new, g_new, t, ls_func_evals).
  int64_t strong_wolfe(const std::vector<at::Tensor>& x, double& t, const at::Tensor& d, double f, at::Tensor g,
                       double gtd, double& f_out, at::Tensor& g_out, int64_t max_ls) {
    const double c1 = 1e-4, c2 = 0.9, tolerance_change = 1e-9;
    const double d_norm = F::abs_max(d);
    g = F::clone(g);
    at::Tensor g_new;
    double f_new = directional_evaluate(x, t, d, g_new);
    int64_t ls_func_evals = 1;
    double gtd_new = F::dot(g_new, d);
    double t_prev = 0, f_prev = f, gtd_prev = gtd;
    at::Tensor g_prev = g;
    bool done = false;
    int64_t ls_iter = 0;
    std::vector<double> bracket, bracket_f, bracket_gtd;
    std::vector<at::Tensor> bracket_g;
    while (ls_iter < max_ls) {
      if (f_new > (f + c1 * t * gtd) || (ls_iter > 1 && f_new >= f_prev)) {
        bracket = {t_prev, t};
        bracket_f = {f_prev, f_new};
        bracket_g = {g_prev, F::clone(g_new)};
        bracket_gtd = {gtd_prev, gtd_new};
        break;
      }
      if (std::abs(gtd_new) <= -c2 * gtd) {
        bracket = {t};
        bracket_f = {f_new};
        bracket_g = {g_new};
        done = true;
        break;
      }
      if (gtd_new >= 0) {
        bracket = {t_prev, t};
        bracket_f = {f_prev, f_new};
        bracket_g = {g_prev, F::clone(g_new)};
        bracket_gtd = {gtd_prev, gtd_new};
        break;
      }
      const double min_step = t + 0.01 * (t - t_prev);
      const double max_step = t * 10;
      const double tmp = t;
      t = cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new, std::make_pair(min_step, max_step));
      t_prev = tmp;
      f_prev = f_new;
      g_prev = F::clone(g_new);
      gtd_prev = gtd_new;
      f_new = directional_evaluate(x, t, d, g_new);
      ls_func_evals += 1;
      gtd_new = F::dot(g_new, d);
      ls_iter += 1;
    }
    if (ls_iter == max_ls) {
      bracket = {0, t};
      bracket_f = {f, f_new};
      bracket_g = {g, g_new};
    }
    bool insuf_progress = false;
    int low_pos = 0, high_pos = 0;
    if (bracket_f.front() <= bracket_f.back()) {
      low_pos = 0;
      high_pos = 1;
    } else {
      low_pos = 1;
      high_pos = 0;
    }
    while (!done && ls_iter < max_ls) {
      if (std::abs(bracket[1] - bracket[0]) * d_norm < tolerance_change) break;
      t = cubic_interpolate(bracket[0], bracket_f[0], bracket_gtd[0], bracket[1], bracket_f[1], bracket_gtd[1]);
      const double bmax = std::max(bracket[0], bracket[1]), bmin = std::min(bracket[0], bracket[1]);
      const double eps = 0.1 * (bmax - bmin);
      if (std::min(bmax - t, t - bmin) < eps) {
        if (insuf_progress || t >= bmax || t <= bmin) {
          if (std::abs(t - bmax) < std::abs(t - bmin)) {
            t = bmax - eps;
          } else {
            t = bmin + eps;
          }
          insuf_progress = false;
        } else {
          insuf_progress = true;
        }
      } else {
        insuf_progress = false;
      }
      f_new = directional_evaluate(x, t, d, g_new);
      ls_func_evals += 1;
      gtd_new = F::dot(g_new, d);
      ls_iter += 1;
      if (f_new > (f + c1 * t * gtd) || f_new >= bracket_f[low_pos]) {
        bracket[high_pos] = t;
        bracket_f[high_pos] = f_new;
        bracket_g[high_pos] = F::clone(g_new);
        bracket_gtd[high_pos] = gtd_new;
        if (bracket_f[0] <= bracket_f[1]) {
          low_pos = 0;
          high_pos = 1;
        } else {
          low_pos = 1;
          high_pos = 0;
        }
      } else {
        if (std::abs(gtd_new) <= -c2 * gtd) {
          done = true;
        } else if (gtd_new * (bracket[high_pos] - bracket[low_pos]) >= 0) {
          bracket[high_pos] = bracket[low_pos];
          bracket_f[high_pos] = bracket_f[low_pos];
          bracket_g[high_pos] = bracket_g[low_pos];
          bracket_gtd[high_pos] = bracket_gtd[low_pos];
        }
        bracket[low_pos] = t;
        bracket_f[low_pos] = f_new;
        bracket_g[low_pos] = F::clone(g_new);
        bracket_gtd[low_pos] = gtd_new;
      }
    }
    t = bracket[low_pos];
    f_out = bracket_f[low_pos];
    g_out = bracket_g[low_pos];
    return ls_func_evals;
  }

  // One optimizer.step(closure); returns orig_loss.
  double step() {
    at::Tensor flat_grad;
    const double orig_loss = closure(flat_grad);
    double loss = orig_loss;
    int64_t current_evals = 1;
    s.func_evals += 1;
    bool opt_cond = F::abs_max(flat_grad) <= o.tolerance_grad;
    if (opt_cond) return orig_loss;
    at::Tensor d = s.d;
    std::optional<double> t = s.t;
    std::optional<double> H_diag = s.H_diag;
    std::optional<double> prev_loss = s.prev_loss;
    at::Tensor prev_flat_grad = s.prev_flat_grad;
    int64_t n_iter = 0;
    while (n_iter < o.max_iter) {
      n_iter += 1;
      s.n_iter += 1;
      if (s.n_iter == 1) {
        d = F::scaled(flat_grad, -1.0);
        s.old_dirs.clear();
        s.old_stps.clear();
        s.ro.clear();
        s.have_history = true;
        H_diag = 1.0;
      } else {
        TORCH_CHECK_VALUE(d.defined() && t && H_diag && prev_flat_grad.defined() && s.have_history,
                          "fusedgrad.Trainer: the LBFGS state is incomplete (n_iter > 0 without d, t, H_diag, "
                          "prev_flat_grad or old_dirs)");
        const at::Tensor y = F::difference(flat_grad, prev_flat_grad);
        const at::Tensor sv = F::scaled(d, *t);
        const double ys = F::dot(y, sv);
        if (ys > 1e-10) {
          if (static_cast<int64_t>(s.old_dirs.size()) == o.history_size) {
            s.old_dirs.erase(s.old_dirs.begin());
            s.old_stps.erase(s.old_stps.begin());
            s.ro.erase(s.ro.begin());
          }
          s.old_dirs.push_back(y);
          s.old_stps.push_back(sv);
          s.ro.push_back(1.0 / ys);
          H_diag = ys / F::dot(y, y);
        }
        const int64_t num_old = static_cast<int64_t>(s.old_dirs.size());
        if (!s.have_al) {
          s.al.assign(static_cast<size_t>(o.history_size), std::nullopt);
          s.have_al = true;
        }
        TORCH_CHECK_VALUE(static_cast<int64_t>(s.al.size()) >= num_old,
                          "fusedgrad.Trainer: the LBFGS state's 'al' is shorter than its history");
        at::Tensor q = F::scaled(flat_grad, -1.0);
        for (int64_t i = num_old - 1; i >= 0; --i) {
          s.al[i] = F::dot(s.old_stps[i], q) * s.ro[i];
          F::axpy(q, s.old_dirs[i], -*s.al[i]);
        }
        at::Tensor r = F::scaled(q, *H_diag);
        d = r;
        for (int64_t i = 0; i < num_old; ++i) {
          const double be_i = F::dot(s.old_dirs[i], r) * s.ro[i];
          F::axpy(r, s.old_stps[i], *s.al[i] - be_i);
        }
      }
      if (!prev_flat_grad.defined()) {
        prev_flat_grad = F::clone(flat_grad);
      } else {
        std::copy(F::in(flat_grad), F::in(flat_grad) + flat_grad.numel(), F::out(prev_flat_grad));
      }
      prev_loss = loss;
      if (s.n_iter == 1) {
        t = std::min(1.0, 1.0 / F::abs_sum(flat_grad)) * o.lr;
      } else {
        t = o.lr;
      }
      const double gtd = F::dot(flat_grad, d);
      if (gtd > -o.tolerance_change) break;
      int64_t ls_func_evals = 0;
      if (o.strong_wolfe) {
        const std::vector<at::Tensor> x_init = clone_param();
        double tt = *t;
        ls_func_evals = strong_wolfe(x_init, tt, d, loss, flat_grad, gtd, loss, flat_grad, o.max_eval - current_evals);
        t = tt;
        add_grad(*t, d);
        opt_cond = F::abs_max(flat_grad) <= o.tolerance_grad;
      } else {
        add_grad(*t, d);
        if (n_iter != o.max_iter) {
          loss = closure(flat_grad);
          opt_cond = F::abs_max(flat_grad) <= o.tolerance_grad;
          ls_func_evals = 1;
        }
      }
      current_evals += ls_func_evals;
      s.func_evals += ls_func_evals;
      if (n_iter == o.max_iter) break;
      if (current_evals >= o.max_eval) break;
      if (opt_cond) break;
      if (F::abs_max(d) * std::abs(*t) <= o.tolerance_change) break;
      if (std::abs(loss - *prev_loss) < o.tolerance_change) break;
    }
    s.d = d;
    s.t = t;
    s.H_diag = H_diag;
    s.prev_flat_grad = prev_flat_grad;
    s.prev_loss = prev_loss;
    return orig_loss;
  }
};

// ---------------------------------------------------------------------------------- the state dict
double as_number(py::handle h) {  // float(h): a float, an int or a one-element tensor
  PyObject* f = PyNumber_Float(h.ptr());
  if (!f) throw py::error_already_set();
  const double v = PyFloat_AS_DOUBLE(f);
  Py_DECREF(f);
  return v;
}

std::optional<double> number_or_none(const py::dict& st, const char* key) {
  if (!st.contains(key) || st[key].is_none()) return std::nullopt;
  return as_number(st[key]);  // a float or a 0-dim tensor (float() of it)
}

at::Tensor tensor_or_none(const py::dict& st, const char* key) {
  if (!st.contains(key) || st[key].is_none()) return at::Tensor();
  return st[key].cast<at::Tensor>();
}

State read_state(const py::dict& st) {
  State s;
  if (st.contains("func_evals")) s.func_evals = st["func_evals"].cast<int64_t>();
  if (st.contains("n_iter")) s.n_iter = st["n_iter"].cast<int64_t>();
  s.d = tensor_or_none(st, "d");
  s.prev_flat_grad = tensor_or_none(st, "prev_flat_grad");
  s.t = number_or_none(st, "t");
  s.H_diag = number_or_none(st, "H_diag");
  s.prev_loss = number_or_none(st, "prev_loss");
  if (st.contains("old_dirs") && !st["old_dirs"].is_none()) {
    s.have_history = true;
    for (py::handle h : st["old_dirs"].cast<py::list>()) s.old_dirs.push_back(h.cast<at::Tensor>());
    for (py::handle h : st["old_stps"].cast<py::list>()) s.old_stps.push_back(h.cast<at::Tensor>());
    for (py::handle h : st["ro"].cast<py::list>()) s.ro.push_back(as_number(h));
  }
  if (st.contains("al") && !st["al"].is_none()) {
    s.have_al = true;
    for (py::handle h : st["al"].cast<py::list>()) {
      s.al.push_back(h.is_none() ? std::nullopt : std::optional<double>(as_number(h)));
    }
  }
  return s;
}

// Numbers as 0-dim tensors of the parameters' dtype, as torch's step leaves ro, H_diag and al
// (t and prev_loss as floats).
void write_state(py::dict& st, const State& s, at::ScalarType dtype, bool stepped) {
  st["func_evals"] = s.func_evals;
  st["n_iter"] = s.n_iter;
  auto scalar = [&](double v) { return py::cast(at::scalar_tensor(v, at::TensorOptions().dtype(dtype))); };
  if (s.have_al) {
    py::list al;
    for (const auto& v : s.al) al.append(v ? scalar(*v) : py::none());
    st["al"] = al;
  }
  if (!stepped) return;  // every step returned at its first evaluation: torch writes nothing else
  st["d"] = s.d.defined() ? py::cast(s.d) : py::none();
  st["t"] = s.t ? py::cast(*s.t) : py::none();
  py::list dirs, stps, ro;
  for (const at::Tensor& t : s.old_dirs) dirs.append(py::cast(t));
  for (const at::Tensor& t : s.old_stps) stps.append(py::cast(t));
  for (double v : s.ro) ro.append(scalar(v));
  st["old_dirs"] = dirs;
  st["old_stps"] = stps;
  st["ro"] = ro;
  st["H_diag"] = s.H_diag ? (*s.H_diag == 1.0 && s.ro.empty() ? py::cast(1) : scalar(*s.H_diag)) : py::none();
  st["prev_flat_grad"] = s.prev_flat_grad.defined() ? py::cast(s.prev_flat_grad) : py::none();
  st["prev_loss"] = s.prev_loss ? py::cast(*s.prev_loss) : py::none();
}

template <typename T>
void run_lbfgs(const engine::NetArgs& net, Lbfgs<T>& lb, int64_t num_steps, const at::Tensor& losses,
               const at::Tensor& steps_done, bool& stepped) {
  T* out = losses.data_ptr<T>();
  for (int64_t step = 0; step < num_steps; ++step) {
    const int64_t before = lb.s.n_iter;
    out[step] = static_cast<T>(lb.step());
    stepped = stepped || lb.s.n_iter != before;
    if (steps_done.defined()) steps_done.data_ptr<int64_t>()[0] += 1;
  }
}

void lbfgs_steps(const std::string& fn, py::dict state, py::sequence group_params, py::sequence group_grads,
                 py::sequence params, py::sequence grads, const at::Tensor& x, const at::Tensor& target,
                 int64_t num_steps, bool mean, const at::Tensor& losses, py::handle steps_done,
                 const std::string& activation, double lr, int64_t max_iter, int64_t max_eval, double tolerance_grad,
                 double tolerance_change, int64_t history_size, bool strong_wolfe) {
  const int64_t P = static_cast<int64_t>(params.size());
  TORCH_CHECK_VALUE(P >= 2 && P % 2 == 0 && static_cast<int64_t>(grads.size()) == P &&
                        group_params.size() == group_grads.size(),
                    "fusedgrad: internal: lbfgs_steps takes 2L parameters and gradients");
  std::vector<at::Tensor> ps, gs, weights, gp, gg;
  std::vector<std::optional<at::Tensor>> biases;
  for (int64_t p = 0; p < P; ++p) {
    ps.push_back(optional_tensor(params[p]));
    gs.push_back(optional_tensor(grads[p]));
    if (p % 2 == 0) {
      weights.push_back(ps.back());
    } else {
      biases.push_back(ps.back().defined() ? std::optional<at::Tensor>(ps.back()) : std::nullopt);
    }
  }
  for (size_t i = 0; i < group_params.size(); ++i) {
    gp.push_back(group_params[i].cast<at::Tensor>());
    gg.push_back(group_grads[i].cast<at::Tensor>());
  }
  const engine::NetArgs net = engine::check_net(fn.c_str(), weights, biases, parse_activation(activation), 0);
  TORCH_CHECK_VALUE(x.dim() == 2 && target.dim() == 2 && x.size(0) == target.size(0) && x.size(0) > 0 &&
                        x.size(1) == net.shape.in() && target.size(1) == net.shape.out() && x.is_contiguous() &&
                        target.is_contiguous() && x.scalar_type() == net.dtype && target.scalar_type() == net.dtype,
                    fn, ": internal: x and target must be contiguous (N, D) and (N, O) of the parameters' dtype");
  TORCH_CHECK_VALUE(losses.numel() >= num_steps && losses.scalar_type() == net.dtype && losses.is_contiguous(), fn,
                    ": internal: the loss buffer is too small");
  TORCH_CHECK_VALUE(max_iter >= 1 && max_eval >= 1 && history_size >= 1, fn,
                    ": LBFGS needs max_iter, max_eval and history_size >= 1");
  const Options o{lr, tolerance_grad, tolerance_change, max_iter, max_eval, history_size, strong_wolfe};
  // The flat vectors are walked as raw arrays (Flat): every one must hold exactly the flat parameters.
  int64_t total = 0;
  for (size_t i = 0; i < gp.size(); ++i) {
    TORCH_CHECK_VALUE(gp[i].is_contiguous() && gg[i].is_contiguous() && gp[i].scalar_type() == net.dtype &&
                          gg[i].scalar_type() == net.dtype && gg[i].numel() == gp[i].numel(),
                      fn, ": internal: LBFGS parameters and gradients must be contiguous, of the network's dtype");
    total += gp[i].numel();
  }
  State s = read_state(state);
  auto flat = [&](const char* key, at::Tensor& t) {
    if (!t.defined()) return;
    TORCH_CHECK_VALUE(t.numel() == total && t.scalar_type() == net.dtype && t.device().is_cpu(), fn,
                      ": optimizer.state's '", key, "' must hold the ", total, " flat parameters' values as ",
                      dtype_name(net.dtype), " on the CPU, got a ", dtype_name(t.scalar_type()), " tensor of ",
                      t.numel(), " values on ", t.device());
    t = t.contiguous();
  };
  flat("d", s.d);
  flat("prev_flat_grad", s.prev_flat_grad);
  for (at::Tensor& t : s.old_dirs) flat("old_dirs", t);
  for (at::Tensor& t : s.old_stps) flat("old_stps", t);
  TORCH_CHECK_VALUE(s.old_dirs.size() == s.old_stps.size() && s.old_dirs.size() == s.ro.size(), fn,
                    ": optimizer.state's 'old_dirs', 'old_stps' and 'ro' must have the same length");
  const at::Tensor done = optional_tensor(steps_done);
  bool stepped = s.d.defined();
  auto go = [&](auto tag) {
    using T = decltype(tag);
    Closure<T> closure(net, ps, gs, gg, x, target, mean);
    Lbfgs<T> lb{o, std::move(s), closure, gp};
    {
      py::gil_scoped_release no_gil;
      at::NoGradGuard no_grad;
      run_lbfgs<T>(net, lb, num_steps, losses, done, stepped);
    }
    s = std::move(lb.s);
  };
  if (net.dtype == at::kFloat) {
    go(float{});
  } else {
    go(double{});
  }
  write_state(state, s, net.dtype, stepped);
  for (const at::Tensor& p : ps) {
    if (p.defined()) p.unsafeGetTensorImpl()->bump_version();
  }
}

}  // namespace

void register_lbfgs(py::module& m) {
  m.def(
      "lbfgs_steps",
      [](const std::string& fn, py::dict state, py::sequence group_params, py::sequence group_grads,
         py::sequence params, py::sequence grads, const at::Tensor& x, const at::Tensor& target, int64_t num_steps,
         bool mean, const at::Tensor& losses, py::handle steps_done, const std::string& activation, double lr,
         int64_t max_iter, int64_t max_eval, double tolerance_grad, double tolerance_change, int64_t history_size,
         bool strong_wolfe) {
        translating_errors(lbfgs_steps)(fn, state, group_params, group_grads, params, grads, x, target, num_steps,
                                        mean, losses, steps_done, activation, lr, max_iter, max_eval, tolerance_grad,
                                        tolerance_change, history_size, strong_wolfe);
      },
      py::arg("fn"), py::arg("state"), py::arg("group_params"), py::arg("group_grads"), py::arg("params"),
      py::arg("grads"), py::arg("x"), py::arg("target"), py::arg("num_steps"), py::arg("mean"), py::arg("losses"),
      py::arg("steps_done"), py::arg("activation"), py::kw_only(), py::arg("lr"), py::arg("max_iter"),
      py::arg("max_eval"), py::arg("tolerance_grad"), py::arg("tolerance_change"), py::arg("history_size"),
      py::arg("strong_wolfe"),
      "torch.optim.LBFGS's steps for fusedgrad.Trainer.fit, full batch (see csrc/trainer/lbfgs.cpp).");
}

}  // namespace fusedgrad::trainer
