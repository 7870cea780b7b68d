// kernel_image_arch: which architecture a kernel's loaded image was compiled for (torch-free).
#pragma once

#include <cuda_runtime.h>

#include <atomic>

namespace fastlatent {
namespace cuda {

// The architecture (PTX version, e.g. 75, 80, 90) that Kernel's image for the current device was
// compiled for: its __CUDA_ARCH__ / 10, also where the driver JIT-compiles older PTX for a newer
// GPU. Kernels with an sm_80 feature behind an __CUDA_ARCH__ guard trap below it; their launchers
// ask here. Read once per device and kernel: cudaFuncGetAttributes is a host-side query (no sync).
template <auto Kernel>
cudaError_t kernel_image_arch(int* arch) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // arch + 1 once read; 0 before
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  const bool cacheable = device >= 0 && device < kMaxDevices;
  const int known = cacheable ? cached[device].load(std::memory_order_relaxed) : 0;
  if (known > 0) {
    *arch = known - 1;
    return cudaSuccess;
  }
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, Kernel);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // returned here; don't leave it for the caller's next launch check
    return err;
  }
  *arch = attr.ptxVersion;
  if (cacheable) cached[device].store(attr.ptxVersion + 1, std::memory_order_relaxed);
  return cudaSuccess;
}

}  // namespace cuda
}  // namespace fastlatent
