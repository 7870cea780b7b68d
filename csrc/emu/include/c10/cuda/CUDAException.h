// Emulated build: C10_CUDA_CHECK raises the error with the emulator's findings (csrc/emu/module.cpp).
#pragma once
#include "../../../fl_emu_api.h"

namespace fl_emu {
void check_cuda(cudaError_t error, const char* expression);
}
#define C10_CUDA_CHECK(EXPR) ::fl_emu::check_cuda((EXPR), #EXPR)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ::fl_emu::check_cuda(cudaGetLastError(), "kernel launch")
