// The ops' `hyper` (float[]) / `modes` (int[]) arguments as LarsOptions / LambOptions (lars_math.h),
// for the CPU (csrc/cpu/optim_cpu.cpp) and CUDA (csrc/cuda/ops_cuda.cpp) op implementations: the
// torch-free decoder of csrc/option_decode.h behind a TORCH_CHECK on the list lengths. The order is
// the table's of fusedlars/backends/option_fields.py.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "option_decode.h"

namespace fusedlars {

// `op` names the caller in the error message, e.g. "fusedlars cpu: lars_step_cpu".
inline LarsOptions lars_options(c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> modes, const char* op) {
  LarsOptions o{};
  TORCH_CHECK(decode_lars_options(hyper.data(), hyper.size(), modes.data(), modes.size(), o), op, " expects ",
              kLarsHyper, " hyper, ", kLarsModes, " modes, got ", hyper.size(), " and ", modes.size());
  return o;
}

inline LambOptions lamb_options(c10::ArrayRef<double> hyper, c10::ArrayRef<int64_t> modes, const char* op) {
  LambOptions o{};
  TORCH_CHECK(decode_lamb_options(hyper.data(), hyper.size(), modes.data(), modes.size(), o), op, " expects ",
              kLambHyper, " hyper, ", kLambModes, " modes, got ", hyper.size(), " and ", modes.size());
  return o;
}

}  // namespace fusedlars
