// CUDA kernels of fusedgrad's fused element-wise passes (README, "Math"):
//
//   s  = act(x w1ᵀ + b1)                        bias_activation (epilogue of a GEMM)
//   r  = p − t,  L = c Σ r²,  g = 2c r,  Σ_rows g   residual
//   dh = ds ⊙ act'(s),  Σ_rows dh                hidden_backward
//
// The scalar formulas are the ones in ../formulas.h, shared with the CPU kernels.
// float16 / bfloat16 values are loaded, computed in float (at::opmath_type)
// and stored back in their own type; float32 and float64 compute in their own
// type, exactly as the CPU pass does.
//
// Deterministic reductions. The loss and the column sums (bias and per-column
// target gradients) are reduced in two stages, with no floating-point atomics:
//   1. the (rows, cols) matrix is cut into column tiles × fixed blocks of
//      rows; each CUDA block sums its tile in a fixed order (each thread walks
//      its rows in order, then a fixed shared-memory tree) and writes its
//      partial sums to a workspace slot of its own;
//   2. a finalize kernel adds the partials of each column in block order, and
//      the loss partials with a fixed tree.
// Floating-point addition is not associative, and atomicAdd commits in
// whatever order the blocks happen to be scheduled, so atomics would make the
// loss and the bias gradients differ in their last bits from run to run.
// Here the partition depends only on the shape (never on the GPU's SM count or
// on timing), so the results are bitwise reproducible from run to run, and
// the same on GPUs of one architecture whatever their size. Partial sums are
// accumulated as on the CPU: the loss and Σ g in double, Σ dh in the opmath
// type (float for float16/bfloat16/float32, double for float64).
#include "kernels_cuda.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>

namespace fusedgrad::cuda {
namespace {

constexpr int kThreads = 256;             // threads per block, all kernels
constexpr int64_t kTargetBlocks = 2048;   // blocks a reduction aims at (fills an H100 ~2×)
constexpr int64_t kMinRowsPerThread = 4;  // rows each thread sums at least, per block
constexpr int64_t kMaxGridY = 65535;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How a (rows, cols) matrix is cut into blocks: tile_cols × tile_rows threads
// (tile_cols = 32 for coalesced rows, fewer when cols is small so that a
// narrow output, e.g. O = 1, still keeps all 256 threads busy). A function of
// the shape only: this is what makes the reductions reproducible.
struct Plan {
  int tile_cols = 1, tile_rows = kThreads;
  int64_t col_tiles = 1;       // gridDim.x
  int64_t rows_per_block = 0;  // a multiple of tile_rows
  int64_t row_blocks = 1;      // gridDim.y of the reductions
};

Plan make_plan(int64_t rows, int64_t cols) {
  Plan p;
  while (p.tile_cols < 32 && p.tile_cols < cols) p.tile_cols <<= 1;
  p.tile_rows = kThreads / p.tile_cols;
  p.col_tiles = std::max<int64_t>(1, ceil_div(cols, p.tile_cols));
  const int64_t target_row_blocks = std::max<int64_t>(1, kTargetBlocks / p.col_tiles);
  int64_t rpb = std::max<int64_t>(p.tile_rows * kMinRowsPerThread, ceil_div(rows, target_row_blocks));
  p.rows_per_block = ceil_div(rpb, p.tile_rows) * p.tile_rows;
  p.row_blocks = std::max<int64_t>(1, ceil_div(rows, p.rows_per_block));  // ≤ target_row_blocks ≤ 2048
  return p;
}

// Element (i, j) of a broadcast operand, as the opmath type; 0 when absent.
template <typename T>
struct Operand {
  using M = at::opmath_type<T>;
  const T* data;
  int64_t row_stride, col_stride;
  explicit Operand(const OperandView& v)
      : data(static_cast<const T*>(v.data)), row_stride(v.row_stride), col_stride(v.col_stride) {}
  __device__ __forceinline__ M read(int64_t i, int64_t j) const {
    return data != nullptr ? static_cast<M>(data[i * row_stride + j * col_stride]) : M(0);
  }
};

// A double (the loss, a column sum) stored in T.
template <typename T, typename V>
__device__ __forceinline__ T store_as(V v) {
  return static_cast<T>(static_cast<at::opmath_type<T>>(v));
}

// ---------------------------------------------------------------------------
// Per-element work. Each functor handles element (i, j) of a contiguous
// (rows, cols) matrix and adds what it contributes to the column sum (col) and
// to the grand total (total) of its thread.

template <typename T>
struct BiasActivationElem {
  using M = at::opmath_type<T>;
  using Acc = M;
  T* h;  // h += bias in place when s is another buffer (h is then kept for act')
  T* s;  // s = act(h + bias); may be h
  Operand<T> bias;
  int64_t cols;
  Activation act;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, Acc&, Acc&) const {
    const int64_t k = i * cols + j;
    if (s == h) {
      s[k] = static_cast<T>(math::bias_activate(static_cast<M>(h[k]), bias.read(i, j), act));
    } else {
      const T hk = static_cast<T>(static_cast<M>(h[k]) + bias.read(i, j));
      h[k] = hk;
      s[k] = static_cast<T>(math::activate(static_cast<M>(hk), act));
    }
  }
};

template <typename T>
struct ResidualElem {
  using M = at::opmath_type<T>;
  using Acc = double;  // as the CPU pass: Σ r² and Σ g in double
  static constexpr bool kHasTotal = true;  // the loss is always wanted
  const T* pred;
  Operand<T> b2, target;
  M two_c;
  T* g;      // may alias pred (same element, read before written)
  T* neg_g;
  int64_t cols;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, Acc& col, Acc& total) const {
    const int64_t k = i * cols + j;
    const M r = math::residual(static_cast<M>(pred[k]), b2.read(i, j), target.read(i, j));
    total += static_cast<double>(r) * static_cast<double>(r);
    if (g != nullptr) {
      const T gk = static_cast<T>(math::loss_grad(r, two_c));
      g[k] = gk;
      // Σ of g as stored, so that db2 is exactly the column sum of the g the
      // GEMMs use (the CPU pass does the same).
      col += static_cast<double>(static_cast<M>(gk));
      if (neg_g != nullptr) neg_g[k] = static_cast<T>(-static_cast<M>(gk));
    }
  }
};

