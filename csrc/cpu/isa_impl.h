// Body of the per-tile kernels, compiled once per instruction set. Include this from an isa_*.cpp
// after defining FL_ISA (2 = AVX-512, 1 = AVX2 + F16C, 0 = generic x86-64 / any CPU) and FL_TABLE_FN,
// inside that file's `#pragma GCC target` region.
//
// NOTE: [One lane structure for every ISA]
// The kernels are written with GCC vector extensions on 16 fp32 lanes (`vf`): one zmm register with
// AVX-512, two ymm with AVX2, four xmm (or scalar code) otherwise. Every ISA performs the same lane
// arithmetic in the same order (no FMA contraction: ISO C++ mode leaves -ffp-contract off), so the
// three builds give bitwise identical results, and the lane sums are reduced in a fixed order.
//
// NOTE: [Accumulation]
// Sums of squares run in fp32 lanes over blocks of 1024 elements (64 per lane), then are added into
// double lanes; a tile's lanes are summed in lane order into a double partial.
#ifndef FL_ISA
#error "define FL_ISA before including isa_impl.h"
#endif

typedef float fl_vf __attribute__((vector_size(64)));
typedef double fl_vd __attribute__((vector_size(128)));
typedef int32_t fl_vi __attribute__((vector_size(64)));
typedef uint32_t fl_vu __attribute__((vector_size(64)));
typedef uint16_t fl_vh __attribute__((vector_size(32)));
typedef float fl_v8 __attribute__((vector_size(32)));
// unaligned, aliasing views for loads and stores (a memcpy of a whole vector made GCC bounce it
// through the stack in 8- and 16-byte pieces: store-forwarding stalls)
typedef float fl_vf_u __attribute__((vector_size(64), aligned(4), may_alias));
typedef uint16_t fl_vh_u __attribute__((vector_size(32), aligned(2), may_alias));

#define FL_LO8(x) __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7)
#define FL_HI8(x) __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15)
#define FL_CAT8(a, b) __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

namespace fusedlars {
// must be declared before lars_math.h's templates (unqualified lookup at definition)
static inline __attribute__((always_inline)) fl_vf fl_sqrt(fl_vf x) {
#if FL_ISA == 2
  // NOTE [AVX-512 intrinsics with a defined source]: GCC 12's _mm512_sqrt_ps, _mm512_cvtph_ps and
  // _mm512_cvtps_ph pass _mm512_undefined_*() (`__m512 __Y = __Y;`) as the masked-off source, which
  // -Wmaybe-uninitialized reports at every inlined call (411 warnings per build; GCC PR 105593). The
  // all-ones-mask forms with a zero source are the same instruction (an all-ones mask is dropped) and
  // the same bits, and their source is defined.
  return (fl_vf)_mm512_maskz_sqrt_ps((__mmask16)0xFFFF, (__m512)x);
#elif FL_ISA == 1
  fl_v8 lo = (fl_v8)_mm256_sqrt_ps((__m256)FL_LO8(x));
  fl_v8 hi = (fl_v8)_mm256_sqrt_ps((__m256)FL_HI8(x));
  return FL_CAT8(lo, hi);
#else
  fl_vf r;
  for (int i = 0; i < 16; ++i) r[i] = __builtin_sqrtf(x[i]);
  return r;
#endif
}
// the exact low-bit kernels' double math (exact_impl.h) in native registers: 8 doubles (AVX-512),
// 4 (AVX2), 2 (otherwise); IEEE sqrt per lane
#if FL_ISA == 2
constexpr int kDN = 8;
#elif FL_ISA == 1
constexpr int kDN = 4;
#else
constexpr int kDN = 2;
#endif
typedef double fl_dn __attribute__((vector_size(8 * kDN)));
static inline __attribute__((always_inline)) fl_dn fl_sqrt(fl_dn x) {
#if FL_ISA == 2
  return (fl_dn)_mm512_maskz_sqrt_pd((__mmask8)0xFF, (__m512d)x);
#elif FL_ISA == 1
  return (fl_dn)_mm256_sqrt_pd((__m256d)x);
#else
  fl_dn r;
  for (int i = 0; i < kDN; ++i) r[i] = __builtin_sqrt(x[i]);
  return r;
#endif
}
}  // namespace fusedlars

