// The CUDA runtime API as the CPU emulation of fastlatent's CUDA kernels sees it (host side):
// error codes, streams, the few runtime calls the launchers and bindings make. Included through
// csrc/emu/include/cuda_runtime_api.h by the kernel headers and the bindings of the emulated build;
// fl_emu.h adds the device side. See docs/cuda-emulation.md.
#pragma once

#include <cstddef>
#include <cstdint>

// Values as in CUDA's driver_types.h, so that messages and codes read the same.
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorMisalignedAddress = 716,
  cudaErrorIllegalInstruction = 715,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
};
typedef cudaError_t cudaError;

struct CUstream_st;
typedef CUstream_st* cudaStream_t;

enum cudaDeviceAttr : int {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};

enum cudaFuncAttribute : int {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
};

cudaError_t cudaGetLastError();
cudaError_t cudaPeekAtLastError();
const char* cudaGetErrorString(cudaError_t error);
const char* cudaGetErrorName(cudaError_t error);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t stream = nullptr);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, int kind, cudaStream_t stream = nullptr);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize();

namespace fl_emu {
// The attribute store behind cudaFuncSetAttribute (a template in fl_emu.h, any kernel type).
cudaError_t set_function_attribute(const void* function, cudaFuncAttribute attr, int value);
}  // namespace fl_emu

// What cudaFuncGetAttributes tells a launcher about a kernel's image: the emulated build compiles
// every kernel as __CUDA_ARCH__ 800 (setup.py), so the image's PTX version is 80 and the
// sm_80 paths (tf32/bf16 tensor cores, cp.async) are the ones exercised.
#ifdef __CUDA_ARCH__
#define FL_EMU_IMAGE_ARCH __CUDA_ARCH__
#else
#define FL_EMU_IMAGE_ARCH 800  // the -D__CUDA_ARCH__ setup.py gives the emulated kernel TUs
#endif
struct cudaFuncAttributes {
  int ptxVersion;
  int binaryVersion;
};

template <typename F>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, F* function) {
  if (attr == nullptr || function == nullptr) return cudaErrorInvalidValue;
  attr->ptxVersion = FL_EMU_IMAGE_ARCH / 10;
  attr->binaryVersion = FL_EMU_IMAGE_ARCH / 10;
  return cudaSuccess;
}

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F* function, cudaFuncAttribute attr, int value) {
  return fl_emu::set_function_attribute(reinterpret_cast<const void*>(function), attr, value);
}
