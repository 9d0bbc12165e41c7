// The exact per-tile kernels of low-bit optimizer state (issue #26): bf16 / int8 state buffers and
// master_weights="remainder", for LARS / TVLARS and LAMB. Included by isa_impl.h inside its
// namespace (compiled once per instruction set, like the fp32 kernels).
//
// Per 256-element quantization block of a tile (tiles start at multiples of kTileElems = 64 blocks,
// so a block never crosses a tile, and blocks start at the param's element 0):
//   load      weights, grads and the old state into fp32 block buffers on the stack (the weights
//             are fp32 values in every form: masters, remainder masters rebuilt, bf16/fp16/fp32
//             params; the old state is dequantized exactly: bf16 -> fp32, int8 map[code] * absmax);
//   math      the fp32 kernels' element math on 16 fp32 lanes (lars_math.h NOTE [Low-bit element math
//             in fp32]); the new state's and the new weights' fp32 values into block buffers;
//   store     the weights (the fp32 master, a bf16/fp16 param rounded from it, or split into bf16
//             + int16 remainder), and the state: fp32, bf16 by stochastic rounding with 16 bits of
//             the Philox call of (seed, step after this step, param id, element / P), or int8 (the block's absmax
//             over all its new values first, then the codes): csrc/lowbit.h, bitwise lowbit.py.
// The element math, Philox, the bf16 rounding and the int8 codes run on 16 lanes (GCC vectors of 16
// floats / 16 words: NOTE [Exact math on lanes] below); the per-element scalar helpers of lowbit.h
// and lars_math.h remain the specification, and the lanes do the same operations in the same order.
// Sums of squares (pass 1) are taken in double, 16 lanes (lane = element index mod 16), tile partial
// = the lanes summed in lane order: fixed order on every ISA and thread count (NOTE [Determinism]).
//
// NOTE: [What "bitwise" means for the cpu backend's low-bit state]
// The state and weights are the reference's bitwise GIVEN the same per-layer scalars: the element
// math is the reference's fp32 operations in its order, and the per-layer scalars come from
// lars_segment / lamb_segment on the kernel's norms. The norms themselves are sums in another order
// than ATen's float64 vector_norm, so they can differ from the reference's in the last bit, and with
// them LARS's trust ratio (LAMB's moments do not depend on any norm). tests/test_cpu_lowbit.py checks
// exactly this: bitwise equality (state bits, codes, scales, remainders, params) wherever the norms
// are exact sums (inputs whose squares sum exactly in double: both orders give the same norm) or the
// ratio does not depend on them (excluded layers, a clipped ratio, LAMB's moments), over several steps;
// and on general inputs the params within the fp32 tolerance and the state within one rounding step.

constexpr int kQB = lowbit::kQBlock;

// NOTE: [Exact math on lanes]
// Each lane of a 16-lane vector does what the scalar helper does for its element: fp32 and double
// ops are IEEE-correct per lane (+ - * / sqrt, no contraction: -ffp-contract=off), fp32 <-> double
// conversions are exact / round to nearest even as static_cast, and integer ops wrap mod 2**32. So
// results are bitwise the scalar code's, on every ISA (the AVX-512 / AVX2 intrinsics below are the
// same lane operations). Lanes past a block's end compute on whatever the buffers hold and are never
// stored; the sums mask them.
typedef uint16_t fl_vh_a __attribute__((vector_size(32), aligned(2), may_alias));
typedef int16_t fl_vs __attribute__((vector_size(32)));
typedef int16_t fl_vs_u __attribute__((vector_size(32), aligned(2), may_alias));

// the double math runs kDN lanes at a time (one register: a 16-double vector lives on the stack)
typedef float fl_fn __attribute__((vector_size(4 * kDN)));
typedef float fl_fn_u __attribute__((vector_size(4 * kDN), aligned(4), may_alias));
typedef int64_t fl_ln __attribute__((vector_size(8 * kDN)));
FL_AI fl_dn ldd(const float* p) { return __builtin_convertvector(*reinterpret_cast<const fl_fn_u*>(p), fl_dn); }
FL_AI fl_vf ld16(const float* p) { return *reinterpret_cast<const fl_vf_u*>(p); }
FL_AI void st16(float* p, fl_vf v) { *reinterpret_cast<fl_vf_u*>(p) = v; }
FL_AI fl_vu bits(fl_vf x) { return (fl_vu)x; }

// lanes >= n -> 0.0
FL_AI fl_dn lane_mask_d(fl_dn x, int n) {
  fl_ln idx;
  for (int l = 0; l < kDN; ++l) idx[l] = l;
  return (fl_dn)((fl_ln)x & (idx < n));
}

