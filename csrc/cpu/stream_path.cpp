// The streaming path: tall data through narrow networks (curve fits,
// surrogates, collocation sets: N ≫ D, H, O). The GEMM path (ops/gemm_path.cpp)
// materialises (N, H) buffers and runs skinny GEMMs (K = D = 1, or O = 1) that
// BLAS does poorly, and past the caches every step streams and page-faults
// those buffers, so its cost per row grows with N. A row never needs another
// row, so here rows go through forward, loss and backward in blocks of
// `block_rows` rows that stay in the L1/L2 cache, and nothing grows with N but
// the outputs the caller asked for (the prediction, s for the mlp op's
// backward, dx, per-sample bias and target gradients).
//
// Layout. Inside a block every per-row quantity is stored transposed, one
// contiguous row of `block_rows` values per feature: xT (D, B), sT (H, B),
// gT (O, B). Every step of the README's "Math" then is a loop over rows that
// vectorises, whatever D, H, O are:
//
//   hT = W1 xT (+ b1)     sT = act(hT)           tile_product, then σ over the block
//   pT = W2 sT            rT = pT + b2 − tT      tile_product, residual loop
//   L += c Σ r²           gT = 2c rT             residual loop (Σ r² in double)
//   dw2 += gT sTᵀ         db2 += Σ_rows g        lane-wise dots over the block's rows
//   dsT = W2ᵀ gT          dhT = dsT ⊙ act'(sT)   tile_product, in place over sT
//                         (act'(hT), from a kept hT, for activations that save their input)
//   dw1 += dhT xTᵀ        db1 += Σ_rows dh       lane-wise dots over the block's rows
//   dxT = W1ᵀ dhT         dt = −g                tile_product, written back as rows
//
// Determinism. Rows are split into a number of chunks that depends only on N
// and the block size (never on the thread count); at::parallel_for hands out
// whole chunks; each chunk sums its blocks in block order into its own double
// partials (each block's contribution is a sum over ≤ block_rows rows in T,
// as the small path does over 64 rows), and the partials are added in chunk
// order. Results are bitwise identical for any number of threads, and float32
// row sums keep float32 accuracy at any N.
//
// The activation is evaluated in registers, in the tile that computed h, in its
// vectorisable form (cpu/activation_cpu.h; σ by vec_exp, within 1–2 ulp of
// std::exp): ATen's sigmoid over a from_blob view of each block measured
// ~0.7 ns per value here, half the whole step of 1→20→1, where vec_exp costs a
// few tenths.
#include "activation_cpu.h"
#include "cpu_paths.h"
#include "../common/lane_vector.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace fusedgrad {
namespace {

// Rows of a block are processed in tiles of kTile lanes held in registers
// (two AVX-512 or four AVX2 vectors of float); block_rows is a multiple of it, and the
// transposed buffers are padded to whole tiles. Lanes past a block's last row
// hold stale (finite or not) values that no sum and no output ever reads.
constexpr int64_t kTile = 32;
// Values of the widest transposed block buffer: 16k (64 KiB in float32) keeps
// the working set of a block in L2 and makes the one σ call per block long.
constexpr int64_t kBlockValues = 16384;
constexpr int64_t kMinBlockRows = 64;
constexpr int64_t kMaxBlockRows = 1024;
// Row chunks: the unit of parallel work and of the partial sums. Fixed, so
// that the summation order (and hence every bit of the result) does not
// depend on the thread count; 16 balances two (or four) threads well.
constexpr int64_t kMaxChunks = 16;

// Where the streaming path pays, measured against the small-loop and GEMM
// paths by benchmarks/stream_crossover.py (docs/streaming.md has the run).
// Its loops reach ~25 GFLOP/s a core against BLAS's ~80, so it wins where BLAS
// cannot reach its speed: skinny products (a width of 1–4), and the (N, H)
// buffers of tall data that the GEMM path streams through memory.
//  - Every width small: past D = 32, H = 128, O = 16 it lost at every N.
//  - Work per row w = D·H + H·O (MACs of the forward): up to kNarrowRowMacs
//    (1→20→1: 40, 4→32→4: 256, 1→64→1: 128) it won at every N from 100 on
//    (1.2–6× on one thread); up to kMediumRowMacs (16→64→4: 1280) it lost
//    at 10⁴ rows (2 threads: 1558 µs against 1285 µs for a whole step) and
//    won from 10⁵ (15.6 ms against 21.8 ms; 155 ms against 492 ms at 10⁶),
//    so it is taken from kMediumMinRows rows, between the two.
constexpr int64_t kMaxStreamIn = 32;
constexpr int64_t kMaxStreamHidden = 128;
constexpr int64_t kMaxStreamOut = 16;
constexpr int64_t kNarrowRowMacs = 512;
constexpr int64_t kMediumRowMacs = 2048;
constexpr int64_t kMediumMinRows = 32768;

int64_t round_up(int64_t n, int64_t k) { return (n + k - 1) / k * k; }

// Rows per block: as many as keep the block in cache, but from a few thousand
// rows on no more than make kMaxChunks blocks of N, so that every chunk holds
// about the same work and two (or four) threads finish together (10⁴ rows of
// 1→20→1 made 13 blocks of 800: 7 against 6, ~15% of the step lost). Small N
// keeps whole blocks (splitting 100 rows would only wake a second thread).
// Like the chunks, this depends on N and the shape only, never on the threads.
constexpr int64_t kMinBalancedBlockRows = 512;

int64_t block_rows_for(const Problem& p) {
  const int64_t widest = std::max<int64_t>({p.D, p.H, p.O, 1});
  int64_t rows = kBlockValues / widest;
  rows = std::min(rows, std::max(kMinBalancedBlockRows, round_up((p.N + kMaxChunks - 1) / kMaxChunks, kTile)));
  rows = std::clamp<int64_t>(rows, kMinBlockRows, kMaxBlockRows);
  return rows / kTile * kTile;
}

bool kind_streams(const Broadcast2d& op) { return op.kind != Broadcast2d::Kind::Other; }

// out[r, i] = Σ_k a[r·K + k] · in[k, i] for i in [0, lanes) (lanes a multiple
// of kTile): a (R × K) · (K × lanes) product whose K loop runs over a tile of
// kTile accumulators held in registers, so each loaded value of `in` feeds one
// multiply-add and nothing is stored until the tile is done.
template <typename T>
FUSEDGRAD_CPU_INLINE void tile_product(T* FUSEDGRAD_RESTRICT out, int64_t ld_out, const T* FUSEDGRAD_RESTRICT a,
                                          int64_t R, int64_t K, const T* FUSEDGRAD_RESTRICT in, int64_t ld_in,
                                          int64_t lanes) {
  for (int64_t r = 0; r < R; ++r) {
    const T* ar = a + r * K;
    T* o = out + r * ld_out;
    for (int64_t i0 = 0; i0 < lanes; i0 += kTile) {
      T acc[kTile];
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) acc[l] = T(0);
      for (int64_t k = 0; k < K; ++k) {
        const T w = ar[k];
        const T* src = in + k * ld_in + i0;
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) acc[l] += w * src[l];
      }
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) o[i0 + l] = acc[l];
    }
  }
}

