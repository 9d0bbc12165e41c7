// Fused CUDA LARS / TVLARS / LAMB steps over a bucket: segments (parameter tensors) reached through a
// per-segment table of base addresses (launch.h Addr: the user's params and grads, our state and
// masters), cut into tiles of kTileElems elements of one segment each. Math: csrc/lars_math.h (shared
// with the CPU kernels); spec: fusedlars/backends/reference.py. Host interface: launch.h (no torch here).
//
// One step of a bucket is ONE cooperative launch of a persistent grid (a few blocks per SM):
//
//   for each group of segments (consecutive segments whose pass-1 bytes fit in about half the L2,
//   chosen by fusedlars/backends/cuda.py; one group when the bucket fits):
//     phase 1  each block takes a contiguous range of the group's tiles and writes per-tile partial
//              sums of squares (LARS: w^2, g^2, (g+lam*w)^2; LAMB: w_d^2, u^2, g^2 after writing the
//              new moments) into the preallocated Plan::part; it also snapshots step / has_state of
//              a strided share of the group's segments into Plan::snap;
//     grid.sync()
//     phase 2  each block, for every segment its tiles belong to, reduces that segment's partials in
//              a FIXED order (thread-strided over tiles, then a fixed warp/block tree) into the trust
//              ratio and element coefficients, and updates its own tiles, the same ones it read in
//              phase 1 (still in L2); a strided share of the segments is "finished" (norms, ratio,
//              step + 1, has_state = 1) from the same reduction.
//
// Fallback (no cooperative launch on the device, FUSEDLARS_CUDA_COOP=0, or path=2): the same kernel
// launched twice, phase 1 then phase 2, over the whole bucket. Both paths compute every number with
// the same operations in the same order, so their results are bitwise identical, and identical for
// any grid size (a tile's partial belongs to one block; a segment's reduction order depends only on
// kThreads).
//
// FSDP2 split (path kPathPartials, then kPathApply; fusedlars/backends/cuda.py lars_partials / apply):
// phase 1 plus segment_reduce, which writes each segment's sums (the same fixed-order reduction as
// phase 2's) into Plan::ssq_out; the caller all-reduces them over the ranks; then phase 2 alone,
// reading the sums from Plan::ssq_in instead of reducing partials. With unreduced sums this is
// bitwise the two-launch step.
//
// LARS from the grads' sums of squares taken in backward (launch.h kPathGivenG2, on any of the paths
// above but apply): pass 1 sums the weights alone, NOTE [Grad sums from backward].
//
// NOTE: [Skips] found_inf != 0 (read on the device) makes every block return before touching
// anything, including has_state / step. Segments with active == 0 are skipped by every phase.
//
// NOTE: [Vector access] Params and grads are the user's tensors: a segment's base addresses (param,
// grad, master, state; launch.h Addr) can sit at any element offset (DDP bucket views, FSDP2 shards).
// Each block decides per segment, from the addresses themselves: when every base the kernel touches
// is 16-byte aligned, groups of VEC = 16 / sizeof(param) elements are accessed with 128-bit loads and
// stores (2 x 128 bit for the fp32 state of a 16-bit param), else element by element. Both ways run
// the SAME groups of VEC elements per thread, in the same order, through the same math (for_tile):
// only the width of the loads and stores differs, so the per-thread fp32 partial sums, and every
// result, are bitwise identical for aligned and unaligned tensors. Tiles start at multiples of
// kTileElems inside their segment, so a tile of an aligned segment is aligned too. A tile's last
// len % VEC elements go element by element on both ways. Offsets are int64 (segments above 2^31
// elements); a tile's length fits an int.
//
// NOTE: [Inactive segments] A segment without a grad this step has address 0 in the grad row (and
// maybe in every row: no state yet). Every loop checks active[s] before it builds the segment's
// pointers (Mem), so nothing of an inactive segment is ever dereferenced.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>

#include "../lowbit.h"
#include "launch.h"

namespace cg = cooperative_groups;

namespace fusedlars {
namespace cuda {
namespace {

constexpr int kWarps = kThreads / 32;

// ------------------------------------------------------------------------------------------------
// element conversion and vector access

template <class T>
struct Cvt;
template <>
struct Cvt<float> {
  static __device__ __forceinline__ float in(float x) { return x; }
  static __device__ __forceinline__ float out(float x) { return x; }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float in(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 out(float x) { return __float2bfloat16_rn(x); }
};
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float in(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half out(float x) { return __float2half_rn(x); }
};

// M elements at p as fp32: with V (p 16-byte aligned, M * sizeof(T) a multiple of 16) as 128-bit
// loads, else element by element. Either way x[j] = p[j].
template <int M, bool V, class T>
__device__ __forceinline__ void vload(const T* p, float (&x)[M]) {
  if constexpr (!V) {
#pragma unroll
    for (int j = 0; j < M; ++j) x[j] = Cvt<T>::in(p[j]);
  } else {
    static_assert((M * sizeof(T)) % 16 == 0, "vector access is 128-bit");
    constexpr int E = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < M / E; ++k) {
      const uint4 raw = reinterpret_cast<const uint4*>(p)[k];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int j = 0; j < E; ++j) x[k * E + j] = Cvt<T>::in(e[j]);
    }
  }
}

template <int M, bool V, class T>
__device__ __forceinline__ void vstore(T* p, const float (&x)[M]) {
  if constexpr (!V) {
#pragma unroll
    for (int j = 0; j < M; ++j) p[j] = Cvt<T>::out(x[j]);
  } else {
    constexpr int E = 16 / sizeof(T);
#pragma unroll
    for (int k = 0; k < M / E; ++k) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int j = 0; j < E; ++j) e[j] = Cvt<T>::out(x[k * E + j]);
      reinterpret_cast<uint4*>(p)[k] = raw;
    }
  }
}

__device__ __forceinline__ int64_t base_of(const Addr& b, int row, int64_t s) {
  return row < b.rows ? b.base[row * b.num_segs + s] : 0;
}

// Segment s's buffers (NOTE [Inactive segments]: only for an active s). PT param/grad type; MASTER:
// the weights live in the fp32 master copy. vec: every base it uses is 16-byte aligned.
template <class PT, bool MASTER>
struct Mem {
  PT* p;
  float* m;
  const PT* g;
  float* s0;
  float* s1;
  bool vec;
  Mem() = default;
  __device__ Mem(const Addr& b, int64_t s) {
    const int64_t bp = base_of(b, kRowParam, s), bg = base_of(b, kRowGrad, s);
    const int64_t bm = MASTER ? base_of(b, kRowMaster, s) : 0;
    const int64_t b0 = base_of(b, kRowS0, s), b1 = base_of(b, kRowS1, s);
    p = reinterpret_cast<PT*>(bp);
    m = reinterpret_cast<float*>(bm);
    g = reinterpret_cast<const PT*>(bg);
    s0 = reinterpret_cast<float*>(b0);
    s1 = reinterpret_cast<float*>(b1);
    vec = ((bp | bg | bm | b0 | b1) & 15) == 0;  // NOTE [Vector access]
  }
  template <int M, bool V>
  __device__ __forceinline__ void load_w(int64_t i, float (&w)[M]) const {
    if constexpr (MASTER) vload<M, V>(m + i, w);
    else vload<M, V>(p + i, w);
  }
  template <int M, bool V>
  __device__ __forceinline__ void store_w(int64_t i, const float (&w)[M]) const {
    if constexpr (MASTER) vstore<M, V>(m + i, w);
    vstore<M, V>(p + i, w);
  }
};