// lowbit::bf16_sr_bits per lane (the 16-bit results in 32-bit lanes)
FL_AI fl_vu bf16_sr_v(fl_vf x, fl_vu rand) {
  const fl_vu b = bits(x);
  const fl_vu sr = (b + (rand & 0xFFFFu)) >> 16;
  return (fl_vu)((b & 0x7FFFFFFFu) > 0x7F800000u) ? ((b >> 16) | 0x0040u) : sr;
}

FL_AI void store_h16(uint16_t* p, fl_vu v) { *reinterpret_cast<fl_vh_a*>(p) = __builtin_convertvector(v, fl_vh); }
FL_AI fl_vf bf16_load_v(const uint16_t* p) {
  return (fl_vf)(__builtin_convertvector(*reinterpret_cast<const fl_vh_a*>(p), fl_vu) << 16);
}

// weights of a variant as fp32 (exact), stored back from the fp32 value of the new weight
template <class PT, bool MASTER, bool REM>
struct ExactW {
  PT* p;
  float* m;
  int16_t* r;
  explicit ExactW(const ExactTile& a)
      : p(static_cast<PT*>(a.param) + a.start),
        m(MASTER ? a.master + a.start : nullptr),
        r(REM ? a.rem + a.start : nullptr) {}
  FL_MI void load(int64_t i, int n, float* out) const {
    for (int j = 0; j < n; j += kW) {
      const int k = n - j < kW ? n - j : kW;
      fl_vf w;
      if constexpr (MASTER) w = k == kW ? IO<float>::load(m + i + j) : load_part(m + i + j, k);
      else w = k == kW ? IO<PT>::load(p + i + j) : load_part(p + i + j, k);
      if constexpr (REM) {
        if (k == kW) {  // lowbit::master_rebuild per lane
          const fl_vu hb = __builtin_convertvector(*reinterpret_cast<const fl_vh_a*>(reinterpret_cast<const uint16_t*>(p) + i + j), fl_vu);
          const fl_vu rb = (fl_vu)__builtin_convertvector(*reinterpret_cast<const fl_vs_u*>(r + i + j), fl_vi);
          st16(out + j, (fl_vf)((hb << 16) + rb));
        } else {
          for (int l = 0; l < k; ++l)
            out[j + l] = lowbit::master_rebuild(reinterpret_cast<const uint16_t*>(p)[i + j + l], r[i + j + l]);
        }
      } else {
        IO<float>::store(out + j, w);
      }
    }
  }
  FL_MI void store(int64_t i, int n, const float* w32) const {
    if constexpr (REM) {
      uint16_t* pb = reinterpret_cast<uint16_t*>(p);
      int j = 0;
      for (; j + kW <= n; j += kW) {  // lowbit::master_split per lane
        const fl_vu b = bits(ld16(w32 + j));
        const fl_vu t = b + 0x8000u;
        const fl_vi nan = (b & 0x7FFFFFFFu) > 0x7F800000u;
        const fl_vu ph = nan ? (((b >> 16) & 0x8000u) | 0x7FC0u) : (t >> 16);
        const fl_vi rm = nan ? fl_vi{} : ((fl_vi)(t & 0xFFFFu) - 0x8000);
        store_h16(pb + i + j, ph);
        *reinterpret_cast<fl_vs_u*>(r + i + j) = __builtin_convertvector(rm, fl_vs);
      }
      for (; j < n; ++j) {
        uint16_t hb;
        int16_t rb;
        lowbit::master_split(w32[j], hb, rb);
        pb[i + j] = hb;
        r[i + j] = rb;
      }
      return;
    }
    for (int j = 0; j < n; j += kW) {
      const int k = n - j < kW ? n - j : kW;
      fl_vf w = IO<float>::load(w32 + j);
      if (k == kW) {
        if constexpr (MASTER) IO<float>::store(m + i + j, w);
        IO<PT>::store(p + i + j, w);
      } else {
        if constexpr (MASTER) store_part(m + i + j, w, k);
        store_part(p + i + j, w, k);
      }
    }
  }
};

// grads as fp32 (exact)
template <class PT>
FL_AI void exact_grads(const PT* g, int64_t i, int n, float* out) {
  for (int j = 0; j < n; j += kW) {
    const int k = n - j < kW ? n - j : kW;
    IO<float>::store(out + j, k == kW ? IO<PT>::load(g + i + j) : load_part(g + i + j, k));
  }
}