// Lane partials gathered before one fold (lane_vector.h): 256 vectors, 16 KiB.
constexpr int64_t kFoldPartials = 256;

// acc[r·C + c] += Σ_i a[r·ld + i] · b[c·ld + i] over the block's n rows: the
// (R × C) sums of two transposed buffers (dw2 += gT sTᵀ, dw1 += dhT xTᵀ),
// taken as lane partials in T (`lanes`: kFoldPartials vectors of scratch),
// folded and added to the double partials.
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void add_outer_sums(double* FUSEDGRAD_RESTRICT acc, const T* a, int64_t R, const T* b, int64_t C,
                                            int64_t ld, int64_t n, T* lanes) {
  const int64_t per_fold = std::max<int64_t>(1, kFoldPartials / C);  // whole rows of C sums per fold
  for (int64_t r0 = 0; r0 < R; r0 += per_fold) {
    const int64_t r1 = std::min(R, r0 + per_fold);
    for (int64_t r = r0; r < r1; ++r) lane_dots_with<VB>(a + r * ld, b, ld, C, n, lanes, (r - r0) * C, 1);
    add_lane_sums<VB>(lanes, (r1 - r0) * C, acc + r0 * C);
  }
}

// acc[r] += Σ_i a[r·ld + i] over the block's n rows, for r < R (db1, Σ g).
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void add_row_sums(double* FUSEDGRAD_RESTRICT acc, const T* a, int64_t R, int64_t ld, int64_t n,
                                          T* lanes) {
  for (int64_t r0 = 0; r0 < R; r0 += kFoldPartials) {
    const int64_t r1 = std::min(R, r0 + kFoldPartials);
    for (int64_t r = r0; r < r1; ++r) lane_row_sum<VB>(a + r * ld, n, lanes + (r - r0) * kLanes<T, VB>);
    add_lane_sums<VB>(lanes, r1 - r0, acc + r0);
  }
}

// The per-call constants every block reads.
template <typename T>
struct StreamPlan {
  using value_type = T;
  int64_t N = 0, D = 0, H = 0, O = 0;
  int64_t B = 0;       // rows per block
  int64_t ld = 0;      // stride of the transposed buffers: B rounded up to kTile
  bool has_w2 = false;
  Activation act = Activation::Sigmoid;
  bool keep_h = false;  // act' is written from h: blocks keep hT beside sT
  at::TensorOptions opts;
  // Weights in the orientation the tile products read (contiguous copies:
  // the caller's may be any strided view).
  std::vector<T> w1;   // (H, D)
  std::vector<T> w1t;  // (D, H), for dx
  std::vector<T> w2;   // (O, H)
  std::vector<T> w2t;  // (H, O), for ds
  // x rows.
  const T* x = nullptr;
  int64_t x_rs = 0, x_cs = 0;

  // Partial sums per chunk (double): [Σ r² | dw1 (H·D) | db1 (H) | dw2 (O·H) | Σ g (O)].
  int64_t off_dw1 = 1, off_db1 = 0, off_dw2 = 0, off_g = 0, width = 0;

