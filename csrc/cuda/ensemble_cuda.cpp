// CUDA kernels of the ensemble ops (schemas: ops/schemas.cpp; shape rules:
// ops/ensemble.h): the generic ensemble of ensemble.h over the single-model
// CUDA ops (elementwise_cuda.cpp), model after model on the current stream.
//
// Each model's work is queued asynchronously (cuBLAS + the fused element-wise
// kernels), and its results are copied into the stacked outputs with
// stream-ordered device copies: nothing syncs with the host. Small models leave
// the GPU mostly idle here (one launch sequence per model); a batched kernel
// with the model dimension across blocks is the way to fill it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../ops/ensemble.h"
#include "../ops/handles.h"

namespace fusedgrad::ensemble {
namespace {

// Model k on CUDA: the registered single-model op. The ensemble op's CUDA
// kernel runs below autograd, so this call reaches the single-model CUDA
// kernel directly.
struct CudaPerModel {
  static constexpr bool kParallel = false;  // one stream: models in order
  static LossAndGrads loss_and_grads(const ModelArgs& a, Reduction r, Activation act, const LossGradMask& need) {
    auto [loss, dx, dw1, db1, dw2, db2, dt] = ops::mlp_loss_and_grads().call(
        a.x, a.w1, a.b1, a.w2, a.b2, a.target, reduction_name(r), activation_name(act), need);
    return {loss, {dx, dw1, db1, dw2, db2, dt}};
  }
  static std::array<Tensor, 2> forward(const ModelArgs& a, Activation act) {
    auto [pred, acts] = ops::mlp_forward().call(a.x, a.w1, a.b1, a.w2, a.b2, activation_name(act));
    return {pred, acts};
  }
  static std::array<Tensor, kNumMlpInputs> backward(const ModelArgs& a, const Tensor& grad_out,
                                                    const Tensor& activations, Activation act,
                                                    const MlpGradMask& need) {
    auto [dx, dw1, db1, dw2, db2] = ops::mlp_backward().call(grad_out, a.x, a.w1, a.b1, a.w2, a.b2, activations,
                                                             activation_name(act), need);
    return {dx, dw1, db1, dw2, db2};
  }
};

// The stacked outputs are allocated on x's device: guard it for the whole op.
template <auto Fn>
struct OnXDevice;

template <class Ret, class... Args, Ret (*Fn)(const Tensor&, Args...)>
struct OnXDevice<Fn> {
  static Ret call(const Tensor& first, Args... args) {
    c10::cuda::OptionalCUDAGuard guard(first.is_cuda() ? std::optional<c10::Device>(first.device()) : std::nullopt);
    return Fn(first, args...);
  }
};

using Cuda = EnsembleOpKernels<CudaPerModel>;

}  // namespace

TORCH_LIBRARY_IMPL(fusedgrad, CUDA, m) {
  m.impl("ensemble_mlp_loss", &OnXDevice<&Cuda::mlp_loss>::call);
  m.impl("ensemble_mlp_loss_and_grads", &OnXDevice<&Cuda::mlp_loss_and_grads>::call);
  m.impl("ensemble_mlp_loss_forward", &OnXDevice<&Cuda::mlp_loss_forward>::call);
  m.impl("ensemble_mlp", &OnXDevice<&Cuda::mlp>::call);
  m.impl("ensemble_mlp_forward", &OnXDevice<&Cuda::mlp_forward>::call);
  // grad_out comes first; it is checked to be on x's device.
  m.impl("ensemble_mlp_backward", &OnXDevice<&Cuda::mlp_backward>::call);
}

}  // namespace fusedgrad::ensemble
