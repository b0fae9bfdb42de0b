// The optimizer registry of fusedgrad.Trainer: one description per torch.optim
// optimizer the fused steps run, each with
//   kName        the name fusedgrad/_optimizers.py gives it (its Python mirror:
//                the torch.optim classes and how torch creates the state),
//   kState       the names of its per-parameter state tensors in optimizer.state[p],
//   kStepCount   whether optimizer.state[p]['step'] counts its steps,
//   kFirstGradientFillsState  whether a missing state tensor is made from the first
//                gradient (SGD's momentum buffer) rather than created by torch beforehand,
//   options()    its param_groups options: key, field, required or not — the one
//                reader (binding_helpers.h) reads every description through it,
//   uses()       which of its state tensors these options use,
//   terms(t) / scalars(terms, lr)  the per-step numbers of step t (counted from 1):
//                what does not depend on lr once per step, then those of one lr,
//   update<T>()  its vectorised element-wise update of n elements, in place,
// written as torch/optim/*.py's single-tensor functions write them (the foreach
// and fused forms compute the same formulas). Python floats (the hyper-parameters,
// bias corrections, decayed learning rates) are computed in double, as Python
// does, and rounded to the parameter's dtype where ATen's tensor-scalar ops round
// them. Adding an element-wise optimizer is one struct here, one entry of
// AnyOptimizer below, and its Python description in fusedgrad/_optimizers.py.
//
// The loops must vectorise (a scalar sqrt and two divisions per element made
// Adam 14 % of an ensemble's step): every option is read into a local before the
// loop and applied by a select, and the optional state is a template parameter,
// so no branch and no store depends on a run-time condition inside the loop.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <variant>

#include "../common/cpu_vector.h"

namespace fusedgrad::trainer {

constexpr int kMaxState = 3;  // state tensors of any description

// A param_groups option of description D: a number (two for a pair such as betas) or a flag;
// `required`: torch.optim's step reads it as group[key] (else a missing key keeps the field's
// default, as an old state dict gives); `float32_tensor`: set when the value is a float32 tensor.
template <class D>
struct Option {
  const char* key;
  double D::*number = nullptr;
  double D::*second = nullptr;
  bool D::*flag = nullptr;
  bool required = false;
  bool D::*float32_tensor = nullptr;
};

template <class D>
constexpr Option<D> number(const char* key, double D::*field, bool required = false,
                           bool D::*float32_tensor = nullptr) {
  return {key, field, nullptr, nullptr, required, float32_tensor};
}
template <class D>
constexpr Option<D> pair(const char* key, double D::*first, double D::*second, bool required = false) {
  return {key, first, second, nullptr, required, nullptr};
}
template <class D>
constexpr Option<D> flag(const char* key, bool D::*field) {
  return {key, nullptr, nullptr, field, false, nullptr};
}
constexpr bool kRequired = true;

// State pointers of one slice, by the description's kState order (null where unused).
template <typename T>
using StatePtrs = std::array<T*, kMaxState>;

// ATen's lerp: self + w (end − self) for |w| < 0.5, else end − (end − self)(1 − w).
template <typename T>
FUSEDGRAD_CPU_INLINE T lerp(T self, T end, T w) {
  return std::abs(w) < T(0.5) ? self + w * (end - self) : end - (end - self) * (T(1) - w);
}

// ---------------------------------------------------------------------------------- SGD
// (lr, momentum μ, dampening τ, weight_decay λ, nesterov, maximize):
//   g ← −g if maximize;   g ← g + λ p
//   b ← g at the first step, else b ← μ b + (1 − τ) g
//   g ← g + μ b if nesterov, else g ← b
//   p ← p − lr g
struct SGD {
  static constexpr const char* kName = "sgd";
  static constexpr std::array<const char*, 1> kState{"momentum_buffer"};
  static constexpr bool kStepCount = false;
  static constexpr bool kFirstGradientFillsState = true;
  double lr = 0, momentum = 0, dampening = 0, weight_decay = 0;
  bool nesterov = false, maximize = false;
  bool operator==(const SGD&) const = default;