  void init(const Problem& p) {
    N = p.N, D = p.D, H = p.H, O = p.O;
    B = block_rows_for(p);
    ld = round_up(B, kTile);
    has_w2 = p.has_w2();
    act = p.activation;
    keep_h = activation_saves_input(act);
    opts = p.x2.options();
    w1.resize(H * D);
    w1t.resize(D * H);
    const T* w = p.w1.const_data_ptr<T>();
    for (int64_t j = 0; j < H; ++j) {
      for (int64_t d = 0; d < D; ++d) {
        const T v = w[j * p.w1.stride(0) + d * p.w1.stride(1)];
        w1[j * D + d] = v;
        w1t[d * H + j] = v;
      }
    }
    if (has_w2) {
      w2.resize(O * H);
      w2t.resize(H * O);
      const T* v2 = p.w2.const_data_ptr<T>();
      for (int64_t o = 0; o < O; ++o) {
        for (int64_t j = 0; j < H; ++j) {
          const T v = v2[o * p.w2.stride(0) + j * p.w2.stride(1)];
          w2[o * H + j] = v;
          w2t[j * O + o] = v;
        }
      }
    }
    x = p.x2.const_data_ptr<T>();
    x_rs = p.x2.stride(0);
    x_cs = p.x2.stride(1);
    off_db1 = off_dw1 + H * D;
    off_dw2 = off_db1 + H;
    off_g = off_dw2 + O * H;
    width = off_g + O;
  }
};

// One chunk's block buffers, per thread and kept across calls: a step
// allocates (and page-faults) nothing that grows with its rows.
template <typename T>
struct BlockBuffers {
  LaneBuffer<T> storage;
  T* xT = nullptr;   // (D, ld)
  T* sT = nullptr;   // (H, ld): h, then s, then dh
  T* gT = nullptr;   // (O, ld): p, then r, then g (sT itself when there is no w2)
  T* dxT = nullptr;  // (D, ld)
  T* bT = nullptr;   // (H, ld): a per-sample b1, transposed
  T* lanes = nullptr;  // (kFoldPartials, kLanes): lane partials of the block's sums
  T* hT = nullptr;   // (H, ld): h, for an activation that saves its input
};

template <typename T>
BlockBuffers<T>& thread_buffers(const StreamPlan<T>& plan) {
  thread_local BlockBuffers<T> buf;
  const int64_t D = plan.D, H = plan.H, O = plan.O, ld = plan.ld;
  const size_t need = static_cast<size_t>((2 * D + 2 * H + O + (plan.keep_h ? H : 0)) * ld + kFoldPartials * kLanes<T, 64>);  // room for either width's partials
  buf.xT = buf.storage.get(need);  // lanes past a block's rows are never read (kTile)
  buf.sT = buf.xT + D * ld;
  buf.gT = buf.sT + H * ld;
  buf.dxT = buf.gT + O * ld;
  buf.bT = buf.dxT + D * ld;
  buf.hT = plan.keep_h ? buf.bT + H * ld : nullptr;
  buf.lanes = buf.bT + (plan.keep_h ? 2 : 1) * H * ld;
  return buf;
}

// Fixed row chunks (see the top of the file): blocks per chunk depend on N and
// the block size only.
struct Chunks {
  int64_t count = 0, blocks_per_chunk = 0, blocks = 0;
  Chunks(int64_t N, int64_t B) {
    blocks = (N + B - 1) / B;
    count = std::min(blocks, kMaxChunks);
    blocks_per_chunk = count ? (blocks + count - 1) / count : 0;
    if (blocks_per_chunk) count = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  }
};

// Runs chunk_fn(first_row, end_row, partial) over the chunks in parallel,
// then sums the partials into totals in chunk order.
template <typename ChunkFn>
void over_chunks(int64_t N, int64_t B, int64_t width, std::vector<double>& totals, const ChunkFn& chunk_fn) {
  totals.assign(static_cast<size_t>(width), 0.0);
  const Chunks chunks(N, B);
  if (chunks.count == 0) return;
  std::vector<double> partial(static_cast<size_t>(chunks.count * width), 0.0);
  const int64_t rows_per_chunk = chunks.blocks_per_chunk * B;
  at::parallel_for(0, chunks.count, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      chunk_fn(c * rows_per_chunk, std::min(N, (c + 1) * rows_per_chunk), partial.data() + c * width);
    }
  });
  for (int64_t c = 0; c < chunks.count; ++c) {
    const double* pc = partial.data() + c * width;
    for (int64_t k = 0; k < width; ++k) totals[k] += pc[k];
  }
}

// xT[d, i] = x[i0 + i, d] for the block's n rows.
template <typename T>
FUSEDGRAD_CPU_INLINE void load_x(const StreamPlan<T>& plan, int64_t i0, int64_t n, T* FUSEDGRAD_RESTRICT xT) {
  const T* x = plan.x + i0 * plan.x_rs;
  for (int64_t d = 0; d < plan.D; ++d) {
    T* dst = xT + d * plan.ld;
    const T* src = x + d * plan.x_cs;
    if (plan.x_rs == 1) {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = src[i * plan.x_rs];
    }
  }
}

