// The CPU engine for an MLP of L linear layers (any depth), one pass over the
// rows for the loss and every gradient. The math (README, "Deep networks"):
//
//   a_0 = x                                  widths n_0 = D, n_1 … n_{L−1}, n_L = O
//   h_l = a_{l−1} W_lᵀ + b_l,   a_l = act(h_l)   (l < L),   p = h_L
//   r = p − t,   L = c Σ r²,   g = 2c r        (c = 1 or 1/(N·O))
//   δ_L = g;   dW_l = δ_lᵀ a_{l−1},   db_l = Σ_rows δ_l,   δ_{l−1} = (δ_l W_l) ⊙ act'(h_{l−1})
//   dx = δ_1 W_1,   dt = −g
//
// Rows run in blocks of at most kBlockRows (every intermediate of a block stays
// in cache; nothing of size N is allocated); each block's three products —
// forward, backward-data and weight gradient — run on one register-blocked
// micro-kernel (mlp_engine_cpu.cpp). Sums over rows are taken in T within a
// block and in double across blocks; the blocks are grouped into a number of
// chunks that depends only on the number of rows, and the chunks' sums are
// added in chunk order, so the result is the same bit for bit for any number
// of threads.
//
// Three epilogues share the pass: loss + gradients (mlp_loss, the trainer),
// forward only (the prediction), backward from a given ∂L/∂p (the prediction's
// backward, which recomputes the forward of each block instead of keeping it).
//
// Input derivatives (order 1 or 2, mlp_jets_cpu.cpp): the forward and backward
// epilogues also run on jets — each row carries, beside h_l, its tangents
// ∂h_l/∂x_d and (order 2) the second derivatives ∂²h_l/∂x_d², d < D:
//
//   ∂a_0 = e_d, ∂²a_0 = 0;   ∂h_l = ∂a_{l−1} W_lᵀ,   ∂²h_l = ∂²a_{l−1} W_lᵀ   (no bias)
//   ∂a_l = act'(h_l) ∂h_l,   ∂²a_l = act''(h_l) (∂h_l)² + act'(h_l) ∂²h_l
//   u = h_L,  du[·, o, d] = ∂h_L/∂x_d,  d2u[·, o, d] = ∂²h_L/∂x_d²
//
// so one product of a layer maps the 1 + order·D rows of a sample's jet at
// once. The backward from (∂L/∂u, ∂L/∂du, ∂L/∂d2u) runs the same products
// transposed, with the activation step reversed (ḡ: the gradient of a_l's parts):
//
//   δh   = ḡa act' + Σ_d ḡ∂a_d act'' ∂h_d + Σ_d ḡ∂²a_d (act''' ∂h_d² + act'' ∂²h_d)
//   δ∂h_d  = ḡ∂a_d act' + 2 ḡ∂²a_d act'' ∂h_d,      δ∂²h_d = ḡ∂²a_d act'
//   dW_l = Σ over every jet row δᵀ a_{l−1},   db_l = Σ over the value rows δh,   dx = δh_1 W_1
//
// Directional jets generalise both: tangents along per-row directions v_i (∂a_0 = v_i) and second
// parts D²h[v_p, v_q] for given pairs (p, q): ∂²a_pq = act'' ∂h_p ∂h_q + act' ∂²h_pq, reversed as
//
//   δh += Σ_pq ḡ∂²a_pq (act''' ∂h_p ∂h_q + act'' ∂²h_pq),   δ∂h_p += ḡ∂²a_pq act'' ∂h_q,
//   δ∂h_q += ḡ∂²a_pq act'' ∂h_p,   dv_i = δ∂h_1,i W_1
//
// (derivatives() is the case v_i = e_d, pairs (d, d)). These are the nested gradients of the
// prediction: J(x)ᵀḡ's own backward along v is the reverse of the jet along v (ḡᵀ H v and ∂/∂θ of
// ḡᵀ J v), and that one's backward along w the reverse of the mixed jet D²u[v, w].
#pragma once

#include <c10/util/SmallVector.h>

#include <cstdint>
#include <functional>
#include <vector>

#include "../common/activation.h"

namespace fusedgrad::engine {

// The shape of one network: L = width.size() − 1 linear layers.
struct NetShape {
  std::vector<int64_t> width;  // n_0 … n_L
  std::vector<char> bias;      // bias[l]: layer l + 1 (0-based l) has a bias
  Activation act = Activation::Sigmoid;

