// The c10d all-reduce of the trainer's data-parallel route (step_reducer.h).
//
// The process group is the one the user made with torch.distributed (gloo on the CPU): its
// Python object is cast to the C++ c10d::ProcessGroup that torch's own bindings hold, and the
// collective is ProcessGroup::allreduce, the call DistributedDataParallel's reducer makes. The
// GIL is released by the caller for the whole loop; a failed, departed or timed-out rank comes
// back here as the backend's c10::Error (DistBackendError), rethrown naming the user's call.
#include "step_reducer.h"

#include <c10/util/Exception.h>
#include <torch/csrc/utils/pybind.h>  // the c10::intrusive_ptr holder caster torch's bindings use

#ifdef FUSEDGRAD_WITH_C10D
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#endif

namespace fusedgrad::trainer {

#ifdef FUSEDGRAD_WITH_C10D
namespace {

class ProcessGroupReducer final : public StepReducer {
 public:
  ProcessGroupReducer(std::string fn, c10::intrusive_ptr<c10d::ProcessGroup> group)
      : fn_(std::move(fn)), group_(std::move(group)) {
    tensors_.resize(1);
  }

  int64_t world_size() const override { return group_->getSize(); }

 protected:
  void allreduce(at::Tensor& buffer) override {
    tensors_[0] = buffer;  // the same tensor every step: no new buffer
    try {
      group_->allreduce(tensors_)->wait();
    } catch (const c10::Error& e) {
      failed(e.what_without_backtrace());
    } catch (const std::exception& e) {  // gloo's own exceptions (a peer's connection reset)
      failed(e.what());
    }
  }


 private:
  [[noreturn]] void failed(const char* why) const {
    TORCH_CHECK(false, fn_, ": the gradient all-reduce over the process group (backend '", group_->getBackendName(),
                "', rank ", group_->getRank(), " of ", group_->getSize(), ") failed: another rank failed, left or "
                "did not reach this step within the group's timeout. ", why);
  }

  std::string fn_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  std::vector<at::Tensor> tensors_;
};

}  // namespace

std::unique_ptr<StepReducer> make_step_reducer(const char* fn, pybind11::handle process_group) {
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  try {
    group = pybind11::cast<c10::intrusive_ptr<c10d::ProcessGroup>>(process_group);
  } catch (const pybind11::cast_error&) {
    TORCH_CHECK_TYPE(false, fn, ": argument 'process_group' must be a torch.distributed ProcessGroup (e.g. "
                     "torch.distributed.group.WORLD or one from torch.distributed.new_group()), got ",
                     pybind11::str(pybind11::type::of(process_group).attr("__qualname__")).cast<std::string>());
  }
  TORCH_CHECK_VALUE(group, fn, ": argument 'process_group' is None");
  return std::make_unique<ProcessGroupReducer>(fn, std::move(group));
}

#else

std::unique_ptr<StepReducer> make_step_reducer(const char* fn, pybind11::handle) {
  TORCH_CHECK_VALUE(false, fn, ": this torch was built without torch.distributed, so fusedgrad was too; "
                    "argument 'process_group' cannot be used");
}

#endif

}  // namespace fusedgrad::trainer