// dst[c, i] = src[(i0 + i)·rs + c·cs] for c < cols, i < n: a broadcast operand
// (per-sample bias, target, the mlp op's grad_out / saved s) read as a
// transposed block. Per-column operands (rs = 0) give rows of one value.
template <typename T>
FUSEDGRAD_CPU_INLINE void load_transposed(const T* src, int64_t rs, int64_t cs, int64_t i0, int64_t n,
                                             int64_t cols, T* FUSEDGRAD_RESTRICT dst, int64_t ld) {
  const T* base = src + i0 * rs;
  for (int64_t c = 0; c < cols; ++c) {
    T* out = dst + c * ld;
    const T* in = base + c * cs;
    if (rs == 0) {
      std::fill(out, out + n, in[0]);
    } else if (rs == 1) {
      std::memcpy(out, in, static_cast<size_t>(n) * sizeof(T));
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = in[i * rs];
    }
  }
}

// dst[(i0 + i)·cols + c] = sign · src[c, i]: a transposed block written back as
// rows of a contiguous (N, cols) output.
template <typename T>
FUSEDGRAD_CPU_INLINE void store_rows(const T* FUSEDGRAD_RESTRICT src, int64_t ld, int64_t i0, int64_t n,
                                        int64_t cols, T* FUSEDGRAD_RESTRICT dst, T sign) {
  T* base = dst + i0 * cols;
  if (cols == 1) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) base[i] = sign * src[i];
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = 0; c < cols; ++c) base[i * cols + c] = sign * src[c * ld + i];
  }
}

// The forward of one block: sT = act(W1 xT + b1), each tile of h summed in
// registers, the bias added and σ applied before it is stored; with a second
// layer, the bare products gT = W2 sT (b2 is added by the caller, as
// math::residual orders it).
template <typename T>
FUSEDGRAD_CPU_INLINE void block_forward(const StreamPlan<T>& plan, const Broadcast2d& b1, int64_t i0, int64_t n,
                                           BlockBuffers<T>& buf) {
  const int64_t D = plan.D, H = plan.H, ld = plan.ld, lanes = round_up(n, kTile);
  load_x(plan, i0, n, buf.xT);
  const bool per_sample_b1 = b1.present() && b1.row_stride != 0;
  if (per_sample_b1) load_transposed(b1.data<T>(), b1.row_stride, b1.col_stride, i0, n, H, buf.bT, ld);
  for (int64_t j = 0; j < H; ++j) {
    const T* wj = plan.w1.data() + j * D;
    T* sj = buf.sT + j * ld;
    const T bias = b1.present() && !per_sample_b1 ? b1.data<T>()[j * b1.col_stride] : T(0);
    const T* bj = per_sample_b1 ? buf.bT + j * ld : nullptr;
    for (int64_t t0 = 0; t0 < lanes; t0 += kTile) {
      T acc[kTile];
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) acc[l] = T(0);
      for (int64_t d = 0; d < D; ++d) {
        const T w = wj[d];
        const T* src = buf.xT + d * ld + t0;
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) acc[l] += w * src[l];
      }
      // h = (x w1ᵀ) + b1, then act
      if (bj) {
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) acc[l] += bj[t0 + l];
      } else {
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) acc[l] += bias;
      }
      if (buf.hT) std::memcpy(buf.hT + j * ld + t0, acc, sizeof(acc));
      activate_n(plan.act, acc, sj + t0, kTile);
    }
  }
  if (plan.has_w2) tile_product(buf.gT, ld, plan.w2.data(), plan.O, H, buf.sT, ld, lanes);
}

// What the backward of a block writes besides the partial sums.
template <typename T>
struct BackwardOutputs {
  bool w1 = false, b1_sums = false, w2 = false, g_sums = false;
  T* dx = nullptr;       // (N, D) contiguous
  T* db1_rows = nullptr; // (N, H) contiguous: per-sample b1
};

