// The CPU engine of mlp_engine.h.
//
// Layout: within a block, every per-row quantity is stored row-major with its
// width padded to a whole number of lane vectors (np = n rounded up to 16
// floats / 8 doubles), so that the three products of a layer are one kernel,
//
//   out[i, :] = init + Σ_k c(i, k) · M[k, :]          (a row of M is np wide)
//
//   forward          h_l[r, :]   = b_l + Σ_k a_{l−1}[r, k] · W_lᵀ[k, :]
//   backward-data    δ_{l−1}[r, :] =     Σ_j δ_l[r, j]     · W_l[j, :]
//   weight gradient  dW_l[j, :]  =       Σ_r δ_l[r, j]     · a_{l−1}[r, :]
//
// and that kernel (`tile`) keeps a tile of `out` in registers while it walks
// k: each step loads one row of M (≤ 4 vectors) and broadcasts one coefficient
// per row of the tile — the shape of a BLAS micro-kernel. Padded lanes of the
// weights and biases are zero, so padded lanes of h, δ and g are zero and
// never reach a result; padded lanes of dW are computed and dropped.
#include "mlp_engine.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "../common/lane_vector.h"   // LaneBuffer: 64-byte aligned scratch
#include "../cpu/activation_cpu.h"   // activate_n, activation_backward_n: the activation table's vector forms

