// The fused training step: forward, squared loss, every parameter gradient
// and the optimizer update of K independent two-layer perceptrons, for any
// number of steps, in one call (fusedgrad.Trainer; K = 1 for a FusedMLP).
//
// Parameters are stacked with a leading model dimension: w1 (K, H, D),
// b1 (K, H), w2 (K, O, H), b2 (K, O) — a FusedMLP's (H, D) weight is K = 1 —
// each contiguous. Their gradients are written into `grads` (the parameters'
// .grad, same shapes), which after the call hold the last step's gradients,
// as after `opt.zero_grad(); loss.backward(); opt.step()`.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>
#include <variant>
#include <vector>

#include "../common/activation.h"
#include "optimizers.h"
#include "step_reducer.h"

namespace fusedgrad::trainer {

enum ParamIndex { kW1 = 0, kB1, kW2, kB2, kNumParams };

// scikit-learn's MLPRegressor defines two terms of a step that torch.optim does not, which
// fusedgrad.sklearn.MLPRegressor passes (fusedgrad/sklearn.py derives them): its L2 gradient
// alpha·W / n_b, a weight decay that depends on the step's rows n_b (so the last, shorter batch of
// an epoch has its own), and Adam's eps added to √v before the bias correction (torch adds it after:
// sklearn's step is torch's with eps_t = eps_hat / √(1 − β2^t)). Its loss also needs ‖W‖² before each
// step. Off unless set; one model only.
struct SklearnTerms {
  bool on = false;
  double decay_per_row = 0;  // the weights' weight_decay of a step = decay_per_row / rows of the step
  double eps_hat = -1;       // >= 0: Adam's eps of step t = eps_hat / √(1 − β2^t)
  at::Tensor weight_sq;      // float64 (num_steps,): Σ over the weights (not biases) of ‖W‖², before each step

  // A parameter's rule for one step: `rule` with the step's terms.
  AnyOptimizer rule_of(const AnyOptimizer& rule, bool weight, int64_t rows, double t) const {
    AnyOptimizer r = rule;
    std::visit(
        [&](auto& o) {
          if constexpr (requires { o.weight_decay; }) {
            if (weight && decay_per_row > 0) o.weight_decay = decay_per_row / static_cast<double>(rows);
          }
          if constexpr (requires { o.beta2; o.eps; }) {
            if (eps_hat >= 0) o.eps = eps_hat / std::sqrt(1.0 - std::pow(o.beta2, t));
          }
        },
        r);
    return r;
  }
};

// One parameter tensor's optimizer: its description with its group's options
// (optimizers.h) and its state, as torch.optim keeps it (binding_helpers.h reads both).
struct ParamState {
  AnyOptimizer rule;
  std::array<at::Tensor, kMaxState> state;  // the description's kState, undefined where unused
  at::Tensor step;         // the 0-dim float step count (incremented per step), where it keeps one
  bool fresh = false;      // the state holds nothing yet: the first gradient fills it (SGD's buffer)
};

struct TrainCall {
  std::array<at::Tensor, kNumParams> params;  // undefined where the model has no such parameter
  std::array<at::Tensor, kNumParams> grads;
  std::array<ParamState, kNumParams> state;
  at::Tensor x;       // (N, D) shared by every model, or (K, N, D)
  at::Tensor target;  // (N, O) or (K, N, O)
  // Rows of each step: full batch (all N rows in order) when batch_size is 0;
  // otherwise step s of the run takes batch b = s mod B of epoch e = s div B
  // (B = ceil(N / batch_size)): rows order[e·N + b·bs ...] (or b·bs ... in
  // order when `order` is undefined), the last batch of an epoch partial.
  int64_t batch_size = 0;
  at::Tensor order;          // int64 (epochs·N,), or undefined
  int64_t first_step = 0;    // index of this call's first step within the run
  int64_t num_steps = 0;
  bool mean = true;          // reduction "mean" (else "sum")
  Activation act = Activation::Sigmoid;  // the hidden layer's activation (common/activation.h)
  at::Tensor lr_scale;       // (K,) per-model factor on every group's lr, or undefined
  at::Tensor losses;         // (num_steps, K) written step by step
  at::Tensor steps_done;     // int64 (1,): steps completed so far (for interruption)
  // The data-parallel route (one model, narrow kernels): each step's sums all-reduced over the
  // ranks before the update (step_reducer.h); null otherwise.
  StepReducer* reducer = nullptr;
  SklearnTerms sklearn;  // fusedgrad.sklearn's step terms (above), off by default
};

// Writes a step count back into the optimizer's one-element float32 or float64 `step` tensor.
inline void write_step_count(const at::Tensor& step, double value) {
  if (step.scalar_type() == at::kFloat) {
    *step.data_ptr<float>() = static_cast<float>(value);
  } else {
    *step.data_ptr<double>() = value;
  }
}

// Validates the call (shapes, dtypes, contiguity, state) and raises
// ValueError / TypeError naming `fn` and the argument; then runs the steps.
// Validation writes nothing. `started`, when given, is set to true once it has
// passed, before the first write (losses, gradients, parameters, optimizer
// state, step counts): an error thrown while *started is still false left every
// tensor of the call as it was, so the call may be declined and retried by
// another route; an error thrown after may leave a step partly applied and must
// never be retried (csrc/trainer/train_bindings.cpp: run_released).
void train_steps(const char* fn, TrainCall& call, bool* started = nullptr);

// The kernel a trainer of one hidden layer runs for these widths (fusedgrad.explain, and
// fusedgrad.Trainer's choice of route): "trainer-engine" (the any-depth engine, through
// deep_train.cpp), else this file's "trainer-narrow-fixed" (the compile-time 1–2-input, 1-output σ
// kernel) or "trainer-narrow".
const char* train_path_name(int64_t D, int64_t H, int64_t O, Activation act);

// Whether train_path_name picks this file's narrow kernels ("trainer-narrow", "trainer-narrow-fixed").
bool narrow_kernel(int64_t D, int64_t H, int64_t O, Activation act);

// The full-batch sums of one step of a one-hidden-layer net with biases whose widths narrow_kernel
// accepts — dw1 | db1 | dw2 | db2 | Σ r², the gradients scaled by two_c: the engine's SumLayout for
// these widths — with this file's narrow kernels: the closure of the trainer's LBFGS (lbfgs.cpp) on
// the narrowest nets, whose outer layers the engine pads to whole vectors.
template <typename T>
void narrow_loss_sums(int64_t N, int64_t D, int64_t H, int64_t O, Activation act, const T* w1, const T* b1,
                      const T* w2, const T* b2, const T* x, const T* t, T two_c, std::vector<double>& sums);

// TEST-ONLY failure injection (fusedgrad._C._testing_fail_after_first_update,
// used by tests/test_no_double_update.py): while on, every run of
// train_steps throws a c10::Error right after the optimizer update of the
// first parameter (w1) of a step — a failure after writing has begun, as an
// out-of-memory in a GEMM of the step would be. Off unless a test turns it on.
void set_fail_after_first_update(bool on);

}  // namespace fusedgrad::trainer