template <typename T>
struct HiddenBackwardElem {
  using M = at::opmath_type<T>;
  using Acc = M;  // as the CPU pass: Σ dh in the opmath type
  static constexpr bool kHasTotal = false;
  T* ds;
  const T* saved;  // s, or h for an activation that saves its input
  int64_t cols;
  Activation act;
  __device__ __forceinline__ void operator()(int64_t i, int64_t j, Acc& col, Acc&) const {
    const int64_t k = i * cols + j;
    T d = ds[k];
    if (act != Activation::Identity) {
      d = static_cast<T>(math::activation_backward(static_cast<M>(d), static_cast<M>(saved[k]), act));
      ds[k] = d;
    }
    col += static_cast<Acc>(d);
  }
};

// ---------------------------------------------------------------------------
// Kernels.

// Element-wise only: block (tile_cols, tile_rows), grid (col_tiles, ≤ 65535);
// threadIdx.x runs along a row so that accesses coalesce, no index division.
template <typename Elem>
__global__ void __launch_bounds__(kThreads) elementwise_kernel(Elem elem, int64_t rows, int64_t cols) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= cols) return;
  const int64_t step = static_cast<int64_t>(gridDim.y) * blockDim.y;
  typename Elem::Acc unused_col = 0, unused_total = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; i < rows; i += step) {
    elem(i, j, unused_col, unused_total);
  }
}

// Stage 1 of a reduction: block (x, y) = (column tile, row block) runs elem
// over its rows_per_block rows × tile_cols columns, then writes
//   col_partials[y * cols + j]          Σ over its rows of column j   (kCols)
//   total_partials[y * gridDim.x + x]   Σ over its whole tile         (kTotal)
// Every sum has a fixed order: thread (tx, ty) takes rows ty, ty + tile_rows,
// … in order; the shared-memory trees below pair the same slots every run.
template <bool kCols, bool kTotal, typename Elem>
__global__ void __launch_bounds__(kThreads) partial_sums_kernel(
    Elem elem, int64_t rows, int64_t cols, int64_t rows_per_block,
    typename Elem::Acc* __restrict__ col_partials, typename Elem::Acc* __restrict__ total_partials) {
  using Acc = typename Elem::Acc;
  __shared__ Acc col_smem[kThreads];
  __shared__ Acc total_smem[kThreads];
  const int tx = threadIdx.x, ty = threadIdx.y;
  const int tile_cols = blockDim.x, tile_rows = blockDim.y;  // powers of two, product kThreads
  const int t = ty * tile_cols + tx;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * tile_cols + tx;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * rows_per_block;
  const int64_t row1 = row0 + rows_per_block < rows ? row0 + rows_per_block : rows;

  Acc col = 0, total = 0;
  if (j < cols) {
    for (int64_t i = row0 + ty; i < row1; i += tile_rows) elem(i, j, col, total);
  }
  if constexpr (kCols) col_smem[t] = col;
  if constexpr (kTotal) total_smem[t] = total;
  __syncthreads();
  if constexpr (kCols) {
    // Column sums: fold the tile_rows threads of each column, top half onto bottom.
    for (int half = tile_rows / 2; half > 0; half /= 2) {
      if (ty < half) col_smem[t] += col_smem[t + half * tile_cols];
      __syncthreads();
    }
    if (ty == 0 && j < cols) col_partials[blockIdx.y * cols + j] = col_smem[tx];
  }
  if constexpr (kTotal) {
    for (int half = kThreads / 2; half > 0; half /= 2) {
      if (t < half) total_smem[t] += total_smem[t + half];
      __syncthreads();
    }
    if (t == 0) total_partials[static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x] = total_smem[0];
  }
}

