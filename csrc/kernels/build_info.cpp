#include "build_info.h"

namespace fastlatent {

const char* cpu_simd_level() {
  return ""
#if defined(__AVX512F__)
         "avx512f "
#endif
#if defined(__AVX2__)
         "avx2 "
#endif
#if defined(__FMA__)
         "fma "
#endif
#if defined(__F16C__)
         "f16c "
#endif
#if defined(__AVX__) && !defined(__AVX2__)
         "avx "
#endif
#if defined(__SSE4_2__) && !defined(__AVX__)
         "sse4.2 "
#endif
#if defined(__SSE2__) && !defined(__SSE4_2__)
         "sse2 "
#endif
#if defined(__ARM_NEON)
         "neon "
#endif
         "";
}

int openmp_version() {
#ifdef _OPENMP
  return _OPENMP;
#else
  return 0;
#endif
}

}  // namespace fastlatent