#include "../lars_math.h"
#include "../lowbit.h"

#include <cstring>
#include <type_traits>

namespace fusedlars {
namespace cpu {
namespace {

#define FL_AI static inline __attribute__((always_inline))
#define FL_MI inline __attribute__((always_inline))
constexpr int kW = 16;         // lanes
constexpr int64_t kBlock = 1024;  // elements accumulated in fp32 before moving to double
constexpr int64_t kPrefetch = 256;  // LARS pass 1: prefetch distance in elements (may run past the tile: harmless)

struct bf16 {
  uint16_t x;
};
struct f16 {
  uint16_t x;
};

template <class T>
struct IO;

template <>
struct IO<float> {
  FL_AI fl_vf load(const float* p) { return *reinterpret_cast<const fl_vf_u*>(p); }
  // explicit native-width stores: GCC lowers an under-aligned 64-byte vector store through the stack
  FL_AI void store(float* p, fl_vf v) {
#if FL_ISA == 2
    _mm512_storeu_ps(p, (__m512)v);
#elif FL_ISA == 1
    _mm256_storeu_ps(p, (__m256)FL_LO8(v));
    _mm256_storeu_ps(p + 8, (__m256)FL_HI8(v));
#elif defined(__SSE2__)
    _mm_storeu_ps(p, (__m128)__builtin_shufflevector(v, v, 0, 1, 2, 3));
    _mm_storeu_ps(p + 4, (__m128)__builtin_shufflevector(v, v, 4, 5, 6, 7));
    _mm_storeu_ps(p + 8, (__m128)__builtin_shufflevector(v, v, 8, 9, 10, 11));
    _mm_storeu_ps(p + 12, (__m128)__builtin_shufflevector(v, v, 12, 13, 14, 15));
#else
    __builtin_memcpy(p, &v, 64);
#endif
  }
};

template <>
struct IO<bf16> {
  FL_AI fl_vf load(const bf16* p) {
    fl_vh h = *reinterpret_cast<const fl_vh_u*>(p);
    fl_vu u = __builtin_convertvector(h, fl_vu) << 16;
    return (fl_vf)u;
  }
  // round to nearest even, NaN -> quiet NaN (as c10::BFloat16)
  FL_AI void store(bf16* p, fl_vf v) {
    fl_vu u = (fl_vu)v;
    fl_vu r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    fl_vu nan = (fl_vu)(v != v);
    r = (r & ~nan) | (nan & 0x7FC0u);
    fl_vh h = __builtin_convertvector(r, fl_vh);
#if FL_ISA >= 1
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)h);
#elif defined(__SSE2__)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), (__m128i)__builtin_shufflevector(h, h, 0, 1, 2, 3, 4, 5, 6, 7));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), (__m128i)__builtin_shufflevector(h, h, 8, 9, 10, 11, 12, 13, 14, 15));
#else
    __builtin_memcpy(p, &h, 32);
#endif
  }
};

template <>
struct IO<f16> {
  FL_AI fl_vf load(const f16* p) {
#if FL_ISA == 2
    // NOTE [AVX-512 intrinsics with a defined source]
    return (fl_vf)_mm512_maskz_cvtph_ps((__mmask16)0xFFFF, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif FL_ISA == 1
    fl_v8 lo = (fl_v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    fl_v8 hi = (fl_v8)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    return FL_CAT8(lo, hi);
#else
    fl_vf r;
    for (int i = 0; i < 16; ++i) r[i] = static_cast<float>(c10::Half(p[i].x, c10::Half::from_bits()));
    return r;
#endif
  }
  FL_AI void store(f16* p, fl_vf v) {
#if FL_ISA == 2
    // NOTE [AVX-512 intrinsics with a defined source]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtps_ph((__mmask16)0xFFFF, (__m512)v, _MM_FROUND_TO_NEAREST_INT));
#elif FL_ISA == 1
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph((__m256)FL_LO8(v), _MM_FROUND_TO_NEAREST_INT));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p + 8), _mm256_cvtps_ph((__m256)FL_HI8(v), _MM_FROUND_TO_NEAREST_INT));
#else
    for (int i = 0; i < 16; ++i) p[i].x = c10::Half(v[i]).x;
#endif
  }
};