  static constexpr auto options() {
    return std::array{number("lr", &SGD::lr, kRequired), number("momentum", &SGD::momentum),
                      number("dampening", &SGD::dampening), number("weight_decay", &SGD::weight_decay),
                      flag("nesterov", &SGD::nesterov), flag("maximize", &SGD::maximize)};
  }
  std::array<bool, 1> uses() const { return {momentum != 0}; }
  struct Terms {};
  Terms terms(double) const { return {}; }
  struct Scalars {
    double lr;
  };
  Scalars scalars(const Terms&, double lr_) const { return {lr_}; }

  template <typename T, bool kMomentum>
  FUSEDGRAD_CPU_INLINE void update_n(const Scalars& s, T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                     T* FUSEDGRAD_RESTRICT buf, bool first, int64_t n) const {
    const T wd = static_cast<T>(weight_decay), mu = static_cast<T>(momentum);
    const T one_minus_damp = static_cast<T>(1.0 - dampening), neg_lr = static_cast<T>(-s.lr);
    const T sign = maximize ? T(-1) : T(1);  // −g exactly, as a product (a select here stops the vectoriser)
    const bool has_wd = weight_decay != 0, nest = nesterov;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      T g = sign * grad[k];
      g = has_wd ? g + wd * p[k] : g;
      if constexpr (kMomentum) {
        const T b = first ? g : buf[k] * mu + one_minus_damp * g;
        buf[k] = b;
        g = nest ? g + mu * b : b;
      }
      p[k] = p[k] + neg_lr * g;
    }
  }
  // `first`: the momentum buffer holds nothing yet (torch creates it as a copy of g).
  template <typename T>
  FUSEDGRAD_CPU_INLINE void update(const Scalars& s, T* p, const T* g, const StatePtrs<T>& st, bool first,
                                   int64_t n) const {
    if (momentum != 0) {
      update_n<T, true>(s, p, g, st[0], first, n);
    } else {
      update_n<T, false>(s, p, g, st[0], first, n);
    }
  }
};

// ---------------------------------------------------------------------------------- Adam, AdamW
// (lr, β1, β2, eps, weight_decay λ, amsgrad, maximize, decoupled_weight_decay), step t:
//   g ← −g if maximize
//   decoupled (AdamW): p ← p (1 − lr λ)          else: g ← g + λ p
//   m ← lerp(m, g, 1 − β1)           v ← β2 v + (1 − β2) g g
//   v̂ ← max(v̂, v) if amsgrad (and v̂ is used below instead of v)
//   p ← p − (lr / (1 − β1^t)) · m / (√v / √(1 − β2^t) + eps)
// AdamW is Adam with decoupled_weight_decay=True by default.
template <bool kDecoupledDefault>
struct AdamFamily {
  static constexpr const char* kName = kDecoupledDefault ? "adamw" : "adam";
  static constexpr std::array<const char*, 3> kState{"exp_avg", "exp_avg_sq", "max_exp_avg_sq"};
  static constexpr bool kStepCount = true;
  static constexpr bool kFirstGradientFillsState = false;
  double lr = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0;
  bool amsgrad = false, maximize = false, decoupled_weight_decay = kDecoupledDefault, fused = false;
  // lr is a float32 tensor: Adam's single-tensor code computes lr / (1 − β1^t) and 1 − lr λ as
  // float32 tensors, so their values carry float32 rounding (not the fused form's).
  bool lr_float32_tensor = false;
  bool operator==(const AdamFamily&) const = default;

  static constexpr auto options() {
    using A = AdamFamily;
    return std::array{number("lr", &A::lr, kRequired, &A::lr_float32_tensor),
                      pair("betas", &A::beta1, &A::beta2, kRequired), number("eps", &A::eps, kRequired),
                      number("weight_decay", &A::weight_decay), flag("amsgrad", &A::amsgrad),
                      flag("maximize", &A::maximize), flag("decoupled_weight_decay", &A::decoupled_weight_decay),
                      flag("fused", &A::fused)};
  }
  std::array<bool, 3> uses() const { return {true, true, amsgrad}; }
  // The bias corrections of step t: two pow, once per step (not per model of an ensemble).
  struct Terms {
    double bc1, bc2_sqrt;  // 1 − β1^t, √(1 − β2^t)
  };
  Terms terms(double t) const { return {1.0 - std::pow(beta1, t), std::pow(1.0 - std::pow(beta2, t), 0.5)}; }
  struct Scalars {
    double step_size;      // lr / (1 − β1^t)
    double bc2_sqrt;       // √(1 − β2^t)
    double decay;          // 1 − lr λ (decoupled)
  };
  Scalars scalars(const Terms& b, double lr_) const {
    if (lr_float32_tensor && !fused) {
      const float lr32 = static_cast<float>(lr_);
      return {static_cast<float>(lr32 / static_cast<float>(b.bc1)), b.bc2_sqrt,
              static_cast<float>(1.0f - lr32 * static_cast<float>(weight_decay))};
    }
    return {lr_ / b.bc1, b.bc2_sqrt, 1.0 - lr_ * weight_decay};
  }

