// The per-tile CPU kernels, as a table of function pointers with one implementation per instruction
// set (isa_avx512.cpp, isa_avx2.cpp, isa_generic.cpp; chosen at run time in optim_cpu.cpp).
//
// A tile is a slice [start, start + len) of ONE segment (len <= kTileElems). Kernels see raw
// pointers to the tile's segment (the user's tensors, fusedlars/buckets.py) and only touch the tile's elements.
#pragma once

#include <cstdint>
#include <string>

#include <c10/util/string_view.h>

namespace fusedlars {

struct LarsCoef;  // lars_math.h (not included here, see NOTE [Internal linkage on the host])
struct LambCoef;
struct LarsExactCoef;
struct LambExactCoef;

namespace cpu {

// Fixed tile size: partial sums of squares are per tile, and a segment's norm is the sum of its
// tiles' partials in tile order, so this constant (not the thread count) fixes the rounding.
constexpr int64_t kTileElems = 16384;

// What a LARS update tile also sums (NOTE [Carried weight norms] in optim_cpu.cpp).
enum Carry : int { kCarryNone = 0, kCarryW = 1, kCarryWU = 2 };

// Storage variant of the param / grad / master buffers.
enum Variant : int { kF32 = 0, kBF16 = 1, kBF16Master = 2, kF16 = 3, kF16Master = 4, kBF16Remainder = 5 };

// Format of the optimizer state of the exact (low-bit) kernels (lowbit_state.STORAGES).
enum Storage : int { kStoreF32 = 0, kStoreBF16 = 1, kStoreInt8 = 2 };

struct TileArgs {
  void* param;       // param dtype
  float* master;     // fp32 master weights or nullptr
  const void* grad;  // param dtype
  float* s0;         // momentum_buffer (LARS) or exp_avg (LAMB); fp32
  float* s1;         // exp_avg_sq (LAMB); fp32
  int64_t start;
  int64_t len;
};

// A tile of the exact kernels (low-bit state and remainder masters, NOTE [Low-bit element math in
// fp32] in lars_math.h). The tile starts at a multiple of kTileElems inside its segment, so
// it holds whole 256-element quantization blocks (the last one may be short: the segment's end).
struct ExactTile {
  void* param;        // param dtype
  float* master;      // fp32 masters or nullptr
  int16_t* rem;       // remainders of master_weights="remainder" (kBF16Remainder) or nullptr
  const void* grad;   // param dtype
  void* s0;           // momentum_buffer (LARS) / exp_avg (LAMB): float, bf16 bits or uint8 codes
  void* s1;           // exp_avg_sq (LAMB)
  float* a0;          // int8: the segment's block scales of s0 (block k at a0[k])
  float* a1;          // ... of s1
  int64_t start, len;
  uint32_t pidx;      // the param's state_dict id (Philox counter word 2)
  uint64_t step_after;  // the param's step count once this step is done (Philox counter word 1)
};

// Per-step values of the exact kernels: g = ((grad * inv) / clip), negated if neg (the reference's
// _grad, operation for operation).
struct ExactCtx {
  int storage;  // Storage
  uint64_t seed;
  double inv, clip;
  int has_clip, neg;
};

struct KernelTable {
  const char* name;
  // out[0..2] = sum w^2, sum (g*gscale)^2, sum (g*gscale + lam*w)^2 over the tile
  void (*lars_sumsq)(const TileArgs&, int variant, float gscale, float lam, double* out);
  // wd: LarsWdMode, mom: 0/1, nesterov: 0/1, carry: Carry. With carry != kCarryNone, out[0] = sum of the
  // new weights' squares; with kCarryWU also out[1] = sum (g*gscale + lam_u*w_old)^2 (as lars_sumsq's out[2])
  void (*lars_update)(const TileArgs&, int variant, int wd, int mom, int nesterov, int carry, float gscale,
                      float lam_u, const LarsCoef&, double* out);
  // new moments written to s0/s1; out = sum w_d^2, sum g^2, sum u^2
  void (*lamb_pass1)(const TileArgs&, int variant, int wd, const LambCoef&, double* out);
  void (*lamb_pass2)(const TileArgs&, int variant, int wd, const LambCoef&);
  // out[0] = sum (g*gscale)^2
  void (*grad_sumsq)(const TileArgs&, int variant, float gscale, double* out);
  // exact kernels (low-bit state): out = sum w^2, g^2, (g + lam*w)^2 in double
  void (*lars_exact_sumsq)(const ExactTile&, int variant, const ExactCtx&, double lam, double* out);
  // out[0] = sum w^2 alone, bitwise lars_exact_sumsq's out[0] (the gradients' sums are given)
  void (*lars_exact_wsumsq)(const ExactTile&, int variant, double* out);
  // wsum (or nullptr): the new weights' sum of squares as lars_exact_wsumsq will take it next step;
  // usum (or nullptr): sum (g + lam_u*w)^2 of the old weights, bitwise lars_exact_sumsq's out[2]
  void (*lars_exact_update)(const ExactTile&, int variant, const ExactCtx&, const LarsExactCoef&, double* wsum,
                            double lam_u, double* usum);
  // out = sum w_d^2, g^2, u^2 (nothing written)
  void (*lamb_exact_pass1)(const ExactTile&, int variant, const ExactCtx&, const LambExactCoef&, double* out);
  // weights and the new state written
  void (*lamb_exact_pass2)(const ExactTile&, int variant, const ExactCtx&, const LambExactCoef&);
};

const KernelTable* kernel_table_avx512();
const KernelTable* kernel_table_avx2();
const KernelTable* kernel_table_generic();

// Name of the kernel table in use; a non-empty `want` (avx512 | avx2 | generic) switches to it.
std::string cpu_isa(c10::string_view want);

}  // namespace cpu
}  // namespace fusedlars
