// Decoding of the ops' `hyper` (float[]) / `modes` (int[]) arguments into the LarsOptions /
// LambOptions of lars_math.h, shared by the CPU (csrc/cpu/optim_cpu.cpp) and CUDA
// (csrc/cuda/ops_cuda.cpp) op implementations. The order is the one fusedlars/kernels/cpu.py writes.
//
// Host C++ with torch headers (ATen / c10); not for the torch-free CUDA kernels (csrc/cuda/*.cu).
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "lars_math.h"

namespace fusedlars {

// `op` names the caller in the error message, e.g. "fusedlars cpu: lars_step_cpu".
inline LarsOptions lars_options(c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> modes, const char* op) {
  TORCH_CHECK(hyper.size() == 14 && modes.size() == 11, op, " expects 14 hyper, 11 modes");
  LarsOptions o{};
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
  return o;
}

inline LambOptions lamb_options(c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> modes, const char* op) {
  TORCH_CHECK(hyper.size() == 11 && modes.size() == 6, op, " expects 11 hyper, 6 modes");
  LambOptions o{};
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
  return o;
}

}  // namespace fusedlars
