// Per-tile CPU kernels built for AVX2 + F16C; see isa_impl.h and kernels.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FL_ISA 1
#define FL_ISA_NAME "avx2"
#define FL_TABLE_FN kernel_table_avx2
#include "isa_impl.h"
#pragma GCC pop_options
#else
namespace fusedlars::cpu { const KernelTable* kernel_table_avx2() { return nullptr; } }
#endif