  template <typename T, bool kAmsgrad>
  FUSEDGRAD_CPU_INLINE void update_n(const Scalars& s, T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                     T* FUSEDGRAD_RESTRICT m, T* FUSEDGRAD_RESTRICT v, T* FUSEDGRAD_RESTRICT vmax,
                                     int64_t n) const {
    const T wd = static_cast<T>(weight_decay);
    const T decay = static_cast<T>(s.decay);
    const T w1 = static_cast<T>(1.0 - beta1), b2 = static_cast<T>(beta2), w2 = static_cast<T>(1.0 - beta2);
    const T bc2_sqrt = static_cast<T>(s.bc2_sqrt), eps_ = static_cast<T>(eps);
    const T neg_step = static_cast<T>(-s.step_size);
    const T sign = maximize ? T(-1) : T(1);
    // `&`, not `&&`: a short circuit here is control flow that GCC carries into the loop.
    const bool coupled_wd = (weight_decay != 0) & !decoupled_weight_decay;
    const bool decoupled_wd = (weight_decay != 0) & decoupled_weight_decay;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      T g = sign * grad[k];
      const T pk = decoupled_wd ? p[k] * decay : p[k];
      g = coupled_wd ? g + wd * pk : g;
      const T mk = lerp(m[k], g, w1);
      const T vk = v[k] * b2 + w2 * g * g;
      m[k] = mk;
      v[k] = vk;
      T vu = vk;
      if constexpr (kAmsgrad) {
        vu = std::max(vmax[k], vk);
        vmax[k] = vu;
      }
      const T denom = std::sqrt(vu) / bc2_sqrt + eps_;
      p[k] = pk + neg_step * mk / denom;
    }
  }
  template <typename T>
  FUSEDGRAD_CPU_INLINE void update(const Scalars& s, T* p, const T* g, const StatePtrs<T>& st, bool, int64_t n) const {
    if (amsgrad) {
      update_n<T, true>(s, p, g, st[0], st[1], st[2], n);
    } else {
      update_n<T, false>(s, p, g, st[0], st[1], nullptr, n);
    }
  }
};
using Adam = AdamFamily<false>;
using AdamW = AdamFamily<true>;

// ---------------------------------------------------------------------------------- RMSprop
// (lr, α, eps, weight_decay λ, momentum μ, centered, maximize), torch/optim/rmsprop.py:
//   g ← −g if maximize;   g ← g + λ p
//   v ← α v + (1 − α) g g
//   centered: ḡ ← lerp(ḡ, g, 1 − α),  a ← √(v − ḡ ḡ) + eps;   else a ← √v + eps
//   μ > 0: b ← μ b + g / a,  p ← p − lr b;   else p ← p − lr g / a
struct RMSprop {
  static constexpr const char* kName = "rmsprop";
  static constexpr std::array<const char*, 3> kState{"square_avg", "momentum_buffer", "grad_avg"};
  static constexpr bool kStepCount = true;
  static constexpr bool kFirstGradientFillsState = false;
  double lr = 0, alpha = 0.99, eps = 1e-8, weight_decay = 0, momentum = 0;
  bool centered = false, maximize = false;
  bool operator==(const RMSprop&) const = default;

  static constexpr auto options() {
    using R = RMSprop;
    return std::array{number("lr", &R::lr, kRequired), number("alpha", &R::alpha, kRequired),
                      number("eps", &R::eps, kRequired), number("weight_decay", &R::weight_decay, kRequired),
                      number("momentum", &R::momentum), flag("centered", &R::centered),
                      flag("maximize", &R::maximize)};
  }
  std::array<bool, 3> uses() const { return {true, momentum > 0, centered}; }
  struct Terms {};
  Terms terms(double) const { return {}; }
  struct Scalars {
    double lr;
  };
  Scalars scalars(const Terms&, double lr_) const { return {lr_}; }