// Everything below the output, for one block, from gT (g = dL/dp) and sT:
// dw2, Σ g, ds, dh (in place over sT), db1, dw1, dx.
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void block_backward(const StreamPlan<T>& plan, const BackwardOutputs<T>& out, int64_t i0,
                                            int64_t n, BlockBuffers<T>& buf, double* FUSEDGRAD_RESTRICT partial) {
  const int64_t D = plan.D, H = plan.H, O = plan.O, ld = plan.ld, lanes = round_up(n, kTile);
  T* sT = buf.sT;
  const T* gT = buf.gT;
  if (out.g_sums) add_row_sums<VB>(partial + plan.off_g, gT, O, ld, n, buf.lanes);
  if (out.w2) add_outer_sums<VB>(partial + plan.off_dw2, gT, O, sT, H, ld, n, buf.lanes);  // dw2 = gᵀ s
  const bool need_hidden = out.w1 || out.b1_sums || out.dx || out.db1_rows;
  if (!need_hidden) return;
  // dh = (W2ᵀ g) ⊙ act'(s) into sT, one tile of ds at a time (ds = g without w2).
  for (int64_t j = 0; j < H; ++j) {
    T* sj = sT + j * ld;
    const T* w = plan.has_w2 ? plan.w2t.data() + j * O : nullptr;
    for (int64_t i0t = 0; i0t < lanes; i0t += kTile) {
      T ds[kTile];
      if (w) {
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) ds[l] = T(0);
        for (int64_t o = 0; o < O; ++o) {
          const T wo = w[o];
          const T* go = gT + o * ld + i0t;
#pragma omp simd
          for (int64_t l = 0; l < kTile; ++l) ds[l] += wo * go[l];
        }
      } else {
        const T* gj = gT + j * ld + i0t;
#pragma omp simd
        for (int64_t l = 0; l < kTile; ++l) ds[l] = gj[l];
      }
      T* s = sj + i0t;
      // ds ⊙ act'(s) (or act'(h)), then stored over s
      if (plan.act != Activation::Identity) activation_backward_n(plan.act, ds, (buf.hT ? buf.hT + j * ld : sj) + i0t, kTile);
#pragma omp simd
      for (int64_t l = 0; l < kTile; ++l) s[l] = ds[l];
    }
  }
  const T* dhT = sT;
  if (out.b1_sums) add_row_sums<VB>(partial + plan.off_db1, dhT, H, ld, n, buf.lanes);
  if (out.db1_rows) store_rows(dhT, ld, i0, n, H, out.db1_rows, T(1));
  if (out.w1) add_outer_sums<VB>(partial + plan.off_dw1, dhT, H, buf.xT, D, ld, n, buf.lanes);  // dw1 = dhᵀ x
  if (out.dx) {  // dx = dh w1: dxT = W1ᵀ dhT, written back as rows
    tile_product(buf.dxT, ld, plan.w1t.data(), D, H, dhT, ld, lanes);
    store_rows(buf.dxT, ld, i0, n, D, out.dx, T(1));
  }
}

// What one chunk of the loss op reads and writes besides its partial sums.
template <typename T>
struct LossJob {
  const Problem* p = nullptr;
  const StreamPlan<T>* plan = nullptr;
  BackwardOutputs<T> bo;
  bool need_g = false;
  T two_c = T(0);
  T* db2_rows = nullptr;  // (N, O): per-sample b2
  T* dt_rows = nullptr;   // (N, O): per-sample target
};

// Rows [r0, r1) of the loss op, block by block (see the top of the file).
template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void loss_chunk(const LossJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  const Problem& p = *job.p;
  const StreamPlan<T>& plan = *job.plan;
  const int64_t O = plan.O, ld = plan.ld;
  const T* b2 = p.b2.present() ? p.b2.data<T>() : nullptr;
  const T* t = p.target.present() ? p.target.data<T>() : nullptr;
  const int64_t brs = p.b2.row_stride, trs = p.target.row_stride;
  BlockBuffers<T>& buf = thread_buffers(plan);
  for (int64_t i0 = r0; i0 < r1; i0 += plan.B) {
    const int64_t n = std::min(plan.B, r1 - i0);
    block_forward(plan, p.b1, i0, n, buf);
    // r = (p + b2) − t, L += Σ r², g = 2c r, in gT. Without a second layer the
    // prediction is s itself (sT) and g gets its own buffer.
    double sq = 0;
    for (int64_t o = 0; o < O; ++o) {
      const T* pr = (plan.has_w2 ? buf.gT : buf.sT) + o * ld;
      T* go = buf.gT + o * ld;
      const T* bo2 = b2 ? b2 + i0 * brs + o * p.b2.col_stride : nullptr;
      const T* to = t ? t + i0 * trs + o * p.target.col_stride : nullptr;
      double sq_o = 0;
      if (!bo2 && !to) {
#pragma omp simd reduction(+ : sq_o)
        for (int64_t i = 0; i < n; ++i) {
          const T r = pr[i];
          sq_o += static_cast<double>(r) * static_cast<double>(r);
          go[i] = math::loss_grad(r, job.two_c);
        }
      } else if (bo2 && to && brs == 0 && trs == 1) {  // (O,) bias, contiguous (N, 1) target: the common case
        const T b = bo2[0];
#pragma omp simd reduction(+ : sq_o)
        for (int64_t i = 0; i < n; ++i) {
          const T r = math::residual(pr[i], b, to[i]);
          sq_o += static_cast<double>(r) * static_cast<double>(r);
          go[i] = math::loss_grad(r, job.two_c);
        }
      } else {
        for (int64_t i = 0; i < n; ++i) {
          const T r = math::residual(pr[i], bo2 ? bo2[i * brs] : T(0), to ? to[i * trs] : T(0));
          sq_o += static_cast<double>(r) * static_cast<double>(r);
          go[i] = math::loss_grad(r, job.two_c);
        }
      }
      sq += sq_o;
    }
    partial[0] += sq;
    if (!job.need_g) continue;
    if (job.db2_rows) store_rows(buf.gT, ld, i0, n, O, job.db2_rows, T(1));
    if (job.dt_rows) store_rows(buf.gT, ld, i0, n, O, job.dt_rows, T(-1));
    block_backward<VB>(plan, job.bo, i0, n, buf, partial);
  }
}

