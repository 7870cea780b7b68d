// Emulated build: the current stream is the emulator's one in-order stream.
#pragma once
#include <c10/core/Device.h>

#include "../../../fl_emu_api.h"

namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
}  // namespace cuda
}  // namespace c10
