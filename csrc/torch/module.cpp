// The Python module fastlatent._C: importing it loads the shared library, which registers
// every operator with the dispatcher (static initialisers of csrc/torch/*.cpp). The only
// Python function it defines is build_info(); ops are reached through torch.ops.fastlatent.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "build_info.h"

#ifndef FL_TORCH_VERSION
#define FL_TORCH_VERSION "unknown"
#endif
#ifndef FL_CUDA_ARCH_FLAGS
#define FL_CUDA_ARCH_FLAGS ""
#endif

namespace py = pybind11;

static py::dict build_info() {
  py::dict info;
  info["torch_version"] = FL_TORCH_VERSION;
  info["compiler"] = __VERSION__;
  info["cpu_simd"] = std::string(fastlatent::cpu_simd_level());
  info["openmp_version"] = fastlatent::openmp_version();
#ifdef _OPENMP
  info["openmp_max_threads"] = omp_get_max_threads();
#else
  info["openmp_max_threads"] = 1;
#endif
#ifdef FL_WITH_CUDA
  info["cuda"] = true;
  info["cuda_archs"] = std::string(fastlatent::cuda_arch_list());
  info["cuda_arch_flags"] = FL_CUDA_ARCH_FLAGS;
  info["cuda_compiled_version"] = fastlatent::cuda_compiled_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = "";
  info["cuda_arch_flags"] = "";
  info["cuda_compiled_version"] = 0;
#endif
  return info;
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "fastlatent compiled extension: registers torch.ops.fastlatent.*";
  m.def("build_info", &build_info, "How this extension was compiled (CUDA archs, SIMD, OpenMP).");
}
