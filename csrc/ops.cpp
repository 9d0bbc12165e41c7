// Operator schema and registration of fusedlars._C (one place).
//
// The module is importable as a Python extension (so `import fusedlars._C` loads the
// registrations); the ops live in the `fusedlars` torch.library namespace.
#include <Python.h>
#include <torch/library.h>

#include "cpu/kernels.h"

PyMethodDef* fusedlars_host_methods();  // csrc/host.cpp

extern "C" {
// A minimal module object: importing it runs the static TORCH_LIBRARY registrations. Its functions
// are the host-side bookkeeping of csrc/host.cpp (the ops are reached through torch.ops.fusedlars).
static struct PyModuleDef fusedlars_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) {
  fusedlars_c_module.m_methods = fusedlars_host_methods();
  return PyModule_Create(&fusedlars_c_module);
}
}

#ifdef FUSEDLARS_WITH_CUDA
std::string fusedlars_cuda_info();  // csrc/cuda/ops_cuda.cpp
#endif

// The CUDA ops (lars_step_cuda, ...) have CUDA kernels only (csrc/cuda/ops_cuda.cpp). Called with
// CPU tensors, or in a build without CUDA kernels, they land here and say so.
static void cuda_op_on_cpu(const c10::OperatorHandle& op, torch::jit::Stack*) {
#ifdef FUSEDLARS_WITH_CUDA
  TORCH_CHECK(false, op.schema().name(), " runs CUDA tensors only, but was called with CPU tensors; "
              "use backend='cpu' (or 'auto') for CPU buckets");
#else
  TORCH_CHECK(false, op.schema().name(), ": this build of fusedlars._C has no CUDA kernels (rebuild with a "
              "CUDA torch and nvcc on PATH; setup.py prints why they were skipped)");
#endif
}

static std::string cuda_info() {
#ifdef FUSEDLARS_WITH_CUDA
  return fusedlars_cuda_info();
#else
  return "";
#endif
}

static std::string build_info() {
  std::string s = "cpu";
#ifdef FUSEDLARS_WITH_CUDA
  s += "+cuda";
#endif
  return s;
}

