// CPU kernels of the fused training step (train_step.h).
//
// Each step of each model runs the README's "Math" over its rows, in blocks of
// at most kBlockRows rows, with every per-row quantity stored transposed —
// one contiguous row of a block per hidden / output unit — so that every inner
// loop runs over rows and vectorises, whatever the (often tiny) widths:
//
//   for each hidden unit j:   h_j = Σ_d w1[j,d] x_d + b1[j],   s_j = act(h_j)  (σ by default)
//   for each output o:        p_o = Σ_j w2[o,j] s_j,   r_o = (p_o + b2[o]) − t_o
//                             L += c Σ r_o²,   g_o = 2c r_o
//                             dw2[o,j] += g_o · s_j,   db2[o] += Σ g_o
//   for each hidden unit j:   ds_j = Σ_o w2[o,j] g_o,   dh_j = ds_j ⊙ act'(s_j)  (σ: s_j ⊙ (1 − s_j);
//                             act'(h_j) for the activations that save their input)
//                             dw1[j,d] += dh_j · x_d,   db1[j] += Σ dh_j
//
// (x_d, t_o, s_j, g_o, dh_j: one value per row of the block). Nothing of
// size N is ever materialised, so a step over 10⁶ rows needs the memory of
// one block. The sums over rows are taken in T within a block and in double
// across blocks; blocks are grouped into a number of chunks that depends only
// on the number of rows, chunk sums are added in chunk order, so the result
// is the same bit for bit whatever the number of threads, and a model of an
// ensemble gets exactly the numbers it would get trained alone.
//
// Then the optimizer updates the model's parameters (optimizers.h) and
// the next step begins. For one model, the chunks of a step run in parallel
// when the step is large enough to pay for it; for several, whole models
// (all their steps) run in parallel, one model per task.
#include "train_step.h"
#include "plain_call.h"  // testing_fail_after_first_update

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "../common/cpu_vector.h"
#include "../cpu/activation_cpu.h"  // activate_n, activation_backward_n: the table's vector forms
#include "../common/lane_vector.h"  // lane-wise row sums: LaneVec, lane_dots_with, add_lane_sums
#include "../common/problem.h"  // shape_str