namespace fusedgrad::engine {

SumLayout::SumLayout(const NetShape& s) {
  const int64_t L = s.layers();
  dw.resize(L);
  db.resize(L);
  int64_t off = 0;
  for (int64_t l = 0; l < L; ++l) {
    dw[l] = off;
    off += s.width[l + 1] * s.width[l];
    db[l] = s.bias[l] ? off : -1;
    if (s.bias[l]) off += s.width[l + 1];
  }
  loss = off;
  size = off + 1;
}

namespace {

constexpr int64_t kMaxChunks = 16;        // row chunks of a pass: fixed by the row count, not the threads
// Multiply-adds of a pass below which a second thread does not pay. On this
// 2-vCPU machine a 100-row depth-3 step (86 k multiply-adds) took 14.8 µs on
// one thread and, split in two, 12.5 or 25 µs on two depending on the process
// (bimodal from run to run: the barrier and the shared core); the PINN-sized
// step (2.2 M) gains from the second thread every run.
constexpr int64_t kMinParallelMacs = 1 << 18;
constexpr int64_t kScratchBytes = 192 * 1024;  // a block's intermediates: within L2

int64_t padded(int64_t n, int64_t lanes) { return (n + lanes - 1) / lanes * lanes; }

int64_t block_rows_for(const NetShape& s, int64_t elt) {
  const int64_t lanes = 64 / elt;
  int64_t per_row = 0, widest = 0;
  for (int64_t n : s.width) {
    per_row += 2 * padded(n, lanes);  // h and a of each layer
    widest = std::max(widest, padded(n, lanes));
  }
  per_row += 2 * widest;  // two δ buffers
  const int64_t rows = kScratchBytes / (elt * per_row);
  return std::clamp<int64_t>(rows / 8 * 8, 16, 256);
}

int64_t blocks_for(const NetShape& s, int64_t count, int64_t element_size) {
  const int64_t B = block_rows_for(s, element_size);
  return std::max<int64_t>((count + B - 1) / B, 1);
}


// A vector of VB bytes of T (GCC's vector extension): 64 (one AVX-512
// register) or 32, chosen per network by vector_bytes().
template <typename T, int VB>
struct VecOf {
  typedef T type __attribute__((vector_size(VB)));
};
template <typename T, int VB>
using Vec = typename VecOf<T, VB>::type;

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE Vec<T, VB> load(const T* p) {
  Vec<T, VB> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void store(T* p, const Vec<T, VB>& v) {
  std::memcpy(p, &v, sizeof(v));
}

// out[i, 0 : NV vectors] = init + Σ_{k < K} coef[i·ci + k·ck] · M[k·ldm, 0 : NV vectors] for RI rows i.
// With few accumulators (RI·NV < 8) each would wait on its own previous multiply-add (4 cycles):
// KU accumulators per output then take every KU-th k and are added at the end (a fixed order:
// the result depends on the shape, never on the threads). Measured: the 1-row tiles of a 1-wide
// input layer's weight gradient were 5 % of a 1→[20]×3→1 pass as one chain.
template <typename T, int VB, int NV, int RI>
FUSEDGRAD_CPU_INLINE void tile(int64_t K, const T* FUSEDGRAD_RESTRICT coef, int64_t ci, int64_t ck,
                               const T* FUSEDGRAD_RESTRICT M, int64_t ldm, const T* FUSEDGRAD_RESTRICT init,
                               T* FUSEDGRAD_RESTRICT out, int64_t ldo) {
  constexpr int64_t W = VB / sizeof(T);
  constexpr int KU = RI * NV >= 8 ? 1 : RI * NV >= 4 ? 2 : RI * NV >= 2 ? 4 : 8;
  Vec<T, VB> acc[KU][RI][NV];
#pragma GCC unroll 4
  for (int v = 0; v < NV; ++v) {
    const Vec<T, VB> b = init ? load<T, VB>(init + v * W) : Vec<T, VB>{};
#pragma GCC unroll 8
    for (int i = 0; i < RI; ++i) {
      acc[0][i][v] = b;
#pragma GCC unroll 8
      for (int u = 1; u < KU; ++u) acc[u][i][v] = Vec<T, VB>{};
    }
  }
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 8
    for (int u = 0; u < KU; ++u) {
      Vec<T, VB> m[NV];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) m[v] = load<T, VB>(M + (k + u) * ldm + v * W);
#pragma GCC unroll 8
      for (int i = 0; i < RI; ++i) {
        const T c = coef[i * ci + (k + u) * ck];
#pragma GCC unroll 4
        for (int v = 0; v < NV; ++v) acc[u][i][v] += c * m[v];
      }
    }
  }
  for (; k < K; ++k) {
    Vec<T, VB> m[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) m[v] = load<T, VB>(M + k * ldm + v * W);
#pragma GCC unroll 8
    for (int i = 0; i < RI; ++i) {
      const T c = coef[i * ci + k * ck];
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[0][i][v] += c * m[v];
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < RI; ++i) {
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) {
      Vec<T, VB> sum = acc[0][i][v];
#pragma GCC unroll 8
      for (int u = 1; u < KU; ++u) sum += acc[u][i][v];
      store<T, VB>(out + i * ldo + v * W, sum);
    }
  }
}

// Rows 0 .. rows − 1 of out (each np wide, np a multiple of the lanes), as `tile`.
// A tile holds up to 16 accumulators: 8 rows of one vector, or 4 rows of 2–4; the
// rows left over go in tiles of 4, 2 and 1.
template <typename T, int VB, int NV>
FUSEDGRAD_CPU_INLINE void tile_rows(int64_t rows, int64_t K, const T* coef, int64_t ci, int64_t ck, const T* M,
                                    int64_t ldm, const T* init, T* out, int64_t ldo) {
  constexpr int RI = NV == 1 ? 8 : 4;
  int64_t i = 0;
  for (; i + RI <= rows; i += RI) tile<T, VB, NV, RI>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo);
  if constexpr (RI == 8) {
    if (i + 4 <= rows) {
      tile<T, VB, NV, 4>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo);
      i += 4;
    }
  }
  if (i + 2 <= rows) {
    tile<T, VB, NV, 2>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo);
    i += 2;
  }
  if (i < rows) tile<T, VB, NV, 1>(K, coef + i * ci, ci, ck, M, ldm, init, out + i * ldo, ldo);
}

template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void product(int64_t rows, int64_t K, const T* coef, int64_t ci, int64_t ck, const T* M,
                                  int64_t ldm, int64_t np, const T* init, T* out, int64_t ldo) {
  constexpr int64_t W = VB / sizeof(T);
  for (int64_t c0 = 0; c0 < np; c0 += 4 * W) {
    const T* Mc = M + c0;
    const T* ic = init ? init + c0 : nullptr;
    T* oc = out + c0;
    switch (std::min<int64_t>(4, (np - c0) / W)) {
      case 1: tile_rows<T, VB, 1>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo); break;
      case 2: tile_rows<T, VB, 2>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo); break;
      case 3: tile_rows<T, VB, 3>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo); break;
      default: tile_rows<T, VB, 4>(rows, K, coef, ci, ck, Mc, ldm, ic, oc, ldo); break;
    }
  }
}

