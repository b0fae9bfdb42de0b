// The CUDA backend of the single-model ops: the element-wise passes the GEMM
// path (ops/gemm_path.cpp) calls between its cuBLAS products, as launches of
// the kernels of kernels_cuda.cu, and the registration of the ops' kernels
// (ops/op_kernels.cpp: the same functions as on the CPU) on the CUDA key.
//
// Every pass sets the tensors' device (CUDAGuard) and launches on that
// device's current stream (at::cuda::getCurrentCUDAStream()), where at::mm_out
// and every other ATen call of the GEMM path run too; nothing synchronises
// with the host: the loss stays a 0-dim device tensor, workspaces come from
// the caching allocator, nothing is read back.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>

#include "../ops/gemm_path.h"
#include "../ops/op_kernels.h"
#include "kernels_cuda.h"

namespace fusedgrad {
namespace {

using at::Tensor;

cuda::OperandView operand_view(const Broadcast2d& op) {
  cuda::OperandView v;
  if (op.present()) {
    v.data = op.view.const_data_ptr();
    v.row_stride = op.row_stride;
    v.col_stride = op.col_stride;
  }
  return v;
}

// A byte workspace for the reductions' partial sums, from the caching
// allocator (stream-ordered: no synchronisation).
Tensor workspace(int64_t bytes, const Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 1)}, like.options().dtype(at::kByte));
}

// Device guard + current stream of t's device.
struct OnDevice {
  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;
  explicit OnDevice(const Tensor& t)
      : guard(checked_cuda_device(t)), stream(at::cuda::getCurrentCUDAStream(t.device().index()).stream()) {}
  static c10::Device checked_cuda_device(const Tensor& t) {
    TORCH_CHECK_VALUE(
        t.is_cuda(), "fusedgrad: the CUDA kernel got x on device ", t.device().str(),
        "; all tensor arguments must be on one CUDA device");
    return t.device();
  }
};

struct CudaElementwise final : ElementwiseKernels {
  void bias_activation(Tensor& h, const Broadcast2d& bias, Activation act, Tensor& s) const override {
    if (!bias.present() && act == Activation::Identity && s.is_same(h)) return;
    const OnDevice on(h);
    cuda::bias_activation(h.scalar_type(), h.data_ptr(), s.data_ptr(), h.size(0), h.size(1), operand_view(bias), act,
                          on.stream);
  }

  void residual(const Tensor& pred, const Broadcast2d& b2, const Broadcast2d& target, double c,
                ResidualOutputs& out) const override {
    const OnDevice on(pred);
    const int64_t rows = pred.size(0), cols = pred.size(1);
    cuda::ResidualArgs args;
    args.pred = pred.const_data_ptr();
    args.b2 = operand_view(b2);
    args.target = operand_view(target);
    args.loss_scale = c;
    args.loss = out.loss.data_ptr();
    args.g = out.g.defined() ? out.g.data_ptr() : nullptr;
    args.neg_g = out.neg_g.defined() ? out.neg_g.data_ptr() : nullptr;
    args.colsum = out.colsum.defined() ? out.colsum.data_ptr() : nullptr;
    args.neg_colsum = out.neg_colsum.defined() ? out.neg_colsum.data_ptr() : nullptr;
    const bool column_sums = args.colsum != nullptr || args.neg_colsum != nullptr;
    const Tensor ws = workspace(cuda::residual_workspace_bytes(rows, cols, column_sums), pred);
    cuda::residual(pred.scalar_type(), rows, cols, args, ws.data_ptr(), on.stream);
  }

  void hidden_backward(Tensor& ds, const Tensor& saved, Activation act, Tensor& colsum) const override {
    const OnDevice on(ds);
    const int64_t rows = ds.size(0), cols = ds.size(1);
    Tensor ws;
    if (colsum.defined()) ws = workspace(cuda::hidden_backward_workspace_bytes(ds.scalar_type(), rows, cols), ds);
    cuda::hidden_backward(ds.scalar_type(), ds.data_ptr(), saved.const_data_ptr(), rows, cols, act,
                          colsum.defined() ? colsum.data_ptr() : nullptr, colsum.defined() ? ws.data_ptr() : nullptr,
                          on.stream);
  }
};

}  // namespace

const ElementwiseKernels& cuda_elementwise_kernels() {
  static const CudaElementwise kernels;
  return kernels;
}

TORCH_LIBRARY_IMPL(fusedgrad, CUDA, m) {
  m.impl("mlp_loss", &op_kernels::mlp_loss);
  m.impl("mlp_loss_and_grads", &op_kernels::mlp_loss_and_grads);
  m.impl("mlp", &op_kernels::mlp);
  m.impl("mlp_forward", &op_kernels::mlp_forward);
  m.impl("mlp_backward", &op_kernels::mlp_backward);
}

}  // namespace fusedgrad