// the old state of one block, dequantized exactly (lowbit_state.decode)
template <int ST>
FL_AI void exact_state_load(const void* s, const float* absmax, bool sign, int64_t i, int n, float* out) {
  if constexpr (ST == kStoreF32) {
    __builtin_memcpy(out, static_cast<const float*>(s) + i, n * sizeof(float));
  } else if constexpr (ST == kStoreBF16) {
    const uint16_t* h = static_cast<const uint16_t*>(s) + i;
    int j = 0;
    for (; j + kW <= n; j += kW) st16(out + j, bf16_load_v(h + j));
    for (; j < n; ++j) out[j] = lowbit::bf16_bits_to_float(h[j]);
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(s) + i;
    const float* map = sign ? lowbit::kSignedMap : lowbit::kUnsignedMap;
    const float scale = absmax[i / kQB];
    int j = 0;
#if FL_ISA == 2
    // map[code] * scale on 16 lanes: the same product. The 256-entry map is 16 registers; a code's
    // low 5 bits pick one of 32 entries in each pair (vpermt2ps), its bits 5-7 the pair (blends). It
    // replaced a vgatherdps: int8 LAMB 0.88x, LARS 0.98x the step time side by side (AMD EPYC)
    __m512 tab[16];
    for (int q = 0; q < 16; ++q) tab[q] = _mm512_loadu_ps(map + 16 * q);
    const __m512 vs = _mm512_set1_ps(scale);
    for (; j + kW <= n; j += kW) {
      const __m512i idx = _mm512_maskz_cvtepu8_epi32((__mmask16)0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
      __m512 pr[8];
      for (int q = 0; q < 8; ++q) pr[q] = _mm512_permutex2var_ps(tab[2 * q], idx, tab[2 * q + 1]);
      const __mmask16 b5 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(32));
      const __mmask16 b6 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(64));
      const __mmask16 b7 = _mm512_test_epi32_mask(idx, _mm512_set1_epi32(128));
      __m512 l1[4];
      for (int q = 0; q < 4; ++q) l1[q] = _mm512_mask_blend_ps(b5, pr[2 * q], pr[2 * q + 1]);
      const __m512 l2a = _mm512_mask_blend_ps(b6, l1[0], l1[1]), l2b = _mm512_mask_blend_ps(b6, l1[2], l1[3]);
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_mask_blend_ps(b7, l2a, l2b), vs));
    }
#elif FL_ISA == 1
    for (; j + 8 <= n; j += 8) {  // map[code] * scale on 8 lanes
      const __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + j)));
      _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_i32gather_ps(map, idx, 4), _mm256_set1_ps(scale)));
    }
#endif
    for (; j < n; ++j) out[j] = lowbit::dequantize(c[j], scale, map);
  }
}

// 8 Philox calls in 64-bit lanes: each lane holds a 32-bit word in its low half. The high halves
// hold whatever the round left there: the products read only the low halves (vpmuludq), and every
// value leaves through a truncation or a shift by 32, so they never reach a result.
typedef uint64_t fl_v8q __attribute__((vector_size(64)));

// the 64-bit products lo32(a) * m of 8 lanes (lowbit::mulhilo32 per lane: hi = p >> 32, lo = low half)
FL_AI fl_v8q mul32_v(fl_v8q a, uint32_t m) {
#if FL_ISA == 2
  // (maskz form: NOTE [AVX-512 intrinsics with a defined source] in isa_impl.h)
  return (fl_v8q)_mm512_maskz_mul_epu32((__mmask8)0xFF, (__m512i)a, _mm512_set1_epi64(m));
#elif FL_ISA == 1
  typedef uint64_t v4q __attribute__((vector_size(32)));
  const __m256i mv = _mm256_set1_epi64x(m);
  const v4q lo = (v4q)_mm256_mul_epu32((__m256i)__builtin_shufflevector(a, a, 0, 1, 2, 3), mv);
  const v4q hi = (v4q)_mm256_mul_epu32((__m256i)__builtin_shufflevector(a, a, 4, 5, 6, 7), mv);
  return __builtin_shufflevector(lo, hi, 0, 1, 2, 3, 4, 5, 6, 7);
#else
  return (a & 0xFFFFFFFFull) * uint64_t(m);
#endif
}

