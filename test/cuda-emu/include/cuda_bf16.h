// lima-native's CUDA emulator (test/cuda-emu): stands in for the CUDA runtime header.
#pragma once
#include "../lima_emu.h"
