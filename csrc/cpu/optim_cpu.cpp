// Fused CPU LARS / TVLARS / LAMB steps over a bucket (ops fusedlars::*_cpu, schemas in ops.cpp).
//
// A bucket is a set of tables over the user's own tensors (fusedlars/buckets.py): the ops take the
// params, grads, masters and state buffers of the ACTIVE segments (those with a grad this step) as
// tensor lists, plus `seg_ids`, the bucket index of each, which addresses the per-segment tables
// (masks, has_state, step, outputs; one entry per segment of the bucket). Element k of active
// segment i is at base_X[i] + k for every buffer X (NOTE [Dense segments] in buckets.py: every
// buffer of a segment has the param's strides, so all are walked in the same memory order).
//
// One step of a bucket:
//   plan     the active segments, cut into tiles of kTileElems (a tile never crosses a segment), and
//            grouped so that a group's pass-1 data fit in cache (group_budget: LARS 8 MiB, LAMB 4 MiB);
//   pass 1   per tile: partial sums of squares (LARS: w^2, g^2, (g + lam*w)^2;  LAMB: also the new
//            moments, written in place, and u^2 of the Adam direction);
//   scalars  per segment: its tiles' partials summed in tile order, the trust ratio and the element
//            coefficients (lars_math.h);
//   pass 2   per tile, backwards (NOTE [Pass 2 runs backwards]): the update.
// Groups run one after the other inside ONE OpenMP parallel region (run_plan, NOTE [Schedule]), one
// barrier per group; each thread computes the coefficients of the segments its own tiles touch
// (redundantly where threads share a segment: identical values). Pass 1 and pass 2 give each
// thread the same contiguous tiles of a group, so pass 2 re-reads what the same core just read.
//
// NOTE: [Bytes per parameter, fp32]
// LARS: pass 1 reads w, g (8 B), or only g (4 B) with carried weight norms; pass 2 reads w, g, b and
// writes w, b (20 B): 28 B (24 carried) from DRAM when a group does not fit in cache (one segment
// larger than the budget), 20 B when pass 2 finds w and g in cache. LAMB keeps no scratch: pass 1 reads w, g, m, v and writes m, v (24 B); pass 2 re-reads
// w, m, v, recomputes the same u (deterministic) and writes w (16 B): 40 B, 28 B from cache.
//
// NOTE: [Carried weight norms]
// With a w_sumsq buffer (float64 [S]), pass 2 also sums the squares of the weights it writes, per
// tile, in pass 1's block and lane order, on the values pass 1 will load (the rounded bf16/fp16
// param when there is no master), and stores each segment's sum (tiles in order). Next step, a
// segment whose entry is not negative skips w in pass 1: it reads only g (grad_sumsq, bitwise
// lars_sumsq's g^2), takes ||w||^2 from w_sumsq (bitwise what it would have summed), and pass 2
// sums the (g + lam*w)^2 of the report (u_norm) instead. Results are bitwise those of a step that
// reads w. Pass 1 then moves 4 B/param (fp32) instead of 8. Not with denominator='norm_of_sum',
// whose ratio needs ||g + lam*w|| before the update. The CALLER owns validity: it writes -1 into
// an entry whenever the weights may have changed outside this op (fusedlars.backends.cpu).
//
// NOTE: [Determinism]
// A tile's partial is computed by one thread in a fixed lane order, and a segment's norm is the sum
// of its tiles' partials in tile order. Neither depends on the thread count, the group budget or the
// instruction set, so results are bitwise identical across runs, thread counts and ISAs.
//
// NOTE: [Skips]
// found_inf != 0: return before touching anything. A segment without a grad is not in the lists.
//
// NOTE: [Phases]
// `phase` splits a step around a cross-rank reduction (FSDP2: fusedlars/distributed.py): 1 runs
// pass 1 and writes each active segment's sums of squares into `sums` (float64 [3, S]; LARS rows
// w^2, g^2, (g + lam*w)^2; LAMB rows w^2, u^2, g^2 as fusedlars/backends/torch.py), 2 takes the
// (all-reduced) sums from `sums` and runs the scalars and pass 2. LAMB's pass 1 writes the moments,
// so phase 2 must follow phase 1 exactly once. Phase 0 (a whole step) is bitwise phase 1 then 2.
// Carried weight norms work across phases too: phase 1 takes a carried segment's LOCAL ||w||^2
// from w_sumsq (reading only g) and phase 2 writes the new local one. The sum of squares of
// g + lam*w (the reported u_norm, not used by the math when weight norms are carried) is then not
// known across ranks: phase 1 puts NaN in its row, so u_norm reads NaN for such a segment.
// Phase 3 (LARS only) is phase 0 with the gradients' sums of squares given in row 1 of `sums`
// (taken in backward: fusedlars/backward_norms.py), so that no segment reads its gradient in pass 1:
// a carried segment skips pass 1 altogether, one that is not carried (params without fp32 masters)
// sums only its weights there (grad_sumsq's loop over w, bitwise lars_sumsq's w^2), and pass 2,
// which reads the gradient once, also sums the (g + lam*w)^2 of the report. With masters, a segment
// that is not carried runs pass 1 as in phase 0. With the given sums equal to pass 1's
// (grad_sumsq_cpu: same tiles and lanes), phase 3 is bitwise phase 0 for the params and state.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "../lars_math.h"
#include "../lowbit.h"
#include "../op_args.h"
#include "kernels.h"

