// C ABI of the CUDA-on-CPU emulation build of csrc/cuda (tests/cuda_emu.py loads it with ctypes; the
// device table and counters are in emu_control.cpp): the same raw-pointer
// mapping as the torch glue csrc/cuda/ops_cuda.cpp, then the real host launchers of
// csrc/cuda/fused_kernels.cu (launch_lars / launch_lamb / launch_grad_sumsq), which choose the launch
// path and grid size from the emulated device table and launch the kernels through csrc/emu/simt.h.
//
// Tensor slots (`t`), in the order of the torch op schemas (csrc/ops.cpp); null for an absent optional:
//   0 param  1 grad  2 master  3 momentum / exp_avg  4 exp_avg_sq (LAMB)  5 wd_mask  6 adapt_mask
//   7 active  8 has_state  9 step  10 w_norm  11 g_norm  12 u_norm  13 trust_ratio  14 tile_seg
//   15 tile_start  16 tile_len  17 seg_tile_ptr  18 group_seg  19 partials  20 snap  21 lr tensor
//   22 inv_scale  23 found_inf  24 clip_coef (LAMB)
// Integer slots (`n`): 0 variant (launch.h Variant)  1 num_tiles  2 num_segments  3 group_seg entries
//   4..7 lr / inv_scale / found_inf / clip_coef tensor is float64 (else float32).
#include <cstdint>
#include <string>

#include "../cuda/launch.h"
#include "../option_decode.h"

using namespace fusedlars;
using namespace fusedlars::cuda;

namespace {

constexpr int kSlots = 25;

Scalar scalar(const void* p, int is_double, double dflt) { return Scalar{p, is_double, dflt}; }

template <class Args>
void fill(Args& a, void* const* t, const int64_t* n, double lr) {
  a.b = Bufs{t[0], static_cast<float*>(t[2]), t[1], static_cast<float*>(t[3]), static_cast<float*>(t[4]), 0};
  a.s = Segs{static_cast<const float*>(t[5]), static_cast<const float*>(t[6]), static_cast<const float*>(t[7]),
             static_cast<float*>(t[8]),       static_cast<float*>(t[9]),       static_cast<float*>(t[10]),
             static_cast<float*>(t[11]),      static_cast<float*>(t[12]),      static_cast<float*>(t[13])};
  a.p = Plan{static_cast<const int32_t*>(t[14]), static_cast<const int64_t*>(t[15]), static_cast<const int32_t*>(t[16]),
             static_cast<const int64_t*>(t[17]), static_cast<const int64_t*>(t[18]), n[1], n[2], n[3] - 1,
             static_cast<double*>(t[19]), static_cast<float*>(t[20])};
  a.lr = scalar(t[21], static_cast<int>(n[4]), lr);
  a.inv_scale = scalar(t[22], static_cast<int>(n[5]), 1.0);
  a.found_inf = scalar(t[23], static_cast<int>(n[6]), 0.0);
}

thread_local std::string g_why;

int report(const LaunchInfo& info, int* out) {
  out[0] = info.path;
  out[1] = info.grid;
  out[2] = static_cast<int>(info.err);
  g_why = info.why ? info.why : "";
  return info.err == cudaSuccess ? 0 : 1;
}

}  // namespace

extern "C" {

int emu_slots() { return kSlots; }

// last_path() of the launcher: 1 cooperative, 2 two launches, 0 none yet
int emu_last_path() { return last_path(); }

// Why the requested launch path could not run (LaunchInfo::why of the last step on this thread), or "".
const char* emu_why() { return g_why.c_str(); }

// 0 on success; out: path, grid, cudaError_t. -1: option lists of the wrong length.
int emu_lars_step(void* const* t, const int64_t* n, const double* hyper, int64_t nh, const int64_t* modes,
                  int64_t nm, double lr, int path, int* out) {
  LarsArgs a{};
  if (!decode_lars_options(hyper, static_cast<size_t>(nh), modes, static_cast<size_t>(nm), a.o)) return -1;
  fill(a, t, n, lr);
  a.b.s1 = nullptr;
  return report(launch_lars(a, static_cast<int>(n[0]), nullptr, path), out);
}

int emu_lamb_step(void* const* t, const int64_t* n, const double* hyper, int64_t nh, const int64_t* modes,
                  int64_t nm, double lr, int path, int* out) {
  LambArgs a{};
  if (!decode_lamb_options(hyper, static_cast<size_t>(nh), modes, static_cast<size_t>(nm), a.o)) return -1;
  fill(a, t, n, lr);
  a.clip_coef = scalar(t[24], static_cast<int>(n[7]), 1.0);
  return report(launch_lamb(a, static_cast<int>(n[0]), nullptr, path), out);
}

// slots used: 1 grad, 7 active, 14-16 tile tables, 19 gpart (float64 [T]), 21 out (float64 scalar), 22 inv_scale
int emu_grad_sumsq(void* const* t, const int64_t* n) {
  Plan p{static_cast<const int32_t*>(t[14]), static_cast<const int64_t*>(t[15]), static_cast<const int32_t*>(t[16]),
         nullptr, nullptr, n[1], n[2], 0, nullptr, nullptr};
  const cudaError_t e = launch_grad_sumsq(t[1], static_cast<int>(n[0]), static_cast<const float*>(t[7]), p,
                                          scalar(t[22], static_cast<int>(n[5]), 1.0), static_cast<double*>(t[19]),
                                          static_cast<double*>(t[21]), nullptr);
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // extern "C"
