// Emulated build: cub::DeviceRadixSort from fl_emu.h (see docs/cuda-emulation.md).
#pragma once
#include "../../../fl_emu.h"