namespace fusedlars {
namespace cpu {
namespace {

// ------------------------------------------------------------------------------------------------
// instruction-set dispatch

bool cpu_has(const char* isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (std::string(isa) == "avx512")
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::string(isa) == "avx2") return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return std::string(isa) == "generic";
}

const KernelTable* table_named(const std::string& name) {
  if (name == "avx512") return kernel_table_avx512();
  if (name == "avx2") return kernel_table_avx2();
  if (name == "generic") return kernel_table_generic();
  return nullptr;
}

const KernelTable* best_table() {
  const char* env = std::getenv("FUSEDLARS_CPU_ISA");
  if (env && *env) {
    std::string want(env);
    TORCH_CHECK(table_named(want) != nullptr, "FUSEDLARS_CPU_ISA=", want, " is not one of avx512, avx2, generic");
    TORCH_CHECK(cpu_has(want.c_str()), "FUSEDLARS_CPU_ISA=", want, ": this CPU does not support it");
    return table_named(want);
  }
  for (const char* n : {"avx512", "avx2"})
    if (cpu_has(n) && table_named(n)) return table_named(n);
  return kernel_table_generic();
}

std::atomic<const KernelTable*> g_table{nullptr};

const KernelTable& table() {
  const KernelTable* t = g_table.load();
  if (!t) {
    t = best_table();
    g_table.store(t);
  }
  return *t;
}

// Cache budget of a group of segments, in bytes of w + g (LARS) or w + g + m + v (LAMB).
// FUSEDLARS_CPU_GROUP_BYTES overrides it (benchmarks; read at every step so that one process can
// compare budgets); it changes speed only, never results. Defaults measured on a 32 MiB-L3 EPYC,
// 2 threads, ResNet-50 shapes, interleaved runs (NOTE [Schedule]): LARS 8 MiB (1M params), LAMB
// 4 MiB (256K params); neighbouring budgets were within 1-3%, less than the run-to-run drift.
int64_t group_budget(int64_t fallback) {
  const char* env = std::getenv("FUSEDLARS_CPU_GROUP_BYTES");
  return env && *env ? std::max<int64_t>(std::atoll(env), 0) : fallback;
}
constexpr int64_t kLarsBudget = int64_t(8) << 20;
constexpr int64_t kLambBudget = int64_t(4) << 20;

// NOTE: [Pass 2 runs backwards]
// Each thread runs pass 2 over its tiles of a group in reverse order: the tiles pass 1 read last
// are the likeliest still in cache, so a group larger than the cache (one big segment) gets hits
// for its last part instead of evicting it while reading its first part. Order does not change
// results (pass 2 is element-wise). Measured: LARS ~3% and LAMB ~2-3% faster backwards with the
// interleaved schedule on ResNet-50 shapes; with the sequential one (NOTE [Schedule]) the two orders
// are within the noise (ResNet-50: LARS/SGD 1.063-1.114 backwards, 1.066-1.085 forwards; 24 layers
// of 512K params: 1.127 backwards, 1.138 forwards; 6 of 2.4M: 1.177 backwards, 1.170 forwards).
// Where pass 1 reads nothing (NOTE [One group when pass 1 reads nothing]) there is nothing to find
// in cache, and pass 2 runs forwards: LARS with norms from backward and carried weight norms, Intel
// Xeon VM, 2 threads, huge pages (THP_MEM_ALLOC_ENABLE=1), both orders in one process in rotated
// rounds, in fused SGD steps: ResNet-50 1.043x / 1.040x / 1.043x / 1.036x forwards against 1.052x /
// 1.067x / 1.055x / 1.052x backwards (four runs, the two built in either order).
// FUSEDLARS_CPU_P2_REVERSE=0 / =1 force either order (benchmarks, and the tests of order independence).
bool p2_reverse(bool pass1_reads) {
  const char* env = std::getenv("FUSEDLARS_CPU_P2_REVERSE");
  if (env && *env == '0') return false;
  if (env && *env == '1') return true;
  return pass1_reads;
}

// ------------------------------------------------------------------------------------------------
// plan: tiles of the active segments, grouped for cache reuse

struct Group {
  int64_t t0, t1;  // tiles
  int64_t s0, s1;  // indices into Plan::seg
};

struct Plan {
  std::vector<int64_t> t_start, t_len, t_cum;  // t_start: offset inside the segment; t_cum[t] = elements before t
  std::vector<int64_t> t_seg;                  // index into seg (= index into the ops' tensor lists)
  std::vector<int64_t> seg;                    // bucket index of each active segment (seg_ids)
  std::vector<int64_t> seg_t0;                 // tiles of seg[i]: [seg_t0[i], seg_t0[i+1])
  std::vector<Group> groups;
  int64_t num_tiles() const { return static_cast<int64_t>(t_start.size()); }
};

// numel[i] / seg_ids[i]: the i-th active segment's element count and bucket index.
Plan make_plan(const std::vector<int64_t>& numel, const int64_t* seg_ids, int64_t bytes_per_elem, int64_t budget) {
  Plan p;
  p.t_cum.push_back(0);
  p.seg_t0.push_back(0);
  Group g{0, 0, 0, 0};
  int64_t gbytes = 0;
  const int64_t A = static_cast<int64_t>(numel.size());
  for (int64_t i = 0; i < A; ++i) {
    const int64_t n = numel[i];
    const int64_t bytes = n * bytes_per_elem;
    if (gbytes > 0 && gbytes + bytes > budget) {
      g.t1 = p.num_tiles();
      g.s1 = static_cast<int64_t>(p.seg.size());
      p.groups.push_back(g);
      g = Group{g.t1, g.t1, g.s1, g.s1};
      gbytes = 0;
    }
    const int64_t si = static_cast<int64_t>(p.seg.size());
    for (int64_t a = 0; a < n; a += kTileElems) {
      const int64_t len = std::min(kTileElems, n - a);
      p.t_start.push_back(a);
      p.t_len.push_back(len);
      p.t_cum.push_back(p.t_cum.back() + len);
      p.t_seg.push_back(si);
    }
    p.seg.push_back(seg_ids[i]);
    p.seg_t0.push_back(p.num_tiles());
    gbytes += bytes;
  }
  if (static_cast<int64_t>(p.seg.size()) > g.s0) {
    g.t1 = p.num_tiles();
    g.s1 = static_cast<int64_t>(p.seg.size());
    p.groups.push_back(g);
  }
  return p;
}

// Tiles [a, b) of a group owned by thread tid of nt: contiguous, balanced by element count.
void split(const Plan& p, const Group& g, int tid, int nt, int64_t& a, int64_t& b) {
  const int64_t base = p.t_cum[g.t0], total = p.t_cum[g.t1] - base;
  auto first = [&](int k) -> int64_t {
    if (k <= 0) return g.t0;
    if (k >= nt) return g.t1;
    const int64_t target = base + (static_cast<int64_t>(k) * total + nt - 1) / nt;
    return std::lower_bound(p.t_cum.begin() + g.t0, p.t_cum.begin() + g.t1, target) - p.t_cum.begin();
  };
  a = first(tid);
  b = first(tid + 1);
}

// Runs the plan in ONE parallel region, one barrier per group:
//
//   for k:  pass1(G_k)  (this thread's tiles)
//           barrier     (every thread's pass 1 of G_k is done)
//           coefficients of the segments of G_k that this thread's tiles touch
//           pass2(G_k)  (the same tiles, backwards: NOTE [Pass 2 runs backwards])
//
// No barrier between pass 2 of G_k and pass 1 of G_k+1: they touch different segments.
// coef(si, slot, commit) computes segment si's coefficients into this thread's slot (threads that
// share a segment compute identical values: same partials, same order); exactly one thread per
// segment passes commit = true (the owner of its first tile; thread 0 for a segment without
// tiles) and writes the per-segment outputs. coef must read per-segment state (step, has_state)
// from a snapshot taken before the region, as the committing thread updates it.
// pass2(t, slot) reads the coefficients of tile t's segment from that slot.
//
// NOTE: [Schedule]
// An earlier schedule interleaved pass 2 of G_k tile by tile with pass 1 of G_k+1 (overlapping
// stores with loads). Once pass 1 of LARS read only g (NOTE [Carried weight norms]), running the
// passes back to back measured faster: ResNet-50 shapes, fp32, 2 threads, LARS/fused-SGD time
// ratio over five interleaved runs: 1.108-1.159 interleaved (2 MiB groups), 1.063-1.114
// sequential (8 MiB groups); LAMB/fused-AdamW 1.23-1.27 either way (1.21-1.25 sequential, 4 MiB).
// Interleaving doubles the data in flight between a tile's two passes, which costs the hits that
// pass 2 gets from cache.
template <class P1, class CO, class P2>
void run_plan(const Plan& p, int nth, P1&& pass1, CO&& coef, P2&& pass2, bool pass1_reads = true) {
  const int64_t G = static_cast<int64_t>(p.groups.size());
  const bool rev = p2_reverse(pass1_reads);
  auto body = [&](int tid, int nt) {
    for (int64_t k = 0; k < G; ++k) {
      const Group& g = p.groups[k];
      int64_t a = 0, b = 0;
      split(p, g, tid, nt, a, b);
      for (int64_t t = a; t < b; ++t) pass1(t);
      if (nt > 1) {
#pragma omp barrier
      }
      for (int64_t t = a; t < b;) {
        const int64_t si = p.t_seg[t];
        coef(si, tid, p.seg_t0[si] >= a);
        t = p.seg_t0[si + 1];
      }
      if (tid == 0)
        for (int64_t si = g.s0; si < g.s1; ++si)
          if (p.seg_t0[si] == p.seg_t0[si + 1]) coef(si, tid, true);
      for (int64_t j = 0; j < b - a; ++j) pass2(rev ? b - 1 - j : a + j, tid);
    }
  };
  if (nth <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(nth)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// NOTE: [Partials run backwards]
// Phase 1 of a split step (NOTE [Phases]) cannot be fused with pass 2 group by group: pass 2 needs
// the sums of every rank first. So that pass 2 (run_plan: groups in order, each thread's tiles of a
// group backwards) still starts on cached data, phase 1 visits the groups in REVERSE order, each
// thread the same tiles of a group as in run_plan, forwards: the data phase 1 touched last is the
// data phase 2 touches first. Order does not change results (one partial per tile).
template <class P1>
void run_pass1_reverse(const Plan& p, int nth, P1&& pass1) {
  const int64_t G = static_cast<int64_t>(p.groups.size());
  auto body = [&](int tid, int nt) {
    for (int64_t k = G - 1; k >= 0; --k) {
      int64_t a = 0, b = 0;
      split(p, p.groups[k], tid, nt, a, b);
      for (int64_t t = a; t < b; ++t) pass1(t);
    }
  };
  if (nth <= 1) {
    body(0, 1);
    return;
  }
#pragma omp parallel num_threads(nth)
  body(omp_get_thread_num(), omp_get_num_threads());
}

// Tile t of the plan, as the kernels take it: its segment's base pointers, its offset and length.
TileArgs tile_of(const std::vector<TileArgs>& bases, const Plan& p, int64_t t) {
  TileArgs a = bases[p.t_seg[t]];
  a.start = p.t_start[t];
  a.len = p.t_len[t];
  return a;
}

// Segment si's sums of N partials per tile (part[N*t + j]), tiles in order: the fixed reduction
// order of NOTE [Determinism].
template <int N>
void segment_sums(const Plan& p, const std::vector<double>& part, int64_t si, double* out) {
  for (int j = 0; j < N; ++j) out[j] = 0.0;
  for (int64_t t = p.seg_t0[si]; t < p.seg_t0[si + 1]; ++t)
    for (int j = 0; j < N; ++j) out[j] += part[N * t + j];
}

int plan_threads(const Plan& p) {
  int nth = at::in_parallel_region() ? 1 : at::get_num_threads();
  if (p.t_cum.back() < 4 * kTileElems) nth = 1;  // not worth waking threads
  return std::max(nth, 1);
}

// ------------------------------------------------------------------------------------------------
// argument checks

int variant_of(at::ScalarType dt, bool master) {
  switch (dt) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return master ? kBF16Master : kBF16;
    case at::kHalf:
      return master ? kF16Master : kF16;
    default:
      TORCH_CHECK(false, "fusedlars cpu: unsupported param dtype ", dt, " (float32, bfloat16, float16 are fused)");
  }
}

// A per-segment table (float [S] or double [S]).
void check_table(const at::Tensor& t, const char* name, at::ScalarType dt, int64_t S) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dt && t.numel() == S,
              "fusedlars cpu: ", name, " must be a contiguous CPU ", dt, " tensor of ", S, " elements");
}

// A per-step scalar argument (lr, inv_scale, found_inf, clip_coef): one element, on the CPU.
void check_scalar(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.numel() == 1 && t.device().is_cpu(), "fusedlars cpu: ", name, " must be a 1-element CPU tensor");
}

