// C ABI of the CUDA-on-CPU emulation build of csrc/cuda (tests/cuda_emu.py loads it with ctypes; the
// device table and counters are in emu_control.cpp): the same raw-pointer
// mapping as the torch glue csrc/cuda/ops_cuda.cpp, then the real host launchers of
// csrc/cuda/fused_kernels.cu (launch_lars / launch_lamb / launch_grad_sumsq), which choose the launch
// path and grid size from the emulated device table and launch the kernels through csrc/emu/simt.h.
//
// Tensor slots (`t`), in the order of the torch op schemas (csrc/ops.cpp) after the tensor lists
// (which the kernels never read: the address table holds their base addresses); null for an absent
// optional:
//   0 addresses (int64 [rows, S], launch.h Row)  1 wd_mask  2 adapt_mask  3 active  4 has_state  5 step
//   6 w_norm  7 g_norm  8 u_norm  9 trust_ratio  10 tile_seg  11 tile_start  12 tile_len  13 seg_tile_ptr
//   14 group_seg  15 partials (grad_sumsq: gpart)  16 snap  17 ssq (float64 [3, S], or [S] given grad sums
//   on a whole step with kPathGivenG2; grad_sumsq: out)
//   18 lr tensor  19 inv_scale  20 found_inf  21 clip_coef (LAMB)  22 param_ids (int64 [S], low-bit state)
// Integer slots (`n`): 0 variant (launch.h Variant)  1 num_tiles  2 num_segments  3 group_seg entries
//   4 address rows  5..8 lr / inv_scale / found_inf / clip_coef tensor is float64 (else float32)
//   9 storage (launch.h StateFormat)  10 remainder masters (0/1)  11 seed (the 64-bit seed's bits).
#include <cstdint>
#include <string>

#include "../cuda/launch.h"
#include "../option_decode.h"

using namespace fusedlars;
using namespace fusedlars::cuda;

namespace {

constexpr int kSlots = 23;
constexpr int kInts = 12;

Scalar scalar(const void* p, int64_t is_double, double dflt) { return Scalar{p, static_cast<int>(is_double), dflt}; }

Addr addr(void* const* t, const int64_t* n) {
  return Addr{static_cast<const int64_t*>(t[0]), n[2], static_cast<int>(n[4])};
}

// ssq (slot 17) as ops_cuda.cpp check_common maps it: the split's sums (paths 3 / 4) and, with the
// kPathGivenG2 flag, the given grad sums (the [S] tensor itself, or row 1 of the partials' output).
Plan plan(void* const* t, const int64_t* n, int path) {
  const int base = path & ~kPathGivenG2;
  double* ssq = static_cast<double*>(t[17]);
  const double* g2 = (path & kPathGivenG2) ? (base == kPathPartials ? ssq + n[2] : ssq) : nullptr;
  return Plan{static_cast<const int32_t*>(t[10]), static_cast<const int64_t*>(t[11]),
              static_cast<const int32_t*>(t[12]), static_cast<const int64_t*>(t[13]),
              static_cast<const int64_t*>(t[14]), n[1], n[2], n[3] - 1, static_cast<double*>(t[15]),
              static_cast<float*>(t[16]),
              base == kPathPartials ? ssq : nullptr,
              base == kPathApply ? ssq : nullptr,
              g2};
}

template <class Args>
void fill(Args& a, void* const* t, const int64_t* n, double lr, int path) {
  a.b = addr(t, n);
  a.s = Segs{static_cast<const float*>(t[1]), static_cast<const float*>(t[2]), static_cast<const float*>(t[3]),
             static_cast<float*>(t[4]),       static_cast<float*>(t[5]),       static_cast<float*>(t[6]),
             static_cast<float*>(t[7]),       static_cast<float*>(t[8]),       static_cast<float*>(t[9])};
  a.p = plan(t, n, path);
  a.lr = scalar(t[18], n[5], lr);
  a.inv_scale = scalar(t[19], n[6], 1.0);
  a.found_inf = scalar(t[20], n[7], 0.0);
  // low-bit state (launch.h Lowbit; ops_cuda.cpp lowbit_args / lowbit_rows)
  a.lb = Lowbit{static_cast<int>(n[9]), static_cast<int>(n[10]), -1, -1, -1, static_cast<uint64_t>(n[11]),
                static_cast<const int64_t*>(t[22])};
  if (a.lb.storage != kStateF32 || a.lb.remainder) lowbit_layout(a.lb, n[4], 2);
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
int emu_ints() { return kInts; }

// last_path() of the launcher: 1 cooperative, 2 two launches, 0 none yet
int emu_last_path() { return last_path(); }

// Why the requested launch path could not run (LaunchInfo::why of the last step on this thread), or "".
const char* emu_why() { return g_why.c_str(); }

// 0 on success; out: path, grid, cudaError_t. -1: option lists of the wrong length; -2: grad sums
// given to LAMB.
int emu_lars_step(void* const* t, const int64_t* n, const double* hyper, int64_t nh, const int64_t* modes,
                  int64_t nm, double lr, int path, int* out) {
  LarsArgs a{};
  if (!decode_lars_options(hyper, static_cast<size_t>(nh), modes, static_cast<size_t>(nm), a.o)) return -1;
  fill(a, t, n, lr, path);
  return report(launch_lars(a, static_cast<int>(n[0]), nullptr, path), out);
}

int emu_lamb_step(void* const* t, const int64_t* n, const double* hyper, int64_t nh, const int64_t* modes,
                  int64_t nm, double lr, int path, int* out) {
  LambArgs a{};
  if (path & kPathGivenG2) return -2;  // LARS's only (ops_cuda.cpp refuses it too)
  if (!decode_lamb_options(hyper, static_cast<size_t>(nh), modes, static_cast<size_t>(nm), a.o)) return -1;
  fill(a, t, n, lr, path);
  a.clip_coef = scalar(t[21], n[8], 1.0);
  return report(launch_lamb(a, static_cast<int>(n[0]), nullptr, path), out);
}

// slots used: 0 addresses (row kRowGrad), 3 active, 10-12 tile tables, 15 gpart (float64 [T]),
// 17 out (float64 scalar), 19 inv_scale
int emu_grad_sumsq(void* const* t, const int64_t* n) {
  Plan p{static_cast<const int32_t*>(t[10]), static_cast<const int64_t*>(t[11]), static_cast<const int32_t*>(t[12]),
         nullptr, nullptr, n[1], n[2], 0, nullptr, nullptr, nullptr, nullptr, nullptr};
  const cudaError_t e =
      launch_grad_sumsq(addr(t, n), static_cast<int>(n[0]), static_cast<const float*>(t[3]), p,
                        scalar(t[19], n[6], 1.0), static_cast<double*>(t[15]), static_cast<double*>(t[17]), nullptr);
  return e == cudaSuccess ? 0 : static_cast<int>(e);
}

}  // extern "C"