// Tail of a tile (n < 16 elements): through a zero-filled 16-lane buffer; only n are written back.
template <class T>
FL_AI fl_vf load_part(const T* p, int n) {
  T tmp[kW] = {};
  __builtin_memcpy(tmp, p, n * sizeof(T));
  return IO<T>::load(tmp);
}
template <class T>
FL_AI void store_part(T* p, fl_vf v, int n) {
  T tmp[kW];
  IO<T>::store(tmp, v);
  __builtin_memcpy(p, tmp, n * sizeof(T));
}

FL_AI fl_vf lane_mask(fl_vf x, int n) {  // lanes >= n -> 0 (whatever x holds there: NaN, inf)
  const fl_vi idx = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
  fl_vi keep = idx < n;
  return (fl_vf)((fl_vi)x & keep);
}

// 16 fp32 accumulator lanes held in native registers: GCC keeps a 64-byte vector variable that is
// wider than the ISA's registers in memory across loop iterations (store-forwarding stalls).
typedef float fl_v4 __attribute__((vector_size(16)));
struct Acc16 {
#if FL_ISA == 2
  fl_vf v = {};
  inline __attribute__((always_inline)) void operator+=(fl_vf x) { v += x; }
  inline __attribute__((always_inline)) fl_vf get() const { return v; }
#elif FL_ISA == 1
  fl_v8 lo = {}, hi = {};
  inline __attribute__((always_inline)) void operator+=(fl_vf x) {
    lo += FL_LO8(x);
    hi += FL_HI8(x);
  }
  inline __attribute__((always_inline)) fl_vf get() const { return FL_CAT8(lo, hi); }
#else
  fl_v4 q0 = {}, q1 = {}, q2 = {}, q3 = {};
  inline __attribute__((always_inline)) void operator+=(fl_vf x) {
    q0 += __builtin_shufflevector(x, x, 0, 1, 2, 3);
    q1 += __builtin_shufflevector(x, x, 4, 5, 6, 7);
    q2 += __builtin_shufflevector(x, x, 8, 9, 10, 11);
    q3 += __builtin_shufflevector(x, x, 12, 13, 14, 15);
  }
  inline __attribute__((always_inline)) fl_vf get() const {
    return FL_CAT8(__builtin_shufflevector(q0, q1, 0, 1, 2, 3, 4, 5, 6, 7),
                   __builtin_shufflevector(q2, q3, 0, 1, 2, 3, 4, 5, 6, 7));
  }
#endif
};

FL_AI fl_vd widen(const Acc16& a) { return __builtin_convertvector(a.get(), fl_vd); }
FL_AI fl_vd widen(fl_vf x) { return __builtin_convertvector(x, fl_vd); }

FL_AI double lane_sum(fl_vd x) {
  double s = 0.0;
  for (int i = 0; i < kW; ++i) s += x[i];
  return s;
}

// Storage of a variant: PT = param/grad type; MASTER: weights come from (and go to) fp32 master.
template <class PT, bool MASTER>
struct Buf {
  const PT* g;
  PT* p;
  float* m;
  explicit Buf(const TileArgs& a)
      : g(static_cast<const PT*>(a.grad) + a.start),
        p(static_cast<PT*>(a.param) + a.start),
        m(MASTER ? a.master + a.start : nullptr) {}
  // software prefetch of the read streams of pass 1 (a read-only pass: the hardware prefetchers
  // alone left it ~10% below the read bandwidth it reaches with this; no effect on results)
  FL_MI void prefetch(int64_t i) const {
    __builtin_prefetch(g + i);
    if constexpr (MASTER) __builtin_prefetch(m + i);
    else __builtin_prefetch(p + i);
  }
  FL_MI fl_vf w(int64_t i) const {
    if constexpr (MASTER) return IO<float>::load(m + i);
    else return IO<PT>::load(p + i);
  }
  FL_MI fl_vf w_part(int64_t i, int n) const {
    if constexpr (MASTER) return load_part(m + i, n);
    else return load_part(p + i, n);
  }
  FL_MI void put(int64_t i, fl_vf v) const {
    if constexpr (MASTER) IO<float>::store(m + i, v);
    IO<PT>::store(p + i, v);
  }
  FL_MI void put_part(int64_t i, fl_vf v, int n) const {
    if constexpr (MASTER) store_part(m + i, v, n);
    store_part(p + i, v, n);
  }
};

