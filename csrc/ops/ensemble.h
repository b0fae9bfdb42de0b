// K independent two-layer perceptrons in one call: the ensemble ops.
//
// Shapes (README "Math" per model; K models stacked along a leading dimension):
//
//   parameters carry the model dimension first, as stacked nn.Linear parameters:
//     w1 (K, H, D)     w2 (K, O, H)
//     b1 (K, H) one per model, read as (K, 1, H); or 3-D, broadcasting to (K, N, H):
//        per-sample (K, N, H), (K, 1, H), (K, N, 1), shared by all models (1, N, H), (1, 1, H), ...
//     b2 likewise against (K, N, O)
//   data are shared by all models or given per model:
//     x      (N, D) shared, or 3-D broadcasting to (K, N, D): (K, N, D) per model, (1, N, D) shared
//     target (N, O) (any 2-D shape broadcasting to it) shared, or 3-D broadcasting to (K, N, O)
//
// Model k is exactly the single-model problem built from the k-th slices; its
// loss is its own "mean" (÷ N·O) or "sum", so loss has shape (K,). Gradients
// are those of Σ_k L_k: a stacked argument's slice k gets model k's gradient
// alone, a shared argument gets the sum over models (summed in model order:
// deterministic).
//
// Every model runs the single-model kernels (kernels.h: the direct-loop path
// for small problems, the GEMM path above the crossover); the models are spread
// over threads. A per-model kernel running inside the parallel region runs its
// own parallel_for inline, so each model is computed exactly as alone.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"
#include "op_kernels.h"

namespace fusedgrad::ensemble {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Str = c10::string_view;

// One argument of the ensemble seen as a 3-D (Km, R, C) tensor, Km = K (one
// slice per model) or 1 (one slice shared by all models).
struct Operand {
  Tensor source;  // the user's tensor; undefined when the argument is None
  Tensor view3;   // (Km, R, C) view of source
  Tensor fixed;   // view3[0] when Km == 1 (taken once, not per model)
  bool stacked = false;  // slice k belongs to model k alone; else shared (gradient summed)

  bool present() const { return source.defined(); }
  Tensor slice(int64_t k) const { return fixed.defined() ? fixed : view3.select(0, k); }
  OptTensor opt_slice(int64_t k) const { return present() ? OptTensor(slice(k)) : std::nullopt; }
};

struct EnsembleProblem {
  int64_t K = 0, N = 0, D = 0, H = 0, O = 0;
  Operand x, w1, b1, w2, b2, target;
  Activation activation = Activation::Sigmoid;

  bool has_w2() const { return w2.present(); }
  const Operand& operand(int i) const {
    const Operand* all[6] = {&x, &w1, &b1, &w2, &b2, &target};
    return *all[i];
  }
};

// Validates every argument once (dtype, device, layout, rank, shapes, K) and
// raises ValueError / TypeError naming `fn` (the function the user called,
// e.g. "mlp_loss") and the argument. ensemble_problem.cpp.
EnsembleProblem make_ensemble_problem(
    const char* fn, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const OptTensor& target, Activation activation);

// The extra checks of the prediction's backward (grad_out, activations).
void check_backward_args(const char* fn, const EnsembleProblem& e, const Tensor& grad_out,
                         const Tensor& activations);

// The ensemble ops' argument rules, run by their fake kernels (fusedgrad/_fake_ensemble.py) on fake or
// meta tensors: the options (reduction nullopt: not checked), make_ensemble_problem naming `fn`, and the
// backward's own operands, as the kernels below run them.
void check_ensemble_args(const std::string& fn, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                         const OptTensor& w2, const OptTensor& b2, const OptTensor& target,
                         const std::optional<std::string>& reduction, const std::string& activation);
void check_ensemble_backward_args(const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                  const OptTensor& w2, const OptTensor& b2, const Tensor& activations,
                                  const std::string& activation);

// Model k's arguments, as the single-model ops take them.
struct ModelArgs {
  Tensor x, w1;
  OptTensor b1, w2, b2, target;
};

inline ModelArgs model_args(const EnsembleProblem& e, int64_t k) {
  return {e.x.slice(k), e.w1.slice(k), e.b1.opt_slice(k), e.w2.opt_slice(k), e.b2.opt_slice(k),
          e.target.opt_slice(k)};
}

// out is (K, M) contiguous; writes g (M elements, any layout) into row k.
inline void put_row(const Tensor& out, int64_t k, const Tensor& g) {
  const int64_t m = out.size(1);
  if (out.is_cpu() && g.is_cpu() && g.is_contiguous() && g.numel() == m &&
      g.scalar_type() == out.scalar_type()) {
    const size_t bytes = static_cast<size_t>(m) * out.element_size();
    if (bytes) {
      std::memcpy(static_cast<char*>(out.data_ptr()) + k * bytes, g.const_data_ptr(), bytes);
    }
    return;
  }
  out.select(0, k).copy_(g.reshape({m}));
}

// Σ_k parts[k], in model order (deterministic whatever the thread count), in
// the shape of `shape_of`.
inline Tensor sum_in_model_order(const std::vector<Tensor>& parts, const Tensor& shape_of) {
  Tensor out = at::zeros(shape_of.sizes(), shape_of.options().requires_grad(false));
  if (parts.empty()) return out;
  const int64_t m = out.numel();
  const bool raw = out.is_cpu() && std::all_of(parts.begin(), parts.end(), [&](const Tensor& p) {
    return p.is_cpu() && p.is_contiguous() && p.numel() == m && p.scalar_type() == out.scalar_type();
  });
  if (!raw) {
    for (const Tensor& p : parts) out.add_(p.reshape(shape_of.sizes()));
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fusedgrad_ensemble_sum", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (const Tensor& p : parts) {
      const scalar_t* src = p.const_data_ptr<scalar_t>();
      for (int64_t j = 0; j < m; ++j) o[j] += src[j];
    }
  });
  return out;
}