namespace fusedgrad::trainer {
namespace {

// Test-only failure injection (train_step.h: set_fail_after_first_update).
std::atomic<bool> fail_after_first_update{false};

constexpr int64_t kBlockRows = 256;    // rows per block (scratch of a block stays in L1/L2)
constexpr int64_t kHiddenGroup = 4;    // hidden units whose backward runs together
constexpr int64_t kMaxChunks = 16;     // row chunks of a step: fixed, not the thread count
constexpr int64_t kMinTaskMacs = 1 << 15;  // multiply-adds below which a parallel task does not pay
// D·H + H·O from which the engine runs a row faster than the narrow kernels (train_path_name): they
// stream every hidden unit's row of a block once per input and output unit, which loses to register
// blocking once a row holds ~2 000 multiply-adds (256×32→64→8: 195 µs a step here, 73 on BLAS).
constexpr int64_t kNarrowMaxMacsPerRow = 2048;
// Models of an ensemble that step together (Run::run_models): their optimizer
// updates run as one long slice per parameter, and their parameters and state
// (~1 KiB a model at 1→20→1) stay in L1 from one step to the next.
constexpr int64_t kModelGroup = 16;

struct Dims {
  int64_t K, N, D, H, O;
  Activation act;
  int64_t macs_per_row() const { return D * H + H * O; }
};

// Offsets of one model's gradient sums (double): dw1 | db1 | dw2 | db2 | Σ r².
struct SumLayout {
  int64_t dw1, db1, dw2, db2, loss, size;
  explicit SumLayout(const Dims& d)
      : dw1(0), db1(d.H * d.D), dw2(db1 + d.H), db2(dw2 + d.O * d.H), loss(db2 + d.O), size(loss + 1) {}
};

// The rows of one step.
struct StepRows {
  const int64_t* index = nullptr;  // null: rows first .. first + count − 1
  int64_t first = 0, count = 0;
  int64_t row(int64_t r) const { return index ? index[r] : first + r; }
};

// One model's tensors, as raw pointers.
template <typename T>
struct ModelPtrs {
  const T* w1;
  const T* b1;
  const T* w2;
  const T* b2;
  const T* x;  // (N, D)
  const T* t;  // (N, O)
};

// Per-thread scratch: one block's transposed inputs and activations.
template <typename T>
using BlockScratch = LaneBuffer<T>;

template <typename T>
BlockScratch<T>& thread_block_scratch() {
  thread_local BlockScratch<T> scratch;
  return scratch;
}

// Rows r0 .. r0 + nb − 1 of the step of a (·, width) matrix, transposed into
// dst (width, ld), the padding rows nb .. ld − 1 zero. A run of rows of one
// column is already a transposed row.
template <typename T>
FUSEDGRAD_CPU_INLINE void gather_transposed(const T* src, int64_t width, const StepRows& rows, int64_t r0,
                                              int64_t nb, int64_t ld, T* dst) {
  if (!rows.index && width == 1) {
    std::memcpy(dst, src + rows.first + r0, static_cast<size_t>(nb) * sizeof(T));
  } else {
    for (int64_t r = 0; r < nb; ++r) {
      const T* row = src + rows.row(r0 + r) * width;
      for (int64_t k = 0; k < width; ++k) dst[k * ld + r] = row[k];
    }
  }
  for (int64_t k = 0; k < width; ++k) std::fill(dst + k * ld + nb, dst + (k + 1) * ld, T(0));
}

// Adds one block's Σ r² and gradient sums into `sums` (SumLayout). The block's
// rows are padded to whole lane vectors (ld): padding rows read x = t = 0 and
// get r = g = 0, so they add nothing to any sum.
//
// kD, kO > 0: the widths D and O as compile-time constants (narrow_widths),
// for which every loop over them unrolls and, with σ, the backward pass runs
// fused: one pass over the rows per hidden unit with every sum in registers.
template <typename T, int VB, int kD, int kO>
FUSEDGRAD_CPU_INLINE void block_loss_and_grads(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m,
                                                 const StepRows& rows, int64_t r0, int64_t nb, T two_c,
                                                 T* scratch, double* FUSEDGRAD_RESTRICT sums) {
  using V = LaneVec<T, VB>;
  constexpr int64_t L = kLanes<T, VB>;
  constexpr bool kFixedWidths = kD > 0 && kO > 0;
  const int64_t D = kD > 0 ? kD : d.D, H = d.H, O = kO > 0 ? kO : d.O;
  const int64_t ld = (nb + L - 1) / L * L;
  T* xT = scratch;        // (D, ld)
  T* tT = xT + D * ld;    // (O, ld)
  T* S = tT + O * ld;     // (H, ld): h_j, then s_j
  T* G = S + H * ld;      // (O, ld): r_o, then g_o
  T* DH = G + O * ld;     // (kHiddenGroup, ld): dh_j of a group of hidden units
  T* P = DH + kHiddenGroup * ld;  // (lay.size, L): lane partials of every sum, in SumLayout order
  T* HS = P + lay.size * L;  // (H, ld): h_j, kept for an activation whose derivative reads h

  // The block's rows of x and t, transposed (x_d and t_o become contiguous).
  gather_transposed(m.x, D, rows, r0, nb, ld, xT);
  gather_transposed(m.t, O, rows, r0, nb, ld, tT);

  // h_j = Σ_d w1[j,d] x_d + b1[j], a vector of rows at a time in registers; s_j = σ(h_j)
  const bool sigmoid = d.act == Activation::Sigmoid;
  const bool fused_backward = kFixedWidths && sigmoid;
  const bool keep_h = activation_saves_input(d.act);
  for (int64_t j = 0; j < H; ++j) {
    const T* wj = m.w1 + j * D;
    const T b = m.b1 ? m.b1[j] : T(0);
    for (int64_t v = 0; v < ld; v += L) {
      V h = lanes_splat<T, VB>(T(0));
      for (int64_t k = 0; k < D; ++k) h += wj[k] * lanes_load<T, VB>(xT + k * ld + v);
      lanes_store(S + j * ld + v, h + b);
    }
  }
  if (sigmoid) {
    sigmoid_inplace(S, H * ld);
  } else {
    if (keep_h) std::memcpy(HS, S, static_cast<size_t>(H * ld) * sizeof(T));
    activate_n(d.act, S, S, H * ld);
  }

  // p_o = Σ_j w2[o,j] s_j;  r_o = (p_o + b2[o]) − t_o (0 on padding rows)
  for (int64_t o = 0; o < O; ++o) {
    const T* wo = m.w2 + o * H;
    const T b = m.b2 ? m.b2[o] : T(0);
    T* go = G + o * ld;
    // Four vectors of rows at a time: four independent chains of H
    // multiply-adds (one chain waited on each multiply-add's latency).
    int64_t v = 0;
    for (; v + 4 * L <= ld; v += 4 * L) {
      V p0 = lanes_splat<T, VB>(T(0)), p1 = p0, p2 = p0, p3 = p0;
      for (int64_t j = 0; j < H; ++j) {
        const T* sj = S + j * ld + v;
        p0 += wo[j] * lanes_load<T, VB>(sj);
        p1 += wo[j] * lanes_load<T, VB>(sj + L);
        p2 += wo[j] * lanes_load<T, VB>(sj + 2 * L);
        p3 += wo[j] * lanes_load<T, VB>(sj + 3 * L);
      }
      const T* to = tT + o * ld + v;
      lanes_store(go + v, (p0 + b) - lanes_load<T, VB>(to));
      lanes_store(go + v + L, (p1 + b) - lanes_load<T, VB>(to + L));
      lanes_store(go + v + 2 * L, (p2 + b) - lanes_load<T, VB>(to + 2 * L));
      lanes_store(go + v + 3 * L, (p3 + b) - lanes_load<T, VB>(to + 3 * L));
    }
    for (; v < ld; v += L) {
      V p = lanes_splat<T, VB>(T(0));
      for (int64_t j = 0; j < H; ++j) p += wo[j] * lanes_load<T, VB>(S + j * ld + v);
      lanes_store(go + v, (p + b) - lanes_load<T, VB>(tT + o * ld + v));
    }
    for (int64_t r = nb; r < ld; ++r) go[r] = T(0);
  }
  // L += Σ r_o²;  g_o = 2c r_o;  db2[o] += Σ g_o;  dw2[o,j] += g_o · s_j
  V sq = lanes_splat<T, VB>(T(0));
  for (int64_t o = 0; o < O; ++o) {
    T* go = G + o * ld;
    V gsum = lanes_splat<T, VB>(T(0));
    for (int64_t v = 0; v < ld; v += L) {
      const V res = lanes_load<T, VB>(go + v);
      sq += res * res;
      const V g = res * two_c;
      lanes_store(go + v, g);
      gsum += g;
    }
    lanes_store(P + (lay.db2 + o) * L, gsum);
    if (!fused_backward) lane_dots_with<VB>(go, S, ld, H, ld, P, lay.dw2 + o * H, 1);
  }
  lanes_store(P + lay.loss * L, sq);

  if constexpr (kFixedWidths) {
    if (fused_backward) {
      // Per hidden unit j, one pass over the rows: dw2[o,j] += g_o · s_j;
      // ds_j = Σ_o w2[o,j] g_o;  dh_j = ds_j ⊙ s_j ⊙ (1 − s_j);  db1[j] += Σ dh_j;
      // dw1[j,d] += dh_j · x_d — the same products, added in the same order,
      // as the passes below, with the 1 + kD + kO lane sums in registers.
      for (int64_t j = 0; j < H; ++j) {
        const T* sj = S + j * ld;
        T w2j[kO];
        for (int o = 0; o < kO; ++o) w2j[o] = m.w2[o * H + j];
        V db1 = lanes_splat<T, VB>(T(0)), dw1[kD], dw2[kO];
        for (int k = 0; k < kD; ++k) dw1[k] = lanes_splat<T, VB>(T(0));
        for (int o = 0; o < kO; ++o) dw2[o] = lanes_splat<T, VB>(T(0));
        for (int64_t v = 0; v < ld; v += L) {
          const V s = lanes_load<T, VB>(sj + v);
          V ds = lanes_splat<T, VB>(T(0));
          for (int o = 0; o < kO; ++o) {
            const V g = lanes_load<T, VB>(G + o * ld + v);
            dw2[o] += g * s;
            ds += w2j[o] * g;
          }
          const V dh = ds * (s * (T(1) - s));
          db1 += dh;
          for (int k = 0; k < kD; ++k) dw1[k] += lanes_load<T, VB>(xT + k * ld + v) * dh;
        }
        lanes_store(P + (lay.db1 + j) * L, db1);
        for (int o = 0; o < kO; ++o) lanes_store(P + (lay.dw2 + o * H + j) * L, dw2[o]);
        for (int k = 0; k < kD; ++k) lanes_store(P + (lay.dw1 + j * kD + k) * L, dw1[k]);
      }
      add_lane_sums<VB>(P, lay.size, sums);
      return;
    }
  }

  // ds_j = Σ_o w2[o,j] g_o;  dh_j = ds_j ⊙ act'(s_j) (σ: s_j ⊙ (1 − s_j));  db1[j] += Σ dh_j;  dw1[j,d] += dh_j · x_d
  // (hidden units four at a time, so that the dw1 sums of each input x_d run
  // as four independent chains)
  for (int64_t j0 = 0; j0 < H; j0 += kHiddenGroup) {
    const int64_t nj = std::min(kHiddenGroup, H - j0);
    for (int64_t q = 0; q < nj; ++q) {
      const int64_t j = j0 + q;
      if (!sigmoid) {  // ds in registers, then act' from the table over the row
        T* dh = DH + q * ld;
        for (int64_t v = 0; v < ld; v += L) {
          V ds = lanes_splat<T, VB>(T(0));
          for (int64_t o = 0; o < O; ++o) ds += m.w2[o * H + j] * lanes_load<T, VB>(G + o * ld + v);
          lanes_store(dh + v, ds);
        }
        activation_backward_n(d.act, dh, (keep_h ? HS : S) + j * ld, ld);
        lane_row_sum<VB>(dh, ld, P + (lay.db1 + j) * L);
        continue;
      }
      V hsum = lanes_splat<T, VB>(T(0));
      for (int64_t v = 0; v < ld; v += L) {
        V ds = lanes_splat<T, VB>(T(0));
        for (int64_t o = 0; o < O; ++o) ds += m.w2[o * H + j] * lanes_load<T, VB>(G + o * ld + v);
        const V s = lanes_load<T, VB>(S + j * ld + v);
        const V dh = ds * (s * (T(1) - s));
        lanes_store(DH + q * ld + v, dh);
        hsum += dh;
      }
      lanes_store(P + (lay.db1 + j) * L, hsum);
    }
    for (int64_t k = 0; k < D; ++k) lane_dots_with<VB>(xT + k * ld, DH, ld, nj, ld, P, lay.dw1 + j0 * D + k, D);
  }

  add_lane_sums<VB>(P, lay.size, sums);
}

// The blocks and chunks of a step of `count` rows.
struct Partition {
  int64_t blocks, chunks;
  explicit Partition(int64_t count)
      : blocks((count + kBlockRows - 1) / kBlockRows), chunks(std::min(blocks, kMaxChunks)) {}
  int64_t chunk_first_block(int64_t c) const { return c * blocks / chunks; }
};

// Σ over the blocks of chunk c into `sums` (zeroed first).
template <typename T, int VB, int kD, int kO>
FUSEDGRAD_CPU_INLINE void chunk_sums(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m,
                                       const StepRows& rows, const Partition& part, int64_t c, T two_c,
                                       double* sums) {
  std::fill(sums, sums + lay.size, 0.0);
  const int64_t per_row = d.D + 2 * d.O + 2 * d.H + kHiddenGroup;
  T* scratch = thread_block_scratch<T>().get(static_cast<size_t>(per_row * kBlockRows + lay.size * kLanes<T, VB>));
  for (int64_t b = part.chunk_first_block(c); b < part.chunk_first_block(c + 1); ++b) {
    const int64_t r0 = b * kBlockRows;
    const int64_t nb = std::min(kBlockRows, rows.count - r0);
    block_loss_and_grads<T, VB, kD, kO>(d, lay, m, rows, r0, nb, two_c, scratch, sums);
  }
}

// The optimizer update of a parameter slice (one model's, or several models'
// that share their learning rate), its gradient written.
struct SliceUpdate {
  const AnyOptimizer* rule;
  const AnyTerms* terms;  // the step's terms, or null: computed from t
  double t;               // the step count of this step (from 1), for descriptions that count
  double lr;
  bool fresh;
  int64_t n;
};

// The narrowest widths — curve fits and surrogates of one or two inputs and
// one output, seed-004's 1→20→1 among them — with σ (the default, and every
// ensemble's activation) run with D and O as compile-time constants; every
// other shape with them as run-time values. (Measured on 1→20→1, K = 256
// models, 2 threads, interleaved builds: 0.58 µs per model-step with run-time
// widths, 0.50 with constant ones. Each constant pair is another copy of the
// block kernel per CPU clone and dtype: eight pairs took this file's compile
// time from 12 s to 200 s.)
template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void chunk_sums_any_widths(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m,
                                                  const StepRows& rows, const Partition& part, int64_t c, T two_c,
                                                  double* sums) {
  if (d.act == Activation::Sigmoid && d.O == 1) {  // fixed_width_kernel(d)
    if (d.D == 1) return chunk_sums<T, VB, 1, 1>(d, lay, m, rows, part, c, two_c, sums);
    if (d.D == 2) return chunk_sums<T, VB, 2, 1>(d, lay, m, rows, part, c, two_c, sums);
  }
  chunk_sums<T, VB, 0, 0>(d, lay, m, rows, part, c, two_c, sums);
}

// The functions that do the arithmetic, compiled per CPU capability
// (cpu_vector.h). Everything around them only orchestrates: their bodies are
// inlined here, so each clone carries its own vector code.
// Each twice: with 64-byte lane vectors (every clone, so that tests can force them on any CPU) and
// with 32-byte ones (no AVX-512 clone); chunk_sums_kernel takes cpu_vector_bytes()'.
template <typename T>
FUSEDGRAD_CPU_CLONES void chunk_sums_64(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m,
                                        const StepRows& rows, const Partition& part, int64_t c, T two_c,
                                        double* sums) {
  chunk_sums_any_widths<T, 64>(d, lay, m, rows, part, c, two_c, sums);
}
template <typename T>
FUSEDGRAD_CPU_CLONES_32 void chunk_sums_32(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m,
                                           const StepRows& rows, const Partition& part, int64_t c, T two_c,
                                           double* sums) {
  chunk_sums_any_widths<T, 32>(d, lay, m, rows, part, c, two_c, sums);
}
template <typename T>
void chunk_sums_kernel(const Dims& d, const SumLayout& lay, const ModelPtrs<T>& m, const StepRows& rows,
                       const Partition& part, int64_t c, T two_c, double* sums) {
  by_vector_width(chunk_sums_64<T>, chunk_sums_32<T>, d, lay, m, rows, part, c, two_c, sums);
}
FUSEDGRAD_CPU_CLONES void update_kernel(float* grad, float* param, const StatePtrs<float>& st,
                                          const SliceUpdate& u) {
  apply_update<float>(*u.rule, u.terms, u.t, u.lr, param, grad, st, u.fresh, u.n);
}
FUSEDGRAD_CPU_CLONES void update_kernel(double* grad, double* param, const StatePtrs<double>& st,
                                          const SliceUpdate& u) {
  apply_update<double>(*u.rule, u.terms, u.t, u.lr, param, grad, st, u.fresh, u.n);
}

// ---------------------------------------------------------------------------
// The whole run.

template <typename T>
struct Run {
  const TrainCall& call;
  Dims d;
  SumLayout lay;
  std::array<T*, kNumParams> param{}, grad{};
  std::array<StatePtrs<T>, kNumParams> state{};  // the optimizer state tensors (optimizers.h: kState)
  std::array<int64_t, kNumParams> per_model{};   // elements of one model's slice
  std::array<double, kNumParams> step0{};        // step count before this call
  std::array<double, kNumParams> lr{};           // the group's lr
  // Whether parameter p's step terms are those of the previous parameter (the same options
  // and step count: usually all four), decided once per call, not per step.
  std::array<bool, kNumParams> same_terms_as_previous{};
  const T* x;
  const T* t;
  int64_t x_model_stride, t_model_stride;
  const int64_t* order;
  T* losses;
  std::vector<AnyTerms> terms;  // [step · kNumParams + p]: each step's terms, for ensembles