// The stochastic-rounding bits of elements e0 .. e0+n-1 (lowbit.h NOTE [Stochastic-rounding bits]):
// BUFFERS = 1 (LARS: out0) or 2 (LAMB: out0, out1), 16 bits per element and buffer. Element e takes
// half k*P + e%P of the Philox call of counter q = e / P (P = 8 / BUFFERS; counter (q, step, param
// id, q >> 32), key the seed): lowbit.h philox_words per call, 8 calls per vector of 64-bit lanes,
// two vectors at a time. The halves a buffer takes from a call are consecutive (P of them: its words
// 2k/P .. ), so writing each call's words in order makes the buffer's halves the uint16 array in
// element order (little endian).
// e0 is a multiple of 256 (a quantization block's start), so q0 = e0 / P is a multiple of 32 and the
// calls of a block never cross 2**32 (c3 is uniform).
template <int BUFFERS>
FL_AI void exact_sr_bits(const ExactCtx& x, const ExactTile& a, int64_t e0, int n, uint16_t* out0, uint16_t* out1) {
  constexpr int P = 8 / BUFFERS;  // elements per call (4 / BUFFERS words of it per buffer)
  const uint32_t k0i = uint32_t(x.seed), k1i = uint32_t(x.seed >> 32);
  const uint32_t c1i = uint32_t(a.step_after), c2i = a.pidx;
  const uint64_t q0 = uint64_t(e0) / P;
  const uint32_t hi = uint32_t(q0 >> 32), lo0 = uint32_t(q0);
  const fl_v8q lane = {0, 1, 2, 3, 4, 5, 6, 7};
  // round 0's product of c2 (the param id: the same for every call) and its halves
  const uint64_t q1 = uint64_t(c2i) * lowbit::kPhiloxM1;
  uint64_t* o64[2] = {reinterpret_cast<uint64_t*>(out0), reinterpret_cast<uint64_t*>(out1)};
  const int calls = (n + P - 1) / P;
  for (int j = 0; j < calls; j += 16) {
    fl_v8q c0[2], c1[2], c2[2], c3[2];
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {  // round 0
      const fl_v8q p0 = mul32_v(lane + uint64_t(lo0 + uint32_t(j + 8 * h)), lowbit::kPhiloxM0);
      c0[h] = fl_v8q{} + uint64_t(uint32_t(q1 >> 32) ^ c1i ^ k0i);
      c2[h] = (p0 >> 32) ^ uint64_t(hi ^ k1i);
      c1[h] = fl_v8q{} + uint64_t(uint32_t(q1));
      c3[h] = p0;
    }
    uint32_t k0 = k0i, k1 = k1i;
#pragma GCC unroll 9
    for (int r = 1; r < 10; ++r) {
      k0 += lowbit::kPhiloxW0;
      k1 += lowbit::kPhiloxW1;
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const fl_v8q p0 = mul32_v(c0[h], lowbit::kPhiloxM0), p1 = mul32_v(c2[h], lowbit::kPhiloxM1);
        c0[h] = (p1 >> 32) ^ c1[h] ^ uint64_t(k0);
        c2[h] = (p0 >> 32) ^ c3[h] ^ uint64_t(k1);
        c1[h] = p1;
        c3[h] = p0;
      }
    }
    // call j + 8h + l's words (w0, w1) and (w2, w3) as the two 32-bit halves of one 64-bit lane
    fl_v8q w01[2], w23[2];
    for (int h = 0; h < 2; ++h) {
      w01[h] = (c0[h] & 0xFFFFFFFFull) | (c1[h] << 32);
      w23[h] = (c2[h] & 0xFFFFFFFFull) | (c3[h] << 32);
    }
    typedef uint64_t fl_v8q_u __attribute__((vector_size(64), aligned(8), may_alias));
    if constexpr (BUFFERS == 2) {  // (w0, w1) of each call to buffer 0, (w2, w3) to buffer 1
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<fl_v8q_u*>(o64[0] + j + 8 * h) = w01[h];
        *reinterpret_cast<fl_v8q_u*>(o64[1] + j + 8 * h) = w23[h];
      }
    } else {  // (w0, w1, w2, w3) of each call in turn
      for (int h = 0; h < 2; ++h) {
        *reinterpret_cast<fl_v8q_u*>(o64[0] + 2 * (j + 8 * h)) = __builtin_shufflevector(w01[h], w23[h], 0, 8, 1, 9, 2, 10, 3, 11);
        *reinterpret_cast<fl_v8q_u*>(o64[0] + 2 * (j + 8 * h) + 8) = __builtin_shufflevector(w01[h], w23[h], 4, 12, 5, 13, 6, 14, 7, 15);
      }
    }
  }
}

// The midpoints by search level (lowbit::quantize_code's step s = 128 >> L at level L): level L holds
// the 2**L candidates mid[k*2s + s - 1], k = 0 .. 2**L - 1, at offset 2**L - 1.
struct MidTree {
  float t[255 + 16];  // (+16: whole-register loads of the short levels stay inside)
};
constexpr MidTree mid_tree(const float* mid) {
  MidTree r{};
  for (int L = 0; L < 8; ++L) {
    const int s = 128 >> L;
    for (int k = 0; k < (1 << L); ++k) r.t[(1 << L) - 1 + k] = mid[k * 2 * s + s - 1];
  }
  return r;
}
[[maybe_unused]] constexpr MidTree kSignedTree = mid_tree(lowbit::kSignedMid);
[[maybe_unused]] constexpr MidTree kUnsignedTree = mid_tree(lowbit::kUnsignedMid);

