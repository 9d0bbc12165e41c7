// Forwarding header of the CUDA-on-CPU emulation (csrc/emu/simt.h): stands in front of the real one.
#pragma once
#include "../simt.h"