  Run(const TrainCall& c, const Dims& dims) : call(c), d(dims), lay(dims) {
    for (int p = 0; p < kNumParams; ++p) {
      if (!c.params[p].defined()) continue;
      param[p] = c.params[p].data_ptr<T>();
      grad[p] = c.grads[p].data_ptr<T>();
      per_model[p] = c.params[p].numel() / d.K;
      const ParamState& st = c.state[p];
      for (int i = 0; i < kMaxState; ++i) {
        if (st.state[i].defined()) state[p][i] = st.state[i].data_ptr<T>();
      }
      if (st.step.defined()) {  // a one-element float tensor on the CPU (check_call)
        step0[p] = st.step.scalar_type() == at::kFloat ? static_cast<double>(*st.step.data_ptr<float>())
                                                       : *st.step.data_ptr<double>();
      }
    }
    int previous = -1;
    for (int p = 0; p < kNumParams; ++p) {
      if (!param[p]) continue;
      lr[p] = optimizer_lr(c.state[p].rule);
      same_terms_as_previous[p] =
          previous >= 0 && step0[previous] == step0[p] && c.state[previous].rule == c.state[p].rule;
      previous = p;
    }
    x = c.x.data_ptr<T>();
    t = c.target.data_ptr<T>();
    x_model_stride = c.x.dim() == 3 ? d.N * d.D : 0;
    t_model_stride = c.target.dim() == 3 ? d.N * d.O : 0;
    order = c.order.defined() ? c.order.data_ptr<int64_t>() : nullptr;
    losses = c.losses.data_ptr<T>();
    if (d.K > 1) {  // every model takes the same steps: their terms (Adam: two pow) once
      terms.resize(static_cast<size_t>(c.num_steps * kNumParams));
      for (int64_t step = 0; step < c.num_steps; ++step) {
        for (int p = 0; p < kNumParams; ++p) {
          if (!param[p]) continue;
          const double t = step0[p] + static_cast<double>(step + 1);
          AnyTerms& here = terms[step * kNumParams + p];
          if (same_terms_as_previous[p]) {
            for (int q = p - 1; q >= 0; --q) {
              if (param[q]) {
                here = terms[step * kNumParams + q];
                break;
              }
            }
          } else {
            here = step_terms(c.state[p].rule, t);
          }
        }
      }
    }
  }