// Whether dense tensors `a` and `b` of one shape walk their elements in the same memory order: equal
// strides on every dim of size > 1 (a size-1 dim's stride never moves an address: a TP shard (1, n)
// of a (k, n) weight has strides (n, 1) or (k, 1), both contiguous).
bool same_order(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) > 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

// Entry i of a segment list: on the CPU, of dtype `dt`, with param i's shape and element order (NOTE
// [Dense segments], fusedlars/buckets.py: the kernels walk every buffer of a segment in the same order).
void check_entry(const at::Tensor& t, const at::Tensor& param, const char* name, int64_t i, at::ScalarType dt) {
  TORCH_CHECK(t.device().is_cpu(), "fusedlars cpu: ", name, "[", i, "] must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dt, "fusedlars cpu: ", name, "[", i, "] must be ", dt, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == param.sizes(), "fusedlars cpu: ", name, "[", i, "] has shape ", t.sizes(),
              ", its param ", param.sizes());
  TORCH_CHECK(t.numel() <= 1 || (same_order(t, param) && t.is_non_overlapping_and_dense()),
              "fusedlars cpu: ", name, "[", i, "] must be dense with its param's strides (on dims of size > 1)");
}

// The segment lists of one step. `lists` are (tensors, name, dtype) and either empty or of length A.
struct Segments {
  int64_t A = 0;
  int variant = kF32;
  std::vector<int64_t> numel;
  std::vector<TileArgs> bases;
};

