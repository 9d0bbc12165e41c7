// The CPU ops' implementations (csrc/cpu/optim_cpu.cpp) that csrc/host.cpp calls directly: the
// functions that TORCH_LIBRARY_IMPL registers, reached without the dispatcher's boxing
// (NOTE [Direct calls] in csrc/host.cpp). Schemas and argument meanings: csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fusedlars {
namespace cpu {

void lars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList momentum,
                   const at::Tensor& seg_ids, const at::Tensor& wd_mask, const at::Tensor& adapt_mask,
                   const at::Tensor& has_state, const at::Tensor& step, const at::Tensor& w_norm,
                   const at::Tensor& g_norm, const at::Tensor& u_norm, const at::Tensor& trust_ratio,
                   const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& w_sumsq,
                   const std::optional<at::Tensor>& sums, int64_t phase, at::ArrayRef<double> hyper,
                   at::ArrayRef<int64_t> modes);

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList exp_avg,
                   at::TensorList exp_avg_sq, const at::Tensor& seg_ids, const at::Tensor& wd_mask,
                   const at::Tensor& adapt_mask, const at::Tensor& has_state, const at::Tensor& step,
                   const at::Tensor& w_norm, const at::Tensor& g_norm, const at::Tensor& u_norm,
                   const at::Tensor& trust_ratio, const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& sums, int64_t phase, at::ArrayRef<double> hyper,
                   at::ArrayRef<int64_t> modes);

at::Tensor grad_sumsq_cpu(at::TensorList grads, const std::optional<at::Tensor>& inv_scale);

}  // namespace cpu
}  // namespace fusedlars