// lowbit::block_absmax on 16 lanes: the max of the |x| (all >= +0: any order gives the same value,
// the same compare a > m ? a : m per lane), the quiet NaN kScaleNaN if any is NaN
FL_AI float block_absmax_v(const float* x, int n) {
  fl_vf m = {};
  fl_vi nan = {};
  int j = 0;
  for (; j + kW <= n; j += kW) {
    const fl_vf a = (fl_vf)(bits(ld16(x + j)) & 0x7FFFFFFFu);
    nan |= a != a;
    m = a > m ? a : m;
  }
  float r = 0.0f;
  bool any = false;
  for (int l = 0; l < kW; ++l) {
    r = m[l] > r ? m[l] : r;
    any |= nan[l] != 0;
  }
  for (; j < n; ++j) {
    const float a = fabsf(x[j]);
    any |= a != a;
    r = a > r ? a : r;
  }
  return any ? lowbit::float_from_bits(lowbit::kScaleNaN) : r;
}

// store the new state of one block from its fp32 values s32 (lowbit_state NOTE [Low-bit state: where
// values become fp32]); `rand`: the block's stochastic-rounding bits for bf16 (exact_sr_bits)
template <int ST>
FL_AI void exact_state_store(void* s, float* absmax, bool sign, int64_t i, int n, const float* s32,
                             const uint16_t* rand) {
  if constexpr (ST == kStoreF32) {
    __builtin_memcpy(static_cast<float*>(s) + i, s32, n * sizeof(float));
  } else if constexpr (ST == kStoreBF16) {
    uint16_t* h = static_cast<uint16_t*>(s) + i;
    int j = 0;
    for (; j + kW <= n; j += kW)
      store_h16(h + j, bf16_sr_v(ld16(s32 + j), __builtin_convertvector(*reinterpret_cast<const fl_vh_a*>(rand + j), fl_vu)));
    for (; j < n; ++j) h[j] = lowbit::bf16_sr_bits(s32[j], rand[j]);
  } else {
    uint8_t* c = static_cast<uint8_t*>(s) + i;
    const float* mid = sign ? lowbit::kSignedMid : lowbit::kUnsignedMid;
    const float scale = block_absmax_v(s32, n);
    absmax[i / kQB] = scale;
    int j = 0;
    [[maybe_unused]] const bool pos = scale > 0.0f;
#if FL_ISA == 2
    // (the maskz / mask forms: NOTE [AVX-512 intrinsics with a defined source] in isa_impl.h)
    // lowbit::quantize_code's 8-step search on 16 lanes, the same compares: the candidates of step s
    // are mid[k*2s + s - 1] (k = the code so far / 2s), MidTree's level of 128/s values, picked by
    // in-register permutes (levels of up to 16 values: one register; 32: two; 64, 128: 4, 8)
    const float* t = sign ? kSignedTree.t : kUnsignedTree.t;
    const __m512 l1 = _mm512_loadu_ps(t + 1), l2 = _mm512_loadu_ps(t + 3), l3 = _mm512_loadu_ps(t + 7);
    const __m512 l4 = _mm512_loadu_ps(t + 15), l5a = _mm512_loadu_ps(t + 31), l5b = _mm512_loadu_ps(t + 47);
    __m512 l6[4], l7[8];
    for (int q = 0; q < 4; ++q) l6[q] = _mm512_loadu_ps(t + 63 + 16 * q);
    for (int q = 0; q < 8; ++q) l7[q] = _mm512_loadu_ps(t + 127 + 16 * q);
    const __m512 m0 = _mm512_set1_ps(t[0]);
    for (; j + kW <= n; j += kW) {
      const __m512 v = pos ? _mm512_maskz_div_ps((__mmask16)0xFFFF, _mm512_loadu_ps(s32 + j), _mm512_set1_ps(scale)) : _mm512_setzero_ps();
      // k: the code's bits above the current step (the candidate index within the level)
      __m512i k = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(m0, v, _CMP_LT_OQ), _mm512_set1_epi32(1));
      auto step = [&](__m512 m) {
        k = _mm512_add_epi32(_mm512_add_epi32(k, k), _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(m, v, _CMP_LT_OQ), _mm512_set1_epi32(1)));
      };
      step(_mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, k, l1));
      step(_mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, k, l2));
      step(_mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, k, l3));
      step(_mm512_maskz_permutexvar_ps((__mmask16)0xFFFF, k, l4));
      step(_mm512_permutex2var_ps(l5a, k, l5b));
      {
        const __mmask16 b5 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(32));
        step(_mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l6[0], k, l6[1]), _mm512_permutex2var_ps(l6[2], k, l6[3])));
      }
      {
        const __mmask16 b5 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(32));
        const __mmask16 b6 = _mm512_test_epi32_mask(k, _mm512_set1_epi32(64));
        const __m512 lo = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[0], k, l7[1]), _mm512_permutex2var_ps(l7[2], k, l7[3]));
        const __m512 hi = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[4], k, l7[5]), _mm512_permutex2var_ps(l7[6], k, l7[7]));
        step(_mm512_mask_blend_ps(b6, lo, hi));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_maskz_cvtepi32_epi8((__mmask16)0xFFFF, k));
    }