// ------------------------------------------------------------------------------------------------
// LARS

template <class PT, bool MASTER>
void lars_sumsq_t(const TileArgs& a, float gscale, float lam, double* out) {
  const Buf<PT, MASTER> b(a);
  const int64_t n = a.len;
  fl_vd dw = {}, dg = {}, du = {};
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t end = i0 + kBlock < n ? i0 + kBlock : n;
    Acc16 sw, sg, su;
    int64_t i = i0;
    for (; i + kW <= end; i += kW) {
      b.prefetch(i + kPrefetch);
      fl_vf w = b.w(i);
      fl_vf g = IO<PT>::load(b.g + i) * gscale;
      fl_vf u = g + lam * w;
      sw += w * w;
      sg += g * g;
      su += u * u;
    }
    if (i < end) {
      const int r = static_cast<int>(end - i);
      fl_vf w = b.w_part(i, r);
      fl_vf g = lane_mask(load_part(b.g + i, r) * gscale, r);
      fl_vf u = g + lam * w;
      sw += w * w;
      sg += g * g;
      su += u * u;
    }
    dw += widen(sw);
    dg += widen(sg);
    du += widen(su);
  }
  out[0] = lane_sum(dw);
  out[1] = lane_sum(dg);
  out[2] = lane_sum(du);
}

// CARRY: also sum the squares of the NEW weights per tile into out[0], with pass 1's exact block and
// lane structure and on the values pass 1 would load (the stored bf16/fp16 value when there is no
// master): next step's pass 1 can take ||w||^2 from here instead of reading w (NOTE [Carried weight
// norms] in optim_cpu.cpp). ACC_U: also sum (g + lam_u*w)^2 of the OLD weights into out[1], exactly
// as pass 1 does, for a segment whose pass 1 read only g.
// UNIT (NOTE [Unit coefficients] in lars_math.h): the caller checked gscale == 1 and c.c_g == 1, and
// with ACC_U and l2 decay that c.lam is lam_u bit for bit, so g + lam*w is formed once for the sum
// and the update. The same values as without UNIT, with 4 of the 15 vector operations fewer.
template <class PT, bool MASTER, int WD, int MOM, bool NEST, bool CARRY, bool ACC_U, bool UNIT>
void lars_update_t(const TileArgs& a, float gscale, float lam_u, const LarsCoef& c_in, double* out) {
  const LarsCoef c = c_in;  // a local copy: stores through float* cannot alias it (no reloads)
  const Buf<PT, MASTER> b(a);
  float* mb = MOM ? a.s0 + a.start : nullptr;
  const int64_t n = a.len;
  constexpr bool kExact = MASTER || std::is_same<PT, float>::value;  // the register is what pass 1 loads
  constexpr bool kShareU = UNIT && ACC_U && WD == kLarsL2;  // u is the update's g + lam*w
  fl_vd dw = {}, du = {};
  // one element group: g already scaled and, in the tail, its lanes past the end zeroed
  auto body = [&](fl_vf w, fl_vf g, fl_vf& buf, Acc16& su) -> fl_vf {
    fl_vf gp;
    if constexpr (kShareU) {
      fl_vf u = g + c.lam * w;
      su += u * u;
      gp = u * c.r;
    } else {
      if constexpr (ACC_U) {
        fl_vf u = g + lam_u * w;
        su += u * u;
      }
      gp = lars_direction<fl_vf>(c, WD, w, g);
    }
    return lars_apply_modes<fl_vf, UNIT>(c, WD, MOM, NEST, w, gp, buf);
  };
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t end = i0 + kBlock < n ? i0 + kBlock : n;
    Acc16 sw, su;
    int64_t i = i0;
    for (; i + kW <= end; i += kW) {
      fl_vf w = b.w(i);
      fl_vf g = IO<PT>::load(b.g + i);
      if constexpr (!UNIT) g = g * gscale;
      fl_vf buf = {};
      if (MOM) buf = IO<float>::load(mb + i);
      fl_vf wn = body(w, g, buf, su);
      if (MOM) IO<float>::store(mb + i, buf);
      b.put(i, wn);
      if (CARRY) {
        fl_vf ws = kExact ? wn : b.w(i);
        sw += ws * ws;
      }
    }
    if (i < end) {
      const int r = static_cast<int>(end - i);
      fl_vf w = b.w_part(i, r);
      fl_vf g = load_part(b.g + i, r);
      if constexpr (!UNIT) g = g * gscale;
      fl_vf buf = {};
      if (MOM) buf = load_part(mb + i, r);
      fl_vf wn = body(w, lane_mask(g, r), buf, su);
      if (MOM) store_part(mb + i, buf, r);
      b.put_part(i, wn, r);
      if (CARRY) {
        fl_vf ws = kExact ? lane_mask(wn, r) : b.w_part(i, r);
        sw += ws * ws;
      }
    }
    if (CARRY) dw += widen(sw);
    if (ACC_U) du += widen(su);
  }
  if (CARRY) out[0] = lane_sum(dw);
  if (ACC_U) out[1] = lane_sum(du);
}

