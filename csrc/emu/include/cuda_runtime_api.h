// Emulated build: the CUDA runtime API of fl_emu_api.h (see docs/cuda-emulation.md).
#pragma once
#include "../fl_emu_api.h"
