// fusedgrad._C.explain_*: which kernel path a call takes, computed by the same
// tests the dispatch runs (fusedgrad/explain.py builds the user's dict).
#include <torch/python.h>

#include <optional>
#include <string>
#include <vector>

#include "../common/options.h"
#include "../common/problem.h"
#include "../engine/mlp_engine.h"
#include "../engine/thread_team.h"
#include "../ops/op_kernels.h"
#include "../trainer/train_step.h"

namespace fusedgrad {
namespace {

namespace py = pybind11;

std::string explain_op(bool loss, const at::Tensor& x, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                       const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2,
                       const std::optional<at::Tensor>& target, const std::string& activation) {
  const Problem p = make_problem(x, w1, b1, w2, b2, target, parse_activation(activation));
  return path_name(p);  // the loss and the prediction take the same path; `loss` says whether target is read
}

py::dict explain_engine(const std::vector<int64_t>& widths, int64_t rows, int64_t element_size) {
  engine::NetShape s;
  s.width = widths;
  s.bias.assign(widths.size() - 1, 1);
  py::dict out;
  out["block_rows"] = engine::block_rows(s, element_size);
  out["blocks"] = engine::block_count(s, rows, element_size);
  out["chunks"] = engine::chunk_count(s, rows, element_size);
  out["vector_bytes"] = engine::vector_bytes(s, element_size);
  out["layout"] = engine::rows_in_lanes_layout(s, element_size) ? "rows-in-lanes" : "padded-rows";
  out["team_threads"] = engine::team_threads(s, rows, element_size);
  return out;
}

}  // namespace

void register_explain(py::module& m) {
  m.def("explain_op", &explain_op, "The kernel path of the one-hidden-layer loss (True) or forward op.");
  m.def("explain_trainer", [](int64_t D, int64_t H, int64_t O, const std::string& activation) {
    return std::string(trainer::train_path_name(D, H, O, parse_activation(activation)));
  }, "The kernel of the one-hidden-layer trainer for these widths.");
  m.def("explain_engine", &explain_engine, "The engine's blocks and chunks for a pass of `rows` rows.");
  m.def("cpu_vector_bytes", &fusedgrad::cpu_vector_bytes,
        "The widest lane vector (bytes) of the CPU code that runs here: 64 with AVX-512 (x86-64-v4), else 32.");
  m.def("_testing_force_vector_bytes", &engine::force_cpu_vector_bytes,
        "Test-only: run the engine with 32- or 64-byte vectors whatever the CPU (0: the CPU's own).");
  m.def("_testing_teams_led", &engine::ThreadTeam::teams_led,
        "Test-only: how many step teams (csrc/engine/thread_team.h) the trainer has formed in this process.");
}

}  // namespace fusedgrad