// One function per dtype and CPU capability (target_clones, picked at load
// time as ATen picks its kernels; GCC clones each template instance): the chunk
// bodies are where the time goes, and a lambda would be compiled for the
// baseline ISA only. Each twice: with
// 64-byte lane vectors (every clone: tests force them on any CPU) and with
// 32-byte ones (no AVX-512 clone), taken by cpu_vector_bytes().
template <typename T>
FUSEDGRAD_CPU_CLONES void loss_chunk_64(const LossJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  loss_chunk<64>(job, r0, r1, partial);
}
template <typename T>
FUSEDGRAD_CPU_CLONES_32 void loss_chunk_32(const LossJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  loss_chunk<32>(job, r0, r1, partial);
}
template <typename T>
void run_loss_chunk(const LossJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  by_vector_width(loss_chunk_64<T>, loss_chunk_32<T>, job, r0, r1, partial);
}

// The loss op over all rows.
template <typename T>
void stream_loss(const Problem& p, double c, const LossGradMask& need, LossAndGrads& res) {
  StreamPlan<T> plan;
  plan.init(p);
  auto& g = res.grads;
  using Kind = Broadcast2d::Kind;
  LossJob<T> job;
  job.p = &p;
  job.plan = &plan;
  const bool need_hidden = need[kX] || need[kW1] || need[kB1];
  job.need_g = need_hidden || need[kW2] || need[kB2] || need[kTarget];
  job.two_c = static_cast<T>(2.0 * c);
  BackwardOutputs<T>& bo = job.bo;
  bo.w1 = need[kW1];
  bo.w2 = need[kW2];
  bo.b1_sums = need[kB1] && p.b1.kind == Kind::PerColumn;
  bo.g_sums = (need[kB2] && p.b2.kind == Kind::PerColumn) || (need[kTarget] && p.target.kind == Kind::PerColumn);
  bo.dx = need[kX] ? g[kX].data_ptr<T>() : nullptr;
  bo.db1_rows = need[kB1] && p.b1.kind == Kind::Full ? g[kB1].data_ptr<T>() : nullptr;
  job.db2_rows = need[kB2] && p.b2.kind == Kind::Full ? g[kB2].data_ptr<T>() : nullptr;
  job.dt_rows = need[kTarget] && p.target.kind == Kind::Full ? g[kTarget].data_ptr<T>() : nullptr;

  std::vector<double> totals;
  over_chunks(plan.N, plan.B, plan.width, totals,
              [&](int64_t r0, int64_t r1, double* partial) { run_loss_chunk(job, r0, r1, partial); });

  *res.loss.data_ptr<T>() = static_cast<T>(c * totals[0]);
  auto write = [&](at::Tensor& dst, int64_t off, int64_t count, double sign) {
    T* d = dst.data_ptr<T>();
    for (int64_t k = 0; k < count; ++k) d[k] = static_cast<T>(sign * totals[off + k]);
  };
  if (need[kW1]) write(g[kW1], plan.off_dw1, plan.H * plan.D, 1.0);
  if (bo.b1_sums) write(g[kB1], plan.off_db1, plan.H, 1.0);
  if (need[kW2]) write(g[kW2], plan.off_dw2, plan.O * plan.H, 1.0);
  // (Kinds, not pointers, decide: an empty tensor's data pointer may be null.)
  if (need[kB2] && p.b2.kind == Kind::PerColumn) write(g[kB2], plan.off_g, plan.O, 1.0);
  if (need[kTarget] && p.target.kind == Kind::PerColumn) write(g[kTarget], plan.off_g, plan.O, -1.0);
}

// The mlp op's forward: prediction (N, O) and the saved s (N, H), both written
// back as rows block by block.
template <typename T>
struct ForwardJob {
  const Problem* p = nullptr;
  const StreamPlan<T>* plan = nullptr;
  T* pred = nullptr;
  T* s_rows = nullptr;  // s, as rows (null: not wanted)
  T* h_rows = nullptr;  // h, as rows (null: not wanted)
};

template <typename T>
FUSEDGRAD_CPU_INLINE void forward_chunk(const ForwardJob<T>& job, int64_t r0, int64_t r1) {
  const Problem& p = *job.p;
  const StreamPlan<T>& plan = *job.plan;
  const int64_t O = plan.O, H = plan.H, ld = plan.ld;
  const T* b2 = p.b2.present() ? p.b2.data<T>() : nullptr;
  BlockBuffers<T>& buf = thread_buffers(plan);
  for (int64_t i0 = r0; i0 < r1; i0 += plan.B) {
    const int64_t n = std::min(plan.B, r1 - i0);
    block_forward(plan, p.b1, i0, n, buf);
    if (job.s_rows) store_rows(buf.sT, ld, i0, n, H, job.s_rows, T(1));
    if (job.h_rows) store_rows(buf.hT, ld, i0, n, H, job.h_rows, T(1));
    if (!plan.has_w2) continue;
    if (b2) {  // p = (s w2ᵀ) + b2
      const int64_t rs = p.b2.row_stride;
      for (int64_t o = 0; o < O; ++o) {
        T* po = buf.gT + o * ld;
        const T* bo = b2 + i0 * rs + o * p.b2.col_stride;
        for (int64_t i = 0; i < n; ++i) po[i] += bo[i * rs];
      }
    }
    store_rows(buf.gT, ld, i0, n, O, job.pred, T(1));
  }
}