Segments check_segments(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList s0,
                        at::TensorList s1, const at::Tensor& seg_ids, int64_t S) {
  Segments g;
  g.A = static_cast<int64_t>(params.size());
  TORCH_CHECK(grads.size() == params.size(), "fusedlars cpu: ", grads.size(), " grads for ", params.size(), " params");
  TORCH_CHECK(seg_ids.device().is_cpu() && seg_ids.is_contiguous() && seg_ids.scalar_type() == at::kLong &&
                  seg_ids.numel() == g.A,
              "fusedlars cpu: seg_ids must be a contiguous CPU int64 tensor with one entry per param");
  const int64_t* ids = seg_ids.data_ptr<int64_t>();
  for (int64_t i = 0; i < g.A; ++i)
    TORCH_CHECK(ids[i] >= 0 && ids[i] < S, "fusedlars cpu: seg_ids[", i, "] = ", ids[i], " outside [0, ", S, ")");
  for (const auto& [lst, name] : {std::pair<at::TensorList, const char*>{masters, "masters"}, {s0, "state"},
                                  {s1, "state"}})
    TORCH_CHECK(lst.empty() || static_cast<int64_t>(lst.size()) == g.A, "fusedlars cpu: ", name, " has ",
                lst.size(), " tensors for ", g.A, " params");
  if (g.A == 0) return g;
  const at::ScalarType dt = params[0].scalar_type();
  TORCH_CHECK(masters.empty() || dt != at::kFloat, "fusedlars cpu: master weights need bf16/fp16 params");
  g.variant = variant_of(dt, !masters.empty());
  g.numel.resize(g.A);
  g.bases.resize(g.A);
  for (int64_t i = 0; i < g.A; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.device().is_cpu() && p.scalar_type() == dt, "fusedlars cpu: params[", i, "] must be a CPU ", dt,
                " tensor");
    TORCH_CHECK(p.numel() <= 1 || p.is_non_overlapping_and_dense(), "fusedlars cpu: params[", i,
                "] is not dense in memory");
    check_entry(grads[i], p, "grads", i, dt);
    TileArgs& b = g.bases[i];
    b = TileArgs{p.data_ptr(), nullptr, grads[i].data_ptr(), nullptr, nullptr, 0, 0};
    if (!masters.empty()) {
      check_entry(masters[i], p, "masters", i, at::kFloat);
      b.master = masters[i].data_ptr<float>();
    }
    if (!s0.empty()) {
      check_entry(s0[i], p, "state", i, at::kFloat);
      b.s0 = s0[i].data_ptr<float>();
    }
    if (!s1.empty()) {
      check_entry(s1[i], p, "state", i, at::kFloat);
      b.s1 = s1[i].data_ptr<float>();
    }
    g.numel[i] = p.numel();
  }
  return g;
}

struct Common {
  int64_t S;
  const float* wd_mask;
  const float* adapt_mask;
  float *has_state, *step, *w_norm, *g_norm, *u_norm, *trust_ratio;
  double lr, inv_scale;
  bool skip;
  // the per-segment outputs of a step (run by the one thread that commits segment s)
  void commit(int64_t s, double n_w, double n_g, double n_u, double r, float step_before) const {
    w_norm[s] = static_cast<float>(n_w);
    g_norm[s] = static_cast<float>(n_g);
    u_norm[s] = static_cast<float>(n_u);
    trust_ratio[s] = static_cast<float>(r);
    has_state[s] = 1.0f;
    step[s] = step_before + 1.0f;
  }
  // segment s's weight decay (its wd_mask applied), in double as the reference takes it
  double lam(double weight_decay, int64_t s) const { return weight_decay * static_cast<double>(wd_mask[s]); }
  // segment s's LARS scalars (lars_math.h lars_segment) from its sums of squares ssq
  LarsSegment lars_scalars(const LarsOptions& o, int64_t s, const double ssq[3], float step_before) const {
    const bool adapt = o.adapt_enabled && adapt_mask[s] != 0;
    return lars_segment(o, ssq[0], ssq[1], ssq[2], lam(o.weight_decay, s), adapt, step_before, lr);
  }
};

Common check_common(const at::Tensor& wd_mask, const at::Tensor& adapt_mask, const at::Tensor& has_state,
                    const at::Tensor& step, const at::Tensor& w_norm, const at::Tensor& g_norm,
                    const at::Tensor& u_norm, const at::Tensor& trust_ratio, const at::Tensor& lr,
                    const std::optional<at::Tensor>& inv_scale, const std::optional<at::Tensor>& found_inf) {
  Common c;
  c.S = wd_mask.numel();
  const std::pair<const at::Tensor*, const char*> segs[] = {
      {&wd_mask, "wd_mask"}, {&adapt_mask, "adapt_mask"}, {&has_state, "has_state"}, {&step, "step"},
      {&w_norm, "w_norm"},   {&g_norm, "g_norm"},         {&u_norm, "u_norm"},       {&trust_ratio, "trust_ratio"}};
  for (const auto& [t, name] : segs) check_table(*t, name, at::kFloat, c.S);
  c.wd_mask = wd_mask.data_ptr<float>();
  c.adapt_mask = adapt_mask.data_ptr<float>();
  c.has_state = has_state.data_ptr<float>();
  c.step = step.data_ptr<float>();
  c.w_norm = w_norm.data_ptr<float>();
  c.g_norm = g_norm.data_ptr<float>();
  c.u_norm = u_norm.data_ptr<float>();
  c.trust_ratio = trust_ratio.data_ptr<float>();
  check_scalar(lr, "lr");
  c.lr = lr.item<double>();
  c.inv_scale = 1.0;
  if (inv_scale) {
    check_scalar(*inv_scale, "inv_scale");
    c.inv_scale = inv_scale->item<double>();
  }
  c.skip = false;
  if (found_inf) {
    check_scalar(*found_inf, "found_inf");
    c.skip = found_inf->item<double>() != 0.0;
  }
  return c;
}

// `sums` of NOTE [Phases]: float64 [3, S], or nullptr for phase 0.
double* check_phase(int64_t phase, const std::optional<at::Tensor>& sums, int64_t S) {
  TORCH_CHECK(phase >= 0 && phase <= 3, "fusedlars cpu: phase must be 0, 1, 2 or 3, got ", phase);
  if (phase == 0) return nullptr;
  TORCH_CHECK(sums.has_value(), "fusedlars cpu: phase ", phase, " needs a sums tensor");
  check_table(*sums, "sums", at::kDouble, 3 * S);
  return sums->data_ptr<double>();
}

int64_t weight_bytes(int variant) { return variant == kF32 || variant == kBF16Master || variant == kF16Master ? 4 : 2; }
int64_t grad_bytes(int variant) { return variant == kF32 ? 4 : 2; }

// ------------------------------------------------------------------------------------------------
// ops