// Runs f.template run<M, V>(i) over the tile [st, st + len) of a segment: thread k takes the groups
// of VEC elements k, k + kThreads, ... (128-bit access when vec, element by element otherwise: the
// same groups in the same order, NOTE [Vector access]), then the tail element by element.
template <int VEC, class F>
__device__ __forceinline__ void for_tile(int64_t st, int len, bool vec, F& f) {
  const int nv = len / VEC;
  if (vec && (st % VEC) == 0) {
    for (int v = threadIdx.x; v < nv; v += kThreads) f.template run<VEC, true>(st + static_cast<int64_t>(v) * VEC);
  } else {
    for (int v = threadIdx.x; v < nv; v += kThreads) f.template run<VEC, false>(st + static_cast<int64_t>(v) * VEC);
  }
  for (int i = nv * VEC + threadIdx.x; i < len; i += kThreads) f.template run<1, false>(st + i);
}

// Sum of N doubles over the block, the same value in every thread, in a fixed order: warp shuffle
// tree, then the warps' sums in warp order.
template <int N>
__device__ __forceinline__ void block_sum(double (&x)[N]) {
  __shared__ double sh[N][kWarps];
#pragma unroll
  for (int k = 0; k < N; ++k)
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x[k] += __shfl_down_sync(0xffffffffu, x[k], off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0)
#pragma unroll
    for (int k = 0; k < N; ++k) sh[k][warp] = x[k];
  __syncthreads();
#pragma unroll
  for (int k = 0; k < N; ++k) {
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) s += sh[k][w];
    x[k] = s;
  }
  __syncthreads();  // sh is reused by the next call
}

// A segment's sums of squares: its tiles' partials, thread-strided in tile order, then block_sum.
__device__ __forceinline__ void segment_sums(const Plan& p, int64_t s, double (&ssq)[3]) {
  ssq[0] = ssq[1] = ssq[2] = 0.0;
  const int64_t t1 = p.seg_tile_ptr[s + 1];
  for (int64_t t = p.seg_tile_ptr[s] + threadIdx.x; t < t1; t += kThreads) {
    ssq[0] += p.part[3 * t];
    ssq[1] += p.part[3 * t + 1];
    ssq[2] += p.part[3 * t + 2];
  }
  block_sum<3>(ssq);
}

// NOTE: [Grad sums from backward] (issue #25; launch.h kPathGivenG2) A LARS step whose grads' sums of
// squares were taken in backward (fusedlars/backward_norms.py) gets them as Plan::g2_in, of the raw
// grads: the g^2 row is g2_in[s] * inv_scale^2 in double (the cpu backend's phase 3 scales them the
// same way, fusedlars/backends/cpu.py), pass 1 sums the weights alone (LarsStep::pass1: no grad is
// loaded, its partials' g^2 and (g + lam*w)^2 rows are 0), and the (g + lam*w)^2 row is NaN: it is not
// known without reading g, and is only reported (u_norm; cuda.py declines a ratio that needs it).
// Given the very g^2 a two-pass step computes, the step is bitwise the two-pass step: its w^2 row is
// summed in the same order from the same loads. LAMB never gets g2_in.
__device__ __forceinline__ void given_g2(const Plan& p, int64_t s, double g2_scale, double (&ssq)[3]) {
  ssq[1] = p.g2_in[s] * g2_scale;
  ssq[2] = __builtin_nan("");
}

// The sums a segment's trust ratio is computed from: its partials' (segment_sums) with the given g^2
// (NOTE [Grad sums from backward]), or on the apply launch of the FSDP2 split the given ones
// (Plan::ssq_in, already summed over the ranks). GIVEN: the kind takes given grad sums (LARS; LAMB's
// kernels do not carry the branch).
template <bool GIVEN>
__device__ __forceinline__ void step_sums(const Plan& p, int64_t s, double g2_scale, double (&ssq)[3]) {
  if (p.ssq_in) {
#pragma unroll
    for (int k = 0; k < 3; ++k) ssq[k] = p.ssq_in[k * p.num_segs + s];
  } else {
    segment_sums(p, s, ssq);
    if (GIVEN && p.g2_in) given_g2(p, s, g2_scale, ssq);
  }
}

// Tile t's three partial sums (this block's per-thread sums x): reduced over the block, stored by
// thread 0.
__device__ __forceinline__ void store_partials(const Plan& p, int64_t t, double (&x)[3]) {
  block_sum<3>(x);
  if (threadIdx.x == 0) {
    p.part[3 * t] = x[0];
    p.part[3 * t + 1] = x[1];
    p.part[3 * t + 2] = x[2];
  }
}

// Cooperative path: every block's partials are visible to every block after this.
__device__ __forceinline__ void grid_barrier() {
  __threadfence();
  cg::this_grid().sync();
}

// Segment s's outputs of the step, written by thread 0 of the block that finishes it.
__device__ __forceinline__ void commit_segment(const Segs& sa, const Plan& p, int64_t s, double n_w, double n_g,
                                               double n_u, double r) {
  if (threadIdx.x != 0) return;
  sa.w_norm[s] = static_cast<float>(n_w);
  sa.g_norm[s] = static_cast<float>(n_g);
  sa.u_norm[s] = static_cast<float>(n_u);
  sa.trust_ratio[s] = static_cast<float>(r);
  sa.has_state[s] = 1.f;
  sa.step[s] = p.snap[2 * s] + 1.f;
}

__device__ __forceinline__ double read(const Scalar& s) {
  if (!s.ptr) return s.value;
  return s.is_double ? *static_cast<const double*>(s.ptr) : static_cast<double>(*static_cast<const float*>(s.ptr));
}

// Tiles and segments of one group for this block: tiles [a, b) (contiguous, balanced by tile count),
// segments s0 + blockIdx.x, s0 + blockIdx.x + gridDim.x, ... < s1 for the snapshot / finishing.
struct Range {
  int64_t s0, s1, a, b;
};

__device__ __forceinline__ Range group_range(const Plan& p, int phase, int64_t g) {
  Range r;
  r.s0 = phase == 0 ? p.group_seg[g] : 0;
  r.s1 = phase == 0 ? p.group_seg[g + 1] : p.num_segs;
  const int64_t t0 = p.seg_tile_ptr[r.s0], nt = p.seg_tile_ptr[r.s1] - t0;
  r.a = t0 + nt * blockIdx.x / gridDim.x;
  r.b = t0 + nt * (blockIdx.x + 1) / gridDim.x;
  return r;
}

__device__ __forceinline__ void snapshot(const Plan& p, const Segs& s, const Range& r) {
  if (threadIdx.x == 0)
    for (int64_t k = r.s0 + blockIdx.x; k < r.s1; k += gridDim.x) {
      p.snap[2 * k] = s.step[k];
      p.snap[2 * k + 1] = s.has_state[k];
    }
}

// ------------------------------------------------------------------------------------------------
// the two-phase skeleton, written once for both kinds

