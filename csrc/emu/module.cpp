// fastlatent._emu: the CUDA kernels run on the CPU under the emulator (docs/cuda-emulation.md).
//
// Ops: torch.ops.fastlatent_emu.<op>, the CUDA bindings of csrc/torch compiled for the emulator
// (binding_shim.h), registered for CPU tensors. Python helpers: seed, counters, planted-bug controls.
#include <c10/core/CPUAllocator.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <cstdlib>
#include <mutex>
#include <string>

#include "code_stats.h"
#include "ema_update.h"
#include "emu_library.h"
#include "group_norm_conv.h"
#include "runtime.h"
#include "sampler_step.h"

TORCH_LIBRARY(fastlatent_emu, m) {}

namespace fl_emu {
namespace {

std::recursive_mutex g_op_mutex;
int g_depth = 0;
uint64_t g_seed = [] {
  const char* s = std::getenv("FL_EMU_SEED");
  return s ? std::strtoull(s, nullptr, 10) : uint64_t{20261206};
}();

// Every CPU allocation during an emulated call (outputs, workspaces, contiguous copies) is device memory.
class TrackingAllocator final : public c10::Allocator {
 public:
  c10::Allocator* inner = nullptr;
  c10::DataPtr allocate(size_t n) override {
    c10::DataPtr p = inner->allocate(n);
    if (n > 0) register_buffer(p.get(), n, "a buffer allocated by the call");
    return p;
  }
  c10::DeleterFnPtr raw_deleter() const override { return inner->raw_deleter(); }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    inner->copy_data(dest, src, count);
  }
};

TrackingAllocator g_tracking;
c10::Allocator* g_previous_allocator = nullptr;

}  // namespace

OpScope::OpScope(const char* op) : op_(op) {
  g_op_mutex.lock();
  outermost_ = g_depth++ == 0;
  if (outermost_) {
    begin_scope(g_seed);
    g_previous_allocator = c10::GetCPUAllocator();
    g_tracking.inner = g_previous_allocator;
    c10::SetCPUAllocator(&g_tracking, /*priority=*/255);
  }
}

OpScope::~OpScope() {
  if (outermost_) {
    c10::SetCPUAllocator(g_previous_allocator, /*priority=*/255);
    if (!finished_) end_scope();
  }
  --g_depth;
  g_op_mutex.unlock();
}

void OpScope::add_tensor(const at::Tensor& t, const std::string& name) {
  if (!t.defined() || t.numel() == 0) return;
  TORCH_CHECK(t.device().is_cpu(), "fastlatent_emu.", op_, ": ", name,
              " must be a CPU tensor (the emulated CUDA kernels run on the CPU), got ", t.device());
  // the exact bytes of the view, not its whole storage
  int64_t last = 0;
  for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
  register_buffer(t.data_ptr(), static_cast<size_t>(last + 1) * t.element_size(), name.c_str());
}

void OpScope::add(const at::Tensor& t) {
  add_tensor(t, "argument " + std::to_string(arg_index_++));
}
void OpScope::add(const std::optional<at::Tensor>& t) {
  if (t) add_tensor(*t, "argument " + std::to_string(arg_index_));
  ++arg_index_;
}
void OpScope::add(at::TensorList ts) {
  for (size_t i = 0; i < ts.size(); ++i)
    add_tensor(ts[i], "argument " + std::to_string(arg_index_) + "[" + std::to_string(i) + "]");
  ++arg_index_;
}

void OpScope::finish() {
  const Report report = outermost_ ? end_scope() : peek_report();
  finished_ = outermost_;
  TORCH_CHECK(report.total == 0 && report.error == cudaSuccess, "fastlatent_emu.", op_, ": ", format(report));
}

void check_cuda(cudaError_t error, const char* expression) {
  if (error == cudaSuccess) return;
  TORCH_CHECK(false, "CUDA error ", cudaGetErrorName(error), " (emulated) from ", expression, "\n",
              format(peek_report()));
}

}  // namespace fl_emu

