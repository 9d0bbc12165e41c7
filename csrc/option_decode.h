// Decoding of the ops' `hyper` (double[]) / `modes` (int64[]) option lists into the LarsOptions /
// LambOptions of lars_math.h. Torch-free: used by csrc/op_args.h (the CPU and CUDA torch ops, which
// turn a failure into a TORCH_CHECK error) and by the CUDA-on-CPU emulation driver (csrc/emu).
// The members, their list positions and the lengths come from csrc/option_fields.h, generated from the
// table of fusedlars/backends/option_fields.py, which also writes the lists.
#pragma once

#include <cstddef>
#include <cstdint>

#include "lars_math.h"

namespace fusedlars {

#define FUSEDLARS_DECODE_HYPER(name, index) o.name = hyper[index];
#define FUSEDLARS_DECODE_MODE(name, index) o.name = static_cast<int>(modes[index]);

// false when the lists have the wrong length (o is then untouched)
inline bool decode_lars_options(const double* hyper, size_t nh, const int64_t* modes, size_t nm, LarsOptions& o) {
  if (nh != kLarsHyper || nm != kLarsModes) return false;
  o = LarsOptions{};
  FUSEDLARS_LARS_HYPER(FUSEDLARS_DECODE_HYPER)
  FUSEDLARS_LARS_MODES(FUSEDLARS_DECODE_MODE)
  return true;
}

inline bool decode_lamb_options(const double* hyper, size_t nh, const int64_t* modes, size_t nm, LambOptions& o) {
  if (nh != kLambHyper || nm != kLambModes) return false;
  o = LambOptions{};
  FUSEDLARS_LAMB_HYPER(FUSEDLARS_DECODE_HYPER)
  FUSEDLARS_LAMB_MODES(FUSEDLARS_DECODE_MODE)
  return true;
}

#undef FUSEDLARS_DECODE_HYPER
#undef FUSEDLARS_DECODE_MODE

}  // namespace fusedlars