  template <typename T, bool kMomentum, bool kCentered>
  FUSEDGRAD_CPU_INLINE void update_n(const Scalars& s, T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                     T* FUSEDGRAD_RESTRICT sq, T* FUSEDGRAD_RESTRICT buf,
                                     T* FUSEDGRAD_RESTRICT gavg, int64_t n) const {
    const T wd = static_cast<T>(weight_decay), a = static_cast<T>(alpha), w = static_cast<T>(1.0 - alpha);
    const T eps_ = static_cast<T>(eps), mu = static_cast<T>(momentum), neg_lr = static_cast<T>(-s.lr);
    const T sign = maximize ? T(-1) : T(1);
    const bool has_wd = weight_decay != 0;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      T g = sign * grad[k];
      g = has_wd ? g + wd * p[k] : g;
      const T v = sq[k] * a + w * g * g;  // square_avg.mul_(α).addcmul_(g, g, value=1 − α)
      sq[k] = v;
      T avg;
      if constexpr (kCentered) {
        const T ga = lerp(gavg[k], g, w);
        gavg[k] = ga;
        avg = std::sqrt(v + T(-1) * ga * ga);  // square_avg.addcmul(ḡ, ḡ, value=−1).sqrt_()
      } else {
        avg = std::sqrt(v);
      }
      avg = avg + eps_;
      if constexpr (kMomentum) {
        const T b = buf[k] * mu + g / avg;  // buf.mul_(μ).addcdiv_(g, avg)
        buf[k] = b;
        p[k] = p[k] + neg_lr * b;
      } else {
        p[k] = p[k] + neg_lr * g / avg;  // param.addcdiv_(g, avg, value=−lr)
      }
    }
  }
  template <typename T>
  FUSEDGRAD_CPU_INLINE void update(const Scalars& s, T* p, const T* g, const StatePtrs<T>& st, bool, int64_t n) const {
    if (momentum > 0) {
      if (centered) {
        update_n<T, true, true>(s, p, g, st[0], st[1], st[2], n);
      } else {
        update_n<T, true, false>(s, p, g, st[0], st[1], nullptr, n);
      }
    } else if (centered) {
      update_n<T, false, true>(s, p, g, st[0], nullptr, st[2], n);
    } else {
      update_n<T, false, false>(s, p, g, st[0], nullptr, nullptr, n);
    }
  }
};

// ---------------------------------------------------------------------------------- Adagrad
// (lr, lr_decay η, weight_decay λ, eps, maximize), step t, torch/optim/adagrad.py:
//   g ← −g if maximize;   g ← g + λ p
//   clr ← lr / (1 + (t − 1) η)
//   s ← s + g g;   p ← p − clr g / (√s + eps)
// (initial_accumulator_value is the state's value at creation: fusedgrad/_optimizers.py.)
struct Adagrad {
  static constexpr const char* kName = "adagrad";
  static constexpr std::array<const char*, 1> kState{"sum"};
  static constexpr bool kStepCount = true;
  static constexpr bool kFirstGradientFillsState = false;
  double lr = 0, lr_decay = 0, weight_decay = 0, eps = 1e-10;
  bool maximize = false;
  bool operator==(const Adagrad&) const = default;

  static constexpr auto options() {
    using A = Adagrad;
    return std::array{number("lr", &A::lr, kRequired), number("lr_decay", &A::lr_decay, kRequired),
                      number("weight_decay", &A::weight_decay, kRequired), number("eps", &A::eps, kRequired),
                      flag("maximize", &A::maximize)};
  }
  std::array<bool, 1> uses() const { return {true}; }
  struct Terms {
    double lr_divisor;  // 1 + (t − 1) η
  };
  Terms terms(double t) const { return {1 + (t - 1) * lr_decay}; }
  struct Scalars {
    double clr;
  };
  Scalars scalars(const Terms& d, double lr_) const { return {lr_ / d.lr_divisor}; }