FUSEDGRAD_CPU_CLONES void forward_chunk_float(const ForwardJob<float>& job, int64_t r0, int64_t r1) {
  forward_chunk<float>(job, r0, r1);
}
FUSEDGRAD_CPU_CLONES void forward_chunk_double(const ForwardJob<double>& job, int64_t r0, int64_t r1) {
  forward_chunk<double>(job, r0, r1);
}
inline void run_forward_chunk(const ForwardJob<float>& job, int64_t r0, int64_t r1) {
  forward_chunk_float(job, r0, r1);
}
inline void run_forward_chunk(const ForwardJob<double>& job, int64_t r0, int64_t r1) {
  forward_chunk_double(job, r0, r1);
}

template <typename T>
void stream_forward(const Problem& p, T* pred, T* s_rows, T* h_rows) {
  StreamPlan<T> plan;
  plan.init(p);
  ForwardJob<T> job{&p, &plan, pred, s_rows, h_rows};
  std::vector<double> unused;
  over_chunks(plan.N, plan.B, 0, unused, [&](int64_t r0, int64_t r1, double*) { run_forward_chunk(job, r0, r1); });
}

// The mlp op's backward from grad_out (N, O) and the saved s (N, H), both
// read as transposed blocks.
template <typename T>
struct BackwardJob {
  const StreamPlan<T>* plan = nullptr;
  BackwardOutputs<T> bo;
  const T* g = nullptr;
  const T* s = nullptr;
  int64_t g_rs = 0, g_cs = 0, s_rs = 0, s_cs = 0;
};

template <int VB, typename T>
FUSEDGRAD_CPU_INLINE void backward_chunk(const BackwardJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  const StreamPlan<T>& plan = *job.plan;
  const int64_t ld = plan.ld;
  BlockBuffers<T>& buf = thread_buffers(plan);
  for (int64_t i0 = r0; i0 < r1; i0 += plan.B) {
    const int64_t n = std::min(plan.B, r1 - i0);
    load_transposed(job.g, job.g_rs, job.g_cs, i0, n, plan.O, buf.gT, ld);
    if (buf.hT) {  // the saved h; s = act(h) only where dw2 = gᵀ s reads it
      load_transposed(job.s, job.s_rs, job.s_cs, i0, n, plan.H, buf.hT, ld);
      if (job.bo.w2) activate_n(plan.act, buf.hT, buf.sT, plan.H * ld);
    } else {
      load_transposed(job.s, job.s_rs, job.s_cs, i0, n, plan.H, buf.sT, ld);
    }
    if (job.bo.w1) load_x(plan, i0, n, buf.xT);  // only dw1 reads x
    block_backward<VB>(plan, job.bo, i0, n, buf, partial);
  }
}

template <typename T>
FUSEDGRAD_CPU_CLONES void backward_chunk_64(const BackwardJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  backward_chunk<64>(job, r0, r1, partial);
}
template <typename T>
FUSEDGRAD_CPU_CLONES_32 void backward_chunk_32(const BackwardJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  backward_chunk<32>(job, r0, r1, partial);
}
template <typename T>
void run_backward_chunk(const BackwardJob<T>& job, int64_t r0, int64_t r1, double* partial) {
  by_vector_width(backward_chunk_64<T>, backward_chunk_32<T>, job, r0, r1, partial);
}

template <typename T>
void stream_backward(const Problem& p, const at::Tensor& g2, const at::Tensor& s2, const MlpGradMask& need,
                     std::array<at::Tensor, kNumMlpInputs>& grads, std::vector<double>& totals,
                     StreamPlan<T>& plan) {
  plan.init(p);
  using Kind = Broadcast2d::Kind;
  BackwardJob<T> job;
  job.plan = &plan;
  BackwardOutputs<T>& bo = job.bo;
  bo.w1 = need[kMw1];
  bo.w2 = need[kMw2];
  bo.b1_sums = need[kMb1] && p.b1.kind == Kind::PerColumn;
  bo.g_sums = need[kMb2] && p.b2.kind == Kind::PerColumn;
  bo.dx = need[kMx] ? grads[kMx].data_ptr<T>() : nullptr;
  bo.db1_rows = need[kMb1] && p.b1.kind == Kind::Full ? grads[kMb1].data_ptr<T>() : nullptr;
  job.g = g2.const_data_ptr<T>();
  job.s = s2.const_data_ptr<T>();
  job.g_rs = g2.stride(0), job.g_cs = g2.stride(1), job.s_rs = s2.stride(0), job.s_cs = s2.stride(1);
  over_chunks(plan.N, plan.B, plan.width, totals,
              [&](int64_t r0, int64_t r1, double* partial) { run_backward_chunk(job, r0, r1, partial); });
}

}  // namespace