// One launch of a LARS or LAMB step. phase 0: both phases with a grid sync (cooperative launch);
// 1: phase 1 only; 2: phase 2 only. K is the kind's step (LarsStep / LambStep below), built once per
// launch from its Args (which has b, s, p, lr, inv_scale, found_inf); it provides
//   K::Coef                 what pass 2 of a segment needs (coefficients, maybe its Mem), computed
//                           once per run of the block's tiles of that segment;
//   pass1(s, st, len, x)    tile [st, st + len) of segment s: this thread's 3 partial sums into x, in
//                           the kind's row order (the rows of Plan::part / ssq_out / ssq_in);
//   coefficients(s, ssq)    segment s's K::Coef from its 3 sums ssq (reads step / has_state from
//                           Plan::snap: phase 2 of the same step may already have advanced them);
//   pass2(s, c, st, len)    the update of tile [st, st + len) of segment s with c;
//   segment(s, ssq)         segment s's n_w, n_g, n_u, r (lars_math.h) for commit_segment;
//   kGivenG2                whether it takes Plan::g2_in (NOTE [Grad sums from backward]).
// Everything else (skip, groups, snapshots, tile ranges, partials, barrier, fixed-order segment
// reduction, finishing) is here, so the two kinds cannot drift apart.
template <class K>
__device__ __forceinline__ void two_phase(const typename K::Args& a, const int phase) {
  if (a.found_inf.ptr && read(a.found_inf) != 0.0) return;  // GradScaler skip: nothing changes
  const K k(a);
  const Plan& p = a.p;
  // NOTE [Grad sums from backward]
  const double g2_scale = K::kGivenG2 && p.g2_in ? read(a.inv_scale) * read(a.inv_scale) : 0.0;
  const int64_t ng = phase == 0 ? p.num_groups : 1;
  for (int64_t gi = 0; gi < ng; ++gi) {
    const Range r = group_range(p, phase, gi);
    if (phase != 2) {
      snapshot(p, a.s, r);
      for (int64_t t = r.a; t < r.b; ++t) {
        const int64_t s = p.tile_seg[t];
        if (a.s.active[s] == 0.f) continue;  // NOTE [Inactive segments]
        double x[3];
        k.pass1(s, p.tile_start[t], p.tile_len[t], x);
        store_partials(p, t, x);
      }
    }
    if (phase == 0) grid_barrier();
    if (phase != 1) {
      int64_t cur = -1;
      typename K::Coef c{};
      for (int64_t t = r.a; t < r.b; ++t) {
        const int64_t s = p.tile_seg[t];
        if (a.s.active[s] == 0.f) continue;
        if (s != cur) {
          double ssq[3];
          step_sums<K::kGivenG2>(p, s, g2_scale, ssq);
          c = k.coefficients(s, ssq);
          cur = s;
        }
        k.pass2(s, c, p.tile_start[t], p.tile_len[t]);
      }
      for (int64_t s = r.s0 + blockIdx.x; s < r.s1; s += gridDim.x) {  // finish the segments
        if (a.s.active[s] == 0.f) continue;
        double ssq[3];
        step_sums<K::kGivenG2>(p, s, g2_scale, ssq);
        const auto sg = k.segment(s, ssq);
        commit_segment(a.s, p, s, sg.n_w, sg.n_g, sg.n_u, sg.r);
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------
// LARS

// Pass 1 of LARS: this thread's sums of w^2, g^2, (g + lam*w)^2; with GRAD false (NOTE [Grad sums
// from backward]) w^2 alone, in the same order, and no grad is loaded.
template <class PT, bool MASTER, bool GRAD>
struct LarsSumsq {
  Mem<PT, MASTER> mem;
  float gscale, lam;
  float sw = 0.f, sg = 0.f, su = 0.f;
  template <int M, bool V>
  __device__ __forceinline__ void run(int64_t i) {
    float w[M], g[M];
    mem.template load_w<M, V>(i, w);
    if constexpr (GRAD) vload<M, V>(mem.g + i, g);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      sw += w[j] * w[j];
      if constexpr (GRAD) {
        const float gj = g[j] * gscale;
        const float u = gj + lam * w[j];
        sg += gj * gj;
        su += u * u;
      }
    }
  }
};

template <class PT, bool MASTER, int WD, int MOM, bool NEST>
struct LarsUpdate {
  Mem<PT, MASTER> mem;
  float gscale;
  LarsCoef c;
  template <int M, bool V>
  __device__ __forceinline__ void run(int64_t i) {
    float w[M], g[M], b[M];
    mem.template load_w<M, V>(i, w);
    vload<M, V>(mem.g + i, g);
    if constexpr (MOM) vload<M, V>(mem.s0 + i, b);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      float bj = MOM ? b[j] : 0.f;
      w[j] = lars_update<WD, MOM, NEST>(c, w[j], g[j] * gscale, bj);
      b[j] = bj;
    }
    if constexpr (MOM) vstore<M, V>(mem.s0 + i, b);
    mem.template store_w<M, V>(i, w);
  }
};

// (The segment's pointers are rebuilt per tile, from the address table: held across the tile loop
// they made ptxas spill in the master-weight variants under the 3-blocks-per-SM register cap.)
template <class PT, bool MASTER, int WD, int MOM, bool NEST>
__device__ __forceinline__ void lars_tile_update(const Addr& b, int64_t s, float gscale, const LarsCoef& c,
                                                 int64_t st, int len) {
  LarsUpdate<PT, MASTER, WD, MOM, NEST> f{Mem<PT, MASTER>(b, s), gscale, c};
  for_tile<16 / sizeof(PT)>(st, len, f.mem.vec, f);
}

template <class PT, bool MASTER, int WD>
__device__ __forceinline__ void lars_tile_update_mom(const LarsArgs& a, int64_t s, float gscale, const LarsCoef& c,
                                                     int64_t st, int len) {
  if (a.o.momentum == 0.0) lars_tile_update<PT, MASTER, WD, 0, false>(a.b, s, gscale, c, st, len);
  else if (a.o.nesterov) lars_tile_update<PT, MASTER, WD, 1, true>(a.b, s, gscale, c, st, len);
  else lars_tile_update<PT, MASTER, WD, 1, false>(a.b, s, gscale, c, st, len);
}

// The LARS step for two_phase. Partials (per tile, then per segment): [w^2, g^2, (g + lam*w)^2],
// g = grad * inv_scale (negated for maximize).
template <class PT, bool MASTER>
struct LarsStep {
  using Args = LarsArgs;
  using Coef = LarsCoef;  // Mem is rebuilt per tile (lars_tile_update)
  static constexpr bool kGivenG2 = true;  // NOTE [Grad sums from backward]
  const LarsArgs& a;
  const float gscale;
  const double lr;

  static __device__ __forceinline__ float gscale_of(const LarsArgs& a) {
    const double inv = read(a.inv_scale);
    return static_cast<float>(a.o.maximize ? -inv : inv);
  }
  __device__ __forceinline__ explicit LarsStep(const LarsArgs& args)
      : a(args), gscale(gscale_of(args)), lr(read(args.lr)) {}

  __device__ __forceinline__ void pass1(int64_t s, int64_t st, int len, double (&x)[3]) const {
    if (a.p.g2_in) {  // NOTE [Grad sums from backward]: the weights alone
      LarsSumsq<PT, MASTER, false> f{Mem<PT, MASTER>(a.b, s), 0.f, 0.f};
      for_tile<16 / sizeof(PT)>(st, len, f.mem.vec, f);
      x[0] = f.sw;
      x[1] = x[2] = 0.0;
      return;
    }
    LarsSumsq<PT, MASTER, true> f{Mem<PT, MASTER>(a.b, s), gscale,
                                  static_cast<float>(a.o.weight_decay * static_cast<double>(a.s.wd_mask[s]))};
    for_tile<16 / sizeof(PT)>(st, len, f.mem.vec, f);
    x[0] = f.sw;
    x[1] = f.sg;
    x[2] = f.su;
  }

  __device__ __forceinline__ LarsSegment segment(int64_t s, const double (&ssq)[3]) const {
    const double lam = a.o.weight_decay * static_cast<double>(a.s.wd_mask[s]);
    const bool adapt = a.o.adapt_enabled && a.s.adapt_mask[s] != 0.f;
    return lars_segment(a.o, ssq[0], ssq[1], ssq[2], lam, adapt, static_cast<double>(a.p.snap[2 * s]), lr);
  }

  __device__ __forceinline__ LarsCoef coefficients(int64_t s, const double (&ssq)[3]) const {
    const Plan& p = a.p;
    return lars_coef(a.o, segment(s, ssq), lr, p.snap[2 * s + 1] != 0.f);
  }

  __device__ __forceinline__ void pass2(int64_t s, const LarsCoef& c, int64_t st, int len) const {
    switch (a.o.wd_mode) {
      case kLarsL2: lars_tile_update_mom<PT, MASTER, kLarsL2>(a, s, gscale, c, st, len); break;
      case kLarsDecoupled: lars_tile_update_mom<PT, MASTER, kLarsDecoupled>(a, s, gscale, c, st, len); break;
      default: lars_tile_update_mom<PT, MASTER, kLarsRatioOnly>(a, s, gscale, c, st, len); break;
    }
  }
};

template <class PT, bool MASTER>
__global__ void __launch_bounds__(kThreads, 3) lars_kernel(const LarsArgs a, const int phase) {
  two_phase<LarsStep<PT, MASTER>>(a, phase);
}

// ------------------------------------------------------------------------------------------------
// LAMB

template <class PT, bool MASTER, int WD>
struct LambPass1 {
  Mem<PT, MASTER> mem;
  LambCoef c;
  float sw = 0.f, sg = 0.f, su = 0.f;
  template <int M, bool V>
  __device__ __forceinline__ void run(int64_t i) {
    float w[M], g[M], m[M], v[M];
    mem.template load_w<M, V>(i, w);
    vload<M, V>(mem.g + i, g);
    vload<M, V>(mem.s0 + i, m);
    vload<M, V>(mem.s1 + i, v);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float gj = g[j] * c.gscale;
      sg += gj * gj;
      lamb_moments<WD>(c, w[j], gj, m[j], v[j]);
      const float wd = lamb_decayed_weight<WD>(c, w[j]);
      const float u = lamb_direction<WD>(c, w[j], m[j], v[j]);
      sw += wd * wd;
      su += u * u;
    }
    vstore<M, V>(mem.s0 + i, m);
    vstore<M, V>(mem.s1 + i, v);
  }
};

template <class PT, bool MASTER, int WD>
struct LambPass2 {
  Mem<PT, MASTER> mem;
  LambCoef c;
  template <int M, bool V>
  __device__ __forceinline__ void run(int64_t i) {
    float w[M], m[M], v[M];
    mem.template load_w<M, V>(i, w);
    vload<M, V>(mem.s0 + i, m);
    vload<M, V>(mem.s1 + i, v);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float u = lamb_direction<WD>(c, w[j], m[j], v[j]);
      w[j] = lamb_decayed_weight<WD>(c, w[j]) - c.k * u;
    }
    mem.template store_w<M, V>(i, w);
  }
};