void lars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList momentum,
                   const at::Tensor& seg_ids, const at::Tensor& wd_mask, const at::Tensor& adapt_mask,
                   const at::Tensor& has_state, const at::Tensor& step, const at::Tensor& w_norm,
                   const at::Tensor& g_norm, const at::Tensor& u_norm, const at::Tensor& trust_ratio,
                   const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& w_sumsq,
                   const std::optional<at::Tensor>& sums, int64_t phase, at::ArrayRef<double> hyper,
                   at::ArrayRef<int64_t> modes) {
  const LarsOptions o = lars_options(hyper, modes, "fusedlars cpu: lars_step_cpu");
  Common c = check_common(wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale,
                          found_inf);
  const int mom = o.momentum != 0.0;
  TORCH_CHECK(!mom || !momentum.empty() || params.empty(), "fusedlars cpu: momentum != 0 needs momentum buffers");
  const Segments g = check_segments(params, grads, masters, mom ? momentum : at::TensorList(), {}, seg_ids, c.S);
  double* ext = check_phase(phase, sums, c.S);
  if (c.skip) return;
  const float gscale = static_cast<float>(o.maximize ? -c.inv_scale : c.inv_scale);
  double* wss = nullptr;
  if (w_sumsq) {
    check_table(*w_sumsq, "w_sumsq", at::kDouble, c.S);
    wss = w_sumsq->data_ptr<double>();
  }
  const int64_t bpe = weight_bytes(g.variant) + grad_bytes(g.variant);
  const bool given = phase == 3;  // NOTE [Phases]: the gradients' sums of squares are given
  // NOTE: [One group when pass 1 reads nothing]
  // Groups exist so that pass 2 finds pass 1's data in cache. With the gradients' sums given and
  // every segment's ||w||^2 carried, pass 1 reads nothing, so the whole bucket is one group: one
  // barrier instead of one per group, and pass 2 split evenly over the threads once. (ResNet-50,
  // 2 threads: 25 groups of 8 MiB, whose barriers waited on the slower thread each time.) Speed only:
  // the plan's tiles, and so every partial and result, do not depend on the grouping.
  bool no_pass1 = given && wss != nullptr;
  for (int64_t i = 0; no_pass1 && i < g.A; ++i) no_pass1 = !(wss[seg_ids.data_ptr<int64_t>()[i]] < 0.0);
  const int64_t budget = no_pass1 ? std::numeric_limits<int64_t>::max() : group_budget(kLarsBudget);
  const Plan p = make_plan(g.numel, seg_ids.data_ptr<int64_t>(), bpe, budget);
  const KernelTable& k = table();
  std::vector<double> part(3 * p.num_tiles());
  TORCH_CHECK(!given || o.denominator != kNormOfSum, "fusedlars cpu: phase 3 cannot take ||g + lam*w|| as given");
  const bool w_only = given && masters.empty();  // pass 1 of a segment that is not carried sums w alone
  std::vector<double> part2(wss || given ? 2 * p.num_tiles() : 0);  // pass 2: new w^2, (g + lam*w)^2
  const int nth = plan_threads(p);
  const int64_t NS = static_cast<int64_t>(p.seg.size());
  std::vector<LarsCoef> coef(static_cast<size_t>(nth) * NS);  // one slot per thread
  std::vector<float> step0(p.seg.size()), has0(p.seg.size());  // snapshot (see run_plan)
  // carried[si]: ||w||^2 comes from w_sumsq, pass 1 reads only g (NOTE [Carried weight norms])
  std::vector<char> carried(p.seg.size(), 0);
  const bool u_in_math = o.denominator == kNormOfSum;
  for (int64_t si = 0; si < NS; ++si) {
    step0[si] = c.step[p.seg[si]];
    has0[si] = c.has_state[p.seg[si]];
    if (wss && !u_in_math) carried[si] = !(wss[p.seg[si]] < 0.0);  // NaN is a valid (carried) value
  }
  const bool whole = phase == 0 || phase == 3;  // one call steps: pass 2 reports u for carried segments
  auto pass1 = [&](int64_t t) {
    if (given && carried[p.t_seg[t]]) return;  // its ||g||^2 is given, its ||w||^2 carried
    const TileArgs a = tile_of(g.bases, p, t);
    if (w_only) {  // ||g||^2 given: the weights alone, through the same loop as a gradient's
      TileArgs aw = a;
      aw.grad = a.param;
      part[3 * t + 1] = part[3 * t + 2] = 0.0;
      k.grad_sumsq(aw, g.variant, 1.0f, &part[3 * t]);
      return;
    }
    if (carried[p.t_seg[t]]) {
      part[3 * t] = part[3 * t + 2] = 0.0;
      k.grad_sumsq(a, g.variant, gscale, &part[3 * t + 1]);  // bitwise lars_sumsq's out[1]
      return;
    }
    const float lam = static_cast<float>(c.lam(o.weight_decay, p.seg[p.t_seg[t]]));
    k.lars_sumsq(a, g.variant, gscale, lam, &part[3 * t]);
  };
  if (phase == 1) {
    run_pass1_reverse(p, nth, pass1);
    for (int64_t si = 0; si < NS; ++si) {
      double ssq[3];
      segment_sums<3>(p, part, si, ssq);
      if (carried[si]) {  // NOTE [Phases]: the local carried ||w||^2; u unknown
        ssq[0] = wss[p.seg[si]];
        ssq[2] = std::numeric_limits<double>::quiet_NaN();
      }
      for (int j = 0; j < 3; ++j) ext[j * c.S + p.seg[si]] = ssq[j];
    }
    return;
  }
  run_plan(
      p, nth,
      [&](int64_t t) {
        if (phase != 2) pass1(t);
      },
      [&](int64_t si, int slot, bool commit) {
        const int64_t s = p.seg[si];
        double ssq[3];
        if (phase == 2) {
          for (int j = 0; j < 3; ++j) ssq[j] = ext[j * c.S + s];
        } else if (given && (carried[si] || w_only)) {
          segment_sums<3>(p, part, si, ssq);  // w^2 of a segment that is not carried
          ssq[1] = ext[c.S + s];
          ssq[2] = 0.0;
        } else {
          segment_sums<3>(p, part, si, ssq);
        }
        // ssq[2] (0 or NaN here) is not used by the math: u_in_math is false. Phase 2's sums are global.
        if (carried[si] && whole) ssq[0] = wss[s];
        const LarsSegment r = c.lars_scalars(o, s, ssq, step0[si]);
        coef[slot * NS + si] = lars_coef(o, r, c.lr, has0[si] != 0);
        if (commit) c.commit(s, r.n_w, r.n_g, r.n_u, r.r, step0[si]);
      },
      [&](int64_t t, int slot) {
        const TileArgs a = tile_of(g.bases, p, t);
        const int64_t si = p.t_seg[t];
        const bool report_u = (carried[si] && whole) || w_only;  // pass 2 sums (g + lam*w)^2 for u_norm
        const int carry = report_u ? kCarryWU : wss ? kCarryW : kCarryNone;
        const float lam_u = static_cast<float>(c.lam(o.weight_decay, p.seg[si]));
        k.lars_update(a, g.variant, o.wd_mode, mom, o.nesterov, carry, gscale, lam_u, coef[slot * NS + si],
                      part2.empty() ? nullptr : &part2[2 * t]);
      },
      !no_pass1);
  if (part2.empty()) return;
  // per segment, tiles in order (as the coefficient phase sums pass 1's partials)
  for (int64_t si = 0; si < NS; ++si) {
    const int64_t s = p.seg[si];
    double wu[2];
    segment_sums<2>(p, part2, si, wu);
    if (wss) wss[s] = wu[0];
    if ((carried[si] && whole) || w_only) c.u_norm[s] = static_cast<float>(std::sqrt(wu[1]));
  }
}

