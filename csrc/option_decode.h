// Decoding of the ops' `hyper` (double[]) / `modes` (int64[]) option lists into the LarsOptions /
// LambOptions of lars_math.h. Torch-free: used by csrc/op_args.h (the CPU and CUDA torch ops, which
// turn a failure into a TORCH_CHECK error) and by the CUDA-on-CPU emulation driver (csrc/emu).
// The order is the one fusedlars/backends/packing.py writes.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lars_math.h"

namespace fusedlars {

constexpr size_t kLarsHyper = 14, kLarsModes = 11, kLambHyper = 11, kLambModes = 6;

// false when the lists have the wrong length (o is then untouched)
inline bool decode_lars_options(const double* hyper, size_t nh, const int64_t* modes, size_t nm, LarsOptions& o) {
  if (nh != kLarsHyper || nm != kLarsModes) return false;
  o = LarsOptions{};
  o.momentum = hyper[0];
  o.dampening = hyper[1];
  o.weight_decay = hyper[2];
  o.eta = hyper[3];
  o.eps = hyper[4];
  o.clamp_lo = hyper[5];
  o.clamp_hi = hyper[6];
  o.clip_lo = hyper[7];
  o.clip_hi = hyper[8];
  o.tv_lmbda = hyper[9];
  o.tv_alpha = hyper[10];
  o.tv_shift = hyper[11];
  o.tv_gamma_min = hyper[12];
  o.tv_gate = hyper[13];
  o.nesterov = static_cast<int>(modes[0]);
  o.maximize = static_cast<int>(modes[1]);
  o.denominator = static_cast<int>(modes[2]);
  o.wd_mode = static_cast<int>(modes[3]);
  o.zero_norm = static_cast<int>(modes[4]);
  o.zero_norm_check = static_cast<int>(modes[5]);
  o.trust_clip = static_cast<int>(modes[6]);
  o.adapt_enabled = static_cast<int>(modes[7]);
  o.momentum_mode = static_cast<int>(modes[8]);
  o.first_step_buffer = static_cast<int>(modes[9]);
  o.tv_on = static_cast<int>(modes[10]);
  return true;
}

inline bool decode_lamb_options(const double* hyper, size_t nh, const int64_t* modes, size_t nm, LambOptions& o) {
  if (nh != kLambHyper || nm != kLambModes) return false;
  o = LambOptions{};
  o.beta1 = hyper[0];
  o.beta2 = hyper[1];
  o.beta3 = hyper[2];
  o.eps = hyper[3];
  o.eps_root = hyper[4];
  o.weight_decay = hyper[5];
  o.clamp_lo = hyper[6];
  o.clamp_hi = hyper[7];
  o.clip_lo = hyper[8];
  o.clip_hi = hyper[9];
  o.trust_ratio_eps = hyper[10];
  o.maximize = static_cast<int>(modes[0]);
  o.bias_correction = static_cast<int>(modes[1]);
  o.wd_mode = static_cast<int>(modes[2]);
  o.adapt_enabled = static_cast<int>(modes[3]);
  o.trust_clip = static_cast<int>(modes[4]);
  o.adam = static_cast<int>(modes[5]);
  return true;
}

}  // namespace fusedlars
