// The argument rules of the deep ops (deep_ops.cpp), one function per op: the
// CPU kernels run them before computing, and the fake kernels (fusedgrad/deep.py,
// through fusedgrad._C.check_deep_*) run the same functions on FakeTensors or
// meta tensors, so that torch.compile, torch.export and meta tensors refuse
// exactly what the kernels refuse, with the same message. `shapes_only` (the
// fake kernels) also accepts the meta device: shape inference, nothing computed.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/string_view.h>

#include <optional>
#include <string>
#include <vector>

namespace fusedgrad::ops {

using Biases = std::vector<std::optional<at::Tensor>>;

void check_deep_mlp_loss(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                         const std::optional<at::Tensor>& target, const std::string& reduction,
                         const std::string& activation);
void check_deep_mlp(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                    const std::string& activation);
void check_deep_mlp_backward(const at::Tensor& grad_out, const at::Tensor& x,
                             const std::vector<at::Tensor>& weights, const Biases& biases,
                             const std::string& activation);
void check_deep_derivatives(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                            const std::string& activation, int64_t order);
void check_deep_derivatives_backward(const std::optional<at::Tensor>& grad_u,
                                     const std::optional<at::Tensor>& grad_du,
                                     const std::optional<at::Tensor>& grad_d2u, const at::Tensor& x,
                                     const std::vector<at::Tensor>& weights, const Biases& biases,
                                     const std::string& activation,
                                     int64_t order);
void check_deep_mlp_jvp(const at::Tensor& x, const std::vector<at::Tensor>& weights, const Biases& biases,
                        const std::string& activation, const at::Tensor& directions,
                        const std::vector<int64_t>& pairs);
void check_deep_mlp_jvp_backward(const std::optional<at::Tensor>& grad_u,
                                 const std::optional<at::Tensor>& grad_tangents,
                                 const std::optional<at::Tensor>& grad_seconds, const at::Tensor& x,
                                 const std::vector<at::Tensor>& weights, const Biases& biases,
                                 const std::string& activation, const at::Tensor& directions,
                                 const std::vector<int64_t>& pairs);

}  // namespace fusedgrad::ops