void lamb_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters, at::TensorList exp_avg,
                   at::TensorList exp_avg_sq, const at::Tensor& seg_ids, const at::Tensor& wd_mask,
                   const at::Tensor& adapt_mask, const at::Tensor& has_state, const at::Tensor& step,
                   const at::Tensor& w_norm, const at::Tensor& g_norm, const at::Tensor& u_norm,
                   const at::Tensor& trust_ratio, const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                   const std::optional<at::Tensor>& sums, int64_t phase, at::ArrayRef<double> hyper,
                   at::ArrayRef<int64_t> modes) {
  const LambOptions o = lamb_options(hyper, modes, "fusedlars cpu: lamb_step_cpu");
  Common c = check_common(wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale,
                          found_inf);
  TORCH_CHECK(params.empty() || (exp_avg.size() == params.size() && exp_avg_sq.size() == params.size()),
              "fusedlars cpu: lamb_step_cpu needs exp_avg and exp_avg_sq for every param");
  const Segments g = check_segments(params, grads, masters, exp_avg, exp_avg_sq, seg_ids, c.S);
  TORCH_CHECK(phase != 3, "fusedlars cpu: phase 3 (given gradient sums) is LARS's");
  double* ext = check_phase(phase, sums, c.S);
  if (c.skip) return;
  double clip = 1.0;
  if (clip_coef) {
    check_scalar(*clip_coef, "clip_coef");
    clip = clip_coef->item<double>();
  }
  const double gscale = (o.maximize ? -c.inv_scale : c.inv_scale) / clip;
  const int64_t bpe = weight_bytes(g.variant) + grad_bytes(g.variant) + 8;
  const Plan p = make_plan(g.numel, seg_ids.data_ptr<int64_t>(), bpe, group_budget(kLambBudget));
  const KernelTable& k = table();
  std::vector<double> part(3 * p.num_tiles());
  const int nth = plan_threads(p);
  const int64_t NS = static_cast<int64_t>(p.seg.size());
  std::vector<LambCoef> coef(static_cast<size_t>(nth) * NS);  // one slot per thread
  std::vector<float> step0(p.seg.size());                     // snapshot (see run_plan)
  for (int64_t si = 0; si < NS; ++si) {
    const int64_t s = p.seg[si];
    step0[si] = c.step[s];
    const LambCoef c0 = lamb_coef(o, gscale, c.lam(o.weight_decay, s), c.lr,
                                  static_cast<double>(c.step[s]) + 1.0);
    for (int j = 0; j < nth; ++j) coef[j * NS + si] = c0;
  }
  // pass 1 uses only the coefficients fixed before the region (not k)
  auto pass1 = [&](int64_t t) {
    k.lamb_pass1(tile_of(g.bases, p, t), g.variant, o.wd_mode, coef[p.t_seg[t]], &part[3 * t]);
  };
  // part rows per tile: w^2, g^2, u^2; sums rows (NOTE [Phases]): w^2, u^2, g^2
  constexpr int kRow[3] = {0, 2, 1};
  if (phase == 1) {
    run_pass1_reverse(p, nth, pass1);
    for (int64_t si = 0; si < NS; ++si) {
      double ssq[3];
      segment_sums<3>(p, part, si, ssq);
      for (int j = 0; j < 3; ++j) ext[kRow[j] * c.S + p.seg[si]] = ssq[j];
    }
    return;
  }
  run_plan(
      p, nth,
      [&](int64_t t) {
        if (phase != 2) pass1(t);
      },
      [&](int64_t si, int slot, bool commit) {
        const int64_t s = p.seg[si];
        double ssq[3];
        if (phase == 2) {
          for (int j = 0; j < 3; ++j) ssq[j] = ext[kRow[j] * c.S + s];
        } else {
          segment_sums<3>(p, part, si, ssq);
        }
        const LambSegment r = lamb_segment(o, ssq[0], ssq[1], ssq[2], c.adapt_mask[s] != 0, c.lr);
        const double t_new = static_cast<double>(step0[si]) + 1.0;
        coef[slot * NS + si].k = lamb_step_scale(o, c.lr, r.r, t_new);
        if (commit) c.commit(s, r.n_w, r.n_g, r.n_u, r.r, step0[si]);
      },
      [&](int64_t t, int slot) {
        k.lamb_pass2(tile_of(g.bases, p, t), g.variant, o.wd_mode, coef[slot * NS + p.t_seg[t]]);
      });
}

// ------------------------------------------------------------------------------------------------
// low-bit state (issue #26): the exact kernels (exact_impl.h; lars_math.h NOTE [Low-bit element math
// in fp32]). Same plan, schedule and per-segment
// scalars as the fp32 ops above; the state is stored through csrc/lowbit.h. LARS takes given gradient
// sums and carries weight norms (NOTE [Carried weight norms of the exact step] in exact_impl.h).

struct ExactSegments {
  int variant = kF32;
  std::vector<int64_t> numel;
  std::vector<ExactTile> bases;
};

// `state`: (s0, absmax0), (s1, absmax1) lists, each empty or of length A.
ExactSegments check_exact_segments(at::TensorList params, at::TensorList grads, at::TensorList masters,
                                   at::TensorList remainders, at::TensorList s0, at::TensorList a0,
                                   at::TensorList s1, at::TensorList a1, const at::Tensor& seg_ids,
                                   const at::Tensor& param_ids, int64_t storage, int64_t S) {
  TORCH_CHECK(storage >= kStoreF32 && storage <= kStoreInt8, "fusedlars cpu: storage must be 0 (fp32), 1 (bf16) or 2 (int8)");
  const Segments base = check_segments(params, grads, masters, {}, {}, seg_ids, S);
  check_table(param_ids, "param_ids", at::kLong, S);
  ExactSegments g;
  g.variant = base.variant;
  g.numel = base.numel;
  const int64_t A = static_cast<int64_t>(params.size());
  TORCH_CHECK(remainders.empty() || (static_cast<int64_t>(remainders.size()) == A && masters.empty()),
              "fusedlars cpu: remainders need one int16 tensor per param and no fp32 masters");
  if (!remainders.empty() && A) {
    TORCH_CHECK(params[0].scalar_type() == at::kBFloat16, "fusedlars cpu: remainder masters need bf16 params");
    g.variant = kBF16Remainder;
  }
  const at::ScalarType sdt = storage == kStoreF32 ? at::kFloat : storage == kStoreBF16 ? at::kBFloat16 : at::kByte;
  for (const auto& [lst, al] : {std::pair<at::TensorList, at::TensorList>{s0, a0}, {s1, a1}}) {
    TORCH_CHECK(lst.empty() || static_cast<int64_t>(lst.size()) == A, "fusedlars cpu: state has ", lst.size(),
                " tensors for ", A, " params");
    TORCH_CHECK(storage != kStoreInt8 || al.size() == lst.size(), "fusedlars cpu: int8 state needs its absmax scales");
  }
  const int64_t* pid = param_ids.data_ptr<int64_t>();
  const int64_t* ids = seg_ids.data_ptr<int64_t>();
  g.bases.resize(A);
  for (int64_t i = 0; i < A; ++i) {
    ExactTile& b = g.bases[i];
    b = ExactTile{params[i].data_ptr(), base.bases[i].master, nullptr, grads[i].data_ptr(), nullptr, nullptr,
                  nullptr, nullptr, 0, 0, static_cast<uint32_t>(pid[ids[i]]), 0};
    if (!remainders.empty()) {
      check_entry(remainders[i], params[i], "remainders", i, at::kShort);
      b.rem = remainders[i].data_ptr<int16_t>();
    }
    const int64_t nb = (params[i].numel() + lowbit::kQBlock - 1) / lowbit::kQBlock;
    auto take = [&](at::TensorList lst, at::TensorList al, void*& sp, float*& ap) {
      if (lst.empty()) return;
      check_entry(lst[i], params[i], "state", i, sdt);
      sp = lst[i].data_ptr();
      if (storage == kStoreInt8) {
        TORCH_CHECK(al[i].device().is_cpu() && al[i].is_contiguous() && al[i].scalar_type() == at::kFloat &&
                        al[i].numel() == nb,
                    "fusedlars cpu: absmax[", i, "] must be a contiguous CPU float tensor of ", nb, " blocks");
        ap = al[i].data_ptr<float>();
      }
    };
    take(s0, a0, b.s0, b.a0);
    take(s1, a1, b.s1, b.a1);
  }
  return g;
}