  ModelPtrs<T> model(int64_t k) const {
    auto at = [&](int p, const T* base) -> const T* { return base ? base + k * per_model[p] : nullptr; };
    return {at(kW1, param[kW1]), at(kB1, param[kB1]), at(kW2, param[kW2]), at(kB2, param[kB2]),
            x + k * x_model_stride, t + k * t_model_stride};
  }

  StepRows rows_of(int64_t step) const {
    const int64_t s = call.first_step + step;
    if (call.batch_size <= 0) return {nullptr, 0, d.N};
    const int64_t bs = call.batch_size;
    const int64_t per_epoch = (d.N + bs - 1) / bs;
    const int64_t epoch = s / per_epoch, b = s % per_epoch;
    const int64_t first = b * bs, count = std::min(bs, d.N - first);
    if (order) return {order + epoch * d.N + first, 0, count};
    return {nullptr, first, count};
  }

  // Writes model k's loss and its gradients from the double sums.
  void write_loss_and_grads(int64_t k, int64_t step, double c, const double* sums, double grad_scale = 1.0) const {
    losses[step * d.K + k] = static_cast<T>(c * sums[lay.loss]);
    const int64_t offsets[kNumParams] = {lay.dw1, lay.db1, lay.dw2, lay.db2};
    for (int p = 0; p < kNumParams; ++p) {
      if (!param[p]) continue;
      const int64_t n = per_model[p];
      T* g = grad[p] + k * n;
      const double* from = sums + offsets[p];
      for (int64_t e = 0; e < n; ++e) g[e] = static_cast<T>(from[e] * grad_scale);
    }
  }