// Stage 2. Blocks [0, col_blocks): one thread per column adds its row_blocks
// partials in block order and stores the sum (col_out) and/or its negation
// (neg_col_out). The block after them (when total_out is set) adds the
// n_total loss partials (fixed strides, then a fixed tree) and stores
// total_scale × sum.
template <typename Acc, typename T>
__global__ void __launch_bounds__(kThreads) finalize_kernel(
    const Acc* __restrict__ col_partials, int64_t row_blocks, int64_t cols, int64_t col_blocks,
    T* __restrict__ col_out, T* __restrict__ neg_col_out,
    const Acc* __restrict__ total_partials, int64_t n_total, double total_scale, T* __restrict__ total_out) {
  if (static_cast<int64_t>(blockIdx.x) < col_blocks) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= cols) return;
    Acc sum = 0;
    for (int64_t b = 0; b < row_blocks; ++b) sum += col_partials[b * cols + j];
    if (col_out != nullptr) col_out[j] = store_as<T>(sum);
    if (neg_col_out != nullptr) neg_col_out[j] = store_as<T>(-sum);
    return;
  }
  // The whole block takes this branch (it depends on blockIdx only).
  __shared__ Acc smem[kThreads];
  const int t = threadIdx.x;
  Acc sum = 0;
  for (int64_t k = t; k < n_total; k += kThreads) sum += total_partials[k];
  smem[t] = sum;
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) smem[t] += smem[t + half];
    __syncthreads();
  }
  // As the CPU: c · Σ r² in double, then stored in the output's type.
  if (t == 0) total_out[0] = store_as<T>(total_scale * static_cast<double>(smem[0]));
}

// ---------------------------------------------------------------------------
// Launch helpers.