ExactTile exact_tile_of(const std::vector<ExactTile>& bases, const Plan& p, int64_t t, uint64_t step_after) {
  ExactTile a = bases[p.t_seg[t]];
  a.start = p.t_start[t];
  a.len = p.t_len[t];
  a.step_after = step_after;
  return a;
}

void lars_step_lowbit_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                          at::TensorList remainders, at::TensorList momentum, at::TensorList momentum_absmax,
                          const at::Tensor& seg_ids, const at::Tensor& param_ids, const at::Tensor& wd_mask,
                          const at::Tensor& adapt_mask, const at::Tensor& has_state, const at::Tensor& step,
                          const at::Tensor& w_norm, const at::Tensor& g_norm, const at::Tensor& u_norm,
                          const at::Tensor& trust_ratio, const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& w_sumsq,
                          const std::optional<at::Tensor>& sums, int64_t storage, int64_t seed,
                          at::ArrayRef<double> hyper, at::ArrayRef<int64_t> modes) {
  const LarsOptions o = lars_options(hyper, modes, "fusedlars cpu: lars_step_lowbit_cpu");
  Common c = check_common(wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale,
                          found_inf);
  const bool mom = o.momentum != 0.0;
  TORCH_CHECK(!mom || !momentum.empty() || params.empty(), "fusedlars cpu: momentum != 0 needs momentum buffers");
  const ExactSegments g = check_exact_segments(params, grads, masters, remainders, mom ? momentum : at::TensorList(),
                                               momentum_absmax, {}, {}, seg_ids, param_ids, storage, c.S);
  // NOTE [Phases]' phase 3: the gradients' sums of squares are given (row 1 of `sums`)
  const double* ext = sums ? check_phase(3, sums, c.S) : nullptr;
  TORCH_CHECK(!ext || o.denominator != kNormOfSum, "fusedlars cpu: given sums cannot give ||g + lam*w||");
  double* wss = nullptr;
  if (w_sumsq) {
    check_table(*w_sumsq, "w_sumsq", at::kDouble, c.S);
    wss = w_sumsq->data_ptr<double>();
  }
  if (c.skip) return;  // NOTE [Skips]: codes, scales, bf16 bits and remainders unchanged
  const ExactCtx x{static_cast<int>(storage), static_cast<uint64_t>(seed), c.inv_scale, 1.0, 0, o.maximize ? 1 : 0};
  const int64_t bpe = weight_bytes(g.variant == kBF16Remainder ? kBF16Master : g.variant) + grad_bytes(g.variant);
  const Plan p = make_plan(g.numel, seg_ids.data_ptr<int64_t>(), bpe, group_budget(kLarsBudget));
  const KernelTable& k = table();
  std::vector<double> part(3 * p.num_tiles());
  const int nth = plan_threads(p);
  const int64_t NS = static_cast<int64_t>(p.seg.size());
  std::vector<LarsExactCoef> coef(static_cast<size_t>(nth) * NS);
  std::vector<float> step0(NS), has0(NS);
  // carried[si]: ||w||^2 from w_sumsq when the gradients' sums are given: pass 1 reads nothing
  // (NOTE [Carried weight norms of the exact step] in exact_impl.h)
  std::vector<char> carried(NS, 0);
  for (int64_t si = 0; si < NS; ++si) {
    step0[si] = c.step[p.seg[si]];
    has0[si] = c.has_state[p.seg[si]];
    if (ext && wss) carried[si] = !(wss[p.seg[si]] < 0.0);  // NaN is a valid (carried) value
  }
  std::vector<double> part2(wss ? p.num_tiles() : 0);  // pass 2: the new weights' squares
  std::vector<double> part3(ext ? p.num_tiles() : 0);  // pass 2, given sums: (g + lam*w)^2 for u_norm
  auto step_after = [&](int64_t si) { return static_cast<uint64_t>(static_cast<double>(step0[si]) + 1.0); };
  run_plan(
      p, nth,
      [&](int64_t t) {
        const int64_t si = p.t_seg[t];
        if (ext) {  // the gradients' sums are given: the weights' alone, unless carried
          part[3 * t] = part[3 * t + 1] = part[3 * t + 2] = 0.0;
          if (!carried[si]) k.lars_exact_wsumsq(exact_tile_of(g.bases, p, t, 0), g.variant, &part[3 * t]);
          return;
        }
        const double lam = c.lam(o.weight_decay, p.seg[si]);
        k.lars_exact_sumsq(exact_tile_of(g.bases, p, t, 0), g.variant, x, lam, &part[3 * t]);
      },
      [&](int64_t si, int slot, bool commit) {
        const int64_t s = p.seg[si];
        double ssq[3];
        segment_sums<3>(p, part, si, ssq);
        if (ext) {  // ||g + lam*w|| is not used by the math (not norm_of_sum): pass 2 sums it for u_norm
          if (carried[si]) ssq[0] = wss[s];
          ssq[1] = ext[c.S + s];
          ssq[2] = std::numeric_limits<double>::quiet_NaN();
        }
        const LarsSegment r = c.lars_scalars(o, s, ssq, step0[si]);
        coef[slot * NS + si] = lars_exact_coef(o, r, c.lr, has0[si] != 0);
        if (commit) c.commit(s, r.n_w, r.n_g, r.n_u, r.r, step0[si]);
      },
      [&](int64_t t, int slot) {
        const int64_t si = p.t_seg[t];
        const double lam_u = c.lam(o.weight_decay, p.seg[si]);
        k.lars_exact_update(exact_tile_of(g.bases, p, t, step_after(si)), g.variant, x, coef[slot * NS + si],
                            wss ? &part2[t] : nullptr, lam_u, ext ? &part3[t] : nullptr);
      });
  // per segment, tiles in order (as the coefficient phase sums pass 1's partials)
  for (int64_t si = 0; si < NS; ++si) {
    const int64_t s = p.seg[si];
    if (wss) segment_sums<1>(p, part2, si, &wss[s]);
    if (ext) {  // what the two-pass step reports (lars_segment's n_u from pass 1's out[2])
      double u2;
      segment_sums<1>(p, part3, si, &u2);
      c.u_norm[s] = static_cast<float>(std::sqrt(u2));
    }
  }
}