  // The optimizer update of models k0 .. k1 − 1 at `step`, their gradients
  // written: one slice of k1 − k0 models per parameter when they share their
  // learning rate (the update is element-wise: the same numbers as model by
  // model, in a few long vector loops instead of many short ones), else
  // model by model.
  // fusedgrad.sklearn's ‖W‖² before the step's update, where asked (one model: train_steps checks).
  void record_weight_sq(int64_t step) const {
    if (!call.sklearn.weight_sq.defined()) return;
    double sq = 0;
    for (int p : {kW1, kW2}) {
      for (int64_t e = 0; e < per_model[p]; ++e) sq += static_cast<double>(param[p][e]) * param[p][e];
    }
    call.sklearn.weight_sq.data_ptr<double>()[step] = sq;
  }

  void update_models(int64_t k0, int64_t k1, int64_t step, int64_t rows) const {
    if (call.lr_scale.defined()) {
      const double* scale = call.lr_scale.data_ptr<double>();
      for (int64_t k = k0; k < k1; ++k) update_slices(k, k + 1, step, scale[k], rows);
    } else {
      update_slices(k0, k1, step, 1.0, rows);
    }
  }

  void update_slices(int64_t k0, int64_t k1, int64_t step, double lr_scale, int64_t rows) const {
    // The step's terms (Adam: two pow) once for the parameters that share their group's
    // options and step count — usually all four; an ensemble's models read those
    // computed once per step (`terms`).
    AnyTerms last;
    for (int p = 0; p < kNumParams; ++p) {
      if (!param[p]) continue;
      const ParamState& st = call.state[p];
      const int64_t off = k0 * per_model[p];
      const double t = step0[p] + static_cast<double>(step + 1);
      const AnyTerms* cached = nullptr;
      if (!terms.empty()) {
        cached = &terms[step * kNumParams + p];
      } else {
        if (!same_terms_as_previous[p]) last = step_terms(st.rule, t);
        cached = &last;
      }
      AnyOptimizer sklearn_rule;  // the rule with fusedgrad.sklearn's step terms (train_step.h), where set
      if (call.sklearn.on) sklearn_rule = call.sklearn.rule_of(st.rule, p == kW1 || p == kW2, rows, t);
      const SliceUpdate u{call.sklearn.on ? &sklearn_rule : &st.rule, cached, t, lr[p] * lr_scale,
                          st.fresh && step == 0, (k1 - k0) * per_model[p]};
      StatePtrs<T> sp{};
      for (int i = 0; i < kMaxState; ++i) sp[i] = state[p][i] ? state[p][i] + off : nullptr;
      update_kernel(grad[p] + off, param[p] + off, sp, u);
      if (fail_after_first_update.load(std::memory_order_relaxed)) {  // test-only (train_step.h)
        TORCH_CHECK(false, "fusedgrad: test-only failure injected after the update of parameter ",
                    (p == kW1 ? "w1" : p == kB1 ? "b1" : p == kW2 ? "w2" : "b2"),
                    " (fusedgrad._C._testing_fail_after_first_update)");
      }
    }
  }

  double loss_scale(const StepRows& rows) const { return call.mean ? 1.0 / static_cast<double>(rows.count * d.O) : 1.0; }