// Launchers with planted-bug controls: setup.py renames the real one to <launch>_emulated; this
// dispatcher runs the active control instead when one is selected.
namespace fastlatent {
#define FL_EMU_CONTROLLED(LAUNCH, PARAMS)                                      \
  cudaError_t LAUNCH##_emulated(const PARAMS& params, cudaStream_t stream);    \
  cudaError_t LAUNCH(const PARAMS& params, cudaStream_t stream) {              \
    if (::fl_emu::ControlLaunch control = ::fl_emu::active_control(#LAUNCH))   \
      return control(&params, stream);                                         \
    return LAUNCH##_emulated(params, stream);                                  \
  }
FL_EMU_CONTROLLED(launch_ema_update_cuda, EmaUpdateParams)
FL_EMU_CONTROLLED(launch_code_stats_cuda, CodeStatsParams)
FL_EMU_CONTROLLED(launch_group_norm_conv3x3_cuda, GroupNormConvParams)
FL_EMU_CONTROLLED(launch_sampler_step_cuda, SamplerStepParams)
#undef FL_EMU_CONTROLLED
}  // namespace fastlatent

PYBIND11_MODULE(_emu, m) {
  m.doc() = "fastlatent's CUDA kernels executed on the CPU by the emulator (docs/cuda-emulation.md)";
  m.def("set_seed", [](uint64_t seed) { fl_emu::g_seed = seed; },
        "Seed of the block order and of the thread order between barriers.");
  m.def("seed", [] { return fl_emu::g_seed; });
  m.def("counters", [] {
    const fl_emu::Counters c = fl_emu::counters();
    return pybind11::dict(pybind11::arg("launches") = c.launches, pybind11::arg("blocks") = c.blocks,
                          pybind11::arg("threads") = c.threads);
  }, "Kernel launches, blocks and threads emulated since import.");
  m.def("matrix_load_counters", [] {
    const fl_emu::MatrixLoadCounters c = fl_emu::matrix_load_counters();
    return pybind11::dict(pybind11::arg("loads") = c.loads, pybind11::arg("phases") = c.phases,
                          pybind11::arg("wavefronts") = c.wavefronts);
  }, "16-bit WMMA fragment loads from shared memory since import, as ldmatrix phases and the shared-memory "
     "wavefronts they take (equal when conflict-free).");
  m.def("matrix_load_cost", [](uint64_t offset, unsigned int ldm, int lines, int line_elems) {
    TORCH_CHECK_VALUE(lines > 0 && lines % 8 == 0 && line_elems > 0 && line_elems % 8 == 0,
                      "fastlatent._emu.matrix_load_cost: lines and line_elems must be positive multiples of "
                      "8, got ", lines, " and ", line_elems);
    const fl_emu::MatrixLoadCounters c = fl_emu::matrix_load_cost(offset, ldm, lines, line_elems);
    return pybind11::dict(pybind11::arg("phases") = c.phases, pybind11::arg("wavefronts") = c.wavefronts);
  }, "The ldmatrix phases and shared-memory wavefronts of one 16-bit fragment load (the model behind "
     "matrix_load_counters).");
  m.def("set_control", [](const std::string& name) {
    TORCH_CHECK_VALUE(fl_emu::set_control(name), "fastlatent._emu.set_control: no control named \"", name,
                      "\"; built: ", c10::Join(", ", fl_emu::control_names()));
  }, "Run a planted-bug copy of a launcher instead of the real one (\"\" for none): tests only.");
  m.def("control_names", &fl_emu::control_names);
  m.def("launched_kernels", &fl_emu::launched_kernels, "Launches per kernel name since import.");
  m.def("shared_variable_count", &fl_emu::shared_variable_count,
        "Static __shared__ variables the checker knows (from the symbol table).");
}