  int64_t layers() const { return static_cast<int64_t>(width.size()) - 1; }
  int64_t in() const { return width.front(); }
  int64_t out() const { return width.back(); }
  // Multiply-adds of one row's forward pass.
  int64_t macs_per_row() const {
    int64_t m = 0;
    for (int64_t l = 0; l < layers(); ++l) m += width[l] * width[l + 1];
    return m;
  }
};

// Where each parameter's gradient sum sits in the engine's double output:
// per layer dW_l (n_{l+1} × n_l, row-major as the weight) then db_l (n_{l+1},
// when the layer has a bias), then the loss Σ r².
struct SumLayout {
  c10::SmallVector<int64_t, 8> dw, db;  // offsets; db[l] = −1 without a bias (inline up to depth 7: no allocation)
  int64_t loss = 0, size = 0;
  explicit SumLayout(const NetShape& s);
};

enum class Epilogue { LossGrads, Forward, Backward };

// Runs chunk(0 … chunks − 1) of a pass, each once, possibly on several threads. A caller that keeps
// threads across many passes supplies one (the trainer's step loop: thread_team.h); without one a
// pass puts its chunks on at::parallel_for when its work pays for the fork and join.
// `waiting`, where given, is called by the calling thread again and again while it waits for chunks
// other threads are running (run_chunks adds up the sums of the chunks done so far).
struct ChunkRunner {
  virtual void run(int64_t chunks, const std::function<void(int64_t)>& chunk,
                   const std::function<void()>* waiting = nullptr) const = 0;
  virtual ~ChunkRunner() = default;
};

template <typename T>
struct Pass {
  const NetShape* shape = nullptr;
  std::vector<const T*> W, b;  // layer l's weight (n_{l+1}, n_l) and bias (n_{l+1}) or null
  // Row r of the pass is row index[r] (or first + r) of x (·, D), target and grad_out (·, O).
  const T* x = nullptr;
  const int64_t* index = nullptr;
  int64_t first = 0, count = 0;
  const T* target = nullptr;    // LossGrads; null: zeros
  const T* grad_out = nullptr;  // Backward: ∂L/∂p
  T two_c = T(0);               // LossGrads: 2c
  Epilogue epilogue = Epilogue::LossGrads;
  bool param_grads = true;      // compute dW, db (into sums)
  // Outputs, indexed by the source row (row index[r] or first + r); null: not wanted.
  T* pred = nullptr;  // Forward: p (·, O)
  // Forward: the first hidden layer (·, n_1) as the one-hidden-layer ops' backward reads it (their
  // mlp_forward's saved activations): a_1, or h_1 where the activation's derivative reads its input.
  T* hidden = nullptr;
  T* dx = nullptr;    // LossGrads / Backward: (·, D)
  T* dt = nullptr;    // LossGrads: (·, O)
  double* sums = nullptr;  // LossGrads / Backward: SumLayout(shape).size values, overwritten
  bool parallel = true;    // chunks may run on several threads (same bits either way)
  const ChunkRunner* runner = nullptr;  // with `parallel`: the team that runs the chunks (null: at::parallel_for)
  // Input derivatives: order 1 or 2 runs the Forward / Backward epilogue on jets (above).
  int order = 0;
  T* du = nullptr;               // Forward: ∂u/∂x (·, O, D)
  T* d2u = nullptr;              // Forward, order 2: the diagonal ∂²u_o/∂x_d² (·, O, D)
  const T* grad_du = nullptr;    // Backward: ∂L/∂du (·, O, D); null: zeros (so is a null grad_out)
  const T* grad_d2u = nullptr;   // Backward, order 2: ∂L/∂d2u (·, O, D); null: zeros
  // Backward: which tangent (∂/∂x_d) and second-derivative parts to carry, D flags each; null: all.
  // A part whose incoming gradient is zero everywhere — and, for a tangent, whose second
  // derivative is not carried — adds exactly zero to every gradient: the backward drops it
  // (a Burgers residual reads u_xx but not u_tt: 4 of 5 parts).
  const char* carry_du = nullptr;
  const char* carry_d2u = nullptr;
  // Directional jets (the create_graph backward of the prediction, deep_mlp_jvp): the tangent parts
  // start from each row's own directions v_i, dirs (·, ndirs, D), instead of e_d, and the second parts
  // are the mixed D²h[v_p, v_q] of the npairs pairs (p, q) in `pairs` (2·npairs entries). du and
  // grad_du are then (·, O, ndirs), d2u and grad_d2u (·, O, npairs); nothing is dropped (no carry_*).
  // Backward: ddirs (·, ndirs, D), the gradient of dirs; null: not wanted.
  const T* dirs = nullptr;
  int64_t ndirs = 0;
  const int64_t* pairs = nullptr;
  int64_t npairs = 0;
  T* ddirs = nullptr;
};

// Runs the pass. Not reentrant per thread for the same call (uses thread-local scratch).
void run(const Pass<float>& pass);
void run(const Pass<double>& pass);
// The jet passes (order > 0), called by run().
void run_jets(const Pass<float>& pass);
void run_jets(const Pass<double>& pass);

// How a pass of `count` rows runs (fusedgrad.explain): the most rows of a block,
// the blocks and chunks, the vector width (32 or 64 bytes). All depend on the
// shape and the row count only, never on the threads.
int64_t block_rows(const NetShape& s, int64_t element_size);
int64_t block_count(const NetShape& s, int64_t count, int64_t element_size);
int64_t chunk_count(const NetShape& s, int64_t count, int64_t element_size);
int vector_bytes(const NetShape& s, int64_t element_size);
// Whether a block holds each feature as a line of its rows rather than its rows padded to whole
// lane vectors (engine_kernels.h, BlockLayout and rows_in_lanes: where the padding would add more
// than a tenth to the products). Fixed by the shape and the CPU's vector width.
bool rows_in_lanes_layout(const NetShape& s, int64_t element_size);
// cpu_vector.h's cpu_vector_bytes() (vector_bytes() never exceeds it), forced to 32 or 64 for
// every kernel of lane vectors whatever the CPU (tests: the other width's code on this machine);
// 0 goes back to the CPU's.
void force_cpu_vector_bytes(int bytes);
// The threads a team (thread_team.h) should keep for many passes of `count` rows: 1 where the
// passes run on one thread (a single chunk, or too little work to share), else up to torch's thread count.
int64_t team_threads(const NetShape& s, int64_t count, int64_t element_size);
// Whether passes of `count` rows are work a second thread always pays for (kMinParallelMacs): a team
// then runs them from the first step, without timing them alone first (TeamProbe).
bool team_always_pays(const NetShape& s, int64_t count);

}  // namespace fusedgrad::engine
