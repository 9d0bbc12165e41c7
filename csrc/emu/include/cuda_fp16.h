// Forwarding header of the CUDA-on-CPU emulation: __half as the compiler's IEEE binary16 (_Float16),
// whose conversions from float round to nearest even like __float2half_rn.
#pragma once
#include "../simt.h"

typedef _Float16 __half;
inline float __half2float(__half x) { return static_cast<float>(x); }
inline __half __float2half_rn(float x) { return static_cast<__half>(x); }
inline __half __float2half(float x) { return static_cast<__half>(x); }