// Tile partials in the order of the sharded split's rows (fusedlars/backends/torch.py lamb_partials):
// [w_d^2, u^2, g^2].
template <class PT, bool MASTER, int WD>
__device__ __forceinline__ void lamb_tile1(const Mem<PT, MASTER>& mem, const LambCoef& c, int64_t st, int len,
                                           double (&x)[3]) {
  LambPass1<PT, MASTER, WD> f{mem, c};
  for_tile<16 / sizeof(PT)>(st, len, mem.vec, f);
  x[0] = f.sw;
  x[1] = f.su;
  x[2] = f.sg;
}

template <class PT, bool MASTER, int WD>
__device__ __forceinline__ void lamb_tile2(const Mem<PT, MASTER>& mem, const LambCoef& c, int64_t st, int len) {
  LambPass2<PT, MASTER, WD> f{mem, c};
  for_tile<16 / sizeof(PT)>(st, len, mem.vec, f);
}

// The LAMB step for two_phase. Partials (per tile, then per segment): [w_d^2, u^2, g^2] (lamb_tile1),
// g = grad * inv_scale / clip_coef (negated for maximize).
template <class PT, bool MASTER>
struct LambStep {
  using Args = LambArgs;
  static constexpr bool kGivenG2 = false;  // Plan::g2_in is LARS's
  // pass 2 of a segment: its coefficients and its Mem, held across the block's tiles of the segment
  struct Coef {
    LambCoef c;
    Mem<PT, MASTER> mem;
    __device__ __forceinline__ Coef() : c{} {}  // mem is set before any use (coefficients)
  };
  const LambArgs& a;
  const double gscale;
  const double lr;

  static __device__ __forceinline__ double gscale_of(const LambArgs& a) {
    const double inv = read(a.inv_scale);
    return (a.o.maximize ? -inv : inv) / read(a.clip_coef);
  }
  __device__ __forceinline__ explicit LambStep(const LambArgs& args)
      : a(args), gscale(gscale_of(args)), lr(read(args.lr)) {}

  __device__ __forceinline__ double lam(int64_t s) const {
    return a.o.weight_decay * static_cast<double>(a.s.wd_mask[s]);
  }

  __device__ __forceinline__ void pass1(int64_t s, int64_t st, int len, double (&x)[3]) const {
    // step[s] is written only in phase 2 (after the grid sync / in a later launch)
    const LambCoef c = lamb_coef(a.o, gscale, lam(s), lr, static_cast<double>(a.s.step[s]) + 1.0);
    const Mem<PT, MASTER> mem(a.b, s);
    switch (a.o.wd_mode) {
      case kLambL2: lamb_tile1<PT, MASTER, kLambL2>(mem, c, st, len, x); break;
      case kLambDecoupled: lamb_tile1<PT, MASTER, kLambDecoupled>(mem, c, st, len, x); break;
      default: lamb_tile1<PT, MASTER, kLambInUpdate>(mem, c, st, len, x); break;
    }
  }

  // ssq = [w_d^2, u^2, g^2] (lamb_tile1)
  __device__ __forceinline__ LambSegment segment(int64_t s, const double (&ssq)[3]) const {
    return lamb_segment(a.o, ssq[0], ssq[2], ssq[1], a.s.adapt_mask[s] != 0.f, lr);
  }

  __device__ __forceinline__ Coef coefficients(int64_t s, const double (&ssq)[3]) const {
    const Plan& p = a.p;
    const double t_new = static_cast<double>(p.snap[2 * s]) + 1.0;
    const LambSegment sg = segment(s, ssq);
    Coef out;
    out.c = lamb_coef(a.o, gscale, lam(s), lr, t_new);
    out.c.k = lamb_step_scale(a.o, lr, sg.r, t_new);
    out.mem = Mem<PT, MASTER>(a.b, s);
    return out;
  }

  __device__ __forceinline__ void pass2(int64_t, const Coef& c, int64_t st, int len) const {
    switch (a.o.wd_mode) {
      case kLambL2: lamb_tile2<PT, MASTER, kLambL2>(c.mem, c.c, st, len); break;
      case kLambDecoupled: lamb_tile2<PT, MASTER, kLambDecoupled>(c.mem, c.c, st, len); break;
      default: lamb_tile2<PT, MASTER, kLambInUpdate>(c.mem, c.c, st, len); break;
    }
  }
};

template <class PT, bool MASTER>
__global__ void __launch_bounds__(kThreads, 2) lamb_kernel(const LambArgs a, const int phase) {
  two_phase<LambStep<PT, MASTER>>(a, phase);
}

