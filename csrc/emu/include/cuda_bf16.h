// Emulated build: the CUDA built-ins come from fl_emu.h (see docs/cuda-emulation.md).
#pragma once
#include "../fl_emu.h"