  template <typename T>
  FUSEDGRAD_CPU_INLINE void update(const Scalars& s, T* FUSEDGRAD_RESTRICT p, const T* FUSEDGRAD_RESTRICT grad,
                                   const StatePtrs<T>& st, bool, int64_t n) const {
    T* FUSEDGRAD_RESTRICT sum = st[0];
    const T wd = static_cast<T>(weight_decay), eps_ = static_cast<T>(eps), neg_clr = static_cast<T>(-s.clr);
    const T sign = maximize ? T(-1) : T(1);
    const bool has_wd = weight_decay != 0;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) {
      T g = sign * grad[k];
      g = has_wd ? g + wd * p[k] : g;
      const T acc = sum[k] + g * g;  // state_sum.addcmul_(g, g, value=1)
      sum[k] = acc;
      const T std_ = std::sqrt(acc) + eps_;
      p[k] = p[k] + neg_clr * g / std_;  // param.addcdiv_(g, std, value=−clr)
    }
  }
};

// ---------------------------------------------------------------------------------- the registry
// One parameter tensor's optimizer: its description, with its param group's options.
using AnyOptimizer = std::variant<SGD, Adam, AdamW, RMSprop, Adagrad>;

template <class V>
struct TermsOf;
template <class... Ds>
struct TermsOf<std::variant<Ds...>> {
  using type = std::variant<typename Ds::Terms...>;
};
using AnyTerms = TermsOf<AnyOptimizer>::type;  // alternative i: AnyOptimizer's i's Terms

template <size_t I = 0, class F>
void for_each_description(F&& f) {  // f(std::integral_constant<size_t, I>) for every description I
  if constexpr (I < std::variant_size_v<AnyOptimizer>) {
    f(std::integral_constant<size_t, I>{});
    for_each_description<I + 1>(f);
  }
}

// The description named `name` with its defaults; false if there is none.
inline bool make_optimizer(const char* name, AnyOptimizer& out) {
  bool found = false;
  for_each_description([&](auto index) {
    using D = std::variant_alternative_t<decltype(index)::value, AnyOptimizer>;
    if (!found && std::char_traits<char>::compare(D::kName, name, std::char_traits<char>::length(D::kName) + 1) == 0) {
      out.template emplace<decltype(index)::value>();
      found = true;
    }
  });
  return found;
}

inline const char* optimizer_name(const AnyOptimizer& o) {
  return std::visit([](const auto& d) { return std::decay_t<decltype(d)>::kName; }, o);
}
inline double optimizer_lr(const AnyOptimizer& o) {
  return std::visit([](const auto& d) { return d.lr; }, o);
}
inline bool has_step_count(const AnyOptimizer& o) {
  return std::visit([](const auto& d) { return std::decay_t<decltype(d)>::kStepCount; }, o);
}
// The state tensors these options use, by name (null past the description's last).
inline std::array<const char*, kMaxState> used_state(const AnyOptimizer& o) {
  return std::visit(
      [](const auto& d) {
        using D = std::decay_t<decltype(d)>;
        static_assert(D::kState.size() <= kMaxState);
        std::array<const char*, kMaxState> out{};
        const auto used = d.uses();
        for (size_t i = 0; i < D::kState.size(); ++i) out[i] = used[i] ? D::kState[i] : nullptr;
        return out;
      },
      o);
}

inline AnyTerms step_terms(const AnyOptimizer& o, double t) {
  return std::visit([t](const auto& d) -> AnyTerms { return d.terms(t); }, o);
}

// The update of description I over n elements: `terms` those of step t when given (cached), else
// computed here. Always inlined, without std::visit, so that each CPU clone of the caller
// (cpu_vector.h: FUSEDGRAD_CPU_CLONES) carries its own vector loops.
template <typename T, size_t I = 0>
FUSEDGRAD_CPU_INLINE void apply_update(const AnyOptimizer& o, const AnyTerms* terms, double t, double lr, T* p,
                                       const T* g, const StatePtrs<T>& st, bool fresh, int64_t n) {
  if constexpr (I < std::variant_size_v<AnyOptimizer>) {
    if (o.index() == I) {
      const auto& d = *std::get_if<I>(&o);
      const auto tm = terms ? *std::get_if<I>(terms) : d.terms(t);
      d.template update<T>(d.scalars(tm, lr), p, g, st, fresh, n);
      return;
    }
    apply_update<T, I + 1>(o, terms, t, lr, p, g, st, fresh, n);
  }
}

}  // namespace fusedgrad::trainer
