#include <cuda_runtime_api.h>

#include "build_info.h"

#define FL_STRINGIZE_IMPL(...) #__VA_ARGS__
#define FL_STRINGIZE(...) FL_STRINGIZE_IMPL(__VA_ARGS__)

namespace fastlatent {

const char* cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return FL_STRINGIZE(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_compiled_version() { return CUDART_VERSION; }

}  // namespace fastlatent