  // Every step of models k0 .. k1 − 1, step by step: each model's gradient,
  // then their optimizer updates together (update_models). The row chunks of
  // a model's step each sum into their own slice of `chunks` — in parallel
  // when `parallel_chunks` and the step is big enough to pay — and are added
  // in chunk order: the same bits either way. `count_steps`: advance
  // call.steps_done after each step (one model alone).
  void run_models(int64_t k0, int64_t k1, bool parallel_chunks, bool count_steps, std::vector<double>& sums,
                  std::vector<double>& chunks) const {
    for (int64_t step = 0; step < call.num_steps; ++step) {
      const StepRows rows = rows_of(step);
      const double c = call.reducer ? call.reducer->pre_scale(call.mean, rows.count, d.O) : loss_scale(rows);
      const T two_c = static_cast<T>(2.0 * c);
      const Partition part(rows.count);
      for (int64_t k = k0; k < k1; ++k) {
        const ModelPtrs<T> m = model(k);
        auto chunk_range = [&](int64_t c0, int64_t c1) {
          for (int64_t ch = c0; ch < c1; ++ch) {
            chunk_sums_kernel(d, lay, m, rows, part, ch, two_c, chunks.data() + ch * lay.size);
          }
        };
        if (parallel_chunks) {
          const int64_t chunk_macs =
              std::max<int64_t>(1, rows.count / std::max<int64_t>(part.chunks, 1)) * d.macs_per_row();
          at::parallel_for(0, part.chunks, std::max<int64_t>(1, kMinTaskMacs / chunk_macs), chunk_range);
        } else {
          chunk_range(0, part.chunks);
        }
        std::fill(sums.begin(), sums.end(), 0.0);
        for (int64_t ch = 0; ch < part.chunks; ++ch) {
          const double* cs = chunks.data() + ch * lay.size;
          for (int64_t e = 0; e < lay.size; ++e) sums[e] += cs[e];
        }
        if (call.reducer) {  // the ranks' sums added (step_reducer.h); one model only
          const double post = call.reducer->reduce(sums.data(), lay.size, lay.loss, c, rows.count, call.mean, d.O);
          write_loss_and_grads(k, step, post, sums.data(), post);
        } else {
          write_loss_and_grads(k, step, c, sums.data());
        }
      }
      record_weight_sq(step);
      update_models(k0, k1, step, rows.count);
      if (count_steps && call.steps_done.defined()) call.steps_done.data_ptr<int64_t>()[0] += 1;
    }
  }
};

// The step counts, once per parameter tensor (all models share it).
void write_step_counts(const TrainCall& call, const std::array<double, kNumParams>& step0) {
  for (int p = 0; p < kNumParams; ++p) {
    const at::Tensor& st = call.state[p].step;
    if (!call.params[p].defined() || !st.defined()) continue;
    write_step_count(st, step0[p] + static_cast<double>(call.num_steps));
  }
}

// Whether the compile-time narrow kernel runs (chunk_sums_any_widths).
bool fixed_width_kernel(const Dims& d) { return d.act == Activation::Sigmoid && d.O == 1 && (d.D == 1 || d.D == 2); }

template <typename T>
void run_all(const TrainCall& call, const Dims& d) {
  Run<T> run(call, d);
  // Per-thread buffers, kept across calls: a step allocates nothing once they have grown.
  const size_t n = static_cast<size_t>(run.lay.size);
  auto buffers = [n]() -> std::pair<std::vector<double>&, std::vector<double>&> {
    thread_local std::vector<double> sums, chunks;
    if (sums.size() != n) sums.assign(n, 0.0);
    if (chunks.size() < n * kMaxChunks) chunks.resize(n * kMaxChunks);
    return {sums, chunks};
  };
  if (d.K == 1) {
    auto [sums, chunks] = buffers();
    run.run_models(0, 1, /*parallel_chunks=*/true, /*count_steps=*/true, sums, chunks);
  } else {
    const int64_t model_macs = std::max<int64_t>(1, call.num_steps * d.N * d.macs_per_row());
    const int64_t grain = std::max<int64_t>(1, kMinTaskMacs / model_macs);
    at::parallel_for(0, d.K, grain, [&](int64_t k0, int64_t k1) {
      auto [sums, chunks] = buffers();
      for (int64_t g0 = k0; g0 < k1; g0 += kModelGroup) {
        run.run_models(g0, std::min(k1, g0 + kModelGroup), /*parallel_chunks=*/false, /*count_steps=*/false, sums,
                       chunks);
      }
    });
    if (call.steps_done.defined()) call.steps_done.data_ptr<int64_t>()[0] += call.num_steps;
  }
  write_step_counts(call, run.step0);
}


// ---------------------------------------------------------------------------
// Validation: everything the kernels rely on, with messages naming `fn`.

const char* kParamNames[kNumParams] = {"w1", "b1", "w2", "b2"};

// `what` names the tensor in pieces (e.g. "optimizer state of ", "w1", " '", "exp_avg", "'"),
// joined only when a check fails: this runs at every step.
template <typename... What>
void check_like(const char* fn, const at::Tensor& t, const at::Tensor& param, const What&... what) {
  TORCH_CHECK_VALUE(t.defined(), fn, ": ", what..., " is missing");
  TORCH_CHECK_TYPE(t.scalar_type() == param.scalar_type(), fn, ": ", what..., " has dtype ",
                   t.scalar_type(), " but its parameter has ", param.scalar_type());
  TORCH_CHECK_VALUE(t.device() == param.device(), fn, ": ", what..., " is on ", t.device(),
                    " but its parameter is on ", param.device());
  TORCH_CHECK_VALUE(t.sizes().equals(param.sizes()), fn, ": ", what..., " has shape ",
                    shape_str(t.sizes()), " but its parameter has shape ", shape_str(param.sizes()));
  TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": ", what..., " must be contiguous");
}

Dims check_call(const char* fn, const TrainCall& c) {
  const at::Tensor& w1 = c.params[kW1];
  const at::Tensor& w2 = c.params[kW2];
  TORCH_CHECK_VALUE(w1.defined() && w2.defined(), fn, ": the model needs both weights");
  TORCH_CHECK_VALUE(w1.device().is_cpu(), fn, ": the fused trainer runs on the CPU; the parameters are on ",
                    w1.device());
  TORCH_CHECK_TYPE(w1.scalar_type() == at::kFloat || w1.scalar_type() == at::kDouble, fn,
                   ": parameters must be float32 or float64, got ", w1.scalar_type());
  Dims d{};
  d.act = c.act;
  const bool stacked = w1.dim() == 3;
  TORCH_CHECK_VALUE(w1.dim() == 2 || stacked, fn, ": w1 must be (H, D) or (K, H, D), got ", shape_str(w1.sizes()));
  d.K = stacked ? w1.size(0) : 1;
  d.H = w1.size(-2);
  d.D = w1.size(-1);
  TORCH_CHECK_VALUE(w2.dim() == w1.dim() && w2.size(-1) == d.H && (!stacked || w2.size(0) == d.K), fn,
                    ": w2 must be ", stacked ? "(K, O, H)" : "(O, H)", " with K and H of w1, got ", shape_str(w2.sizes()));
  d.O = w2.size(-2);
  for (int p = 0; p < kNumParams; ++p) {
    const at::Tensor& t = c.params[p];
    if (!t.defined()) continue;
    TORCH_CHECK_TYPE(t.scalar_type() == w1.scalar_type(), fn, ": parameter ", kParamNames[p], " has dtype ",
                     t.scalar_type(), " but w1 has ", w1.scalar_type());
    TORCH_CHECK_VALUE(t.device() == w1.device(), fn, ": parameter ", kParamNames[p], " is on ", t.device(),
                      " but w1 is on ", w1.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": parameter ", kParamNames[p], " must be contiguous");
    const char* pname = kParamNames[p];
    check_like(fn, c.grads[p], t, "the gradient buffer of ", pname);
    const ParamState& st = c.state[p];
    const char* state_of = "optimizer state of ";
    const auto used = used_state(st.rule);
    for (int i = 0; i < kMaxState; ++i) {
      if (used[i]) check_like(fn, st.state[i], t, state_of, pname, " '", used[i], "'");
    }
    if (has_step_count(st.rule)) {
      TORCH_CHECK_VALUE(st.step.defined() && st.step.numel() == 1 && st.step.device().is_cpu() &&
                            (st.step.scalar_type() == at::kFloat || st.step.scalar_type() == at::kDouble),
                        fn, ": ", state_of, pname, " 'step' must be a one-element float tensor on the CPU");
    }
  }
  auto check_bias = [&](int p, int64_t width) {
    const at::Tensor& b = c.params[p];
    if (!b.defined()) return;
    const bool ok = stacked ? (b.dim() == 2 && b.size(0) == d.K && b.size(1) == width)
                            : (b.dim() == 1 && b.size(0) == width);
    TORCH_CHECK_VALUE(ok, fn, ": parameter ", kParamNames[p], " must have shape ",
                      stacked ? "(K, " : "(", width, stacked ? ")" : ",)", ", got ", shape_str(b.sizes()));
  };
  check_bias(kB1, d.H);
  check_bias(kB2, d.O);

  auto check_data = [&](const char* name, const at::Tensor& t, int64_t width) -> int64_t {
    TORCH_CHECK_TYPE(t.scalar_type() == w1.scalar_type(), fn, ": argument '", name, "' has dtype ",
                     t.scalar_type(), " but the parameters have ", w1.scalar_type());
    TORCH_CHECK_VALUE(t.device() == w1.device(), fn, ": argument '", name, "' is on ", t.device(),
                      " but the parameters are on ", w1.device());
    TORCH_CHECK_VALUE(t.is_contiguous(), fn, ": argument '", name, "' must be contiguous");
    const bool per_model = t.dim() == 3;
    TORCH_CHECK_VALUE(
        (t.dim() == 2 || (per_model && stacked && t.size(0) == d.K)) && t.size(-1) == width, fn, ": argument '",
        name, "' must have shape (N, ", width, ")", stacked ? " or (K, N, " + std::to_string(width) + ")" : "",
        ", got ", shape_str(t.sizes()));
    return t.size(-2);
  };
  d.N = check_data("x", c.x, d.D);
  const int64_t nt = check_data("target", c.target, d.O);
  TORCH_CHECK_VALUE(nt == d.N, fn, ": 'x' has ", d.N, " rows but 'target' has ", nt);
  TORCH_CHECK_VALUE(d.N > 0, fn, ": 'x' has no rows");
  TORCH_CHECK_VALUE(c.num_steps >= 0, fn, ": the number of steps must be >= 0");
  TORCH_CHECK_VALUE(c.losses.is_contiguous() && c.losses.scalar_type() == w1.scalar_type() &&
                        c.losses.numel() >= c.num_steps * d.K,
                    fn, ": internal: the loss buffer is too small");
  if (c.batch_size > 0 && c.order.defined()) {
    const int64_t per_epoch = (d.N + c.batch_size - 1) / c.batch_size;
    const int64_t last_epoch = (c.first_step + std::max<int64_t>(c.num_steps, 1) - 1) / per_epoch;
    TORCH_CHECK_VALUE(c.order.scalar_type() == at::kLong && c.order.is_contiguous() &&
                          c.order.numel() >= (last_epoch + 1) * d.N,
                      fn, ": internal: the batch order covers too few epochs");
    // Every index is read as a row of x: none may point outside it.
    const int64_t* idx = c.order.data_ptr<int64_t>();
    const bool in_range = std::all_of(idx, idx + c.order.numel(), [&](int64_t i) { return i >= 0 && i < d.N; });
    TORCH_CHECK_VALUE(in_range, fn, ": internal: the batch order holds a row index outside [0, ", d.N, ")");
  }
  if (c.lr_scale.defined()) {
    TORCH_CHECK_VALUE(c.lr_scale.scalar_type() == at::kDouble && c.lr_scale.is_contiguous() &&
                          c.lr_scale.numel() == d.K,
                      fn, ": the per-model learning-rate factors must be a float64 tensor of shape (K,) = (", d.K,
                      ",)");
  }
  return d;
}

}  // namespace