#elif FL_ISA == 1
    // lowbit::quantize_code's 8-step search on 8 lanes (gathers of the midpoints); the same compares
    for (; j + 8 <= n; j += 8) {
      const __m256 v = pos ? _mm256_div_ps(_mm256_loadu_ps(s32 + j), _mm256_set1_ps(scale)) : _mm256_setzero_ps();
      __m256i cc = _mm256_setzero_si256();
      for (int step = 128; step > 0; step >>= 1) {
        const __m256 m = _mm256_i32gather_ps(mid, _mm256_add_epi32(cc, _mm256_set1_epi32(step - 1)), 4);
        cc = _mm256_add_epi32(cc, _mm256_and_si256(_mm256_castps_si256(_mm256_cmp_ps(m, v, _CMP_LT_OQ)), _mm256_set1_epi32(step)));
      }
      alignas(32) int32_t q[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), cc);
      for (int l = 0; l < 8; ++l) c[j + l] = uint8_t(q[l]);
    }
#endif
    for (; j < n; ++j) c[j] = lowbit::quantize_code(lowbit::normalize(s32[j], scale), mid);
  }
}

// the reference's _grad per lane: ((g * inv) / clip), negated if neg
FL_AI fl_dn exact_grad(const ExactCtx& x, fl_dn g) {
  g = g * x.inv;
  if (x.has_clip) g = g / x.clip;
  return x.neg ? -g : g;
}

// 16 double lanes of a sum of squares: lane l takes the elements j with j % 16 == l, held as 16/kDN
// registers (lanes past the block's end add +0.0: a sum of squares is +0, positive, inf or NaN,
// which + 0.0 leaves as it is)
constexpr int kDQ = kW / kDN;
struct DAcc {
  fl_dn v[kDQ] = {};
  FL_MI void add(int q, fl_dn x, int k) {
    if (k < kDN) x = lane_mask_d(x, k);
    v[q] += x * x;
  }
  FL_MI double sum() const {
    double s = 0.0;
    for (int q = 0; q < kDQ; ++q)
      for (int l = 0; l < kDN; ++l) s += v[q][l];
    return s;
  }
};

