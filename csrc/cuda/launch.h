// Host interface of the fused CUDA kernels (csrc/cuda/fused_kernels.cu).
//
// No torch here: the kernels' translation unit compiles with plain nvcc (scripts/cuda_compile_check.py
// builds it for sm_80 / sm_90 / sm_100 without torch), and the torch glue (ops_cuda.cpp) fills these
// structs from tensors. Everything is a raw device pointer; nothing here synchronizes with the host.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "../lars_math.h"

namespace fusedlars {
namespace cuda {

// Elements per tile: a tile is a slice of ONE segment; one block computes a tile's partial sums of
// squares in a fixed order. Must equal fusedlars/kernels/cuda.py TILE (the tile tables come from
// Bucket.tiles(TILE)).
constexpr int kTileElems = 16384;
constexpr int kThreads = 256;  // threads per block (fixed: the reduction order depends on it)

enum Variant : int { kF32 = 0, kBF16 = 1, kBF16Master = 2, kF16 = 3, kF16Master = 4 };
enum Path : int { kPathAuto = 0, kPathCooperative = 1, kPathTwoLaunch = 2 };

// A per-step scalar: read on the device from `ptr` (fp32 or fp64) when set, else `value`.
struct Scalar {
  const void* ptr;
  int is_double;
  double value;
};

// Tile table (Bucket.tiles) and scratch, all device memory.
struct Plan {
  const int32_t* tile_seg;      // [T]
  const int64_t* tile_start;    // [T] element offset into the flat buffers
  const int32_t* tile_len;      // [T]
  const int64_t* seg_tile_ptr;  // [S+1]
  const int64_t* group_seg;     // [G+1] segment boundaries of the L2-sized groups (cooperative path)
  int64_t num_tiles, num_segs, num_groups;
  double* part;  // [3T] per-tile partial sums of squares
  float* snap;   // [2S] step / has_state of each segment at the start of the step
};

struct Segs {
  const float *wd_mask, *adapt_mask, *active;
  float *has_state, *step, *w_norm, *g_norm, *u_norm, *trust_ratio;
};

struct Bufs {
  void* param;       // param dtype
  float* master;     // fp32 master weights or nullptr
  const void* grad;  // param dtype
  float* s0;         // momentum buffer (LARS, nullptr without momentum) or exp_avg (LAMB)
  float* s1;         // exp_avg_sq (LAMB)
  int vec_ok;        // set by launch_lars / launch_lamb: every base pointer is 16-byte aligned (128-bit access)
};

struct LarsArgs {
  Bufs b;
  Segs s;
  Plan p;
  LarsOptions o;
  Scalar lr, inv_scale, found_inf;
};

struct LambArgs {
  Bufs b;
  Segs s;
  Plan p;
  LambOptions o;
  Scalar lr, inv_scale, found_inf, clip_coef;
};

struct LaunchInfo {
  cudaError_t err;
  int path;         // kPathCooperative or kPathTwoLaunch (what ran)
  int grid;         // blocks
  const char* why;  // non-null: why the requested path could not run (err is then cudaErrorNotSupported)
};

LaunchInfo launch_lars(const LarsArgs& a, int variant, cudaStream_t stream, int path);
LaunchInfo launch_lamb(const LambArgs& a, int variant, cudaStream_t stream, int path);
// *out = sum over active tiles (tile order) of sum (grad*inv_scale)^2; gpart: [T] scratch
cudaError_t launch_grad_sumsq(const void* grad, int variant, const float* active, const Plan& p,
                              Scalar inv_scale, double* gpart, double* out, cudaStream_t stream);

const char* compiled_archs();  // nvcc's __CUDA_ARCH_LIST__, e.g. "800,900,1000"
int last_path();               // path of the last LARS/LAMB launch in this process (0: none yet)
// cooperative launch support of `device`: 1/0; sms / blocks_per_sm of the LARS fp32 kernel
int device_coop(int device, int* sms, int* blocks_per_sm);

}  // namespace cuda
}  // namespace fusedlars
