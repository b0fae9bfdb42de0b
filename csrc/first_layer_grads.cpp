// dw1 = dhᵀ x and dx = dh w1: the two GEMMs that end every backward, the same
// on every device (at::mm_out dispatches to BLAS or cuBLAS).
#include "kernels.h"

namespace fusedgrad {

void first_layer_grads(const Problem& p, const at::Tensor& dh, bool need_w1, bool need_x,
                       at::Tensor& dw1, at::Tensor& dx) {
  if (need_w1) {
    dw1 = at::empty({p.H, p.D}, dh.options());
    at::mm_out(dw1, dh.t(), p.x2);
  }
  if (need_x) {
    dx = at::empty({p.N, p.D}, dh.options());
    at::mm_out(dx, dh, p.w1);
    dx = dx.view(p.x_shape);
  }
}

}  // namespace fusedgrad
