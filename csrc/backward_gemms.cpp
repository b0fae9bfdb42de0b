// The GEMMs that begin and end every backward, the same on every device
// (at::mm_out dispatches to BLAS or cuBLAS); the element-wise pass between
// them (dh = ds ⊙ act'(s), db1) is each backend's own.
#include "kernels.h"

namespace fusedgrad {

at::Tensor output_layer_grads(const Problem& p, const at::Tensor& g, bool g_owned, const at::Tensor& s,
                              bool need_w2, bool need_hidden, at::Tensor& dw2) {
  if (need_w2) {
    dw2 = at::empty({p.O, p.H}, s.options());
    at::mm_out(dw2, g.t(), s);
  }
  if (!need_hidden) return at::Tensor();
  if (!p.has_w2()) {
    // Without a second layer ds = g; reuse g's buffer only when it is ours.
    return g_owned ? g : g.clone(at::MemoryFormat::Contiguous);
  }
  at::Tensor ds = at::empty({p.N, p.H}, s.options());
  at::mm_out(ds, g, p.w2);
  return ds;
}

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