// ------------------------------------------------------------------------------------------------
// LAMB

template <class PT, bool MASTER, int WD>
void lamb_pass1_t(const TileArgs& a, const LambCoef& c_in, double* out) {
  const LambCoef c = c_in;
  const Buf<PT, MASTER> b(a);
  float* mp = a.s0 + a.start;
  float* vp = a.s1 + a.start;
  const int64_t n = a.len;
  fl_vd dw = {}, dg = {}, du = {};
  for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
    const int64_t end = i0 + kBlock < n ? i0 + kBlock : n;
    Acc16 sw, sg, su;
    int64_t i = i0;
    for (; i + kW <= end; i += kW) {
      fl_vf w = b.w(i);
      fl_vf g = IO<PT>::load(b.g + i) * c.gscale;
      fl_vf m = IO<float>::load(mp + i), v = IO<float>::load(vp + i);
      sg += g * g;
      lamb_moments<WD>(c, w, g, m, v);
      IO<float>::store(mp + i, m);
      IO<float>::store(vp + i, v);
      fl_vf wd = lamb_decayed_weight<WD>(c, w);
      fl_vf u = lamb_direction<WD>(c, w, m, v);
      sw += wd * wd;
      su += u * u;
    }
    if (i < end) {
      const int r = static_cast<int>(end - i);
      fl_vf w = b.w_part(i, r);
      fl_vf g = lane_mask(load_part(b.g + i, r) * c.gscale, r);
      fl_vf m = load_part(mp + i, r), v = load_part(vp + i, r);
      sg += g * g;
      lamb_moments<WD>(c, w, g, m, v);
      store_part(mp + i, m, r);
      store_part(vp + i, v, r);
      fl_vf wd = lamb_decayed_weight<WD>(c, w);
      fl_vf u = lane_mask(lamb_direction<WD>(c, w, m, v), r);  // 0/(0+eps) is NaN when eps == 0
      sw += wd * wd;
      su += u * u;
    }
    dw += widen(sw);
    dg += widen(sg);
    du += widen(su);
  }
  out[0] = lane_sum(dw);
  out[1] = lane_sum(dg);
  out[2] = lane_sum(du);
}

