// CUDA implementations of fusedlars::lars_step_cuda / lamb_step_cuda / grad_sumsq_cuda (schemas in
// csrc/ops.cpp): argument checks, tensors -> raw pointers, launch on the current stream
// (csrc/cuda/fused_kernels.cu). No host sync: per-step scalars are passed as device pointers, and the
// params, grads and state are reached through the bucket's device table of base addresses (the tensor
// lists are checked here for device and dtype, never dereferenced through the lists).
//
// Only <c10/cuda/...> headers: ATen/cuda/CUDAContext.h pulls cusparse.h, which a minimal toolkit lacks.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <string>

#include "../op_args.h"
#include "launch.h"

namespace fusedlars {
namespace cuda {
namespace {

void check_buf(const at::Tensor& t, const char* name, const at::Device& dev, at::ScalarType dt, int64_t numel) {
  TORCH_CHECK(t.device() == dev, "fusedlars cuda: ", name, " must be on ", dev, " (the param's device), got ",
              t.device());
  TORCH_CHECK(t.is_contiguous(), "fusedlars cuda: ", name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == dt, "fusedlars cuda: ", name, " must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(numel < 0 || t.numel() == numel, "fusedlars cuda: ", name, " has ", t.numel(), " elements, expected ",
              numel);
}

Scalar scalar(const std::optional<at::Tensor>& t, const char* name, const at::Device& dev, double dflt) {
  if (!t) return Scalar{nullptr, 0, dflt};
  TORCH_CHECK(t->numel() == 1, "fusedlars cuda: ", name, " must have one element, got shape ", t->sizes());
  TORCH_CHECK(t->device() == dev, "fusedlars cuda: ", name, " must be on ", dev, ", got ", t->device(),
              " (a CPU value would need a host sync; pass a float or a device tensor)");
  TORCH_CHECK(t->scalar_type() == at::kFloat || t->scalar_type() == at::kDouble, "fusedlars cuda: ", name,
              " must be float32 or float64, got ", t->scalar_type());
  return Scalar{t->data_ptr(), t->scalar_type() == at::kDouble ? 1 : 0, dflt};
}

// The tensor lists of a step (honest alias information for the dispatcher and torch.compile; the
// kernels reach the tensors through the address table): params (the S segments' local tensors, written),
// grads (the active segments' grads, read), state (masters and state buffers that exist, written).
// Returns the param dtype.
at::ScalarType check_lists(at::TensorList params, at::TensorList grads, at::TensorList state, const at::Device& dev,
                           int64_t S, const Lowbit& lb) {
  TORCH_CHECK(static_cast<int64_t>(params.size()) == S, "fusedlars cuda: ", S, " segments but ", params.size(),
              " params");
  TORCH_CHECK(S > 0, "fusedlars cuda: a bucket has at least one param");
  const at::ScalarType dt = params[0].scalar_type();
  for (const auto& t : params)
    TORCH_CHECK(t.device() == dev && t.scalar_type() == dt, "fusedlars cuda: every param must be ", dt, " on ", dev,
                ", got ", t.scalar_type(), " on ", t.device());
  TORCH_CHECK(static_cast<int64_t>(grads.size()) <= S, "fusedlars cuda: more grads (", grads.size(), ") than params");
  for (const auto& t : grads)
    TORCH_CHECK(t.device() == dev && t.scalar_type() == dt, "fusedlars cuda: every grad must be ", dt, " on ", dev,
                ", got ", t.scalar_type(), " on ", t.device());
  // fp32 masters, state and int8 scales; bf16 state bits, uint8 codes, int16 remainders (launch.h Lowbit)
  for (const auto& t : state) {
    const at::ScalarType st = t.scalar_type();
    const bool ok = st == at::kFloat || (st == at::kBFloat16 && lb.storage == kStateBF16) ||
                    (st == at::kByte && lb.storage == kStateInt8) || (st == at::kShort && lb.remainder);
    TORCH_CHECK(t.device() == dev && ok, "fusedlars cuda: master weights and state must be float32 (or the "
                "low-bit formats of `storage` / `remainder`) on ", dev, ", got ", st, " on ", t.device());
  }
  return dt;
}

// The parameters both step ops' schemas (csrc/ops.cpp) start with, params .. found_inf, written once for
// check_common and the two ops; FUSEDLARS_STEP_ARGS: the same names, as arguments.
#define FUSEDLARS_STEP_PARAMS                                                                                        \
  at::TensorList params, at::TensorList grads, at::TensorList state, const at::Tensor& addresses, bool master,      \
      const at::Tensor& wd_mask, const at::Tensor& adapt_mask, const at::Tensor& active,                             \
      const at::Tensor& has_state, const at::Tensor& step, const at::Tensor& w_norm, const at::Tensor& g_norm,       \
      const at::Tensor& u_norm, const at::Tensor& trust_ratio, const at::Tensor& tile_seg,                           \
      const at::Tensor& tile_start, const at::Tensor& tile_len, const at::Tensor& seg_tile_ptr,                      \
      const at::Tensor& group_seg, const at::Tensor& partials, const at::Tensor& snap,                               \
      const std::optional<at::Tensor>& ssq, const std::optional<at::Tensor>& lr_tensor, double lr,                   \
      const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf
#define FUSEDLARS_STEP_ARGS                                                                                      \
  params, grads, state, addresses, master, wd_mask, adapt_mask, active, has_state, step, w_norm, g_norm, u_norm, \
      trust_ratio, tile_seg, tile_start, tile_len, seg_tile_ptr, group_seg, partials, snap, ssq, lr_tensor, lr,  \
      inv_scale, found_inf

// The low-bit inputs of a step (launch.h Lowbit), before check_common: storage, remainder, seed, param ids.
template <class Args>
void lowbit_args(Args& a, const std::optional<at::Tensor>& param_ids, int64_t storage, bool remainder, int64_t seed,
                 const at::Tensor& addresses) {
  TORCH_CHECK(storage >= kStateF32 && storage <= kStateInt8, "fusedlars cuda: storage must be 0 (fp32), 1 (bf16) or "
              "2 (int8), got ", storage);
  a.lb = Lowbit{static_cast<int>(storage), remainder ? 1 : 0, -1, -1, -1, static_cast<uint64_t>(seed), nullptr};
  if (storage == kStateF32 && !remainder) return;
  TORCH_CHECK(param_ids.has_value(), "fusedlars cuda: low-bit state needs param_ids");
  check_buf(*param_ids, "param_ids", addresses.device(), at::kLong, addresses.dim() == 2 ? addresses.size(1) : -1);
  a.lb.param_id = param_ids->data_ptr<int64_t>();
}

// The rows after the state rows (launch.h lowbit_layout); returns the number of state rows.
template <class Args>
int lowbit_rows(Args& a, int64_t rows, int max_states) {
  if (a.lb.storage == kStateF32 && !a.lb.remainder) return -1;
  const int nst = lowbit_layout(a.lb, rows, max_states);
  TORCH_CHECK(nst >= 0, "fusedlars cuda: ", rows,
              " address rows do not fit the low-bit layout (param, grad, master, state, remainder, scales)");
  return nst;
}

// Checks the arguments LARS and LAMB share and fills the common fields of `a` (LarsArgs / LambArgs):
// b, s, p, lr, inv_scale, found_inf. min_rows: the address table rows the kind needs. Returns the variant.
template <class Args>
int check_common(Args& a, FUSEDLARS_STEP_PARAMS, int64_t path, int min_rows) {
  TORCH_CHECK(addresses.is_cuda(), "fusedlars cuda: the address table must be a CUDA tensor, got ",
              addresses.device());
  const at::Device dev = addresses.device();
  const int64_t S = wd_mask.numel();
  const at::ScalarType dt = check_lists(params, grads, state, dev, S, a.lb);
  int variant = kF32;
  switch (dt) {
    case at::kFloat:
      TORCH_CHECK(!master, "fusedlars cuda: master weights need a bf16/fp16 param");
      variant = kF32;
      break;
    case at::kBFloat16:
      variant = master ? kBF16Master : kBF16;
      break;
    case at::kHalf:
      variant = master ? kF16Master : kF16;
      break;
    default:
      TORCH_CHECK(false, "fusedlars cuda: unsupported param dtype ", dt, " (float32, bfloat16, float16 are fused)");
  }
  check_buf(addresses, "addresses", dev, at::kLong, -1);
  TORCH_CHECK(addresses.dim() == 2 && addresses.size(1) == S && addresses.size(0) >= min_rows &&
                  addresses.size(0) <= kMaxRows,
              "fusedlars cuda: the address table must be int64 [rows, ", S, "] with ", min_rows, "..", kMaxRows,
              " rows, got ", addresses.sizes());
  TORCH_CHECK(!a.lb.remainder || dt == at::kBFloat16, "fusedlars cuda: remainder masters need bf16 params");
  TORCH_CHECK(!a.lb.remainder || !master, "fusedlars cuda: remainder masters replace the fp32 masters");
  const std::pair<const at::Tensor*, const char*> segs[] = {
      {&wd_mask, "wd_mask"}, {&adapt_mask, "adapt_mask"}, {&active, "active"}, {&has_state, "has_state"},
      {&step, "step"},       {&w_norm, "w_norm"},         {&g_norm, "g_norm"}, {&u_norm, "u_norm"},
      {&trust_ratio, "trust_ratio"}};
  for (const auto& [t, name] : segs) check_buf(*t, name, dev, at::kFloat, S);
  const int64_t T = tile_start.numel();
  check_buf(tile_seg, "tile_seg", dev, at::kInt, T);
  check_buf(tile_start, "tile_start", dev, at::kLong, T);
  check_buf(tile_len, "tile_len", dev, at::kInt, T);
  check_buf(seg_tile_ptr, "seg_tile_ptr", dev, at::kLong, S + 1);
  check_buf(group_seg, "group_seg", dev, at::kLong, -1);
  TORCH_CHECK(group_seg.numel() >= 2, "fusedlars cuda: group_seg needs at least 2 entries");
  check_buf(partials, "partials", dev, at::kDouble, -1);
  TORCH_CHECK(partials.numel() >= 3 * T, "fusedlars cuda: partials needs 3 * num_tiles = ", 3 * T, " elements");
  check_buf(snap, "snap", dev, at::kFloat, -1);
  TORCH_CHECK(snap.numel() >= 2 * S, "fusedlars cuda: snap needs 2 * num_segments = ", 2 * S, " elements");
  // path: launch.h Path, maybe with the kPathGivenG2 flag (NOTE [Grad sums from backward] in
  // fused_kernels.cu): then ssq holds the given grad sums, [S] on a whole step, row 1 of [3, S] on
  // the partials path (overwritten by the sums)
  const int64_t base = path & ~static_cast<int64_t>(kPathGivenG2);
  const bool given = (path & kPathGivenG2) != 0;
  TORCH_CHECK(base >= kPathAuto && base <= kPathApply && path >= 0 && path < 2 * kPathGivenG2,
              "fusedlars cuda: path must be 0..4 (+8: grad sums given), got ", path);
  TORCH_CHECK(!(given && base == kPathApply), "fusedlars cuda: the apply path takes no grad sums (they are in ssq)");
  const bool split = base == kPathPartials || base == kPathApply;
  TORCH_CHECK((split || given) == ssq.has_value(),
              "fusedlars cuda: ssq is given exactly for path 3 (partials), 4 (apply) and with grad sums (+8)");
  if (ssq) check_buf(*ssq, "ssq", dev, at::kDouble, given && !split ? S : 3 * S);

  a.b = Addr{addresses.data_ptr<int64_t>(), S, static_cast<int>(addresses.size(0))};
  a.s = Segs{wd_mask.data_ptr<float>(), adapt_mask.data_ptr<float>(), active.data_ptr<float>(),
             has_state.data_ptr<float>(), step.data_ptr<float>(), w_norm.data_ptr<float>(),
             g_norm.data_ptr<float>(), u_norm.data_ptr<float>(), trust_ratio.data_ptr<float>()};
  a.p = Plan{tile_seg.data_ptr<int32_t>(), tile_start.data_ptr<int64_t>(), tile_len.data_ptr<int32_t>(),
             seg_tile_ptr.data_ptr<int64_t>(), group_seg.data_ptr<int64_t>(), T, S, group_seg.numel() - 1,
             partials.data_ptr<double>(), snap.data_ptr<float>(),
             base == kPathPartials ? ssq->data_ptr<double>() : nullptr,
             base == kPathApply ? ssq->data_ptr<double>() : nullptr,
             given ? ssq->data_ptr<double>() + (split ? S : 0) : nullptr};
  a.lr = scalar(lr_tensor, "lr", dev, lr);
  a.inv_scale = scalar(inv_scale, "inv_scale", dev, 1.0);
  a.found_inf = scalar(found_inf, "found_inf", dev, 0.0);
  return variant;
}

// Launches the step `a` (filled by check_common and the kind's own fields) on the current stream of
// `dev`; an unavailable requested path or a failed launch is an error of `op`.
template <class Args>
void launch_step(LaunchInfo (*launch)(const Args&, int, cudaStream_t, int), const Args& a, int variant,
                 const at::Device& dev, int64_t path, const char* op) {
  const c10::cuda::CUDAGuard guard(dev);
  const LaunchInfo info = launch(a, variant, c10::cuda::getCurrentCUDAStream().stream(), static_cast<int>(path));
  TORCH_CHECK(info.why == nullptr, "fusedlars cuda: ", op, ": cooperative launch requested but unavailable: ",
              info.why);
  TORCH_CHECK(info.err == cudaSuccess, "fusedlars cuda: ", op, " launch failed: ", cudaGetErrorString(info.err));
}

#define FUSEDLARS_LOWBIT_PARAMS \
  const std::optional<at::Tensor>&param_ids, int64_t storage, bool remainder, int64_t seed

void lars_step_cuda(FUSEDLARS_STEP_PARAMS, at::ArrayRef<double> hyper, at::ArrayRef<int64_t> modes, int64_t path,
                    FUSEDLARS_LOWBIT_PARAMS) {
  LarsArgs a{};
  a.o = lars_options(hyper, modes, "fusedlars cuda: lars_step_cuda");
  lowbit_args(a, param_ids, storage, remainder, seed, addresses);
  const bool exact = storage != kStateF32 || remainder;
  TORCH_CHECK(!exact || (path & kPathGivenG2) == 0, "fusedlars cuda: low-bit state takes no grad sums (path +8)");
  // rows param, grad, master (+ momentum buffer)
  const int variant =
      check_common(a, FUSEDLARS_STEP_ARGS, path, a.o.momentum != 0.0 ? kRowS0 + 1 : kRowMaster + 1);
  const int nst = lowbit_rows(a, addresses.size(0), 1);
  TORCH_CHECK(!exact || a.o.momentum == 0.0 || nst == 1, "fusedlars cuda: low-bit momentum needs its state rows");
  launch_step(&launch_lars, a, variant, addresses.device(), path, "lars_step_cuda");
}

void lamb_step_cuda(FUSEDLARS_STEP_PARAMS, const std::optional<at::Tensor>& clip_coef, at::ArrayRef<double> hyper,
                    at::ArrayRef<int64_t> modes, int64_t path, FUSEDLARS_LOWBIT_PARAMS) {
  LambArgs a{};
  a.o = lamb_options(hyper, modes, "fusedlars cuda: lamb_step_cuda");
  lowbit_args(a, param_ids, storage, remainder, seed, addresses);
  TORCH_CHECK((path & kPathGivenG2) == 0, "fusedlars cuda: lamb_step_cuda takes no grad sums (path +8 is LARS's)");
  // rows param, grad, master, exp_avg, exp_avg_sq
  const int variant = check_common(a, FUSEDLARS_STEP_ARGS, path, kRowS1 + 1);
  const int nst = lowbit_rows(a, addresses.size(0), 2);
  TORCH_CHECK(nst == -1 || nst == 2, "fusedlars cuda: low-bit LAMB needs both state rows");
  a.clip_coef = scalar(clip_coef, "clip_coef", addresses.device(), 1.0);
  launch_step(&launch_lamb, a, variant, addresses.device(), path, "lamb_step_cuda");
}

#undef FUSEDLARS_LOWBIT_PARAMS
#undef FUSEDLARS_STEP_ARGS
#undef FUSEDLARS_STEP_PARAMS

at::Tensor grad_sumsq_cuda(at::TensorList grads, const at::Tensor& addresses, const at::Tensor& active,
                           const at::Tensor& tile_seg, const at::Tensor& tile_start, const at::Tensor& tile_len,
                           const at::Tensor& gpart, const std::optional<at::Tensor>& inv_scale) {
  TORCH_CHECK(addresses.is_cuda(), "fusedlars cuda: the address table must be a CUDA tensor, got ",
              addresses.device());
  const at::Device dev = addresses.device();
  const int64_t S = active.numel();
  int variant = kF32;  // no grad: no active tile, nothing is read
  if (!grads.empty()) {
    switch (grads[0].scalar_type()) {
      case at::kFloat: variant = kF32; break;
      case at::kBFloat16: variant = kBF16; break;
      case at::kHalf: variant = kF16; break;
      default: TORCH_CHECK(false, "fusedlars cuda: unsupported grad dtype ", grads[0].scalar_type());
    }
  }
  for (const auto& g : grads)
    TORCH_CHECK(g.device() == dev && g.scalar_type() == grads[0].scalar_type(), "fusedlars cuda: every grad must be ",
                grads[0].scalar_type(), " on ", dev, ", got ", g.scalar_type(), " on ", g.device());
  check_buf(addresses, "addresses", dev, at::kLong, -1);
  TORCH_CHECK(addresses.dim() == 2 && addresses.size(1) == S && addresses.size(0) > kRowGrad,
              "fusedlars cuda: the address table must be int64 [rows >= 2, ", S, "], got ", addresses.sizes());
  check_buf(active, "active", dev, at::kFloat, -1);
  const int64_t T = tile_start.numel();
  check_buf(tile_seg, "tile_seg", dev, at::kInt, T);
  check_buf(tile_start, "tile_start", dev, at::kLong, T);
  check_buf(tile_len, "tile_len", dev, at::kInt, T);
  check_buf(gpart, "gpart", dev, at::kDouble, -1);
  TORCH_CHECK(gpart.numel() >= T, "fusedlars cuda: gpart needs num_tiles = ", T, " elements");
  Plan p{tile_seg.data_ptr<int32_t>(), tile_start.data_ptr<int64_t>(), tile_len.data_ptr<int32_t>(), nullptr, nullptr,
         T, S, 0, nullptr, nullptr, nullptr, nullptr};
  const Addr b{addresses.data_ptr<int64_t>(), S, static_cast<int>(addresses.size(0))};
  const c10::cuda::CUDAGuard guard(dev);
  at::Tensor out = at::empty({}, addresses.options().dtype(at::kDouble));
  const cudaError_t err =
      launch_grad_sumsq(b, variant, active.data_ptr<float>(), p, scalar(inv_scale, "inv_scale", dev, 1.0),
                        gpart.data_ptr<double>(), out.data_ptr<double>(), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "fusedlars cuda: grad_sumsq_cuda launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedlars

// "archs=800,900,1000;devices=N;device=<i>;name=...;sm=90;coop=1;sms=132;blocks_per_sm=3;last_path=cooperative"
// (device fields only when a GPU is visible). Called by ops.cpp's cuda_info op.
std::string fusedlars_cuda_info() {
  using namespace fusedlars::cuda;
  std::string s = std::string("archs=") + compiled_archs();
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  s += ";devices=" + std::to_string(n);
  if (n > 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, dev) == cudaSuccess) {
      s += ";device=" + std::to_string(dev) + ";name=" + prop.name + ";sm=" + std::to_string(prop.major * 10 + prop.minor);
    }
    int sms = 0, per_sm = 0;
    const int coop = device_coop(dev, &sms, &per_sm);
    s += ";coop=" + std::to_string(coop) + ";sms=" + std::to_string(sms) + ";blocks_per_sm=" + std::to_string(per_sm);
  }
  const int lp = last_path();
  s += std::string(";last_path=") + (lp == kPathCooperative ? "cooperative" : lp == kPathTwoLaunch ? "two_launch" : "none");
  return s;
}

TORCH_LIBRARY_IMPL(fusedlars, CUDA, m) {
  m.impl("lars_step_cuda", &fusedlars::cuda::lars_step_cuda);
  m.impl("lamb_step_cuda", &fusedlars::cuda::lamb_step_cuda);
  m.impl("grad_sumsq_cuda", &fusedlars::cuda::grad_sumsq_cuda);
}
