// Per-tile CPU kernels built for AVX-512 (F, BW, VL, DQ); see isa_impl.h and kernels.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define FL_ISA 2
#define FL_ISA_NAME "avx512"
#define FL_TABLE_FN kernel_table_avx512
#include "isa_impl.h"
#pragma GCC pop_options
#else
namespace fusedlars::cpu { const KernelTable* kernel_table_avx512() { return nullptr; } }
#endif