// Models per task: enough multiply-adds per task that splitting pays.
inline int64_t models_per_task(const EnsembleProblem& e) {
  const int64_t macs = std::max<int64_t>(1, e.N * (e.D * e.H + e.H * std::max<int64_t>(e.O, 1)));
  return std::max<int64_t>(1, 32768 / macs);
}

// How the gradients of the arguments that are shared by all models come back.
enum class Shared {
  Sum,       // summed over models, in the argument's own shape (the gradient of Σ_k L_k)
  PerModel,  // stacked (K, *argument's shape): model k's own gradient, for a later weighted sum
};

// The generic ensemble on top of a per-model backend. `PerModel` supplies
//   static constexpr bool kParallel          (models on threads, or in order on one stream)
//   LossAndGrads loss_and_grads(const ModelArgs&, Reduction, Activation, const LossGradMask&)
//   std::array<Tensor, 2> forward(const ModelArgs&, Activation)
//   std::array<Tensor, kNumMlpInputs> backward(const ModelArgs&, grad_out, activations, Activation, const MlpGradMask&)
template <class PerModel>
struct Ensemble {
  template <class Body>
  static void for_each_model(const EnsembleProblem& e, const Body& body) {
    auto run = [&](int64_t k0, int64_t k1) {
      for (int64_t k = k0; k < k1; ++k) body(k);
    };
    if (PerModel::kParallel) {
      // at::parallel_for does not carry thread-local state to its workers:
      // the ops run below autograd (the caller's dispatch-key TLS), and the
      // per-model slices and kernels must run there too, on every thread.
      const at::ThreadLocalState caller_state;
      at::parallel_for(0, e.K, models_per_task(e), [&](int64_t k0, int64_t k1) {
        at::ThreadLocalStateGuard guard(caller_state);
        run(k0, k1);
      });
    } else {
      run(0, e.K);
    }
  }

  // Outputs of gradients: stacked operands and PerModel shared ones get a (K, M)
  // buffer filled row by row; shared ones to be summed collect per-model parts.
  template <size_t NumInputs>
  struct GradCollector {
    std::array<Tensor, NumInputs> rows;
    std::array<std::vector<Tensor>, NumInputs> parts;
    std::array<const Operand*, NumInputs> ops{};
    std::array<bool, NumInputs> need{};
    Shared shared = Shared::Sum;

    void init(const EnsembleProblem& e, const std::array<const Operand*, NumInputs>& operands,
              const std::array<bool, NumInputs>& needed, Shared mode) {
      ops = operands;
      need = needed;
      shared = mode;
      const auto opts = e.x.source.options().requires_grad(false);
      for (size_t i = 0; i < NumInputs; ++i) {
        if (!need[i]) continue;
        const Operand& op = *ops[i];
        if (op.stacked || shared == Shared::PerModel) {
          const int64_t per_model = op.stacked ? op.source.numel() / std::max<int64_t>(e.K, 1)
                                               : op.source.numel();
          rows[i] = at::empty({e.K, per_model}, opts);
        } else {
          parts[i].resize(static_cast<size_t>(e.K));
        }
      }
    }
    void put(int64_t k, const std::array<Tensor, NumInputs>& grads) {
      for (size_t i = 0; i < NumInputs; ++i) {
        if (!need[i]) continue;
        if (rows[i].defined()) {
          put_row(rows[i], k, grads[i]);
        } else {
          parts[i][static_cast<size_t>(k)] = grads[i];
        }
      }
    }
    std::array<Tensor, NumInputs> finish(const Tensor& like) {
      std::array<Tensor, NumInputs> out;
      for (size_t i = 0; i < NumInputs; ++i) {
        if (!need[i]) {
          out[i] = at::empty({0}, like.options().requires_grad(false));
          continue;
        }
        const Operand& op = *ops[i];
        if (op.stacked) {
          out[i] = rows[i].view(op.source.sizes());
        } else if (shared == Shared::PerModel) {
          std::vector<int64_t> shape = {rows[i].size(0)};
          for (int64_t s : op.source.sizes()) shape.push_back(s);
          out[i] = rows[i].view(shape);
        } else {
          out[i] = sum_in_model_order(parts[i], op.source);
        }
      }
      return out;
    }
  };

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> loss_and_grads(
      const EnsembleProblem& e, Reduction reduction, std::array<bool, 6> need, Shared shared) {
    // A gradient for an argument that is None does not exist.
    for (int i = 0; i < kNumLossInputs; ++i) need[i] = need[i] && e.operand(i).present();
    const Tensor& like = e.x.source;
    Tensor loss = at::empty({e.K, 1}, like.options().requires_grad(false));
    GradCollector<kNumLossInputs> grads;
    grads.init(e, {&e.x, &e.w1, &e.b1, &e.w2, &e.b2, &e.target}, need, shared);
    for_each_model(e, [&](int64_t k) {
      LossAndGrads r = PerModel::loss_and_grads(model_args(e, k), reduction, e.activation, need);
      put_row(loss, k, r.loss);
      grads.put(k, r.grads);
    });
    auto g = grads.finish(like);
    return {loss.view({e.K}), g[kX], g[kW1], g[kB1], g[kW2], g[kB2], g[kTarget]};
  }