// A pass's weights in the two padded layouts the kernel reads, and its layout
// of per-block scratch. Built once per pass, read by every chunk.
// Column sums of rows 0 .. rows − 1 of a (rows × np) block into out (np), in
// registers: four rows' vectors in flight, then added in a fixed order.
template <typename T, int VB>
FUSEDGRAD_CPU_INLINE void column_sums(const T* a, int64_t rows, int64_t np, T* out) {
  constexpr int64_t W = VB / sizeof(T);
  for (int64_t c = 0; c < np; c += W) {
    Vec<T, VB> s[4] = {};
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) s[q] += load<T, VB>(a + (r + q) * np + c);
    }
    for (; r < rows; ++r) s[0] += load<T, VB>(a + r * np + c);
    store<T, VB>(out + c, (s[0] + s[1]) + (s[2] + s[3]));
  }
}

// Whether a network's padded widths are much shorter with 32-byte vectors
// than with 64-byte ones (narrow layers: 20 floats pad to 32 with 16 lanes, to
// 24 with 8); products and activations run over the padded widths.
int vector_bytes_for(const NetShape& s, int64_t elt) {
  int64_t with64 = 0, with32 = 0;
  for (int64_t n : s.width) {
    with64 += padded(n, 64 / elt);
    with32 += padded(n, 32 / elt);
  }
  return with64 * 10 > with32 * 11 ? 32 : 64;
}

template <typename T, int VB>
struct Plan {
  const Pass<T>& pass;
  const NetShape& s;
  SumLayout lay;
  int64_t L, B, blocks, chunks, lanes;
  bool saves_input;
  std::vector<int64_t> np;                  // padded widths
  std::vector<const T*> WT, Wp, bp;         // W_lᵀ (n_l × np_{l+1}), W_l (n_{l+1} × np_l), b_l (np_{l+1}) or null
  std::vector<int64_t> a_off, h_off;        // scratch offsets of a_l and h_l (per row block)
  int64_t d0_off, d1_off, dw_off, db_off, scratch_size;
  std::vector<T> packed;                    // storage of WT, Wp, bp