void set_fail_after_first_update(bool on) { fail_after_first_update.store(on, std::memory_order_relaxed); }
bool testing_fail_after_first_update() { return fail_after_first_update.load(std::memory_order_relaxed); }

void train_steps(const char* fn, TrainCall& call, bool* started) {
  const Dims d = check_call(fn, call);  // writes nothing
  TORCH_CHECK_VALUE(!call.reducer || d.K == 1, fn,
                    ": internal: the data-parallel route runs one model on the narrow kernels here");
  TORCH_CHECK_VALUE(!call.sklearn.on || d.K == 1, fn, ": internal: scikit-learn's step terms are for one model");
  TORCH_CHECK_VALUE(!call.sklearn.weight_sq.defined() ||
                        (call.sklearn.weight_sq.scalar_type() == at::kDouble &&
                         call.sklearn.weight_sq.is_contiguous() && call.sklearn.weight_sq.numel() >= call.num_steps),
                    fn, ": internal: the ||W||^2 buffer must be float64 with a value per step");
  if (call.num_steps == 0) return;
  if (started) *started = true;  // from here on an error may leave a step partly applied
  // The parameters are updated in place, as torch.optim does under no_grad.
  at::NoGradGuard no_grad;
  if (call.params[kW1].scalar_type() == at::kFloat) {
    run_all<float>(call, d);
  } else {
    run_all<double>(call, d);
  }
  // In-place updates bump the version counters (as optimizer.step()'s in-place
  // ops do), so a graph that saved a parameter before the step refuses to use it.
  for (int p = 0; p < kNumParams; ++p) {
    if (!call.params[p].defined()) continue;
    for (const at::Tensor* t : {&call.params[p], &call.grads[p]}) t->unsafeGetTensorImpl()->bump_version();
    for (const at::Tensor& t : call.state[p].state) {
      if (t.defined()) t.unsafeGetTensorImpl()->bump_version();
    }
  }
}

