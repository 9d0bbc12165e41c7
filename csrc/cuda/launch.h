// Host interface of the fused CUDA kernels (csrc/cuda/fused_kernels.cu).
//
// No torch here: the kernels' translation unit compiles with plain nvcc (scripts/cuda_compile_check.py
// builds it for sm_80 / sm_90 / sm_100 without torch), and the torch glue (ops_cuda.cpp) fills these
// structs from tensors. Everything is a raw device pointer; nothing here synchronizes with the host.
// Params and grads are the user's tensors, reached through a per-segment table of base addresses
// (Addr); nothing assumes that segments are adjacent or aligned.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../lars_math.h"

namespace fusedlars {
namespace cuda {

// Elements per tile: a tile is a slice of ONE segment; one block computes a tile's partial sums of
// squares in a fixed order. Must equal fusedlars/backends/cuda.py TILE (the tile tables come from
// Bucket.tiles(TILE)).
constexpr int kTileElems = 16384;
constexpr int kThreads = 256;  // threads per block (fixed: the reduction order depends on it)
static_assert(kTileElems % 8 == 0, "tiles start on multiples of every 128-bit vector width (NOTE [Vector access])");

enum Variant : int { kF32 = 0, kBF16 = 1, kBF16Master = 2, kF16 = 3, kF16Master = 4 };
// kPathAuto / kPathCooperative / kPathTwoLaunch: a whole step. kPathPartials: launch 1 and the
// per-segment reduction into Plan::ssq_out (FSDP2 split, fusedlars/backends/cuda.py lars_partials);
// kPathApply: launch 2 from the given per-segment sums Plan::ssq_in (lars_apply).
enum Path : int { kPathAuto = 0, kPathCooperative = 1, kPathTwoLaunch = 2, kPathPartials = 3, kPathApply = 4 };
// A flag on a LARS path (kPathAuto / kPathCooperative / kPathTwoLaunch / kPathPartials): the grads'
// sums of squares are given (taken in backward, fusedlars/backward_norms.py; issue #25), Plan::g2_in.
// Pass 1 then sums the weights alone (no grad is loaded), and the (g + lam*w)^2 row is NaN (only
// reported, as u_norm: the ratio must not need it, cuda.py declines norm_of_sum).
constexpr int kPathGivenG2 = 8;

// Rows of the address table (Bucket.address_table(kinds), kinds in this order: cuda.py _kinds()).
// Element k of segment s of buffer X is at ((X's type*) base[X * S + s]) + k; 0 where the segment has
// no such buffer (inactive, no master). Rows at or above Addr::rows are absent.
enum Row : int { kRowParam = 0, kRowGrad = 1, kRowMaster = 2, kRowS0 = 3, kRowS1 = 4 };
constexpr int kMaxRows = 8;  // + remainder and two absmax rows of low-bit state (Lowbit)

// A per-step scalar: read on the device from `ptr` (fp32 or fp64) when set, else `value`.
struct Scalar {
  const void* ptr;
  int is_double;
  double value;
};

// Tile table (Bucket.tiles) and scratch, all device memory.
struct Plan {
  const int32_t* tile_seg;      // [T]
  const int64_t* tile_start;    // [T] element offset inside the tile's segment
  const int32_t* tile_len;      // [T]
  const int64_t* seg_tile_ptr;  // [S+1]
  const int64_t* group_seg;     // [G+1] segment boundaries of the L2-sized groups (cooperative path)
  int64_t num_tiles, num_segs, num_groups;
  double* part;  // [3T] per-tile partial sums of squares
  float* snap;   // [2S] step / has_state of each segment at the start of the step
  double* ssq_out;       // kPathPartials: [3, S] per-segment sums (0 for inactive segments), else nullptr
  const double* ssq_in;  // kPathApply: [3, S] per-segment sums to finish the step from, else nullptr
  // kPathGivenG2: [S] the raw grads' sums of squares (scaled by inv_scale^2 in double on the device),
  // else nullptr. With kPathPartials it is row 1 of ssq_out, read and then overwritten (scaled).
  const double* g2_in;
};

struct Segs {
  const float *wd_mask, *adapt_mask, *active;
  float *has_state, *step, *w_norm, *g_norm, *u_norm, *trust_ratio;
};

// Base addresses of the user's tensors (params, grads) and ours (masters, state), per segment.
// s0: momentum buffer (LARS; absent without momentum) or exp_avg (LAMB); s1: exp_avg_sq (LAMB).
struct Addr {
  const int64_t* base;  // [rows, S] int64
  int64_t num_segs;     // S
  int rows;             // rows present (3..kMaxRows)
};

// Low-bit optimizer state (issue #26; fusedlars/backends/lowbit_state.py, NOTE [Low-bit buckets] in
// fusedlars/buckets.py): bucket inputs, not options. storage: the format of the state rows kRowS0 /
// kRowS1 (fp32, bf16 bits, or uint8 codes of the dynamic-tree maps); remainder: bf16 params whose
// fp32 masters are the param plus an int16 remainder (row row_rem). int8: row_a0 / row_a1 hold each
// state buffer's fp32 scales, one per 256-element block. The rows past the kind's state rows come in
// the order remainder, absmax of s0, absmax of s1 (those that exist; -1 for an absent one).
// Stochastic rounding keys Philox-4x32-10 on (seed, step after this step, param_id[s], element).
// storage == kStateF32 && !remainder: the fp32 kernels; otherwise the exact kernels (NOTE [Exact
// kernels] in fused_kernels.cu).
enum StateFormat : int { kStateF32 = 0, kStateBF16 = 1, kStateInt8 = 2 };
struct Lowbit {
  int storage;    // StateFormat
  int remainder;  // 0 / 1
  int row_rem, row_a0, row_a1;
  uint64_t seed;
  const int64_t* param_id;  // [S] state_dict ids (exact kernels), else nullptr
};

// Fills lb's rows from the table's row count (3 + nst + remainder + (int8 ? nst : 0) rows, nst <=
// max_states state rows); returns nst, -1 when the rows do not fit (ops_cuda.cpp, csrc/emu/emu_abi.cpp).
inline int lowbit_layout(Lowbit& lb, int64_t rows, int max_states) {
  const int64_t extra = rows - 3 - lb.remainder;
  const int64_t per = lb.storage == kStateInt8 ? 2 : 1;
  if (extra < 0 || extra % per != 0 || extra / per > max_states) return -1;
  const int nst = static_cast<int>(extra / per);
  int r = 3 + nst;
  lb.row_rem = lb.remainder ? r++ : -1;
  lb.row_a0 = lb.storage == kStateInt8 && nst >= 1 ? r++ : -1;
  lb.row_a1 = lb.storage == kStateInt8 && nst >= 2 ? r++ : -1;
  return nst;
}

struct LarsArgs {
  Addr b;
  Segs s;
  Plan p;
  LarsOptions o;
  Scalar lr, inv_scale, found_inf;
  Lowbit lb;
};

struct LambArgs {
  Addr b;
  Segs s;
  Plan p;
  LambOptions o;
  Scalar lr, inv_scale, found_inf, clip_coef;
  Lowbit lb;
};

struct LaunchInfo {
  cudaError_t err;
  int path;         // kPathCooperative or kPathTwoLaunch (what ran)
  int grid;         // blocks
  const char* why;  // non-null: why the requested path could not run (err is then cudaErrorNotSupported)
};

LaunchInfo launch_lars(const LarsArgs& a, int variant, cudaStream_t stream, int path);
LaunchInfo launch_lamb(const LambArgs& a, int variant, cudaStream_t stream, int path);
// *out = sum over active tiles (tile order) of sum (grad*inv_scale)^2 (grads: row kRowGrad of `b`);
// gpart: [T] scratch
cudaError_t launch_grad_sumsq(const Addr& b, int variant, const float* active, const Plan& p, Scalar inv_scale,
                              double* gpart, double* out, cudaStream_t stream);

const char* compiled_archs();  // nvcc's __CUDA_ARCH_LIST__, e.g. "800,900,1000"
int last_path();               // path of the last LARS/LAMB launch in this process (0: none yet)
// cooperative launch support of `device`: 1/0; sms / blocks_per_sm of the LARS fp32 kernel
int device_coop(int device, int* sms, int* blocks_per_sm);

}  // namespace cuda
}  // namespace fusedlars