template <class PT, bool MASTER, int WD>
void lamb_pass2_t(const TileArgs& a, const LambCoef& c_in) {
  const LambCoef c = c_in;
  const Buf<PT, MASTER> b(a);
  const float* mp = a.s0 + a.start;
  const float* vp = a.s1 + a.start;
  const int64_t n = a.len;
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    fl_vf w = b.w(i);
    fl_vf u = lamb_direction<WD>(c, w, IO<float>::load(mp + i), IO<float>::load(vp + i));
    b.put(i, lamb_decayed_weight<WD>(c, w) - c.k * u);
  }
  if (i < n) {
    const int r = static_cast<int>(n - i);
    fl_vf w = b.w_part(i, r);
    fl_vf u = lamb_direction<WD>(c, w, load_part(mp + i, r), load_part(vp + i, r));
    b.put_part(i, lamb_decayed_weight<WD>(c, w) - c.k * u, r);
  }
}

// NOTE: [Read streams of the grad-norm pass]
// With carried weight norms, LARS pass 1 reads one stream (g) and nothing else. A lone read stream
// per core is limited by how many misses the core keeps in flight, not by DRAM bandwidth: on a 2-core
// Ice Lake VM (Xeon @ 2.80 GHz) a plain C sum of squares over 102 MB read 15 GB/s with 2 threads,
// while torch's fused SGD moved 35-40 GB/s (3 read + 2 write streams). So the loop walks kStreams
// consecutive blocks (4 KiB each, fp32: separate pages, each its own prefetch stream) side by side,
// one fp32 accumulator per block. Each block is still summed alone in its lane order and the blocks'
// sums are added into the double lanes in block order, so the partial is bitwise the one-block-at-
// a-time sum of lars_sumsq (NOTE [Carried weight norms] in optim_cpu.cpp relies on that). Measured
// in one run, ResNet-50 shapes, 2 threads: this pass 0.39x -> 0.32x of a fused SGD step, the whole
// LARS step 1.38x -> 1.30x; 8 streams measured the same as 4, software prefetch (0.25-16 KiB ahead)
// made no difference.
constexpr int kStreams = 4;

template <class PT>
void grad_sumsq_t(const TileArgs& a, float gscale, double* out) {
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  const int64_t n = a.len;
  fl_vd dg = {};
  int64_t i0 = 0;
  for (; i0 + kStreams * kBlock <= n; i0 += kStreams * kBlock) {
    Acc16 sg[kStreams];
    for (int64_t i = 0; i < kBlock; i += kW)
      for (int s = 0; s < kStreams; ++s) {
        fl_vf g = IO<PT>::load(gp + i0 + s * kBlock + i) * gscale;
        sg[s] += g * g;
      }
    for (int s = 0; s < kStreams; ++s) dg += widen(sg[s]);
  }
  for (; i0 < n; i0 += kBlock) {
    const int64_t end = i0 + kBlock < n ? i0 + kBlock : n;
    Acc16 sg;
    int64_t i = i0;
    for (; i + kW <= end; i += kW) {
      fl_vf g = IO<PT>::load(gp + i) * gscale;
      sg += g * g;
    }
    if (i < end) {
      const int r = static_cast<int>(end - i);
      fl_vf g = lane_mask(load_part(gp + i, r) * gscale, r);
      sg += g * g;
    }
    dg += widen(sg);
  }
  out[0] = lane_sum(dg);
}

// ------------------------------------------------------------------------------------------------
// low-bit state: the exact kernels

#include "exact_impl.h"

// ------------------------------------------------------------------------------------------------
// run-time option -> template dispatch

template <class F>
FL_AI void by_variant(int variant, F&& f) {
  switch (variant) {
    case kF32: f.template operator()<float, false>(); break;
    case kBF16: f.template operator()<bf16, false>(); break;
    case kBF16Master: f.template operator()<bf16, true>(); break;
    case kF16: f.template operator()<f16, false>(); break;
    default: f.template operator()<f16, true>(); break;
  }
}

void lars_sumsq(const TileArgs& a, int variant, float gscale, float lam, double* out) {
  by_variant(variant, [&]<class PT, bool M>() { lars_sumsq_t<PT, M>(a, gscale, lam, out); });
}

