// The all-reduce of fusedgrad.Trainer's data-parallel route (Trainer(process_group=…) and
// Trainer(DistributedDataParallel(net), …)): once per step, between the loss-and-gradients pass
// and the optimizer update, every rank's step sums are added across the ranks of a
// torch.distributed process group, so every rank applies the same update.
//
// The buffer is one flat float64 tensor made once per call (no allocation per step by this
// code; the c10d backend makes its own Work object per collective), used by both step loops
// (deep_train.cpp: the any-depth engine; train_cpu.cpp: the one-hidden-layer narrow kernels):
//
//   [ gradient sums (the engine's SumLayout: dW_1 | db_1 | … | Σ r²) | rows of the step ]
//
// Route "global mean" (Trainer(process_group=…), reduction "mean"): each rank's pass runs with
// 2c = 2 (plain sums); after the all-reduce the gradients and the loss are scaled by
// 1 / (Σ_r rows_r · O), the mean over all ranks' rows, whatever the shards' sizes.
// Route "mean of rank means" (DistributedDataParallel's own semantics): each rank's pass is scaled
// by its own 1 / (rows_r · O), and the sum is divided by the world size, as DDP's reducer does.
// Reduction "sum": plain sums, nothing scaled.
#pragma once

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <memory>
#include <string>

namespace fusedgrad::trainer {

class StepReducer {
 public:
  virtual ~StepReducer() = default;

  // The factor c the step's pass scales its sums by (its gradients by 2c): the rank's own
  // reduction of its `rows` rows (DDP) or 1 (plain sums, scaled after the all-reduce).
  double pre_scale(bool mean, int64_t rows, int64_t outputs) const {
    return rank_means && mean ? 1.0 / static_cast<double>(rows * outputs) : 1.0;
  }

  // Adds the step's `size` sums (loss at `loss_index`, the gradients already scaled by 2·pre) across
  // the ranks, in place, with this rank's `rows`; returns `post`, the factor that turns every reduced
  // sum into the step's loss (post · sums[loss_index]) and gradients. Throws c10::Error naming the
  // user's call when a rank failed, left or timed out.
  double reduce(double* sums, int64_t size, int64_t loss_index, double pre, int64_t rows, bool mean,
                int64_t outputs) {
    if (buffer_.numel() != size + 1) buffer_ = at::zeros({size + 1}, at::kDouble);  // once per call
    double* b = buffer_.data_ptr<double>();
    std::copy(sums, sums + size, b);
    b[loss_index] *= pre;
    b[size] = static_cast<double>(rows);
    allreduce(buffer_);
    std::copy(b, b + size, sums);
    if (rank_means) return 1.0 / static_cast<double>(world_size());
    return mean ? 1.0 / (b[size] * static_cast<double>(outputs)) : 1.0;  // the rows of every rank's step
  }

  virtual int64_t world_size() const = 0;

  bool rank_means = false;  // DistributedDataParallel's semantics (above)

 protected:
  // Adds `buffer` across the ranks in place and waits for it.
  virtual void allreduce(at::Tensor& buffer) = 0;

 private:
  at::Tensor buffer_;  // [sums | rows], float64
};

// The reducer of a torch.distributed ProcessGroup (a Python object); raises TypeError naming
// `fn` for anything else, and ValueError when this torch was built without torch.distributed.
std::unique_ptr<StepReducer> make_step_reducer(const char* fn, pybind11::handle process_group);

}  // namespace fusedgrad::trainer