// ------------------------------------------------------------------------------------------------
// Low-bit state and remainder masters (issue #26): the exact kernels
//
// NOTE: [Exact kernels] With bf16 / int8 state (launch.h Lowbit) or remainder masters, the stored
// state must be the reference's bit for bit given the same per-layer norms (fusedlars/backends/
// lowbit_state.py NOTE [Low-bit state: where values become fp32]). These kernels run the same
// two_phase skeleton (same launches, partials, fixed-order reductions, skips) with the element math
// of csrc/lars_math.h NOTE [Low-bit element math in fp32] (fp32 and uncontracted; the cpu backend's
// csrc/cpu/exact_impl.h does the same), then the storage of csrc/lowbit.h:
// bf16 by stochastic rounding with 16 bits of the Philox call of (seed, step after this step, param
// id, element / P) (lowbit.h NOTE [Stochastic-rounding bits]), int8 as codes of the dynamic-tree maps (__constant__ kTables) with one absmax per
// 256-element block. A tile (kTileElems, a multiple of 256, starting at a multiple of it inside its
// segment) is walked in chunks of kThreads = 256 elements, thread k taking element k of each chunk:
// a chunk is exactly one quantization block (a segment's last one may be short), so its absmax is a
// block reduction (warp max, then the warps' maxima in shared memory; the max of values >= +0 is
// the same in any order, NaN if any value is NaN: lowbit::block_absmax). Pass-1 sums are per-thread
// doubles then block_sum (fixed order). LAMB's pass 1 takes the norms only (the new moments are not
// stored: pass 2 recomputes them from the old state, as the cpu backend does), so both launch paths
// and any grid read the old state in pass 1 and write it once in pass 2. Elements are accessed one by
// one (no 128-bit access: the state is 1 or 2 bytes), so alignment never matters. Separate kernel
// instantiations (exact_lars_kernel / exact_lamb_kernel): the fp32 kernels are unchanged.
static_assert(kThreads == lowbit::kQBlock, "a chunk of the exact kernels is one quantization block");
static_assert(kTileElems % lowbit::kQBlock == 0, "tiles hold whole quantization blocks");

// The quantization maps and midpoints (lowbit.h's host arrays) in constant memory.
struct QTables {
  float smap[256], umap[256], smid[255], umid[255];
};
constexpr QTables q_tables() {
  QTables t{};
  for (int i = 0; i < 256; ++i) {
    t.smap[i] = lowbit::kSignedMap[i];
    t.umap[i] = lowbit::kUnsignedMap[i];
  }
  for (int i = 0; i < 255; ++i) {
    t.smid[i] = lowbit::kSignedMid[i];
    t.umid[i] = lowbit::kUnsignedMid[i];
  }
  return t;
}
__constant__ QTables kTables = q_tables();

// Segment s's buffers for the exact kernels (NOTE [Inactive segments]: only for an active s).
template <class PT, bool MASTER, bool REM>
struct ExMem {
  PT* p;
  float* m;
  int16_t* r;
  const PT* g;
  void* s0;
  void* s1;
  float* a0;
  float* a1;
  __device__ ExMem(const Addr& b, const Lowbit& lb, int64_t s) {
    p = reinterpret_cast<PT*>(base_of(b, kRowParam, s));
    g = reinterpret_cast<const PT*>(base_of(b, kRowGrad, s));
    m = MASTER ? reinterpret_cast<float*>(base_of(b, kRowMaster, s)) : nullptr;
    r = REM ? reinterpret_cast<int16_t*>(base_of(b, lb.row_rem, s)) : nullptr;
    s0 = reinterpret_cast<void*>(base_of(b, kRowS0, s));
    s1 = reinterpret_cast<void*>(base_of(b, kRowS1, s));
    a0 = lb.row_a0 >= 0 ? reinterpret_cast<float*>(base_of(b, lb.row_a0, s)) : nullptr;
    a1 = lb.row_a1 >= 0 ? reinterpret_cast<float*>(base_of(b, lb.row_a1, s)) : nullptr;
  }
  // the weight as fp32 (exact: the master, the param + its remainder, or the param)
  __device__ __forceinline__ float load_w(int64_t i) const {
    if constexpr (REM) return lowbit::master_rebuild(reinterpret_cast<const uint16_t*>(p)[i], r[i]);
    else if constexpr (MASTER) return m[i];
    else return Cvt<PT>::in(p[i]);
  }
  __device__ __forceinline__ void store_w(int64_t i, float w) const {
    if constexpr (REM) {
      uint16_t hb;
      int16_t rb;
      lowbit::master_split(w, hb, rb);
      reinterpret_cast<uint16_t*>(p)[i] = hb;
      r[i] = rb;
    } else {
      if constexpr (MASTER) m[i] = w;
      p[i] = Cvt<PT>::out(w);
    }
  }
};

// The old value of element i of a state buffer (st: its storage), exactly (lowbit_state.decode).
template <int ST>
__device__ __forceinline__ float state_load(const void* st, const float* absmax, bool sign, int64_t i) {
  if constexpr (ST == kStateF32) return static_cast<const float*>(st)[i];
  else if constexpr (ST == kStateBF16) return lowbit::bf16_bits_to_float(static_cast<const uint16_t*>(st)[i]);
  else
    return lowbit::dequantize(static_cast<const uint8_t*>(st)[i], absmax[i / lowbit::kQBlock],
                              sign ? kTables.smap : kTables.umap);
}

// lowbit::block_absmax over the chunk's values (on = this thread holds one), in every thread.
__device__ __forceinline__ float chunk_absmax(float x, bool on) {
  __shared__ float shm[kWarps];
  __shared__ int shn[kWarps];
  const float a = on ? fabsf(x) : 0.0f;
  int nan = a != a;
  float m = nan ? 0.0f : a;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float o = __shfl_xor_sync(0xffffffffu, m, off);
    m = o > m ? o : m;
    nan |= __shfl_xor_sync(0xffffffffu, nan, off);
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    shm[warp] = m;
    shn[warp] = nan;
  }
  __syncthreads();
  float r = 0.0f;
  int any = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    r = shm[w] > r ? shm[w] : r;
    any |= shn[w];
  }
  __syncthreads();  // shm / shn are reused by the next chunk
  return any ? lowbit::float_from_bits(lowbit::kScaleNaN) : r;
}

// Stores the new value s32 of element i (on: this thread holds one; every thread of the block calls
// it for a chunk, int8 reduces over the chunk) of a state buffer; rand: its Philox word (bf16).
template <int ST>
__device__ __forceinline__ void state_store(void* st, float* absmax, bool sign, int64_t i, bool on, float s32,
                                            uint32_t rand) {
  if constexpr (ST == kStateF32) {
    if (on) static_cast<float*>(st)[i] = s32;
  } else if constexpr (ST == kStateBF16) {
    if (on) static_cast<uint16_t*>(st)[i] = lowbit::bf16_sr_bits(s32, rand);
  } else {
    const float scale = chunk_absmax(s32, on);
    if (on) {
      static_cast<uint8_t*>(st)[i] = lowbit::quantize_code(lowbit::normalize(s32, scale), sign ? kTables.smid : kTables.umid);
      if ((threadIdx.x) == 0) absmax[i / lowbit::kQBlock] = scale;  // the chunk's first element
    }
  }
}