template <class PT, bool M, int WD, bool CARRY, bool ACC_U>
FL_AI void lars_update_mom(const TileArgs& a, int mom, int nest, float gscale, float lam_u, const LarsCoef& c,
                           double* out) {
  // UNIT only with momentum, where c_g's product is (NOTE [Unit coefficients])
  const bool unit = gscale == 1.0f && c.c_g == 1.0f &&
                    (!ACC_U || WD != kLarsL2 || std::memcmp(&lam_u, &c.lam, sizeof(float)) == 0);
  if (!mom) lars_update_t<PT, M, WD, 0, false, CARRY, ACC_U, false>(a, gscale, lam_u, c, out);
  else if (nest && unit) lars_update_t<PT, M, WD, 1, true, CARRY, ACC_U, true>(a, gscale, lam_u, c, out);
  else if (nest) lars_update_t<PT, M, WD, 1, true, CARRY, ACC_U, false>(a, gscale, lam_u, c, out);
  else if (unit) lars_update_t<PT, M, WD, 1, false, CARRY, ACC_U, true>(a, gscale, lam_u, c, out);
  else lars_update_t<PT, M, WD, 1, false, CARRY, ACC_U, false>(a, gscale, lam_u, c, out);
}

template <class PT, bool M, int WD>
FL_AI void lars_update_carry(const TileArgs& a, int mom, int nest, int carry, float gscale, float lam_u,
                             const LarsCoef& c, double* out) {
  if (carry == kCarryNone) lars_update_mom<PT, M, WD, false, false>(a, mom, nest, gscale, lam_u, c, out);
  else if (carry == kCarryW) lars_update_mom<PT, M, WD, true, false>(a, mom, nest, gscale, lam_u, c, out);
  else lars_update_mom<PT, M, WD, true, true>(a, mom, nest, gscale, lam_u, c, out);
}

void lars_update_k(const TileArgs& a, int variant, int wd, int mom, int nest, int carry, float gscale, float lam_u,
                   const LarsCoef& c, double* out) {
  by_variant(variant, [&]<class PT, bool M>() {
    if (wd == kLarsL2) lars_update_carry<PT, M, kLarsL2>(a, mom, nest, carry, gscale, lam_u, c, out);
    else if (wd == kLarsDecoupled) lars_update_carry<PT, M, kLarsDecoupled>(a, mom, nest, carry, gscale, lam_u, c, out);
    else lars_update_carry<PT, M, kLarsRatioOnly>(a, mom, nest, carry, gscale, lam_u, c, out);
  });
}

void lamb_pass1(const TileArgs& a, int variant, int wd, const LambCoef& c, double* out) {
  by_variant(variant, [&]<class PT, bool M>() {
    if (wd == kLambL2) lamb_pass1_t<PT, M, kLambL2>(a, c, out);
    else if (wd == kLambDecoupled) lamb_pass1_t<PT, M, kLambDecoupled>(a, c, out);
    else lamb_pass1_t<PT, M, kLambInUpdate>(a, c, out);
  });
}

void lamb_pass2(const TileArgs& a, int variant, int wd, const LambCoef& c) {
  by_variant(variant, [&]<class PT, bool M>() {
    if (wd == kLambL2) lamb_pass2_t<PT, M, kLambL2>(a, c);
    else if (wd == kLambDecoupled) lamb_pass2_t<PT, M, kLambDecoupled>(a, c);
    else lamb_pass2_t<PT, M, kLambInUpdate>(a, c);
  });
}

void grad_sumsq(const TileArgs& a, int variant, float gscale, double* out) {
  switch (variant) {
    case kF32: grad_sumsq_t<float>(a, gscale, out); break;
    case kBF16:
    case kBF16Master: grad_sumsq_t<bf16>(a, gscale, out); break;
    default: grad_sumsq_t<f16>(a, gscale, out); break;
  }
}

#undef FL_AI
#undef FL_MI
}  // namespace

const KernelTable* FL_TABLE_FN() {
  static const KernelTable t = {FL_ISA_NAME, &lars_sumsq, &lars_update_k, &lamb_pass1, &lamb_pass2, &grad_sumsq,
                                 &lars_exact_sumsq, &lars_exact_wsumsq, &lars_exact_update_k, &lamb_exact_pass1,
                                 &lamb_exact_pass2};
  return &t;
}

}  // namespace cpu
}  // namespace fusedlars