  static Tensor loss(const EnsembleProblem& e, Reduction reduction) {
    return std::get<0>(loss_and_grads(e, reduction, {}, Shared::Sum));
  }

  // (prediction (K, N, O), activations (K, N, H); empty without w2 where the
  // prediction is the activations themselves, as in the single-model op).
  static std::tuple<Tensor, Tensor> forward(const EnsembleProblem& e) {
    const auto opts = e.x.source.options().requires_grad(false);
    const bool with_acts = e.has_w2() || activation_saves_input(e.activation);
    Tensor pred = at::empty({e.K, e.N * e.O}, opts);
    Tensor acts = with_acts ? at::empty({e.K, e.N * e.H}, opts) : at::empty({0}, opts);
    for_each_model(e, [&](int64_t k) {
      auto out = PerModel::forward(model_args(e, k), e.activation);
      put_row(pred, k, out[0]);
      if (with_acts) put_row(acts, k, out[1]);
    });
    return {pred.view({e.K, e.N, e.O}), with_acts ? acts.view({e.K, e.N, e.H}) : acts};
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
      const EnsembleProblem& e, const Tensor& grad_out, const Tensor& activations, std::array<bool, 5> need) {
    const Operand* operands[5] = {&e.x, &e.w1, &e.b1, &e.w2, &e.b2};
    for (int i = 0; i < kNumMlpInputs; ++i) need[i] = need[i] && operands[i]->present();
    GradCollector<kNumMlpInputs> grads;
    grads.init(e, {&e.x, &e.w1, &e.b1, &e.w2, &e.b2}, need, Shared::Sum);
    for_each_model(e, [&](int64_t k) {
      grads.put(k, PerModel::backward(model_args(e, k), grad_out.select(0, k), activations.select(0, k),
                                      e.activation, need));
    });
    auto g = grads.finish(e.x.source);
    return {g[kMx], g[kMw1], g[kMb1], g[kMw2], g[kMb2]};
  }
};

// The ensemble ops' kernels, the same for every backend: validate once, then run
// the ensemble. The function names in messages are the ones the user called.
template <class PerModel>
struct EnsembleOpKernels {
  using E = Ensemble<PerModel>;

  static Tensor mlp_loss(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                         const OptTensor& b2, const OptTensor& target, Str reduction, Str activation) {
    const Reduction red = parse_reduction(reduction);
    const EnsembleProblem e = make_ensemble_problem("mlp_loss", x, w1, b1, w2, b2, target, parse_activation(activation));
    return E::loss(e, red);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_and_grads(
      const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
      const OptTensor& target, Str reduction, Str activation, std::array<bool, 6> output_mask) {
    const Reduction red = parse_reduction(reduction);
    const EnsembleProblem e =
        make_ensemble_problem("mlp_loss_and_grads", x, w1, b1, w2, b2, target, parse_activation(activation));
    return E::loss_and_grads(e, red, output_mask, Shared::Sum);
  }

  // The autograd node's forward: shared arguments' gradients per model.
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_forward(
      const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
      const OptTensor& target, Str reduction, Str activation, std::array<bool, 6> output_mask) {
    const Reduction red = parse_reduction(reduction);
    const EnsembleProblem e = make_ensemble_problem("mlp_loss", x, w1, b1, w2, b2, target, parse_activation(activation));
    return E::loss_and_grads(e, red, output_mask, Shared::PerModel);
  }

  static Tensor mlp(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
                    const OptTensor& b2, Str activation) {
    const EnsembleProblem e = make_ensemble_problem("mlp", x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
    return std::get<0>(E::forward(e));
  }

  static std::tuple<Tensor, Tensor> mlp_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                                const OptTensor& w2, const OptTensor& b2, Str activation) {
    const EnsembleProblem e = make_ensemble_problem("mlp", x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
    return E::forward(e);
  }

  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward(
      const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
      const OptTensor& b2, const Tensor& activations, Str activation, std::array<bool, 5> output_mask) {
    const EnsembleProblem e = make_ensemble_problem("mlp", x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
    check_backward_args("mlp", e, grad_out, activations);
    return E::backward(e, grad_out, activations, output_mask);
  }
};

}  // namespace fusedgrad::ensemble