// the weights' squares of one block (fp32 values in wf, n of them) into sw: lars_exact_sumsq_t's w
// accumulation, the same adds in the same order
FL_AI void exact_wsum_block(DAcc& sw, const float* wf, int n) {
  for (int j = 0; j < n; j += kW) {
#pragma GCC unroll 8
    for (int q = 0; q < kDQ; ++q) {
      const int o = j + q * kDN;
      sw.add(q, ldd(wf + o), n - o);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// LARS

// NOTE: [Carried weight norms of the exact step]
// With the gradients' sums given (taken in backward), pass 1 sums only the weights
// (lars_exact_wsumsq_t), and with carry_weight_norms not even that: pass 2 sums the new weights as
// the next pass 1 would load them (ExactW::load of what it just stored: the fp32 master, the rebuilt
// remainder master or the bf16/fp16 param) with the same DAcc lanes and order, so a carried sum is
// bitwise the one pass 1 would take, and the step is the same with or without carrying.
template <class PT, bool MASTER, bool REM>
void lars_exact_wsumsq_t(const ExactTile& a, double* out) {
  const ExactW<PT, MASTER, REM> W(a);
  DAcc sw;
  alignas(64) float wf[kQB] = {};
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    W.load(i, n, wf);
    exact_wsum_block(sw, wf, n);
  }
  out[0] = sw.sum();
}

template <class PT, bool MASTER, bool REM>
void lars_exact_sumsq_t(const ExactTile& a, const ExactCtx& x, double lam, double* out) {
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  DAcc sw, sg, su;
  alignas(64) float wf[kQB] = {}, gf[kQB] = {};
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    W.load(i, n, wf);
    exact_grads(gp, i, n, gf);
    for (int j = 0; j < n; j += kW) {
#pragma GCC unroll 8
      for (int q = 0; q < kDQ; ++q) {
        const int o = j + q * kDN, k = n - o;
        const fl_dn w = ldd(wf + o), g = exact_grad(x, ldd(gf + o));
        sw.add(q, w, k);
        sg.add(q, g, k);
        su.add(q, g + lam * w, k);
      }
    }
  }
  out[0] = sw.sum();
  out[1] = sg.sum();
  out[2] = su.sum();
}

// Pass 2 (NOTE [Low-bit element math in fp32] in lars_math.h): the element math on 16 fp32
// lanes, as the fp32 kernels run it; the sums (usum, wsum) in double as pass 1 takes them.
template <class PT, bool MASTER, bool REM, int ST>
void lars_exact_update_t(const ExactTile& a, const ExactCtx& x, const LarsExactCoef& c_in, double* wsum, double lam_u,
                         double* usum) {
  const LarsExactCoef c = c_in;
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  const bool mom = c.mom != 0;
  const float gscale = static_cast<float>(x.neg ? -x.inv : x.inv);  // the fp32 kernels' factor
  // the register holds what the next pass 1 loads (the fp32 param or master); otherwise reload it
  constexpr bool kRegW = !REM && (MASTER || std::is_same<PT, float>::value);
  alignas(64) float wf[kQB] = {}, gf[kQB] = {}, sf[kQB] = {}, s32[kQB], w32[kQB];
  alignas(64) uint16_t rnd[kQB] = {};  // (written through uint64 words: exact_sr_bits)
  DAcc sw;  // the new weights' squares (wsum: NOTE [Carried weight norms of the exact step])
  DAcc su;  // usum: (g + lam_u*w)^2 of the old weights, as lars_exact_sumsq_t's out[2] (the same lanes)
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    W.load(i, n, wf);
    exact_grads(gp, i, n, gf);
    if (mom) exact_state_load<ST>(a.s0, a.a0, true, a.start + i, n, sf);
    for (int j = 0; j < n; j += kW) {
      const fl_vf w = ld16(wf + j);
      fl_vf b = ld16(sf + j);
      const fl_vf wn = lars_exact_update<fl_vf>(c, w, ld16(gf + j) * gscale, b);
      st16(s32 + j, b);
      st16(w32 + j, wn);
      if (usum || (wsum && kRegW)) {
#pragma GCC unroll 8
        for (int q = 0; q < kDQ; ++q) {
          const int o = j + q * kDN, k = n - o;
          if (usum) {
            const fl_dn wd = ldd(wf + o);
            su.add(q, exact_grad(x, ldd(gf + o)) + lam_u * wd, k);
          }
          if (kRegW && wsum) sw.add(q, ldd(w32 + o), k);
        }
      }
    }
    W.store(i, n, w32);
    if (wsum && !kRegW) {  // as the next pass 1 loads them (wf is free again)
      W.load(i, n, wf);
      exact_wsum_block(sw, wf, n);
    }
    if (mom) {
      if constexpr (ST == kStoreBF16) exact_sr_bits<1>(x, a, a.start + i, n, rnd, nullptr);
      exact_state_store<ST>(a.s0, a.a0, true, a.start + i, n, s32, rnd);
    }
  }
  if (wsum) *wsum = sw.sum();
  if (usum) *usum = su.sum();
}

// ------------------------------------------------------------------------------------------------
// LAMB

// one block's element math (lars_math.h NOTE [Low-bit element math in fp32], on 16 fp32 lanes): pass 1
// adds w_d, g (the exact scaled grad, before l2) and u into the sums; pass 2 writes the new moments'
// fp32 values and the new weights' (w_d - k*u)
template <class PT, bool MASTER, bool REM, int ST, bool PASS2>
FL_AI void lamb_exact_block(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c, int64_t i, int n,
                            DAcc* acc, float* m32, float* v32, float* w32) {
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  alignas(64) float wf[kQB], gf[kQB], mf[kQB], vf[kQB];
  if (n < kQB) {  // the lanes past the end: defined values (never stored, masked in the sums)
    for (int j = n; j < kQB; ++j) wf[j] = gf[j] = mf[j] = vf[j] = 0.0f;
  }
  W.load(i, n, wf);
  exact_grads(gp, i, n, gf);
  exact_state_load<ST>(a.s0, a.a0, true, a.start + i, n, mf);
  exact_state_load<ST>(a.s1, a.a1, false, a.start + i, n, vf);
  const float gscale = c.c.gscale;
  for (int j = 0; j < n; j += kW) {
    fl_vf m = ld16(mf + j), v = ld16(vf + j), u;
    const fl_vf wd = lamb_exact_direction<fl_vf>(c, ld16(wf + j), ld16(gf + j) * gscale, m, v, u);
    if constexpr (PASS2) {
      st16(m32 + j, m);
      st16(v32 + j, v);
      st16(w32 + j, wd - c.c.k * u);
    } else {  // the sums in double: w_d and u as computed, ||g|| of the exact gradient (as pass 1 of LARS)
      alignas(64) float tw[kW], tu[kW];
      st16(tw, wd);
      st16(tu, u);
#pragma GCC unroll 8
      for (int q = 0; q < kDQ; ++q) {
        const int o = j + q * kDN, k = n - o;
        acc[0].add(q, ldd(tw + q * kDN), k);
        acc[1].add(q, exact_grad(x, ldd(gf + o)), k);
        acc[2].add(q, ldd(tu + q * kDN), k);
      }
    }
  }
}