const char* train_path_name(int64_t D, int64_t H, int64_t O, Activation act) {
  const Dims d{1, 1, D, H, O, act};
  const int64_t macs = d.macs_per_row();
  // The any-depth engine (csrc/engine/, run by deep_train.cpp) where it was measured faster than
  // this file's kernels (docs/bench/trainer_crossover.md: Trainer.fit, float32, 2 threads, Adam,
  // both routes interleaved in one process; engine / narrow over two runs, 100 and 2 000 rows):
  //   4 or more inputs and H·(D + O) >= 192 multiply-adds a row: 32×16→1 0.54–0.58, 16×32→2
  //   0.54–0.82, 16×16→1 0.66–0.89, 8×32→1 0.76–0.96, 8×16→4 0.84–1.03, 4×32→2 0.86–1.08; below it
  //   this file's kernels (4×16→1 1.04–1.23, 4×32→1 0.93–1.13; 8×8→1 1.15–1.34 at 100 rows, though
  //   0.74–0.85 at 2 000: the rule does not see the rows), as with 1–3 inputs and 1–2 outputs
  //   (1×20→1 tanh 1.25–1.38, 2×32→2 1.01–1.12);
  //   16 or more inputs and >= 128: 16×8→1 0.68–0.96, 32×4→1 0.91–0.94 (16×4→1, 68, keeps this
  //   file's: 1.04–1.17, but 0.70–0.74 at 2 000 rows in one run);
  //   4 or more outputs and >= 320: 3×64→4 0.72–1.02, 1×64→4 0.93–1.10 (1×32→4 1.03–1.16 keeps this
  //   file's);
  //   every row of >= 2048 (this file once ran its own BLAS orchestration there; the engine against
  //   it, 256×32→160→8 517–604 → 164–169 µs a step, 1000×1→2048→1 8.0–8.2 → 3.7–4.4 ms).
  // The compile-time-width σ kernel (1–2 inputs, 1 output) keeps its nets whatever their width:
  // the engine was 1.12–1.73× slower there (1×20→1, 2×64→1, 1×256→1).
  const bool engine = (D >= 4 && macs >= 192) || (D >= 16 && macs >= 128) || (O >= 4 && macs >= 320) ||
                      macs >= kNarrowMaxMacsPerRow;
  if (fixed_width_kernel(d)) return "trainer-narrow-fixed";
  return engine ? "trainer-engine" : "trainer-narrow";
}

bool narrow_kernel(int64_t D, int64_t H, int64_t O, Activation act) {
  const char* path = train_path_name(D, H, O, act);
  return std::strcmp(path, "trainer-narrow") == 0 || std::strcmp(path, "trainer-narrow-fixed") == 0;
}

template <typename T>
void narrow_loss_sums(int64_t N, int64_t D, int64_t H, int64_t O, Activation act, const T* w1, const T* b1,
                      const T* w2, const T* b2, const T* x, const T* t, T two_c, std::vector<double>& sums) {
  const Dims d{1, N, D, H, O, act};
  const SumLayout lay(d);
  const ModelPtrs<T> m{w1, b1, w2, b2, x, t};
  StepRows rows;
  rows.count = N;
  const Partition part(N);
  thread_local std::vector<double> chunks;
  chunks.resize(static_cast<size_t>(part.chunks * lay.size));
  auto chunk_range = [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) chunk_sums_kernel(d, lay, m, rows, part, ch, two_c, chunks.data() + ch * lay.size);
  };
  const int64_t chunk_macs = std::max<int64_t>(1, N / std::max<int64_t>(part.chunks, 1)) * d.macs_per_row();
  at::parallel_for(0, part.chunks, std::max<int64_t>(1, kMinTaskMacs / chunk_macs), chunk_range);
  sums.assign(static_cast<size_t>(lay.size), 0.0);
  for (int64_t ch = 0; ch < part.chunks; ++ch) {
    const double* cs = chunks.data() + ch * lay.size;
    for (int64_t e = 0; e < lay.size; ++e) sums[e] += cs[e];
  }
}

template void narrow_loss_sums<float>(int64_t, int64_t, int64_t, int64_t, Activation, const float*, const float*,
                                      const float*, const float*, const float*, const float*, float,
                                      std::vector<double>&);
template void narrow_loss_sums<double>(int64_t, int64_t, int64_t, int64_t, Activation, const double*,
                                       const double*, const double*, const double*, const double*, const double*,
                                       double, std::vector<double>&);

}  // namespace fusedgrad::trainer