TORCH_LIBRARY_FRAGMENT(fusedlars, m) {
  // Build identification, so `fusedlars info` can tell which kernels this binary holds.
  m.def("build_info() -> str", &build_info);

  // Fused optimizer steps over one bucket (fusedlars/buckets.py): the user's params and grads, the
  // optimizer's masters and state, as lists over the bucket's ACTIVE segments (those with a grad this
  // step; `masters` / `momentum` empty when unused), `seg_ids` (int64, the bucket index of each)
  // and the per-segment tables with one entry per segment of the bucket. `hyper` and `modes` carry
  // the resolved group options in the order fusedlars/backends/packing.py writes them (decoded in
  // csrc/op_args.h into LarsOptions / LambOptions of csrc/lars_math.h). `phase` / `sums`: NOTE
  // [Phases] in csrc/cpu/optim_cpu.cpp (0: a whole step). Implementations: csrc/cpu/optim_cpu.cpp;
  // fake kernels: fusedlars/backends/cpu.py.
  m.def(
      "lars_step_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] momentum, "
      "Tensor seg_ids, Tensor wd_mask, Tensor adapt_mask, "
      "Tensor(d!) has_state, Tensor(e!) step, Tensor(f!) w_norm, Tensor(g!) g_norm, Tensor(h!) u_norm, "
      "Tensor(i!) trust_ratio, Tensor lr, Tensor? inv_scale, Tensor? found_inf, Tensor(j!)? w_sumsq, "
      "Tensor(k!)? sums, int phase, float[] hyper, int[] modes) -> ()");
  m.def(
      "lamb_step_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] exp_avg, "
      "Tensor(d!)[] exp_avg_sq, Tensor seg_ids, Tensor wd_mask, Tensor adapt_mask, "
      "Tensor(e!) has_state, Tensor(f!) step, Tensor(g!) w_norm, Tensor(h!) g_norm, "
      "Tensor(i!) u_norm, Tensor(j!) trust_ratio, Tensor lr, Tensor? inv_scale, Tensor? found_inf, "
      "Tensor? clip_coef, Tensor(k!)? sums, int phase, float[] hyper, int[] modes) -> ()");
  // The same steps with low-bit state (issue #26): `storage` 0 fp32, 1 bf16, 2 int8 (state lists of
  // that dtype: fp32, bf16, uint8 codes with one fp32 absmax per 256-element block in the *_absmax
  // lists), `remainders` the int16 remainders of master_weights="remainder" (bf16 params), `param_ids`
  // int64 [S] the params' state_dict ids and `seed` the 64-bit seed (as int64 bits) of the stochastic
  // rounding (NOTE [Low-bit buckets] in fusedlars/buckets.py). The element math is the reference's in
  // float64 (csrc/cpu/exact_impl.h); whole steps only. `w_sumsq` (carry_weight_norms): the stepped
  // segments' new sums of the weights' squares, as the next pass 1 would take them. `sums` ([3, S], row 1
  // the gradients' sums of squares taken in backward: NOTE [Phases]' phase 3): no gradient is read
  // for the norms, and a carried segment reads nothing in pass 1.
  m.def(
      "lars_step_lowbit_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] remainders, "
      "Tensor(d!)[] momentum, Tensor(e!)[] momentum_absmax, Tensor seg_ids, Tensor param_ids, Tensor wd_mask, "
      "Tensor adapt_mask, Tensor(f!) has_state, Tensor(g!) step, Tensor(h!) w_norm, Tensor(i!) g_norm, "
      "Tensor(j!) u_norm, Tensor(k!) trust_ratio, Tensor lr, Tensor? inv_scale, Tensor? found_inf, "
      "Tensor(l!)? w_sumsq, Tensor? sums, int storage, int seed, float[] hyper, int[] modes) -> ()");
  m.def(
      "lamb_step_lowbit_cpu(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] masters, Tensor(c!)[] remainders, "
      "Tensor(d!)[] exp_avg, Tensor(e!)[] exp_avg_absmax, Tensor(f!)[] exp_avg_sq, Tensor(g!)[] exp_avg_sq_absmax, "
      "Tensor seg_ids, Tensor param_ids, Tensor wd_mask, Tensor adapt_mask, Tensor(h!) has_state, Tensor(i!) step, "
      "Tensor(j!) w_norm, Tensor(k!) g_norm, Tensor(l!) u_norm, Tensor(m!) trust_ratio, Tensor lr, "
      "Tensor? inv_scale, Tensor? found_inf, Tensor? clip_coef, int storage, int seed, float[] hyper, "
      "int[] modes) -> ()");
  // sum of ||grad * inv_scale||^2 over the given grads, float64 0-dim
  m.def("grad_sumsq_cpu(Tensor[] grads, Tensor? inv_scale) -> Tensor");
  // CUDA steps (csrc/cuda: one cooperative launch per bucket, or 2 launches) over the bucket's own
  // tensors: the kernels reach them through `addresses`, the int64 [rows, S] device table of base
  // addresses of Bucket.address_table (rows param, grad, master, then the state buffers: momentum, or
  // exp_avg and exp_avg_sq; 0 where a segment has none). The lists declare what the step reads and
  // writes (alias information) and are checked for device and dtype, never dereferenced: `params` the
  // S params (written), `grads` the active segments' grads, `state` the existing masters and state
  // buffers (written); `master`: the weights live in the fp32 masters. Then the per-segment tables,
  // the tile table (Bucket.tiles(TILE)), the segment groups of the cooperative path and preallocated
  // scratch (`partials` float64 [3T], `snap` float32 [2S]); lr is `lr_tensor` (a 1-element device
  // tensor, fp32/fp64) or, when that is None, the float `lr`. path: 0 auto, 1 cooperative (error if
  // unavailable), 2 two launches; FSDP2 split: 3 partials (writes the per-segment sums of squares into
  // `ssq`, float64 [3, S]), 4 apply (finishes the step from the sums in `ssq`). Fake kernels:
  // fusedlars/backends/cuda.py. Low-bit state (issue #26): `storage` 0 fp32, 1 bf16, 2 int8 buffers in
  // the state rows, `remainder` int16 remainder masters, then their rows (launch.h Row), `param_ids`
  // int64 [S] state_dict ids and the 64-bit `seed` of the stochastic rounding (NOTE [Low-bit buckets]).
  m.def(
      "lars_step_cuda(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, Tensor addresses, bool master, "
      "Tensor wd_mask, Tensor adapt_mask, Tensor active, Tensor(c!) has_state, Tensor(d!) step, "
      "Tensor(e!) w_norm, Tensor(f!) g_norm, Tensor(g!) u_norm, Tensor(h!) trust_ratio, Tensor tile_seg, "
      "Tensor tile_start, Tensor tile_len, Tensor seg_tile_ptr, Tensor group_seg, Tensor(i!) partials, "
      "Tensor(j!) snap, Tensor(k!)? ssq, Tensor? lr_tensor, float lr, Tensor? inv_scale, Tensor? found_inf, "
      "float[] hyper, int[] modes, int path=0, Tensor? param_ids=None, int storage=0, "
      "bool remainder=False, int seed=0) -> ()");
  m.def(
      "lamb_step_cuda(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] state, Tensor addresses, bool master, "
      "Tensor wd_mask, Tensor adapt_mask, Tensor active, Tensor(c!) has_state, Tensor(d!) step, "
      "Tensor(e!) w_norm, Tensor(f!) g_norm, Tensor(g!) u_norm, Tensor(h!) trust_ratio, Tensor tile_seg, "
      "Tensor tile_start, Tensor tile_len, Tensor seg_tile_ptr, Tensor group_seg, Tensor(i!) partials, "
      "Tensor(j!) snap, Tensor(k!)? ssq, Tensor? lr_tensor, float lr, Tensor? inv_scale, Tensor? found_inf, "
      "Tensor? clip_coef, float[] hyper, int[] modes, int path=0, Tensor? param_ids=None, int storage=0, "
      "bool remainder=False, int seed=0) -> ()");
  // sum over active segments of ||grad * inv_scale||^2 (grads at row 1 of `addresses`), float64 0-dim
  m.def(
      "grad_sumsq_cuda(Tensor[] grads, Tensor addresses, Tensor active, Tensor tile_seg, Tensor tile_start, "
      "Tensor tile_len, Tensor(a!) gpart, Tensor? inv_scale) -> Tensor");
  // CUDA build / device facts, "key=value;..." ("" without CUDA kernels): archs, coop, last_path
  m.def("cuda_info() -> str", &cuda_info);
  // the CPU kernel table in use (avx512 | avx2 | generic); a non-empty `want` switches it
  m.def("cpu_isa(str want='') -> str", &fusedlars::cpu::cpu_isa);
}

TORCH_LIBRARY_IMPL(fusedlars, CPU, m) {
  for (const char* op : {"lars_step_cuda", "lamb_step_cuda", "grad_sumsq_cuda"})
    m.impl(op, torch::CppFunction::makeFromBoxedFunction<&cuda_op_on_cpu>());
}