template <class PT, bool MASTER, bool REM, int ST>
void lamb_exact_pass1_t(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c_in, double* out) {
  const LambExactCoef c = c_in;
  DAcc acc[3];
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    lamb_exact_block<PT, MASTER, REM, ST, false>(a, x, c, i, n, acc, nullptr, nullptr, nullptr);
  }
  out[0] = acc[0].sum();
  out[1] = acc[1].sum();
  out[2] = acc[2].sum();
}

template <class PT, bool MASTER, bool REM, int ST>
void lamb_exact_pass2_t(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c_in) {
  const LambExactCoef c = c_in;
  const ExactW<PT, MASTER, REM> W(a);
  alignas(64) float m32[kQB], v32[kQB], w32[kQB];
  alignas(64) uint16_t r0[kQB] = {}, r1[kQB] = {};  // (written through uint64 words: exact_sr_bits)
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    lamb_exact_block<PT, MASTER, REM, ST, true>(a, x, c, i, n, nullptr, m32, v32, w32);
    W.store(i, n, w32);
    // LAMB's two buffers take halves j and 4 + j of one Philox call (lowbit_state.BUFFER)
    if constexpr (ST == kStoreBF16) exact_sr_bits<2>(x, a, a.start + i, n, r0, r1);
    exact_state_store<ST>(a.s0, a.a0, true, a.start + i, n, m32, r0);
    exact_state_store<ST>(a.s1, a.a1, false, a.start + i, n, v32, r1);
  }
}

// ------------------------------------------------------------------------------------------------
// dispatch: variant (with remainder masters) x storage

template <class F>
FL_AI void by_exact_variant(int variant, int storage, F&& f) {
  auto st = [&]<class PT, bool M, bool R>() {
    if (storage == kStoreBF16) f.template operator()<PT, M, R, kStoreBF16>();
    else if (storage == kStoreInt8) f.template operator()<PT, M, R, kStoreInt8>();
    else f.template operator()<PT, M, R, kStoreF32>();
  };
  switch (variant) {
    case kF32: st.template operator()<float, false, false>(); break;
    case kBF16: st.template operator()<bf16, false, false>(); break;
    case kBF16Master: st.template operator()<bf16, true, false>(); break;
    case kBF16Remainder: st.template operator()<bf16, false, true>(); break;
    case kF16: st.template operator()<f16, false, false>(); break;
    default: st.template operator()<f16, true, false>(); break;
  }
}

void lars_exact_sumsq(const ExactTile& a, int variant, const ExactCtx& x, double lam, double* out) {
  by_exact_variant(variant, kStoreF32, [&]<class PT, bool M, bool R, int ST>() {
    lars_exact_sumsq_t<PT, M, R>(a, x, lam, out);
  });
}

void lars_exact_wsumsq(const ExactTile& a, int variant, double* out) {
  by_exact_variant(variant, kStoreF32, [&]<class PT, bool M, bool R, int ST>() { lars_exact_wsumsq_t<PT, M, R>(a, out); });
}

void lars_exact_update_k(const ExactTile& a, int variant, const ExactCtx& x, const LarsExactCoef& c, double* wsum,
                         double lam_u, double* usum) {
  by_exact_variant(variant, x.storage, [&]<class PT, bool M, bool R, int ST>() {
    lars_exact_update_t<PT, M, R, ST>(a, x, c, wsum, lam_u, usum);
  });
}

void lamb_exact_pass1(const ExactTile& a, int variant, const ExactCtx& x, const LambExactCoef& c, double* out) {
  by_exact_variant(variant, x.storage, [&]<class PT, bool M, bool R, int ST>() {
    lamb_exact_pass1_t<PT, M, R, ST>(a, x, c, out);
  });
}

void lamb_exact_pass2(const ExactTile& a, int variant, const ExactCtx& x, const LambExactCoef& c) {
  by_exact_variant(variant, x.storage, [&]<class PT, bool M, bool R, int ST>() {
    lamb_exact_pass2_t<PT, M, R, ST>(a, x, c);
  });
}