template <typename Elem>
void launch_elementwise(const Elem& elem, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return;
  const Plan plan = make_plan(rows, cols);
  const dim3 block(plan.tile_cols, plan.tile_rows);
  const dim3 grid(
      static_cast<unsigned>(plan.col_tiles),
      static_cast<unsigned>(std::min<int64_t>(ceil_div(rows, plan.tile_rows), kMaxGridY)));
  elementwise_kernel<Elem><<<grid, block, 0, stream>>>(elem, rows, cols);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Workspace layout of a two-stage reduction: [row_blocks × cols column
// partials][row_blocks × col_tiles total partials], each part present only
// when wanted.
template <typename Acc>
int64_t workspace_bytes(const Plan& plan, int64_t cols, bool want_cols, bool want_total) {
  int64_t n = 0;
  if (want_cols) n += plan.row_blocks * cols;
  if (want_total) n += plan.row_blocks * plan.col_tiles;
  return n * static_cast<int64_t>(sizeof(Acc));
}

// Runs elem over the matrix and reduces what it contributes. Elem::kHasTotal
// says whether elem produces a grand total (the loss): only the kernel
// variants a pass can use are instantiated.
template <typename Elem, typename T>
void launch_reduction(
    const Elem& elem, int64_t rows, int64_t cols, void* workspace, T* col_out, T* neg_col_out,
    T* total_out, double total_scale, cudaStream_t stream) {
  using Acc = typename Elem::Acc;
  constexpr bool kTotal = Elem::kHasTotal;
  TORCH_INTERNAL_ASSERT(kTotal == (total_out != nullptr), "fusedgrad: total output mismatch");
  const bool want_cols = (col_out != nullptr || neg_col_out != nullptr) && cols > 0;
  if constexpr (!kTotal) {
    if (!want_cols) {
      launch_elementwise(elem, rows, cols, stream);  // nothing to sum
      return;
    }
  }
  const Plan plan = make_plan(rows, cols);
  Acc* col_partials = want_cols ? static_cast<Acc*>(workspace) : nullptr;
  Acc* total_partials = kTotal ? static_cast<Acc*>(workspace) + (want_cols ? plan.row_blocks * cols : 0) : nullptr;
  const dim3 block(plan.tile_cols, plan.tile_rows);
  const dim3 grid(static_cast<unsigned>(plan.col_tiles), static_cast<unsigned>(plan.row_blocks));
  if (want_cols) {
    partial_sums_kernel<true, kTotal, Elem><<<grid, block, 0, stream>>>(
        elem, rows, cols, plan.rows_per_block, col_partials, total_partials);
  } else if constexpr (kTotal) {
    partial_sums_kernel<false, true, Elem><<<grid, block, 0, stream>>>(
        elem, rows, cols, plan.rows_per_block, nullptr, total_partials);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t col_blocks = want_cols ? ceil_div(cols, kThreads) : 0;
  const int64_t blocks = col_blocks + (kTotal ? 1 : 0);
  finalize_kernel<Acc, T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      col_partials, plan.row_blocks, cols, col_blocks, col_out, neg_col_out,
      total_partials, plan.row_blocks * plan.col_tiles, total_scale, total_out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void bias_activation(
    c10::ScalarType dtype, void* h, void* s, int64_t rows, int64_t cols, OperandView bias,
    Activation act, cudaStream_t stream) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedgrad_bias_activation_cuda", [&] {
    const BiasActivationElem<scalar_t> elem{
        static_cast<scalar_t*>(h), static_cast<scalar_t*>(s), Operand<scalar_t>(bias), cols, act};
    launch_elementwise(elem, rows, cols, stream);
  });
}

int64_t residual_workspace_bytes(int64_t rows, int64_t cols, bool column_sums) {
  return workspace_bytes<double>(make_plan(rows, cols), cols, column_sums, /*want_total=*/true);
}

void residual(
    c10::ScalarType dtype, int64_t rows, int64_t cols, const ResidualArgs& a, void* workspace,
    cudaStream_t stream) {
  TORCH_INTERNAL_ASSERT(a.loss != nullptr, "fusedgrad: residual pass without a loss output");
  // (An empty matrix has null data pointers: nothing to check then, and the
  // column sums come out as zeros.)
  TORCH_INTERNAL_ASSERT(
      rows * cols == 0 || a.g != nullptr ||
          (a.neg_g == nullptr && a.colsum == nullptr && a.neg_colsum == nullptr),
      "fusedgrad: residual pass asked for quantities derived from g without g");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedgrad_residual_cuda", [&] {
    using M = at::opmath_type<scalar_t>;
    const ResidualElem<scalar_t> elem{
        static_cast<const scalar_t*>(a.pred), Operand<scalar_t>(a.b2), Operand<scalar_t>(a.target),
        static_cast<M>(2.0 * a.loss_scale), static_cast<scalar_t*>(a.g), static_cast<scalar_t*>(a.neg_g), cols};
    launch_reduction(
        elem, rows, cols, workspace, static_cast<scalar_t*>(a.colsum), static_cast<scalar_t*>(a.neg_colsum),
        static_cast<scalar_t*>(a.loss), a.loss_scale, stream);
  });
}

int64_t hidden_backward_workspace_bytes(c10::ScalarType dtype, int64_t rows, int64_t cols) {
  const Plan plan = make_plan(rows, cols);
  return dtype == c10::ScalarType::Double
      ? workspace_bytes<double>(plan, cols, /*want_cols=*/true, /*want_total=*/false)
      : workspace_bytes<float>(plan, cols, /*want_cols=*/true, /*want_total=*/false);
}

void hidden_backward(
    c10::ScalarType dtype, void* ds, const void* saved, int64_t rows, int64_t cols, Activation act,
    void* colsum, void* workspace, cudaStream_t stream) {
  if (colsum == nullptr && act == Activation::Identity) return;  // dh = ds, nothing to do
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedgrad_hidden_backward_cuda", [&] {
    const HiddenBackwardElem<scalar_t> elem{
        static_cast<scalar_t*>(ds), static_cast<const scalar_t*>(saved), cols, act};
    launch_reduction(
        elem, rows, cols, workspace, static_cast<scalar_t*>(colsum), static_cast<scalar_t*>(nullptr),
        static_cast<scalar_t*>(nullptr), 1.0, stream);
  });
}

}  // namespace fusedgrad::cuda