  explicit Plan(const Pass<T>& p) : pass(p), s(*p.shape), lay(*p.shape) {
    L = s.layers();
    lanes = VB / sizeof(T);
    B = block_rows_for(s, sizeof(T));
    blocks = blocks_for(s, p.count, sizeof(T));
    chunks = std::min(blocks, kMaxChunks);
    saves_input = activation_saves_input(s.act);
    np.resize(L + 1);
    int64_t widest = 0;
    for (int64_t l = 0; l <= L; ++l) widest = std::max(widest, np[l] = padded(s.width[l], lanes));
    // Packed weights: every segment starts on a lane-vector boundary (np are multiples of the lanes).
    int64_t total = 0;
    for (int64_t l = 0; l < L; ++l) total += s.width[l] * np[l + 1] + s.width[l + 1] * np[l] + np[l + 1];
    packed.assign(static_cast<size_t>(total + lanes), T(0));
    T* base = packed.data();
    base += (lanes - (reinterpret_cast<uintptr_t>(base) / sizeof(T)) % lanes) % lanes;
    WT.resize(L);
    Wp.resize(L);
    bp.resize(L);
    for (int64_t l = 0; l < L; ++l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1];
      const T* w = p.W[l];
      T* wt = base;
      base += n_in * np[l + 1];
      T* wp = base;
      base += n_out * np[l];
      for (int64_t j = 0; j < n_out; ++j) {
        for (int64_t k = 0; k < n_in; ++k) {
          wt[k * np[l + 1] + j] = w[j * n_in + k];
          wp[j * np[l] + k] = w[j * n_in + k];
        }
      }
      WT[l] = wt;
      Wp[l] = wp;
      if (p.b[l]) {
        std::copy(p.b[l], p.b[l] + n_out, base);
        bp[l] = base;
      } else {
        bp[l] = nullptr;
      }
      base += np[l + 1];
    }
    // Scratch of one block: a_0 … a_{L−1}, h_1 … h_L (h_l is a_l where the
    // activation does not keep its input), two δ buffers, one dW_l and db_l.
    int64_t off = 0;
    a_off.assign(L + 1, 0);
    h_off.assign(L + 1, 0);
    for (int64_t l = 0; l <= L; ++l) {
      a_off[l] = off;
      off += B * np[l];
      if (l > 0 && l < L && saves_input) {
        h_off[l] = off;
        off += B * np[l];
      } else {
        h_off[l] = a_off[l];  // h_L = p (no activation); a_0 = x has no h
      }
    }
    d0_off = off;
    off += B * widest;
    d1_off = off;
    off += B * widest;
    dw_off = off;
    int64_t dw_max = 0;
    for (int64_t l = 0; l < L; ++l) dw_max = std::max(dw_max, s.width[l + 1] * np[l]);
    off += dw_max;
    db_off = off;
    off += widest;
    scratch_size = off;
  }

  int64_t row(int64_t r) const { return pass.index ? pass.index[r] : pass.first + r; }

  // Rows r0 .. r0 + nb − 1 of the pass; parameter sums and Σ r² added into `sums`.
  FUSEDGRAD_CPU_INLINE void block(T* scratch, int64_t r0, int64_t nb, double* sums) const {
    const int64_t D = s.in(), O = s.out();
    T* a0 = scratch + a_off[0];
    for (int64_t r = 0; r < nb; ++r) {
      const T* src = pass.x + row(r0 + r) * D;
      T* dst = a0 + r * np[0];
      std::copy(src, src + D, dst);
      std::fill(dst + D, dst + np[0], T(0));
    }
    // Forward.
    for (int64_t l = 0; l < L; ++l) {
      T* in = scratch + a_off[l];
      T* h = scratch + h_off[l + 1];
      product<T, VB>(nb, s.width[l], in, np[l], 1, WT[l], np[l + 1], np[l + 1], bp[l], h, np[l + 1]);
      T* a = scratch + a_off[l + 1];
      if (l + 1 < L && !(s.act == Activation::Identity && a == h)) activate_n(s.act, h, a, nb * np[l + 1]);
    }
    const T* p = scratch + h_off[L];
    const int64_t npo = np[L];
    if (pass.epilogue == Epilogue::Forward) {
      for (int64_t r = 0; r < nb; ++r) std::copy(p + r * npo, p + r * npo + O, pass.pred + row(r0 + r) * O);
      return;
    }
    // ∂L/∂p of the block's rows (padded lanes zero).
    T* g = scratch + d0_off;
    if (pass.epilogue == Epilogue::LossGrads) {
      double loss = 0;
      for (int64_t r = 0; r < nb; ++r) {
        const int64_t src = row(r0 + r) * O;
        T* gr = g + r * npo;
        const T* pr = p + r * npo;
        for (int64_t o = 0; o < O; ++o) {
          const T res = pr[o] - (pass.target ? pass.target[src + o] : T(0));
          loss += static_cast<double>(res) * static_cast<double>(res);
          gr[o] = pass.two_c * res;
          if (pass.dt) pass.dt[src + o] = -gr[o];
        }
        std::fill(gr + O, gr + npo, T(0));
      }
      sums[lay.loss] += loss;
    } else {
      for (int64_t r = 0; r < nb; ++r) {
        const T* src = pass.grad_out + row(r0 + r) * O;
        std::copy(src, src + O, g + r * npo);
        std::fill(g + r * npo + O, g + (r + 1) * npo, T(0));
      }
    }
    // Backward, layer by layer from the top.
    T* delta = g;
    T* next = scratch + d1_off;
    for (int64_t l = L - 1; l >= 0; --l) {
      const int64_t n_in = s.width[l], n_out = s.width[l + 1];
      const T* a = scratch + a_off[l];
      if (pass.param_grads) {
        T* dw = scratch + dw_off;
        product<T, VB>(n_out, nb, delta, 1, np[l + 1], a, np[l], np[l], nullptr, dw, np[l]);
        double* dst = sums + lay.dw[l];
        for (int64_t j = 0; j < n_out; ++j) {
          for (int64_t k = 0; k < n_in; ++k) dst[j * n_in + k] += static_cast<double>(dw[j * np[l] + k]);
        }
        if (lay.db[l] >= 0) {
          T* db = scratch + db_off;
          column_sums<T, VB>(delta, nb, np[l + 1], db);
          double* dbs = sums + lay.db[l];
          for (int64_t j = 0; j < n_out; ++j) dbs[j] += static_cast<double>(db[j]);
        }
      }
      if (l == 0 && !pass.dx) break;
      product<T, VB>(nb, n_out, delta, np[l + 1], 1, Wp[l], np[l], np[l], nullptr, next, np[l]);
      if (l > 0) {
        activation_backward_n(s.act, next, scratch + h_off[l], nb * np[l]);
      } else {
        for (int64_t r = 0; r < nb; ++r) std::copy(next + r * np[0], next + r * np[0] + D, pass.dx + row(r0 + r) * D);
      }
      std::swap(delta, next);
    }
  }

  // Chunk ch of the pass: its rows, block by block, summed into chunk_sums.
  FUSEDGRAD_CPU_INLINE void chunk(int64_t ch, double* chunk_sums) const {
    thread_local LaneBuffer<T> buffer;
    T* scratch = buffer.get(static_cast<size_t>(scratch_size));
    if (chunk_sums) std::fill(chunk_sums, chunk_sums + lay.size, 0.0);
    // Blocks split the rows evenly (none much smaller than the others); chunk ch takes a run of them.
    for (int64_t b = blocks * ch / chunks; b < blocks * (ch + 1) / chunks; ++b) {
      const int64_t r0 = pass.count * b / blocks, r1 = pass.count * (b + 1) / blocks;
      block(scratch, r0, r1 - r0, chunk_sums);
    }
  }
};

