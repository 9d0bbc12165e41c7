// Per-tile CPU kernels built for baseline x86-64 (SSE2) or any other CPU; see isa_impl.h and kernels.h.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <c10/util/Half.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kernels.h"

#define FL_ISA 0
#define FL_ISA_NAME "generic"
#define FL_TABLE_FN kernel_table_generic
#include "isa_impl.h"
