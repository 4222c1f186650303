// Stands in for CUDA's header when a kernel is compiled for the CPU emulator (emulator.h).
#pragma once
#include "emulator.h"
