// The single-model ops' kernels (op_kernels.h), registered here on the CPU key.
#include "op_kernels.h"

#include <torch/library.h>

#include "engine_path.h"
#include "gemm_path.h"

namespace fusedgrad {

LossAndGrads loss_and_grads(const Problem& p, Reduction reduction, const LossGradMask& need) {
  if (engine_path_applies(p)) return engine_loss_and_grads(p, reduction, need);
  return gemm_loss_and_grads(p, reduction, need);
}

const char* path_name(const Problem& p) {
  if (!p.x2.is_cpu()) return "cuda";
  return engine_path_applies(p) ? "engine" : "gemm";
}

std::array<at::Tensor, 2> forward(const Problem& p, bool activations) {
  if (engine_path_applies(p)) return engine_forward(p, activations);
  return gemm_forward(p);
}

std::array<at::Tensor, kNumMlpInputs> backward(
    const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations, const MlpGradMask& need) {
  if (engine_path_applies(p)) return engine_backward(p, grad_out, need);
  return gemm_backward(p, grad_out, activations, need);
}

namespace {
// mlp_backward's own arguments, beyond make_problem's.
void check_backward_operands(const Problem& p, const at::Tensor& grad_out, const at::Tensor& activations,
                             const at::Tensor& x) {
  TORCH_CHECK_VALUE(
      grad_out.sizes().equals(p.out_shape),
      "fusedgrad: argument 'grad_out' must have the prediction's shape ", c10::IntArrayRef(p.out_shape),
      ", got ", grad_out.sizes());
  TORCH_CHECK_VALUE(
      activations.numel() == p.N * p.H,
      "fusedgrad: argument 'activations' must hold N*H = ", p.N * p.H, " elements, got ",
      activations.numel());
  TORCH_CHECK_TYPE(
      grad_out.scalar_type() == x.scalar_type() && activations.scalar_type() == x.scalar_type(),
      "fusedgrad: arguments 'grad_out' and 'activations' must have x's dtype");
  // The dispatcher routes by all tensor arguments, so a device kernel could
  // otherwise be handed a grad_out on another device.
  TORCH_CHECK_VALUE(
      grad_out.device() == x.device() && activations.device() == x.device(),
      "fusedgrad: arguments 'grad_out' and 'activations' must be on x's device ", x.device().str(),
      ", got ", grad_out.device().str(), " and ", activations.device().str());
}
}  // namespace

namespace op_kernels {

Tensor mlp_loss(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
                const OptTensor& target, Str reduction, Str activation) {
  const Reduction red = parse_reduction(reduction);
  const Problem p = make_problem(x, w1, b1, w2, b2, target, parse_activation(activation));
  return loss_and_grads(p, red, LossGradMask{}).loss;
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> mlp_loss_and_grads(
    const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
    const OptTensor& target, Str reduction, Str activation, std::array<bool, 6> output_mask) {
  const Reduction red = parse_reduction(reduction);
  const Problem p = make_problem(x, w1, b1, w2, b2, target, parse_activation(activation));
  LossGradMask need = output_mask;
  // A gradient for an argument that is None does not exist.
  need[kB1] = need[kB1] && p.b1.present();
  need[kW2] = need[kW2] && p.has_w2();
  need[kB2] = need[kB2] && p.b2.present();
  need[kTarget] = need[kTarget] && p.target.present();
  LossAndGrads r = loss_and_grads(p, red, need);
  auto& g = r.grads;
  return {std::move(r.loss), std::move(g[kX]), std::move(g[kW1]), std::move(g[kB1]),
          std::move(g[kW2]), std::move(g[kB2]), std::move(g[kTarget])};
}

Tensor mlp(const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2, const OptTensor& b2,
           Str activation) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
  return forward(p, false)[0];
}

std::tuple<Tensor, Tensor> mlp_forward(const Tensor& x, const Tensor& w1, const OptTensor& b1,
                                       const OptTensor& w2, const OptTensor& b2, Str activation) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
  auto out = forward(p, true);
  return {std::move(out[0]), std::move(out[1])};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> mlp_backward(
    const Tensor& grad_out, const Tensor& x, const Tensor& w1, const OptTensor& b1, const OptTensor& w2,
    const OptTensor& b2, const Tensor& activations, Str activation, std::array<bool, 5> output_mask) {
  const Problem p = make_problem(x, w1, b1, w2, b2, std::nullopt, parse_activation(activation));
  check_backward_operands(p, grad_out, activations, x);
  MlpGradMask need = output_mask;
  need[kMb1] = need[kMb1] && p.b1.present();
  need[kMw2] = need[kMw2] && p.has_w2();
  need[kMb2] = need[kMb2] && p.b2.present();
  auto g = backward(p, grad_out, activations, need);
  return {std::move(g[kMx]), std::move(g[kMw1]), std::move(g[kMb1]), std::move(g[kMw2]), std::move(g[kMb2])};
}

}  // namespace op_kernels

void check_problem_args(const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                        const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                        const std::optional<at::Tensor>& target, const std::optional<std::string>& reduction,
                        const std::string& activation) {
  if (reduction) parse_reduction(*reduction);
  make_problem(x, w1, b1, w2, b2, target, parse_activation(activation));
}

void check_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                         const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                         const std::optional<at::Tensor>& b2, const at::Tensor& activations,
                         const std::string& activation) {
  check_backward_operands(make_problem(x, w1, b1, w2, b2, std::nullopt, parse_activation(activation)), grad_out,
                          activations, x);
}

TORCH_LIBRARY_IMPL(fusedgrad, CPU, m) {
  m.impl("mlp_loss", &op_kernels::mlp_loss);
  m.impl("mlp_loss_and_grads", &op_kernels::mlp_loss_and_grads);
  m.impl("mlp", &op_kernels::mlp);
  m.impl("mlp_forward", &op_kernels::mlp_forward);
  m.impl("mlp_backward", &op_kernels::mlp_backward);
}

}  // namespace fusedgrad
