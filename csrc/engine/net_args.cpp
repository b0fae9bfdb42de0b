#include "net_args.h"

#include <c10/util/Exception.h>

#include "../common/problem.h"  // dtype_name, shape_str

namespace fusedgrad::engine {

NetArgs check_net(const char* fn, at::TensorList weights, const std::vector<std::optional<at::Tensor>>& biases,
                  Activation act, int64_t models) {
  NetArgs net;
  const int64_t L = static_cast<int64_t>(weights.size());
  TORCH_CHECK_VALUE(L >= 1, fn, ": argument 'weights' must hold at least one weight, got an empty list");
  TORCH_CHECK_VALUE(biases.empty() || static_cast<int64_t>(biases.size()) == L, fn,
                    ": argument 'biases' must hold one entry (a tensor or None) per weight: ", L, " expected, got ",
                    biases.size());
  const int64_t lead = models > 0 ? 1 : 0;
  const at::Tensor& w0 = weights[0];
  net.dtype = w0.scalar_type();
  net.device = w0.device();
  TORCH_CHECK_TYPE(net.dtype == at::kFloat || net.dtype == at::kDouble, fn,
                   ": argument 'weights'[0] must be float32 or float64, got ", dtype_name(net.dtype));
  net.shape.act = act;
  net.shape.width.resize(L + 1);
  net.shape.bias.assign(L, 0);
  net.W.resize(L);
  net.b.resize(L);
  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor& w = weights[l];
    TORCH_CHECK_TYPE(w.scalar_type() == net.dtype, fn, ": argument 'weights'[", l, "] has dtype ",
                     dtype_name(w.scalar_type()), " but 'weights'[0] has ", dtype_name(net.dtype),
                     "; every tensor must have one dtype");
    TORCH_CHECK_VALUE(w.device() == net.device, fn, ": argument 'weights'[", l, "] is on ", w.device(),
                      " but 'weights'[0] is on ", net.device);
    TORCH_CHECK_VALUE(w.layout() == at::kStrided, fn, ": argument 'weights'[", l, "] must be a dense tensor");
    TORCH_CHECK_VALUE(w.dim() == 2 + lead, fn, ": argument 'weights'[", l, "] must be ",
                      lead ? "(K, out_features, in_features)" : "(out_features, in_features)", ", got shape ",
                      shape_str(w.sizes()));
    if (lead) {
      TORCH_CHECK_VALUE(w.size(0) == models, fn, ": argument 'weights'[", l, "] holds ", w.size(0),
                        " models, expected K = ", models);
    }
    if (l == 0) {
      net.shape.width[0] = w.size(-1);
    } else {
      TORCH_CHECK_VALUE(w.size(-1) == net.shape.width[l], fn, ": argument 'weights'[", l, "] has shape ",
                        shape_str(w.sizes()), ": its in_features (", w.size(-1),
                        ") must equal the out_features of 'weights'[", l - 1, "] (", net.shape.width[l], ")");
    }
    net.shape.width[l + 1] = w.size(-2);
    net.W[l] = w.contiguous();
    if (!biases.empty() && biases[l].has_value() && biases[l]->defined()) {
      const at::Tensor& b = *biases[l];
      TORCH_CHECK_TYPE(b.scalar_type() == net.dtype, fn, ": argument 'biases'[", l, "] has dtype ",
                       dtype_name(b.scalar_type()), ", expected the weights' ", dtype_name(net.dtype));
      TORCH_CHECK_VALUE(b.device() == net.device, fn, ": argument 'biases'[", l, "] is on ", b.device(),
                        ", expected the weights' device ", net.device);
      const bool ok = lead ? (b.dim() == 2 && b.size(0) == models && b.size(1) == w.size(-2))
                           : (b.dim() == 1 && b.size(0) == w.size(-2));
      const std::vector<int64_t> expected = lead ? std::vector<int64_t>{models, w.size(-2)}
                                                 : std::vector<int64_t>{w.size(-2)};
      TORCH_CHECK_VALUE(ok, fn, ": argument 'biases'[", l, "] must have shape ", shape_str(expected),
                        " to match 'weights'[", l, "] of shape ", shape_str(w.sizes()), ", got ",
                        shape_str(b.sizes()));
      net.b[l] = b.contiguous();
      net.shape.bias[l] = 1;
    }
  }
  return net;
}

}  // namespace fusedgrad::engine