// Stochastic-rounding bits of element i of segment s for each of `buffers` state buffers (lowbit.h
// NOTE [Stochastic-rounding bits]: the Philox call of counter (i / (8 / buffers), step after this step,
// param id), one half each; the P neighbours sharing the call compute it alongside).
__device__ __forceinline__ void sr_bits_of(const Lowbit& lb, uint64_t step_after, int64_t s, int64_t i, int buffers,
                                           uint32_t (&w)[2]) {
  lowbit::sr_bits(lb.seed, step_after, static_cast<uint32_t>(lb.param_id[s]), static_cast<uint64_t>(i), buffers, w);
}

// the reference's _grad: ((grad * inv) / clip), negated for maximize
struct ExGrad {
  double inv, clip;
  bool neg;
  __device__ __forceinline__ double operator()(float g) const {
    double x = static_cast<double>(g) * inv;
    x = x / clip;
    return neg ? -x : x;
  }
};

// Calls f(i, on) for the chunks of tile [st, st + len): every thread for every chunk (int8 reduces
// over a chunk), i = st + chunk * 256 + threadIdx.x, on = i < st + len.
template <class F>
__device__ __forceinline__ void for_chunks(int64_t st, int len, F&& f) {
  for (int c = 0; c < len; c += kThreads) {
    const int k = c + static_cast<int>(threadIdx.x);
    f(st + k, k < len);
  }
}

template <class PT, bool MASTER, bool REM, int ST>
struct ExactLarsStep {
  using Args = LarsArgs;
  struct Coef {
    LarsExactCoef c;
    uint64_t step_after;
    __device__ __forceinline__ Coef() : c{}, step_after(0) {}
  };
  static constexpr bool kGivenG2 = false;  // cuda.py declines given grad sums for low-bit state
  const LarsArgs& a;
  const ExGrad gr;
  const double lr;
  __device__ __forceinline__ explicit ExactLarsStep(const LarsArgs& args)
      : a(args), gr{read(args.inv_scale), 1.0, args.o.maximize != 0}, lr(read(args.lr)) {}

  __device__ __forceinline__ double lam(int64_t s) const {
    return a.o.weight_decay * static_cast<double>(a.s.wd_mask[s]);
  }

  __device__ __forceinline__ void pass1(int64_t s, int64_t st, int len, double (&x)[3]) const {
    const ExMem<PT, MASTER, REM> mem(a.b, a.lb, s);
    const double l = lam(s);
    double sw = 0.0, sg = 0.0, su = 0.0;
    for_chunks(st, len, [&](int64_t i, bool on) {
      if (!on) return;
      const double w = mem.load_w(i), g = gr(Cvt<PT>::in(mem.g[i]));
      const double u = g + l * w;
      sw += w * w;
      sg += g * g;
      su += u * u;
    });
    x[0] = sw;
    x[1] = sg;
    x[2] = su;
  }

  __device__ __forceinline__ LarsSegment segment(int64_t s, const double (&ssq)[3]) const {
    const bool adapt = a.o.adapt_enabled && a.s.adapt_mask[s] != 0.f;
    return lars_segment(a.o, ssq[0], ssq[1], ssq[2], lam(s), adapt, static_cast<double>(a.p.snap[2 * s]), lr);
  }

  __device__ __forceinline__ Coef coefficients(int64_t s, const double (&ssq)[3]) const {
    Coef out;
    out.c = lars_exact_coef(a.o, segment(s, ssq), lr, a.p.snap[2 * s + 1] != 0.f);
    out.step_after = static_cast<uint64_t>(static_cast<double>(a.p.snap[2 * s]) + 1.0);
    return out;
  }

  __device__ __forceinline__ void pass2(int64_t s, const Coef& cf, int64_t st, int len) const {
    const ExMem<PT, MASTER, REM> mem(a.b, a.lb, s);
    const LarsExactCoef& c = cf.c;
    const bool mom = c.mom != 0;
    // lars_math.h NOTE [Low-bit element math in fp32]: fp32, uncontracted (--fmad=false)
    const float gscale = static_cast<float>(gr.neg ? -gr.inv : gr.inv);
    for_chunks(st, len, [&](int64_t i, bool on) {
      float s32 = 0.0f;
      if (on) {
        const float w = static_cast<float>(mem.load_w(i)), g = Cvt<PT>::in(mem.g[i]) * gscale;
        float b = mom ? state_load<ST>(mem.s0, mem.a0, true, i) : 0.0f;
        mem.store_w(i, lars_exact_update<float>(c, w, g, b));
        s32 = b;
      }
      if (mom) {  // uniform over the block
        uint32_t rw[2] = {0u, 0u};
        if (ST == kStateBF16 && on) sr_bits_of(a.lb, cf.step_after, s, i, 1, rw);
        state_store<ST>(mem.s0, mem.a0, true, i, on, s32, rw[0]);
      }
    });
  }
};

template <class PT, bool MASTER, bool REM, int ST>
struct ExactLambStep {
  using Args = LambArgs;
  struct Coef {
    LambExactCoef c;
    uint64_t step_after;
    __device__ __forceinline__ Coef() : c{}, step_after(0) {}
  };
  static constexpr bool kGivenG2 = false;
  const LambArgs& a;
  const ExGrad gr;
  const double lr;
  __device__ __forceinline__ explicit ExactLambStep(const LambArgs& args)
      : a(args), gr{read(args.inv_scale), read(args.clip_coef), args.o.maximize != 0}, lr(read(args.lr)) {}

  __device__ __forceinline__ double lam(int64_t s) const {
    return a.o.weight_decay * static_cast<double>(a.s.wd_mask[s]);
  }

  // the fp32 gradient factor (lars_math.h NOTE [Low-bit element math in fp32]): +-inv_scale / clip_coef
  __device__ __forceinline__ double gscale() const { return (gr.neg ? -gr.inv : gr.inv) / gr.clip; }

  // one element in fp32: the new moments (m, v), the direction u; g64: the exact scaled grad (for
  // ||g||); returns w_d
  __device__ __forceinline__ float element(const ExMem<PT, MASTER, REM>& mem, const LambExactCoef& c, int64_t i,
                                           float& m, float& v, float& u, double& g64) const {
    const float w = mem.load_w(i), g = Cvt<PT>::in(mem.g[i]);
    g64 = gr(g);
    m = state_load<ST>(mem.s0, mem.a0, true, i);
    v = state_load<ST>(mem.s1, mem.a1, false, i);
    return lamb_exact_direction<float>(c, w, g * c.c.gscale, m, v, u);
  }

  // rows [w_d^2, u^2, g^2] as the fp32 LAMB kernel's (g before l2), in double
  __device__ __forceinline__ void pass1(int64_t s, int64_t st, int len, double (&x)[3]) const {
    const ExMem<PT, MASTER, REM> mem(a.b, a.lb, s);
    // step[s] is written only in phase 2 (after the grid sync / in a later launch)
    const LambExactCoef c = lamb_exact_coef(a.o, gscale(), lam(s), lr, static_cast<double>(a.s.step[s]) + 1.0);
    double sw = 0.0, su = 0.0, sg = 0.0;
    for_chunks(st, len, [&](int64_t i, bool on) {
      if (!on) return;
      float m, v, u;
      double g;
      const double wd = element(mem, c, i, m, v, u, g);
      sw += wd * wd;
      su += static_cast<double>(u) * static_cast<double>(u);
      sg += g * g;
    });
    x[0] = sw;
    x[1] = su;
    x[2] = sg;
  }

  __device__ __forceinline__ LambSegment segment(int64_t s, const double (&ssq)[3]) const {
    return lamb_segment(a.o, ssq[0], ssq[2], ssq[1], a.s.adapt_mask[s] != 0.f, lr);
  }

