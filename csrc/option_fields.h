// GENERATED from the table of fusedlars/backends/option_fields.py (setup.py rewrites it before every build;
// `python -m fusedlars.backends.option_fields` by hand). Do not edit: tests/test_one_source.py fails when
// this file differs from the table.
//
// FUSEDLARS_<KIND>_HYPER(X) / FUSEDLARS_<KIND>_MODES(X) call X(member, index) for each double / int member
// of LarsOptions / LambOptions (csrc/lars_math.h declares the members from them), in struct order; index is
// the member's position in the ops' float[] hyper / int[] modes list (csrc/option_decode.h decodes them).
#pragma once

#include <cstddef>

// LarsOptions: the double members, hyper[0..13]
#define FUSEDLARS_LARS_HYPER(X) \
  X(momentum, 0) \
  X(dampening, 1) \
  X(weight_decay, 2) \
  X(eta, 3) \
  X(eps, 4) \
  X(clamp_lo, 5) \
  X(clamp_hi, 6) \
  X(clip_lo, 7) \
  X(clip_hi, 8) \
  X(tv_lmbda, 9) \
  X(tv_alpha, 10) \
  X(tv_shift, 11) \
  X(tv_gamma_min, 12) \
  X(tv_gate, 13) \

// LarsOptions: the int members, modes[0..10]
#define FUSEDLARS_LARS_MODES(X) \
  X(nesterov, 0) \
  X(maximize, 1) \
  X(denominator, 2) \
  X(wd_mode, 3) \
  X(zero_norm, 4) \
  X(zero_norm_check, 5) \
  X(trust_clip, 6) \
  X(adapt_enabled, 7) \
  X(momentum_mode, 8) \
  X(first_step_buffer, 9) \
  X(tv_on, 10) \

// LambOptions: the double members, hyper[0..10]
#define FUSEDLARS_LAMB_HYPER(X) \
  X(beta1, 0) \
  X(beta2, 1) \
  X(beta3, 2) \
  X(eps, 3) \
  X(eps_root, 4) \
  X(weight_decay, 5) \
  X(clamp_lo, 6) \
  X(clamp_hi, 7) \
  X(clip_lo, 8) \
  X(clip_hi, 9) \
  X(trust_ratio_eps, 10) \

// LambOptions: the int members, modes[0..5]
#define FUSEDLARS_LAMB_MODES(X) \
  X(maximize, 0) \
  X(bias_correction, 1) \
  X(wd_mode, 2) \
  X(adapt_enabled, 3) \
  X(trust_clip, 4) \
  X(adam, 5) \

namespace fusedlars {

// lengths of the ops' option lists
constexpr size_t kLarsHyper = 14, kLarsModes = 11, kLambHyper = 11, kLambModes = 6;

}  // namespace fusedlars
