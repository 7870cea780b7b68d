// Emulated build: cub from fl_emu.h (see docs/cuda-emulation.md).
#pragma once
#include "../../fl_emu.h"