  __device__ __forceinline__ Coef coefficients(int64_t s, const double (&ssq)[3]) const {
    const double t_new = static_cast<double>(a.p.snap[2 * s]) + 1.0;
    Coef out;
    out.c = lamb_exact_coef(a.o, gscale(), lam(s), lr, t_new);
    out.c.c.k = lamb_exact_step_scale(a.o, lr, segment(s, ssq).r, t_new);
    out.step_after = static_cast<uint64_t>(t_new);
    return out;
  }

  __device__ __forceinline__ void pass2(int64_t s, const Coef& cf, int64_t st, int len) const {
    const ExMem<PT, MASTER, REM> mem(a.b, a.lb, s);
    for_chunks(st, len, [&](int64_t i, bool on) {
      float m32 = 0.0f, v32 = 0.0f;
      uint32_t rw[2] = {0u, 0u};
      if (on) {
        float u;
        double g;
        const float wd = element(mem, cf.c, i, m32, v32, u, g);
        mem.store_w(i, wd - cf.c.c.k * u);
        // LAMB's two buffers: halves j and 4 + j of one Philox call (lowbit_state.BUFFER)
        if (ST == kStateBF16) sr_bits_of(a.lb, cf.step_after, s, i, 2, rw);
      }
      state_store<ST>(mem.s0, mem.a0, true, i, on, m32, rw[0]);
      state_store<ST>(mem.s1, mem.a1, false, i, on, v32, rw[1]);
    });
  }
};

template <class PT, bool MASTER, bool REM, int ST>
__global__ void __launch_bounds__(kThreads, 2) exact_lars_kernel(const LarsArgs a, const int phase) {
  two_phase<ExactLarsStep<PT, MASTER, REM, ST>>(a, phase);
}

// (1 block per SM guaranteed: at 2, i.e. 128 registers, the int8 variants spill on sm_100)
template <class PT, bool MASTER, bool REM, int ST>
__global__ void __launch_bounds__(kThreads, 1) exact_lamb_kernel(const LambArgs a, const int phase) {
  two_phase<ExactLambStep<PT, MASTER, REM, ST>>(a, phase);
}

// ------------------------------------------------------------------------------------------------
// FSDP2 split: per-segment sums of the phase-1 partials (kPathPartials, after a phase-1 launch)

// ssq_out[k * S + s] = segment_sums(s)[k] for active segments, 0 for inactive ones (they add nothing
// to a sum over the ranks) and for all of them when found_inf (phase 1 returned: no partials).
// The same reduction, in the same order, as phase 2 of a whole step: lars_step == apply(partials)
// bitwise. With Plan::g2_in (row 1 of ssq_out itself: NOTE [Grad sums from backward]) the g^2 row is
// the given one scaled, read by thread 0 before it overwrites it, and the (g + lam*w)^2 row NaN.
__global__ void __launch_bounds__(kThreads) segment_reduce(const Plan p, const float* active, const Scalar found_inf,
                                                           const Scalar inv_scale) {
  const bool skip = found_inf.ptr && read(found_inf) != 0.0;
  const double g2_scale = p.g2_in ? read(inv_scale) * read(inv_scale) : 0.0;
  for (int64_t s = blockIdx.x; s < p.num_segs; s += gridDim.x) {
    double x[3] = {0.0, 0.0, 0.0};
    const bool on = !skip && active[s] != 0.f;  // block-uniform
    if (on) segment_sums(p, s, x);
    if (threadIdx.x == 0) {
      if (on && p.g2_in) given_g2(p, s, g2_scale, x);
#pragma unroll
      for (int k = 0; k < 3; ++k) p.ssq_out[k * p.num_segs + s] = x[k];
    }
  }
}

// ------------------------------------------------------------------------------------------------
// global gradient norm (LAMB's max_grad_norm): per-tile partials, then one block in tile order

template <class PT>
struct GradSumsq {
  const PT* g;
  float gscale;
  float sg = 0.f;
  template <int M, bool V>
  __device__ __forceinline__ void run(int64_t i) {
    float x[M];
    vload<M, V>(g + i, x);
#pragma unroll
    for (int j = 0; j < M; ++j) {
      const float gj = x[j] * gscale;
      sg += gj * gj;
    }
  }
};

template <class PT>
__global__ void __launch_bounds__(kThreads) grad_sumsq_partials(const Addr b, const float* active, const Plan p,
                                                                 const Scalar inv_scale, double* gpart) {
  const float gscale = static_cast<float>(read(inv_scale));
  for (int64_t t = blockIdx.x; t < p.num_tiles; t += gridDim.x) {
    const int64_t s = p.tile_seg[t];
    if (active[s] == 0.f) continue;  // NOTE [Inactive segments]
    const int64_t bg = base_of(b, kRowGrad, s);
    GradSumsq<PT> f{reinterpret_cast<const PT*>(bg), gscale};
    for_tile<16 / sizeof(PT)>(p.tile_start[t], p.tile_len[t], (bg & 15) == 0, f);
    double x[1] = {f.sg};
    block_sum<1>(x);
    if (threadIdx.x == 0) gpart[t] = x[0];
  }
}

__global__ void __launch_bounds__(kThreads) grad_sumsq_final(const float* active, const Plan p, const double* gpart,
                                                              double* out) {
  double x[1] = {0.0};
  for (int64_t t = threadIdx.x; t < p.num_tiles; t += kThreads)
    if (active[p.tile_seg[t]] != 0.f) x[0] += gpart[t];
  block_sum<1>(x);
  if (threadIdx.x == 0) *out = x[0];
}

// ------------------------------------------------------------------------------------------------
// host side

std::atomic<int> g_last_path{0};

struct DevAttr {
  int sms = 0, coop = 0;
};

DevAttr dev_attr(int dev) {
  static std::mutex mu;
  static std::map<int, DevAttr> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DevAttr d;
  if (cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&d.coop, cudaDevAttrCooperativeLaunch, dev) != cudaSuccess) {
    cudaGetLastError();
    d = DevAttr{};
  }
  cache[dev] = d;
  return d;
}

int blocks_per_sm(const void* fn, int dev) {
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_pair(fn, dev);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, fn, kThreads, 0) != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  cache[key] = n;
  return n;
}

bool env_off(const char* name) {
  const char* v = std::getenv(name);
  return v && std::strcmp(v, "0") == 0;
}