void lamb_step_lowbit_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                          at::TensorList remainders, at::TensorList exp_avg, at::TensorList exp_avg_absmax,
                          at::TensorList exp_avg_sq, at::TensorList exp_avg_sq_absmax, const at::Tensor& seg_ids,
                          const at::Tensor& param_ids, const at::Tensor& wd_mask, const at::Tensor& adapt_mask,
                          const at::Tensor& has_state, const at::Tensor& step, const at::Tensor& w_norm,
                          const at::Tensor& g_norm, const at::Tensor& u_norm, const at::Tensor& trust_ratio,
                          const at::Tensor& lr, const std::optional<at::Tensor>& inv_scale,
                          const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& clip_coef,
                          int64_t storage, int64_t seed, at::ArrayRef<double> hyper, at::ArrayRef<int64_t> modes) {
  const LambOptions o = lamb_options(hyper, modes, "fusedlars cpu: lamb_step_lowbit_cpu");
  Common c = check_common(wd_mask, adapt_mask, has_state, step, w_norm, g_norm, u_norm, trust_ratio, lr, inv_scale,
                          found_inf);
  TORCH_CHECK(params.empty() || (exp_avg.size() == params.size() && exp_avg_sq.size() == params.size()),
              "fusedlars cpu: lamb_step_lowbit_cpu needs exp_avg and exp_avg_sq for every param");
  const ExactSegments g = check_exact_segments(params, grads, masters, remainders, exp_avg, exp_avg_absmax,
                                               exp_avg_sq, exp_avg_sq_absmax, seg_ids, param_ids, storage, c.S);
  if (c.skip) return;
  ExactCtx x{static_cast<int>(storage), static_cast<uint64_t>(seed), c.inv_scale, 1.0, 0, o.maximize ? 1 : 0};
  if (clip_coef) {
    check_scalar(*clip_coef, "clip_coef");
    x.clip = clip_coef->item<double>();
    x.has_clip = 1;
  }
  const int64_t sb = storage == kStoreF32 ? 8 : storage == kStoreBF16 ? 4 : 2;
  const int64_t bpe = weight_bytes(g.variant == kBF16Remainder ? kBF16Master : g.variant) + grad_bytes(g.variant) + sb;
  const Plan p = make_plan(g.numel, seg_ids.data_ptr<int64_t>(), bpe, group_budget(kLambBudget));
  const KernelTable& k = table();
  std::vector<double> part(3 * p.num_tiles());
  const int nth = plan_threads(p);
  const int64_t NS = static_cast<int64_t>(p.seg.size());
  std::vector<LambExactCoef> coef(static_cast<size_t>(nth) * NS);
  std::vector<float> step0(NS);
  for (int64_t si = 0; si < NS; ++si) {
    const int64_t s = p.seg[si];
    step0[si] = c.step[s];
    const LambExactCoef c0 = lamb_exact_coef(o, (x.neg ? -x.inv : x.inv) / x.clip, c.lam(o.weight_decay, s), c.lr,
                                             static_cast<double>(step0[si]) + 1.0);
    for (int j = 0; j < nth; ++j) coef[j * NS + si] = c0;
  }
  auto step_after = [&](int64_t si) { return static_cast<uint64_t>(static_cast<double>(step0[si]) + 1.0); };
  run_plan(
      p, nth,
      [&](int64_t t) {
        k.lamb_exact_pass1(exact_tile_of(g.bases, p, t, 0), g.variant, x, coef[p.t_seg[t]], &part[3 * t]);
      },
      [&](int64_t si, int slot, bool commit) {
        const int64_t s = p.seg[si];
        double ssq[3];
        segment_sums<3>(p, part, si, ssq);
        const LambSegment r = lamb_segment(o, ssq[0], ssq[1], ssq[2], c.adapt_mask[s] != 0, c.lr);
        const double t_new = static_cast<double>(step0[si]) + 1.0;
        coef[slot * NS + si].c.k = lamb_exact_step_scale(o, c.lr, r.r, t_new);
        if (commit) c.commit(s, r.n_w, r.n_g, r.n_u, r.r, step0[si]);
      },
      [&](int64_t t, int slot) {
        const int64_t si = p.t_seg[t];
        k.lamb_exact_pass2(exact_tile_of(g.bases, p, t, step_after(si)), g.variant, x, coef[slot * NS + si]);
      });
}

at::Tensor grad_sumsq_cpu(at::TensorList grads, const std::optional<at::Tensor>& inv_scale) {
  float gscale = 1.0f;
  if (inv_scale) {
    check_scalar(*inv_scale, "inv_scale");
    gscale = inv_scale->item<float>();
  }
  const int64_t A = static_cast<int64_t>(grads.size());
  std::vector<int64_t> numel(A), ids(A);
  std::vector<TileArgs> bases(A);
  int variant = kF32;
  for (int64_t i = 0; i < A; ++i) {
    const at::Tensor& gr = grads[i];
    TORCH_CHECK(gr.device().is_cpu() && (gr.numel() <= 1 || gr.is_non_overlapping_and_dense()) &&
                    gr.scalar_type() == grads[0].scalar_type(),
                "fusedlars cpu: grads[", i, "] must be a dense CPU tensor of grads[0]'s dtype");
    variant = variant_of(gr.scalar_type(), false);
    bases[i] = TileArgs{nullptr, nullptr, gr.data_ptr(), nullptr, nullptr, 0, 0};
    numel[i] = gr.numel();
    ids[i] = i;
  }
  const Plan p = make_plan(numel, ids.data(), 0, 0);
  std::vector<double> part(p.num_tiles());
  const KernelTable& k = table();
  at::parallel_for(0, p.num_tiles(), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) k.grad_sumsq(tile_of(bases, p, t), variant, gscale, &part[t]);
  });
  double total = 0.0;  // segment order, tile order
  for (int64_t si = 0; si < static_cast<int64_t>(p.seg.size()); ++si) {
    double seg;
    segment_sums<1>(p, part, si, &seg);
    total += seg;
  }
  return at::scalar_tensor(total, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

// Which kernel table runs; `want` (avx512 | avx2 | generic) switches it (tests compare ISAs).
std::string cpu_isa(c10::string_view want) {
  if (!want.empty()) {
    std::string w(want);
    TORCH_CHECK(table_named(w) != nullptr, "fusedlars cpu: unknown ISA '", w, "' (avx512, avx2, generic)");
    TORCH_CHECK(cpu_has(w.c_str()), "fusedlars cpu: this CPU does not support ", w);
    g_table.store(table_named(w));
  }
  return table().name;
}

}  // namespace cpu
}  // namespace fusedlars

TORCH_LIBRARY_IMPL(fusedlars, CPU, m) {
  m.impl("lars_step_cpu", &fusedlars::cpu::lars_step_cpu);
  m.impl("lamb_step_cpu", &fusedlars::cpu::lamb_step_cpu);
  m.impl("grad_sumsq_cpu", &fusedlars::cpu::grad_sumsq_cpu);
  m.impl("lars_step_lowbit_cpu", &fusedlars::cpu::lars_step_lowbit_cpu);
  m.impl("lamb_step_lowbit_cpu", &fusedlars::cpu::lamb_step_lowbit_cpu);
}
