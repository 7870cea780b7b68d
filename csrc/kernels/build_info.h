// Facts about how the kernel library was compiled, for fastlatent.build_info().
#pragma once

namespace fastlatent {

// SIMD instruction sets the CPU kernels were compiled for, e.g. "avx2 fma f16c".
const char* cpu_simd_level();
// OpenMP version macro (_OPENMP, e.g. 201511), or 0 without OpenMP.
int openmp_version();

#if defined(__CUDACC__) || defined(FL_WITH_CUDA)
// Comma-separated SM architectures the CUDA kernels carry, from nvcc's __CUDA_ARCH_LIST__.
const char* cuda_arch_list();
// CUDA runtime version the kernels were compiled with (CUDART_VERSION).
int cuda_compiled_version();
#endif

}  // namespace fastlatent