// The clones' entry points: one chunk, compiled per CPU level.
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<float, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<float, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<double, 64>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }
FUSEDGRAD_CPU_CLONES void chunk_kernel(const Plan<double, 32>& plan, int64_t ch, double* sums) { plan.chunk(ch, sums); }

template <typename T, int VB>
void run_plan(const Pass<T>& pass) {
  const Plan<T, VB> plan(pass);
  const bool want_sums = pass.sums && pass.epilogue != Epilogue::Forward;
  const int64_t size = plan.lay.size;
  thread_local std::vector<double> partial;
  if (want_sums) partial.resize(static_cast<size_t>(plan.chunks * size));
  double* base = want_sums ? partial.data() : nullptr;
  auto run_chunks = [&](int64_t c0, int64_t c1) {
    for (int64_t ch = c0; ch < c1; ++ch) chunk_kernel(plan, ch, base ? base + ch * size : nullptr);
  };
  const bool threads = pass.parallel && plan.chunks > 1 &&
      pass.count * pass.shape->macs_per_row() >= kMinParallelMacs;
  if (threads) {
    at::parallel_for(0, plan.chunks, 1, run_chunks);
  } else {
    run_chunks(0, plan.chunks);
  }
  if (!want_sums) return;
  std::copy(base, base + size, pass.sums);
  for (int64_t ch = 1; ch < plan.chunks; ++ch) {
    const double* cs = base + ch * size;
    for (int64_t e = 0; e < size; ++e) pass.sums[e] += cs[e];
  }
}

template <typename T>
void run_pass(const Pass<T>& pass) {
  if (pass.count == 0) {
    if (pass.sums) std::fill(pass.sums, pass.sums + SumLayout(*pass.shape).size, 0.0);
    return;
  }
  if (vector_bytes_for(*pass.shape, sizeof(T)) == 32) {
    run_plan<T, 32>(pass);
  } else {
    run_plan<T, 64>(pass);
  }
}

}  // namespace

int64_t block_rows(const NetShape& s, int64_t element_size) { return block_rows_for(s, element_size); }

int64_t block_count(const NetShape& s, int64_t count, int64_t element_size) {
  return blocks_for(s, count, element_size);
}

int64_t chunk_count(const NetShape& s, int64_t count, int64_t element_size) {
  return std::min(blocks_for(s, count, element_size), kMaxChunks);
}

int vector_bytes(const NetShape& s, int64_t element_size) { return vector_bytes_for(s, element_size);
}

void run(const Pass<float>& pass) { run_pass(pass); }
void run(const Pass<double>& pass) { run_pass(pass); }

}  // namespace fusedgrad::engine