bool stream_path_applies(const Problem& p) {
  if (!(kind_streams(p.b1) && kind_streams(p.b2) && kind_streams(p.target))) return false;
  if (p.D > kMaxStreamIn || p.H > kMaxStreamHidden || p.O > kMaxStreamOut) return false;
  if (p.D == 0 || p.H == 0 || p.O == 0) return false;  // empty layers: the general path's zeros
  const int64_t row_macs = p.D * p.H + (p.has_w2() ? p.H * p.O : 0);
  return row_macs <= kNarrowRowMacs || (row_macs <= kMediumRowMacs && p.N >= kMediumMinRows);
}

LossAndGrads mlp_loss_and_grads_cpu_stream(const Problem& p, Reduction reduction, const LossGradMask& need) {
  LossAndGrads out = allocate_loss_and_grads(p, need);
  const double c = math::loss_scale(reduction, p.N * p.O);
  if (p.x2.scalar_type() == at::kFloat) {
    stream_loss<float>(p, c, need, out);
  } else {
    TORCH_INTERNAL_ASSERT(p.x2.scalar_type() == at::kDouble, "make_problem admits float32/float64 on the CPU");
    stream_loss<double>(p, c, need, out);
  }
  return out;
}

std::array<at::Tensor, 2> mlp_forward_cpu_stream(const Problem& p) {
  const auto opts = p.x2.options();
  const bool keep_h = activation_saves_input(p.activation);
  // The prediction, and what the backward differentiates act with (s, or h).
  // Without w2 the prediction is s (the autograd node saves it as the
  // output), and the second slot holds h or nothing.
  at::Tensor pred = at::empty({p.N, p.has_w2() ? p.O : p.H}, opts);
  at::Tensor saved = p.has_w2() || keep_h ? at::empty({p.N, p.H}, opts) : at::empty({0}, opts);
  auto run = [&](auto* type_tag) {
    using T = std::remove_pointer_t<decltype(type_tag)>;
    T* s_rows = !p.has_w2() ? pred.data_ptr<T>() : keep_h ? nullptr : saved.data_ptr<T>();
    stream_forward<T>(p, p.has_w2() ? pred.data_ptr<T>() : nullptr, s_rows, keep_h ? saved.data_ptr<T>() : nullptr);
  };
  if (opts.dtype() == at::kFloat) {
    run(static_cast<float*>(nullptr));
  } else {
    run(static_cast<double*>(nullptr));
  }
  return {pred.view(p.out_shape), saved};
}

std::array<at::Tensor, kNumMlpInputs> mlp_backward_cpu_stream(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need) {
  const auto opts = p.x2.options();
  std::array<at::Tensor, kNumMlpInputs> grads;
  const at::Tensor g = grad_out.reshape({p.N, p.O});
  const at::Tensor s = activations.reshape({p.N, p.H});
  auto alloc = [&](MlpInput k, at::IntArrayRef shape) {
    return at::empty(need[k] ? shape : at::IntArrayRef({0}), opts);
  };
  grads[kMx] = alloc(kMx, p.x_shape);
  grads[kMw1] = alloc(kMw1, {p.H, p.D});
  grads[kMb1] = alloc(kMb1, need[kMb1] ? p.b1.source.sizes() : at::IntArrayRef());
  grads[kMw2] = alloc(kMw2, {p.O, p.H});
  std::vector<double> totals;
  auto finish = [&](auto& plan) {
    using T = typename std::remove_reference_t<decltype(plan)>::value_type;
    auto write = [&](at::Tensor& dst, int64_t off, int64_t count) {
      T* d = dst.data_ptr<T>();
      for (int64_t k = 0; k < count; ++k) d[k] = static_cast<T>(totals[off + k]);
    };
    if (need[kMw1]) write(grads[kMw1], plan.off_dw1, p.H * p.D);
    if (need[kMb1] && p.b1.kind == Broadcast2d::Kind::PerColumn) write(grads[kMb1], plan.off_db1, p.H);
    if (need[kMw2]) write(grads[kMw2], plan.off_dw2, p.O * p.H);
    if (need[kMb2]) {
      if (p.b2.kind == Broadcast2d::Kind::PerColumn) {
        grads[kMb2] = at::empty(p.b2.source.sizes(), opts);
        write(grads[kMb2], plan.off_g, p.O);
      } else {  // Full: g itself, copied (an op's output must not alias its input)
        grads[kMb2] = g.clone(at::MemoryFormat::Contiguous).view(p.b2.source.sizes());
      }
    } else {
      grads[kMb2] = at::empty({0}, opts);
    }
  };
  if (opts.dtype() == at::kFloat) {
    StreamPlan<float> plan;
    stream_backward<float>(p, g, s, need, grads, totals, plan);
    finish(plan);
  } else {
    StreamPlan<double> plan;
    stream_backward<double>(p, g, s, need, grads, totals, plan);
    finish(plan);
  }
  return grads;
}

}  // namespace fusedgrad