template <class Args>
LaunchInfo launch(void (*fn)(const Args, const int), const Args& a, cudaStream_t stream, int path) {
  LaunchInfo info{cudaSuccess, kPathTwoLaunch, 0, nullptr};
  path &= ~kPathGivenG2;  // carried by Plan::g2_in (NOTE [Grad sums from backward])
  int dev = 0;
  if ((info.err = cudaGetDevice(&dev)) != cudaSuccess) return info;
  const DevAttr d = dev_attr(dev);
  const int per_sm = blocks_per_sm(reinterpret_cast<const void*>(fn), dev);
  const int64_t T = a.p.num_tiles;
  const int64_t resident = static_cast<int64_t>(per_sm) * d.sms;
  bool coop = d.coop && resident > 0;
  const char* why = coop ? nullptr : "the device does not support cooperative launches";
  if (coop && env_off("FUSEDLARS_CUDA_COOP")) {
    coop = false;
    why = "FUSEDLARS_CUDA_COOP=0";
  }
  if (coop && env_off("FUSEDLARS_CUDA_COOP_IN_GRAPH")) {
    cudaStreamCaptureStatus st = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(stream, &st) == cudaSuccess && st != cudaStreamCaptureStatusNone) {
      coop = false;
      why = "FUSEDLARS_CUDA_COOP_IN_GRAPH=0 and the stream is capturing";
    }
  }
  if (path == kPathPartials || path == kPathApply) {
    // FSDP2 split: the launches of the two-launch path, apart (NOTE [Partials and apply], cuda.py)
    const int64_t cap = resident > 0 ? 4 * resident : 1024;
    const int64_t g = T < cap ? (T > 0 ? T : 1) : cap;
    info.grid = static_cast<int>(g);
    info.path = path;
    if (path == kPathPartials) {
      fn<<<static_cast<unsigned>(g), kThreads, 0, stream>>>(a, 1);
      const int64_t S = a.p.num_segs;
      const int64_t gs = S < cap ? (S > 0 ? S : 1) : cap;
      segment_reduce<<<static_cast<unsigned>(gs), kThreads, 0, stream>>>(a.p, a.s.active, a.found_inf,
                                                                          a.inv_scale);
    } else {
      fn<<<static_cast<unsigned>(g), kThreads, 0, stream>>>(a, 2);
    }
    info.err = cudaGetLastError();
    return info;
  }
  if (path == kPathCooperative && !coop) {
    info.err = cudaErrorNotSupported;
    info.why = why;
    return info;
  }
  if (path == kPathTwoLaunch) coop = false;
  if (coop) {
    // persistent grid: every block resident (required by grid.sync), no more blocks than tiles
    const int64_t g = T < resident ? (T > 0 ? T : 1) : resident;
    info.grid = static_cast<int>(g);
    info.path = kPathCooperative;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(static_cast<unsigned>(g));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = 0;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeCooperative;
    attr[0].val.cooperative = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    info.err = cudaLaunchKernelEx(&cfg, fn, a, 0);
  } else {
    const int64_t cap = resident > 0 ? 4 * resident : 1024;
    const int64_t g = T < cap ? (T > 0 ? T : 1) : cap;
    info.grid = static_cast<int>(g);
    info.path = kPathTwoLaunch;
    fn<<<static_cast<unsigned>(g), kThreads, 0, stream>>>(a, 1);
    fn<<<static_cast<unsigned>(g), kThreads, 0, stream>>>(a, 2);
    info.err = cudaGetLastError();
  }
  if (info.err == cudaSuccess) g_last_path.store(info.path);
  return info;
}

// The step kernel of Args' kind for a param type and master flag (the variants of launch.h Variant).
template <class PT, bool MASTER>
constexpr auto kernel_for(const LarsArgs&) {
  return &lars_kernel<PT, MASTER>;
}
template <class PT, bool MASTER>
constexpr auto kernel_for(const LambArgs&) {
  return &lamb_kernel<PT, MASTER>;
}

template <class PT, bool MASTER, bool REM, int ST>
constexpr auto exact_kernel_for(const LarsArgs&) {
  return &exact_lars_kernel<PT, MASTER, REM, ST>;
}
template <class PT, bool MASTER, bool REM, int ST>
constexpr auto exact_kernel_for(const LambArgs&) {
  return &exact_lamb_kernel<PT, MASTER, REM, ST>;
}

// The exact kernels (NOTE [Exact kernels]) of a variant and state format; remainder masters are bf16's.
template <int ST, class Args>
LaunchInfo launch_exact(const Args& a, int variant, cudaStream_t stream, int path) {
  if (a.lb.remainder) return launch(exact_kernel_for<__nv_bfloat16, false, true, ST>(a), a, stream, path);
  if constexpr (ST == kStateF32) {
    return LaunchInfo{cudaErrorInvalidValue, kPathTwoLaunch, 0, nullptr};  // fp32 without remainder: not exact
  } else {
    switch (variant) {
      case kF32: return launch(exact_kernel_for<float, false, false, ST>(a), a, stream, path);
      case kBF16: return launch(exact_kernel_for<__nv_bfloat16, false, false, ST>(a), a, stream, path);
      case kBF16Master: return launch(exact_kernel_for<__nv_bfloat16, true, false, ST>(a), a, stream, path);
      case kF16: return launch(exact_kernel_for<__half, false, false, ST>(a), a, stream, path);
      default: return launch(exact_kernel_for<__half, true, false, ST>(a), a, stream, path);
    }
  }
}

template <class Args>
LaunchInfo launch_variant(const Args& a, int variant, cudaStream_t stream, int path) {
  if (a.lb.storage == kStateBF16) return launch_exact<kStateBF16>(a, variant, stream, path);
  if (a.lb.storage == kStateInt8) return launch_exact<kStateInt8>(a, variant, stream, path);
  if (a.lb.remainder) return launch_exact<kStateF32>(a, variant, stream, path);
  switch (variant) {
    case kF32: return launch(kernel_for<float, false>(a), a, stream, path);
    case kBF16: return launch(kernel_for<__nv_bfloat16, false>(a), a, stream, path);
    case kBF16Master: return launch(kernel_for<__nv_bfloat16, true>(a), a, stream, path);
    case kF16: return launch(kernel_for<__half, false>(a), a, stream, path);
    default: return launch(kernel_for<__half, true>(a), a, stream, path);
  }
}

}  // namespace

LaunchInfo launch_lars(const LarsArgs& a, int variant, cudaStream_t stream, int path) {
  return launch_variant(a, variant, stream, path);
}

LaunchInfo launch_lamb(const LambArgs& a, int variant, cudaStream_t stream, int path) {
  return launch_variant(a, variant, stream, path);
}

cudaError_t launch_grad_sumsq(const Addr& b, int variant, const float* active, const Plan& p, Scalar inv_scale,
                              double* gpart, double* out, cudaStream_t stream) {
  const int64_t T = p.num_tiles;
  if (T > 0) {
    const unsigned g = static_cast<unsigned>(T < 4096 ? T : 4096);
    if (variant == kF32)
      grad_sumsq_partials<float><<<g, kThreads, 0, stream>>>(b, active, p, inv_scale, gpart);
    else if (variant == kBF16 || variant == kBF16Master)
      grad_sumsq_partials<__nv_bfloat16><<<g, kThreads, 0, stream>>>(b, active, p, inv_scale, gpart);
    else
      grad_sumsq_partials<__half><<<g, kThreads, 0, stream>>>(b, active, p, inv_scale, gpart);
  }
  grad_sumsq_final<<<1, kThreads, 0, stream>>>(active, p, gpart, out);
  return cudaGetLastError();
}

#define FUSEDLARS_STR2(...) #__VA_ARGS__
#define FUSEDLARS_STR(...) FUSEDLARS_STR2(__VA_ARGS__)
const char* compiled_archs() {
#ifdef __CUDA_ARCH_LIST__
  return FUSEDLARS_STR(__CUDA_ARCH_LIST__);
#else
  return "unknown";
#endif
}

int last_path() { return g_last_path.load(); }

int device_coop(int device, int* sms, int* per_sm) {
  const DevAttr d = dev_attr(device);
  int prev = 0;
  cudaGetDevice(&prev);
  if (prev != device) cudaSetDevice(device);
  const int n = blocks_per_sm(reinterpret_cast<const void*>(&lars_kernel<float, false>), device);
  if (prev != device) cudaSetDevice(prev);
  if (sms) *sms = d.sms;
  if (per_sm) *per_sm = n;
  return d.coop && n > 0 ? 1 : 0;
}

}  // namespace cuda
}  // namespace fusedlars
