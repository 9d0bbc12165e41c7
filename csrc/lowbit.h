// Low-bit optimizer-state arithmetic (issue #26): Philox-4x32-10, bf16 rounding (nearest-even and
// stochastic), block-wise 8-bit quantization with dynamic-tree maps, and the exact fp32 master split
// into a bf16 param plus an int16 remainder.
//
// The specification is fusedlars/backends/lowbit.py: its docstrings and NOTE blocks state each formula
// and its source; this header computes the same functions, scalar per element, bit for bit
// (tests/test_lowbit.py compiles it with g++ and compares against lowbit.py, and compiles it with nvcc
// for sm_80 where nvcc is on PATH). fusedlars/backends/triton_lowbit.py is the Triton copy.
//
// Torch-free and __host__ __device__ (FUSEDLARS_HD / FUSEDLARS_INLINE of lars_math.h): the CUDA kernels
// call these per element, the CPU kernels per element or per SIMD lane.
//
// NOTE: [Integers, not conversions]
// Every rounding here works on fp32 bit patterns with 32-bit unsigned integer arithmetic (wrapping
// mod 2**32), never with the hardware's float -> bf16 conversions: their NaN results differ between
// CPUs, CUDA and Triton, and a stochastic rounding has no instruction at all. The only float
// operations are one IEEE division (x / scale) and one product (map[code] * scale): build without
// fast-math (no --use_fast_math, no -ffast-math), or the division is no longer correctly rounded.
//
// NOTE: [Tables in memory the caller chooses]
// The quantization maps and their midpoints are 256 / 255 fp32 values (kSignedMap ... below, equal
// to lowbit.py's tables: checked bitwise by tests/test_lowbit.py). The functions take them by pointer,
// so a CUDA kernel can keep them in __constant__ or shared memory and the CPU reads these host arrays
// (a namespace-scope constexpr array cannot be indexed at run time in device code).
#pragma once

#include <cstdint>

#include "lars_math.h"  // FUSEDLARS_HD, FUSEDLARS_INLINE

namespace fusedlars {
namespace lowbit {

// ---------------------------------------------------------------------------------------------
// bit patterns

FUSEDLARS_HD FUSEDLARS_INLINE uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  __builtin_memcpy(&b, &x, sizeof b);
  return b;
#endif
}

FUSEDLARS_HD FUSEDLARS_INLINE float float_from_bits(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float x;
  __builtin_memcpy(&x, &b, sizeof x);
  return x;
#endif
}

FUSEDLARS_HD FUSEDLARS_INLINE bool is_nan_bits(uint32_t b) { return (b & 0x7FFFFFFFu) > 0x7F800000u; }

// A bf16 pattern as the fp32 it represents (exact).
FUSEDLARS_HD FUSEDLARS_INLINE float bf16_bits_to_float(uint16_t h) { return float_from_bits(uint32_t(h) << 16); }

// ---------------------------------------------------------------------------------------------
// Philox-4x32-10 (lowbit.philox4x32 / philox_words)

constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;

FUSEDLARS_HD FUSEDLARS_INLINE void mulhilo32(uint32_t a, uint32_t m, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  hi = __umulhi(a, m);
  lo = a * m;
#else
  const uint64_t p = uint64_t(a) * uint64_t(m);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
#endif
}

// Philox-4x32-10 of counter c (in place: c becomes the 4 output words) under key (k0, k1).
FUSEDLARS_HD FUSEDLARS_INLINE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(c[0], kPhiloxM0, hi0, lo0);
    mulhilo32(c[2], kPhiloxM1, hi1, lo1);
    const uint32_t n0 = hi1 ^ c[1] ^ k0, n2 = hi0 ^ c[3] ^ k1;
    c[0] = n0;
    c[1] = lo1;
    c[2] = n2;
    c[3] = lo0;
  }
}

// The 4 random words of element `element` of param `param_index` at step `step` under a 64-bit seed:
// counter (element mod 2**32, step mod 2**32, param_index, element >> 32), key (seed low, seed high).
FUSEDLARS_HD FUSEDLARS_INLINE void philox_words(uint64_t seed, uint64_t step, uint32_t param_index, uint64_t element,
                                                uint32_t out[4]) {
  out[0] = uint32_t(element);
  out[1] = uint32_t(step);
  out[2] = param_index;
  out[3] = uint32_t(element >> 32);
  philox4x32_10(out, uint32_t(seed), uint32_t(seed >> 32));
}

// NOTE: [Stochastic-rounding bits] (lowbit.py NOTE [Stochastic-rounding bits: 16 per value, 8 per
// Philox call]): a value takes 16 random bits, a Philox call gives 8 halves, so buffer k of `buffers`
// (1: LARS's momentum; 2: LAMB's exp_avg, exp_avg_sq) of element e takes half h = k*P + e%P of the
// call of counter e / P, P = 8 / buffers; half h is (word[h / 2] >> 16*(h % 2)) & 0xFFFF.
FUSEDLARS_HD FUSEDLARS_INLINE uint32_t sr_half(const uint32_t w[4], int h) {
  // selects, not w[h >> 1]: a dynamically indexed array would live in a GPU thread's local memory
  const int k = h >> 1;
  const uint32_t x = k == 0 ? w[0] : k == 1 ? w[1] : k == 2 ? w[2] : w[3];
  return (x >> (16 * (h & 1))) & 0xFFFFu;
}

// The stochastic-rounding bits of element `element` for each of `buffers` (1 or 2) state buffers:
// out[k] for buffer k.
FUSEDLARS_HD FUSEDLARS_INLINE void sr_bits(uint64_t seed, uint64_t step, uint32_t param_index, uint64_t element,
                                           int buffers, uint32_t out[2]) {
  const int per = buffers == 2 ? 4 : 8;
  uint32_t w[4];
  philox_words(seed, step, param_index, element / uint64_t(per), w);
  const int j = int(element % uint64_t(per));
  out[0] = sr_half(w, j);
  out[1] = buffers == 2 ? sr_half(w, per + j) : 0u;
}

// ---------------------------------------------------------------------------------------------
// bf16 rounding (lowbit.round_bf16_nearest_bits / round_bf16_stochastic_bits)

// Round to nearest even; a NaN keeps its sign and top payload bits, quiet bit set.
FUSEDLARS_HD FUSEDLARS_INLINE uint16_t bf16_rne_bits(float x) {
  const uint32_t b = float_bits(x);
  if (is_nan_bits(b)) return uint16_t((b >> 16) | 0x0040u);
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}

// Stochastic rounding with the low 16 bits of `rand`; inf / NaN as bf16_rne_bits. An inf's low 16
// bits are zero, so the add-and-truncate already gives its bf16 inf (bf16_rne_bits' value): only NaN
// takes its own branch.
FUSEDLARS_HD FUSEDLARS_INLINE uint16_t bf16_sr_bits(float x, uint32_t rand) {
  const uint32_t b = float_bits(x);
  if (is_nan_bits(b)) return uint16_t((b >> 16) | 0x0040u);  // NaN: bf16_rne_bits'
  return uint16_t((b + (rand & 0xFFFFu)) >> 16);
}

// ---------------------------------------------------------------------------------------------
// block-wise 8-bit quantization (lowbit.block_absmax / normalize / quantize_codes / dequantize_blockwise)

constexpr int kQBlock = 256;     // elements per block; blocks start at a param's element 0
constexpr int kSignedZero = 127;  // the code of 0.0 in kSignedMap (0 in kUnsignedMap)
constexpr uint32_t kScaleNaN = 0x7FC00000u;

// max |x[i]| over n elements (a block: n <= kQBlock), the quiet NaN kScaleNaN if any is NaN.
FUSEDLARS_HD FUSEDLARS_INLINE float block_absmax(const float* x, int n) {
  float m = 0.0f;
  bool nan = false;
  for (int i = 0; i < n; ++i) {
    const float a = fabsf(x[i]);
    nan |= a != a;
    m = a > m ? a : m;
  }
  return nan ? float_from_bits(kScaleNaN) : m;
}

// v = x / scale (IEEE division) where scale > 0, else 0 (scale 0 or NaN).
FUSEDLARS_HD FUSEDLARS_INLINE float normalize(float x, float scale) { return scale > 0.0f ? x / scale : 0.0f; }

// The code of normalized v: #{i : mid[i] < v}, by an 8-step binary search over the 255 midpoints.
FUSEDLARS_HD FUSEDLARS_INLINE uint8_t quantize_code(float v, const float* mid) {
  int c = 0;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int step = 128; step > 0; step >>= 1) c += (mid[c + step - 1] < v) ? step : 0;
  return uint8_t(c);
}

FUSEDLARS_HD FUSEDLARS_INLINE float dequantize(uint8_t code, float scale, const float* map) { return map[code] * scale; }

// ---------------------------------------------------------------------------------------------
// exact masters (lowbit.master_split / master_rebuild, NOTE [Master split] there)

FUSEDLARS_HD FUSEDLARS_INLINE void master_split(float master, uint16_t& param, int16_t& remainder) {
  const uint32_t b = float_bits(master);
  if (is_nan_bits(b)) {
    param = uint16_t(((b >> 16) & 0x8000u) | 0x7FC0u);
    remainder = 0;
    return;
  }
  const uint32_t t = b + 0x8000u;  // wraps mod 2**32
  param = uint16_t(t >> 16);
  remainder = int16_t(int32_t(t & 0xFFFFu) - 0x8000);
}

FUSEDLARS_HD FUSEDLARS_INLINE float master_rebuild(uint16_t param, int16_t remainder) {
  return float_from_bits((uint32_t(param) << 16) + uint32_t(int32_t(remainder)));
}

// ---------------------------------------------------------------------------------------------
// the tables (host arrays; see NOTE [Tables in memory the caller chooses])

// lowbit.dynamic_map(signed=True)
static constexpr float kSignedMap[256] = {
    -0x1.fc6666p-1f, -0x1.f53334p-1f, -0x1.eep-1f, -0x1.e6ccccp-1f, -0x1.df999ap-1f, -0x1.d86666p-1f,
    -0x1.d13334p-1f, -0x1.cap-1f, -0x1.c2ccccp-1f, -0x1.bb999ap-1f, -0x1.b46666p-1f, -0x1.ad3334p-1f,
    -0x1.a6p-1f, -0x1.9eccccp-1f, -0x1.97999ap-1f, -0x1.906666p-1f, -0x1.893334p-1f, -0x1.82p-1f,
    -0x1.7accccp-1f, -0x1.73999ap-1f, -0x1.6c6666p-1f, -0x1.653334p-1f, -0x1.5ep-1f, -0x1.56ccccp-1f,
    -0x1.4f999ap-1f, -0x1.486666p-1f, -0x1.413334p-1f, -0x1.3ap-1f, -0x1.32ccccp-1f, -0x1.2b999ap-1f,
    -0x1.246666p-1f, -0x1.1d3334p-1f, -0x1.16p-1f, -0x1.0eccccp-1f, -0x1.07999ap-1f, -0x1.006666p-1f,
    -0x1.f26666p-2f, -0x1.e4p-2f, -0x1.d5999ap-2f, -0x1.c73334p-2f, -0x1.b8ccccp-2f, -0x1.aa6666p-2f,
    -0x1.9cp-2f, -0x1.8d999ap-2f, -0x1.7f3334p-2f, -0x1.70ccccp-2f, -0x1.626666p-2f, -0x1.54p-2f,
    -0x1.45999ap-2f, -0x1.373334p-2f, -0x1.28ccccp-2f, -0x1.1a6666p-2f, -0x1.0cp-2f, -0x1.fb3334p-3f,
    -0x1.de6666p-3f, -0x1.c1999ap-3f, -0x1.a4ccccp-3f, -0x1.88p-3f, -0x1.6b3334p-3f, -0x1.4e6666p-3f,
    -0x1.31999ap-3f, -0x1.14ccccp-3f, -0x1.fp-4f, -0x1.b66666p-4f, -0x1.93d70ap-4f, -0x1.8851ecp-4f,
    -0x1.7cccccp-4f, -0x1.7147aep-4f, -0x1.65c29p-4f, -0x1.5a3d7p-4f, -0x1.4eb852p-4f, -0x1.433334p-4f,
    -0x1.37ae14p-4f, -0x1.2c28f6p-4f, -0x1.20a3d8p-4f, -0x1.151eb8p-4f, -0x1.09999ap-4f, -0x1.fc28f6p-5f,
    -0x1.e51eb8p-5f, -0x1.ce147ap-5f, -0x1.b70a3ep-5f, -0x1.ap-5f, -0x1.88f5c2p-5f, -0x1.71eb86p-5f,
    -0x1.5ae148p-5f, -0x1.43d70ap-5f, -0x1.2cccccp-5f, -0x1.15c29p-5f, -0x1.fd70a4p-6f, -0x1.cf5c28p-6f,
    -0x1.a147aep-6f, -0x1.733334p-6f, -0x1.451eb8p-6f, -0x1.170a3ep-6f, -0x1.d1eb86p-7f, -0x1.75c29p-7f,
    -0x1.3e76c8p-7f, -0x1.2c0832p-7f, -0x1.19999ap-7f, -0x1.072b02p-7f, -0x1.e978d4p-8f, -0x1.c49ba6p-8f,
    -0x1.9fbe76p-8f, -0x1.7ae148p-8f, -0x1.560418p-8f, -0x1.3126eap-8f, -0x1.0c49bap-8f, -0x1.ced916p-9f,
    -0x1.851eb8p-9f, -0x1.3b645ap-9f, -0x1.e353f8p-10f, -0x1.4fdf3cp-10f, -0x1.eecbfcp-11f, -0x1.b3d07cp-11f,
    -0x1.78d4fep-11f, -0x1.3dd98p-11f, -0x1.02dep-11f, -0x1.8fc504p-12f, -0x1.19ce08p-12f, -0x1.47ae14p-13f,
    -0x1.743e96p-14f, -0x1.15df66p-14f, -0x1.6f0068p-15f, -0x1.64840ep-16f, -0x1.040bfep-17f, -0x1.b43526p-19f,
    -0x1.27476cp-21f, 0.0f, 0x1.27476cp-21f, 0x1.b43526p-19f, 0x1.040bfep-17f, 0x1.64840ep-16f,
    0x1.6f0068p-15f, 0x1.15df66p-14f, 0x1.743e96p-14f, 0x1.47ae14p-13f, 0x1.19ce08p-12f, 0x1.8fc504p-12f,
    0x1.02dep-11f, 0x1.3dd98p-11f, 0x1.78d4fep-11f, 0x1.b3d07cp-11f, 0x1.eecbfcp-11f, 0x1.4fdf3cp-10f,
    0x1.e353f8p-10f, 0x1.3b645ap-9f, 0x1.851eb8p-9f, 0x1.ced916p-9f, 0x1.0c49bap-8f, 0x1.3126eap-8f,
    0x1.560418p-8f, 0x1.7ae148p-8f, 0x1.9fbe76p-8f, 0x1.c49ba6p-8f, 0x1.e978d4p-8f, 0x1.072b02p-7f,
    0x1.19999ap-7f, 0x1.2c0832p-7f, 0x1.3e76c8p-7f, 0x1.75c29p-7f, 0x1.d1eb86p-7f, 0x1.170a3ep-6f,
    0x1.451eb8p-6f, 0x1.733334p-6f, 0x1.a147aep-6f, 0x1.cf5c28p-6f, 0x1.fd70a4p-6f, 0x1.15c29p-5f,
    0x1.2cccccp-5f, 0x1.43d70ap-5f, 0x1.5ae148p-5f, 0x1.71eb86p-5f, 0x1.88f5c2p-5f, 0x1.ap-5f,
    0x1.b70a3ep-5f, 0x1.ce147ap-5f, 0x1.e51eb8p-5f, 0x1.fc28f6p-5f, 0x1.09999ap-4f, 0x1.151eb8p-4f,
    0x1.20a3d8p-4f, 0x1.2c28f6p-4f, 0x1.37ae14p-4f, 0x1.433334p-4f, 0x1.4eb852p-4f, 0x1.5a3d7p-4f,
    0x1.65c29p-4f, 0x1.7147aep-4f, 0x1.7cccccp-4f, 0x1.8851ecp-4f, 0x1.93d70ap-4f, 0x1.b66666p-4f,
    0x1.fp-4f, 0x1.14ccccp-3f, 0x1.31999ap-3f, 0x1.4e6666p-3f, 0x1.6b3334p-3f, 0x1.88p-3f,
    0x1.a4ccccp-3f, 0x1.c1999ap-3f, 0x1.de6666p-3f, 0x1.fb3334p-3f, 0x1.0cp-2f, 0x1.1a6666p-2f,
    0x1.28ccccp-2f, 0x1.373334p-2f, 0x1.45999ap-2f, 0x1.54p-2f, 0x1.626666p-2f, 0x1.70ccccp-2f,
    0x1.7f3334p-2f, 0x1.8d999ap-2f, 0x1.9cp-2f, 0x1.aa6666p-2f, 0x1.b8ccccp-2f, 0x1.c73334p-2f,
    0x1.d5999ap-2f, 0x1.e4p-2f, 0x1.f26666p-2f, 0x1.006666p-1f, 0x1.07999ap-1f, 0x1.0eccccp-1f,
    0x1.16p-1f, 0x1.1d3334p-1f, 0x1.246666p-1f, 0x1.2b999ap-1f, 0x1.32ccccp-1f, 0x1.3ap-1f,
    0x1.413334p-1f, 0x1.486666p-1f, 0x1.4f999ap-1f, 0x1.56ccccp-1f, 0x1.5ep-1f, 0x1.653334p-1f,
    0x1.6c6666p-1f, 0x1.73999ap-1f, 0x1.7accccp-1f, 0x1.82p-1f, 0x1.893334p-1f, 0x1.906666p-1f,
    0x1.97999ap-1f, 0x1.9eccccp-1f, 0x1.a6p-1f, 0x1.ad3334p-1f, 0x1.b46666p-1f, 0x1.bb999ap-1f,
    0x1.c2ccccp-1f, 0x1.cap-1f, 0x1.d13334p-1f, 0x1.d86666p-1f, 0x1.df999ap-1f, 0x1.e6ccccp-1f,
    0x1.eep-1f, 0x1.f53334p-1f, 0x1.fc6666p-1f, 0x1p+0f,
};

// lowbit.code_midpoints(signed=True)
static constexpr float kSignedMid[255] = {
    -0x1.f8ccccp-1f, -0x1.f1999ap-1f, -0x1.ea6666p-1f, -0x1.e33334p-1f, -0x1.dcp-1f, -0x1.d4ccccp-1f,
    -0x1.cd999ap-1f, -0x1.c66666p-1f, -0x1.bf3334p-1f, -0x1.b8p-1f, -0x1.b0ccccp-1f, -0x1.a9999ap-1f,
    -0x1.a26666p-1f, -0x1.9b3334p-1f, -0x1.94p-1f, -0x1.8cccccp-1f, -0x1.85999ap-1f, -0x1.7e6666p-1f,
    -0x1.773334p-1f, -0x1.7p-1f, -0x1.68ccccp-1f, -0x1.61999ap-1f, -0x1.5a6666p-1f, -0x1.533334p-1f,
    -0x1.4cp-1f, -0x1.44ccccp-1f, -0x1.3d999ap-1f, -0x1.366666p-1f, -0x1.2f3334p-1f, -0x1.28p-1f,
    -0x1.20ccccp-1f, -0x1.19999ap-1f, -0x1.126666p-1f, -0x1.0b3334p-1f, -0x1.04p-1f, -0x1.f99998p-2f,
    -0x1.eb3334p-2f, -0x1.dcccccp-2f, -0x1.ce6668p-2f, -0x1.cp-2f, -0x1.b19998p-2f, -0x1.a33334p-2f,
    -0x1.94ccccp-2f, -0x1.866668p-2f, -0x1.78p-2f, -0x1.699998p-2f, -0x1.5b3334p-2f, -0x1.4cccccp-2f,
    -0x1.3e6668p-2f, -0x1.3p-2f, -0x1.219998p-2f, -0x1.133334p-2f, -0x1.04ccccp-2f, -0x1.ecccccp-3f,
    -0x1.dp-3f, -0x1.b33334p-3f, -0x1.966666p-3f, -0x1.79999ap-3f, -0x1.5cccccp-3f, -0x1.4p-3f,
    -0x1.233334p-3f, -0x1.066666p-3f, -0x1.d33334p-4f, -0x1.a51eb8p-4f, -0x1.8e147cp-4f, -0x1.828f5cp-4f,
    -0x1.770a3cp-4f, -0x1.6b852p-4f, -0x1.6p-4f, -0x1.547aep-4f, -0x1.48f5c4p-4f, -0x1.3d70a4p-4f,
    -0x1.31eb84p-4f, -0x1.266668p-4f, -0x1.1ae148p-4f, -0x1.0f5c28p-4f, -0x1.03d70ap-4f, -0x1.f0a3d8p-5f,
    -0x1.d99998p-5f, -0x1.c28f5cp-5f, -0x1.ab852p-5f, -0x1.947aep-5f, -0x1.7d70a4p-5f, -0x1.666668p-5f,
    -0x1.4f5c28p-5f, -0x1.3851ecp-5f, -0x1.2147aep-5f, -0x1.0a3d7p-5f, -0x1.e66666p-6f, -0x1.b851ecp-6f,
    -0x1.8a3d7p-6f, -0x1.5c28f6p-6f, -0x1.2e147cp-6f, -0x1p-6f, -0x1.a3d70cp-7f, -0x1.5a1cacp-7f,
    -0x1.353f7cp-7f, -0x1.22d0e6p-7f, -0x1.10624ep-7f, -0x1.fbe76cp-8f, -0x1.d70a3cp-8f, -0x1.b22d0ep-8f,
    -0x1.8d4fep-8f, -0x1.6872bp-8f, -0x1.43958p-8f, -0x1.1eb852p-8f, -0x1.f3b644p-9f, -0x1.a9fbe8p-9f,
    -0x1.604188p-9f, -0x1.16872cp-9f, -0x1.99999ap-10f, -0x1.23a29cp-10f, -0x1.d14e3cp-11f, -0x1.9652bcp-11f,
    -0x1.5b574p-11f, -0x1.205bcp-11f, -0x1.cac082p-12f, -0x1.54c986p-12f, -0x1.bda512p-13f, -0x1.00e6bp-13f,
    -0x1.450efep-14f, -0x1.cd5f9ap-15f, -0x1.10a138p-15f, -0x1.e68a0cp-17f, -0x1.711948p-18f, -0x1.fe07p-20f,
    -0x1.27476cp-22f, 0x1.27476cp-22f, 0x1.fe07p-20f, 0x1.711948p-18f, 0x1.e68a0cp-17f, 0x1.10a138p-15f,
    0x1.cd5f9ap-15f, 0x1.450efep-14f, 0x1.00e6bp-13f, 0x1.bda512p-13f, 0x1.54c986p-12f, 0x1.cac082p-12f,
    0x1.205bcp-11f, 0x1.5b574p-11f, 0x1.9652bcp-11f, 0x1.d14e3cp-11f, 0x1.23a29cp-10f, 0x1.99999ap-10f,
    0x1.16872cp-9f, 0x1.604188p-9f, 0x1.a9fbe8p-9f, 0x1.f3b644p-9f, 0x1.1eb852p-8f, 0x1.43958p-8f,
    0x1.6872bp-8f, 0x1.8d4fep-8f, 0x1.b22d0ep-8f, 0x1.d70a3cp-8f, 0x1.fbe76cp-8f, 0x1.10624ep-7f,
    0x1.22d0e6p-7f, 0x1.353f7cp-7f, 0x1.5a1cacp-7f, 0x1.a3d70cp-7f, 0x1p-6f, 0x1.2e147cp-6f,
    0x1.5c28f6p-6f, 0x1.8a3d7p-6f, 0x1.b851ecp-6f, 0x1.e66666p-6f, 0x1.0a3d7p-5f, 0x1.2147aep-5f,
    0x1.3851ecp-5f, 0x1.4f5c28p-5f, 0x1.666668p-5f, 0x1.7d70a4p-5f, 0x1.947aep-5f, 0x1.ab852p-5f,
    0x1.c28f5cp-5f, 0x1.d99998p-5f, 0x1.f0a3d8p-5f, 0x1.03d70ap-4f, 0x1.0f5c28p-4f, 0x1.1ae148p-4f,
    0x1.266668p-4f, 0x1.31eb84p-4f, 0x1.3d70a4p-4f, 0x1.48f5c4p-4f, 0x1.547aep-4f, 0x1.6p-4f,
    0x1.6b852p-4f, 0x1.770a3cp-4f, 0x1.828f5cp-4f, 0x1.8e147cp-4f, 0x1.a51eb8p-4f, 0x1.d33334p-4f,
    0x1.066666p-3f, 0x1.233334p-3f, 0x1.4p-3f, 0x1.5cccccp-3f, 0x1.79999ap-3f, 0x1.966666p-3f,
    0x1.b33334p-3f, 0x1.dp-3f, 0x1.ecccccp-3f, 0x1.04ccccp-2f, 0x1.133334p-2f, 0x1.219998p-2f,
    0x1.3p-2f, 0x1.3e6668p-2f, 0x1.4cccccp-2f, 0x1.5b3334p-2f, 0x1.699998p-2f, 0x1.78p-2f,
    0x1.866668p-2f, 0x1.94ccccp-2f, 0x1.a33334p-2f, 0x1.b19998p-2f, 0x1.cp-2f, 0x1.ce6668p-2f,
    0x1.dcccccp-2f, 0x1.eb3334p-2f, 0x1.f99998p-2f, 0x1.04p-1f, 0x1.0b3334p-1f, 0x1.126666p-1f,
    0x1.19999ap-1f, 0x1.20ccccp-1f, 0x1.28p-1f, 0x1.2f3334p-1f, 0x1.366666p-1f, 0x1.3d999ap-1f,
    0x1.44ccccp-1f, 0x1.4cp-1f, 0x1.533334p-1f, 0x1.5a6666p-1f, 0x1.61999ap-1f, 0x1.68ccccp-1f,
    0x1.7p-1f, 0x1.773334p-1f, 0x1.7e6666p-1f, 0x1.85999ap-1f, 0x1.8cccccp-1f, 0x1.94p-1f,
    0x1.9b3334p-1f, 0x1.a26666p-1f, 0x1.a9999ap-1f, 0x1.b0ccccp-1f, 0x1.b8p-1f, 0x1.bf3334p-1f,
    0x1.c66666p-1f, 0x1.cd999ap-1f, 0x1.d4ccccp-1f, 0x1.dcp-1f, 0x1.e33334p-1f, 0x1.ea6666p-1f,
    0x1.f1999ap-1f, 0x1.f8ccccp-1f, 0x1.fe3334p-1f,
};

// lowbit.dynamic_map(signed=False)
static constexpr float kUnsignedMap[256] = {
    0.0f, 0x1.5cf752p-22f, 0x1.a0133p-21f, 0x1.1d3672p-19f, 0x1.2599eep-18f, 0x1.bc98a2p-18f,
    0x1.29cbacp-17f, 0x1.0624dep-16f, 0x1.c2e33ep-16f, 0x1.3fd0dp-15f, 0x1.9e3002p-15f, 0x1.fc8f32p-15f,
    0x1.2d7732p-14f, 0x1.5ca6cap-14f, 0x1.8bd662p-14f, 0x1.0cb296p-13f, 0x1.82a994p-13f, 0x1.f8a09p-13f,
    0x1.374bc6p-12f, 0x1.724746p-12f, 0x1.ad42c4p-12f, 0x1.e83e42p-12f, 0x1.119cep-11f, 0x1.2f1aap-11f,
    0x1.4c986p-11f, 0x1.6a161ep-11f, 0x1.8793dep-11f, 0x1.a5119cp-11f, 0x1.c28f5cp-11f, 0x1.e00d1cp-11f,
    0x1.fd8adap-11f, 0x1.2b020cp-10f, 0x1.74bc6ap-10f, 0x1.be76c8p-10f, 0x1.041894p-9f, 0x1.28f5c2p-9f,
    0x1.4dd2f2p-9f, 0x1.72b02p-9f, 0x1.978d5p-9f, 0x1.bc6a7ep-9f, 0x1.e147aep-9f, 0x1.03126ep-8f,
    0x1.158106p-8f, 0x1.27ef9ep-8f, 0x1.3a5e36p-8f, 0x1.4cccccp-8f, 0x1.5f3b64p-8f, 0x1.71a9fcp-8f,
    0x1.841894p-8f, 0x1.96872cp-8f, 0x1.a8f5c2p-8f, 0x1.bb645ap-8f, 0x1.cdd2f2p-8f, 0x1.e0418ap-8f,
    0x1.f2b02p-8f, 0x1.028f5cp-7f, 0x1.0bc6a8p-7f, 0x1.14fdf4p-7f, 0x1.1e354p-7f, 0x1.276c8cp-7f,
    0x1.30a3d8p-7f, 0x1.39db22p-7f, 0x1.43126ep-7f, 0x1.5eb852p-7f, 0x1.8cccccp-7f, 0x1.bae148p-7f,
    0x1.e8f5c2p-7f, 0x1.0b851ep-6f, 0x1.228f5cp-6f, 0x1.39999ap-6f, 0x1.50a3d8p-6f, 0x1.67ae14p-6f,
    0x1.7eb852p-6f, 0x1.95c29p-6f, 0x1.acccccp-6f, 0x1.c3d70ap-6f, 0x1.dae148p-6f, 0x1.f1eb86p-6f,
    0x1.047ae2p-5f, 0x1.1p-5f, 0x1.1b851ep-5f, 0x1.270a3ep-5f, 0x1.328f5cp-5f, 0x1.3e147ap-5f,
    0x1.49999ap-5f, 0x1.551eb8p-5f, 0x1.60a3d8p-5f, 0x1.6c28f6p-5f, 0x1.77ae14p-5f, 0x1.833334p-5f,
    0x1.8eb852p-5f, 0x1.9a3d7p-5f, 0x1.a5c29p-5f, 0x1.b147aep-5f, 0x1.bcccccp-5f, 0x1.c851ecp-5f,
    0x1.d3d70ap-5f, 0x1.df5c28p-5f, 0x1.eae148p-5f, 0x1.f66666p-5f, 0x1.00f5c2p-4f, 0x1.06b852p-4f,
    0x1.0c7ae2p-4f, 0x1.123d7p-4f, 0x1.18p-4f, 0x1.1dc29p-4f, 0x1.23851ep-4f, 0x1.2947aep-4f,
    0x1.2f0a3ep-4f, 0x1.34ccccp-4f, 0x1.3a8f5cp-4f, 0x1.4051ecp-4f, 0x1.46147ap-4f, 0x1.4bd70ap-4f,
    0x1.51999ap-4f, 0x1.575c28p-4f, 0x1.5d1eb8p-4f, 0x1.62e148p-4f, 0x1.68a3d8p-4f, 0x1.6e6666p-4f,
    0x1.7428f6p-4f, 0x1.79eb86p-4f, 0x1.7fae14p-4f, 0x1.8570a4p-4f, 0x1.8b3334p-4f, 0x1.90f5c2p-4f,
    0x1.96b852p-4f, 0x1.a8p-4f, 0x1.c4ccccp-4f, 0x1.e1999ap-4f, 0x1.fe6666p-4f, 0x1.0d999ap-3f,
    0x1.1cp-3f, 0x1.2a6666p-3f, 0x1.38ccccp-3f, 0x1.473334p-3f, 0x1.55999ap-3f, 0x1.64p-3f,
    0x1.726666p-3f, 0x1.80ccccp-3f, 0x1.8f3334p-3f, 0x1.9d999ap-3f, 0x1.acp-3f, 0x1.ba6666p-3f,
    0x1.c8ccccp-3f, 0x1.d73334p-3f, 0x1.e5999ap-3f, 0x1.f4p-3f, 0x1.013334p-2f, 0x1.086666p-2f,
    0x1.0f999ap-2f, 0x1.16ccccp-2f, 0x1.1ep-2f, 0x1.253334p-2f, 0x1.2c6666p-2f, 0x1.33999ap-2f,
    0x1.3accccp-2f, 0x1.42p-2f, 0x1.493334p-2f, 0x1.506666p-2f, 0x1.57999ap-2f, 0x1.5eccccp-2f,
    0x1.66p-2f, 0x1.6d3334p-2f, 0x1.746666p-2f, 0x1.7b999ap-2f, 0x1.82ccccp-2f, 0x1.8ap-2f,
    0x1.913334p-2f, 0x1.986666p-2f, 0x1.9f999ap-2f, 0x1.a6ccccp-2f, 0x1.aep-2f, 0x1.b53334p-2f,
    0x1.bc6666p-2f, 0x1.c3999ap-2f, 0x1.caccccp-2f, 0x1.d2p-2f, 0x1.d93334p-2f, 0x1.e06666p-2f,
    0x1.e7999ap-2f, 0x1.eeccccp-2f, 0x1.f6p-2f, 0x1.fd3334p-2f, 0x1.023334p-1f, 0x1.05ccccp-1f,
    0x1.096666p-1f, 0x1.0dp-1f, 0x1.10999ap-1f, 0x1.143334p-1f, 0x1.17ccccp-1f, 0x1.1b6666p-1f,
    0x1.1fp-1f, 0x1.22999ap-1f, 0x1.263334p-1f, 0x1.29ccccp-1f, 0x1.2d6666p-1f, 0x1.31p-1f,
    0x1.34999ap-1f, 0x1.383334p-1f, 0x1.3bccccp-1f, 0x1.3f6666p-1f, 0x1.43p-1f, 0x1.46999ap-1f,
    0x1.4a3334p-1f, 0x1.4dccccp-1f, 0x1.516666p-1f, 0x1.55p-1f, 0x1.58999ap-1f, 0x1.5c3334p-1f,
    0x1.5fccccp-1f, 0x1.636666p-1f, 0x1.67p-1f, 0x1.6a999ap-1f, 0x1.6e3334p-1f, 0x1.71ccccp-1f,
    0x1.756666p-1f, 0x1.79p-1f, 0x1.7c999ap-1f, 0x1.803334p-1f, 0x1.83ccccp-1f, 0x1.876666p-1f,
    0x1.8bp-1f, 0x1.8e999ap-1f, 0x1.923334p-1f, 0x1.95ccccp-1f, 0x1.996666p-1f, 0x1.9dp-1f,
    0x1.a0999ap-1f, 0x1.a43334p-1f, 0x1.a7ccccp-1f, 0x1.ab6666p-1f, 0x1.afp-1f, 0x1.b2999ap-1f,
    0x1.b63334p-1f, 0x1.b9ccccp-1f, 0x1.bd6666p-1f, 0x1.c1p-1f, 0x1.c4999ap-1f, 0x1.c83334p-1f,
    0x1.cbccccp-1f, 0x1.cf6666p-1f, 0x1.d3p-1f, 0x1.d6999ap-1f, 0x1.da3334p-1f, 0x1.ddccccp-1f,
    0x1.e16666p-1f, 0x1.e5p-1f, 0x1.e8999ap-1f, 0x1.ec3334p-1f, 0x1.efccccp-1f, 0x1.f36666p-1f,
    0x1.f7p-1f, 0x1.fa999ap-1f, 0x1.fe3334p-1f, 0x1p+0f,
};

// lowbit.code_midpoints(signed=False)
static constexpr float kUnsignedMid[255] = {
    0x1.5cf752p-23f, 0x1.27476cp-21f, 0x1.853b3ep-20f, 0x1.b43528p-19f, 0x1.711948p-18f, 0x1.040bfep-17f,
    0x1.9b0ab4p-17f, 0x1.64840ep-16f, 0x1.10a138p-15f, 0x1.6f0068p-15f, 0x1.cd5f9ap-15f, 0x1.15df66p-14f,
    0x1.450efep-14f, 0x1.743e96p-14f, 0x1.d29dc8p-14f, 0x1.47ae14p-13f, 0x1.bda512p-13f, 0x1.19ce08p-12f,
    0x1.54c986p-12f, 0x1.8fc504p-12f, 0x1.cac084p-12f, 0x1.02dep-11f, 0x1.205bcp-11f, 0x1.3dd98p-11f,
    0x1.5b574p-11f, 0x1.78d4fep-11f, 0x1.9652bcp-11f, 0x1.b3d07cp-11f, 0x1.d14e3cp-11f, 0x1.eecbfcp-11f,
    0x1.14e3bcp-10f, 0x1.4fdf3cp-10f, 0x1.999998p-10f, 0x1.e353f8p-10f, 0x1.16872cp-9f, 0x1.3b645ap-9f,
    0x1.604188p-9f, 0x1.851eb8p-9f, 0x1.a9fbe8p-9f, 0x1.ced916p-9f, 0x1.f3b644p-9f, 0x1.0c49bap-8f,
    0x1.1eb852p-8f, 0x1.3126eap-8f, 0x1.43958p-8f, 0x1.560418p-8f, 0x1.6872bp-8f, 0x1.7ae148p-8f,
    0x1.8d4fep-8f, 0x1.9fbe78p-8f, 0x1.b22d0ep-8f, 0x1.c49ba6p-8f, 0x1.d70a3ep-8f, 0x1.e978d4p-8f,
    0x1.fbe76cp-8f, 0x1.072b02p-7f, 0x1.10624ep-7f, 0x1.19999ap-7f, 0x1.22d0e6p-7f, 0x1.2c0832p-7f,
    0x1.353f7cp-7f, 0x1.3e76c8p-7f, 0x1.50e56p-7f, 0x1.75c29p-7f, 0x1.a3d70ap-7f, 0x1.d1eb84p-7f,
    0x1p-6f, 0x1.170a3cp-6f, 0x1.2e147cp-6f, 0x1.451eb8p-6f, 0x1.5c28f6p-6f, 0x1.733334p-6f,
    0x1.8a3d7p-6f, 0x1.a147aep-6f, 0x1.b851ecp-6f, 0x1.cf5c28p-6f, 0x1.e66668p-6f, 0x1.fd70a4p-6f,
    0x1.0a3d7p-5f, 0x1.15c29p-5f, 0x1.2147aep-5f, 0x1.2cccccp-5f, 0x1.3851ecp-5f, 0x1.43d70ap-5f,
    0x1.4f5c28p-5f, 0x1.5ae148p-5f, 0x1.666668p-5f, 0x1.71eb84p-5f, 0x1.7d70a4p-5f, 0x1.88f5c4p-5f,
    0x1.947aep-5f, 0x1.ap-5f, 0x1.ab852p-5f, 0x1.b70a3cp-5f, 0x1.c28f5cp-5f, 0x1.ce147cp-5f,
    0x1.d99998p-5f, 0x1.e51eb8p-5f, 0x1.f0a3d8p-5f, 0x1.fc28f4p-5f, 0x1.03d70ap-4f, 0x1.09999ap-4f,
    0x1.0f5c28p-4f, 0x1.151eb8p-4f, 0x1.1ae148p-4f, 0x1.20a3d8p-4f, 0x1.266666p-4f, 0x1.2c28f6p-4f,
    0x1.31eb84p-4f, 0x1.37ae14p-4f, 0x1.3d70a4p-4f, 0x1.433334p-4f, 0x1.48f5c2p-4f, 0x1.4eb852p-4f,
    0x1.547aep-4f, 0x1.5a3d7p-4f, 0x1.6p-4f, 0x1.65c29p-4f, 0x1.6b852p-4f, 0x1.7147aep-4f,
    0x1.770a3ep-4f, 0x1.7cccccp-4f, 0x1.828f5cp-4f, 0x1.8851ecp-4f, 0x1.8e147cp-4f, 0x1.93d70ap-4f,
    0x1.9f5c28p-4f, 0x1.b66666p-4f, 0x1.d33334p-4f, 0x1.fp-4f, 0x1.066666p-3f, 0x1.14ccccp-3f,
    0x1.233334p-3f, 0x1.319998p-3f, 0x1.4p-3f, 0x1.4e6668p-3f, 0x1.5cccccp-3f, 0x1.6b3334p-3f,
    0x1.799998p-3f, 0x1.88p-3f, 0x1.966668p-3f, 0x1.a4ccccp-3f, 0x1.b33334p-3f, 0x1.c19998p-3f,
    0x1.dp-3f, 0x1.de6668p-3f, 0x1.ecccccp-3f, 0x1.fb3334p-3f, 0x1.04ccccp-2f, 0x1.0cp-2f,
    0x1.133334p-2f, 0x1.1a6666p-2f, 0x1.21999ap-2f, 0x1.28ccccp-2f, 0x1.3p-2f, 0x1.373334p-2f,
    0x1.3e6666p-2f, 0x1.45999ap-2f, 0x1.4cccccp-2f, 0x1.54p-2f, 0x1.5b3334p-2f, 0x1.626666p-2f,
    0x1.69999ap-2f, 0x1.70ccccp-2f, 0x1.78p-2f, 0x1.7f3334p-2f, 0x1.866666p-2f, 0x1.8d999ap-2f,
    0x1.94ccccp-2f, 0x1.9cp-2f, 0x1.a33334p-2f, 0x1.aa6666p-2f, 0x1.b1999ap-2f, 0x1.b8ccccp-2f,
    0x1.cp-2f, 0x1.c73334p-2f, 0x1.ce6666p-2f, 0x1.d5999ap-2f, 0x1.dcccccp-2f, 0x1.e4p-2f,
    0x1.eb3334p-2f, 0x1.f26666p-2f, 0x1.f9999ap-2f, 0x1.006668p-1f, 0x1.04p-1f, 0x1.079998p-1f,
    0x1.0b3334p-1f, 0x1.0eccccp-1f, 0x1.126668p-1f, 0x1.16p-1f, 0x1.199998p-1f, 0x1.1d3334p-1f,
    0x1.20ccccp-1f, 0x1.246668p-1f, 0x1.28p-1f, 0x1.2b9998p-1f, 0x1.2f3334p-1f, 0x1.32ccccp-1f,
    0x1.366668p-1f, 0x1.3ap-1f, 0x1.3d9998p-1f, 0x1.413334p-1f, 0x1.44ccccp-1f, 0x1.486668p-1f,
    0x1.4cp-1f, 0x1.4f9998p-1f, 0x1.533334p-1f, 0x1.56ccccp-1f, 0x1.5a6668p-1f, 0x1.5ep-1f,
    0x1.619998p-1f, 0x1.653334p-1f, 0x1.68ccccp-1f, 0x1.6c6668p-1f, 0x1.7p-1f, 0x1.739998p-1f,
    0x1.773334p-1f, 0x1.7accccp-1f, 0x1.7e6668p-1f, 0x1.82p-1f, 0x1.859998p-1f, 0x1.893334p-1f,
    0x1.8cccccp-1f, 0x1.906668p-1f, 0x1.94p-1f, 0x1.979998p-1f, 0x1.9b3334p-1f, 0x1.9eccccp-1f,
    0x1.a26668p-1f, 0x1.a6p-1f, 0x1.a99998p-1f, 0x1.ad3334p-1f, 0x1.b0ccccp-1f, 0x1.b46668p-1f,
    0x1.b8p-1f, 0x1.bb9998p-1f, 0x1.bf3334p-1f, 0x1.c2ccccp-1f, 0x1.c66668p-1f, 0x1.cap-1f,
    0x1.cd9998p-1f, 0x1.d13334p-1f, 0x1.d4ccccp-1f, 0x1.d86668p-1f, 0x1.dcp-1f, 0x1.df9998p-1f,
    0x1.e33334p-1f, 0x1.e6ccccp-1f, 0x1.ea6668p-1f, 0x1.eep-1f, 0x1.f19998p-1f, 0x1.f53334p-1f,
    0x1.f8ccccp-1f, 0x1.fc6668p-1f, 0x1.ff199ap-1f,
};

}  // namespace lowbit
}  // namespace fusedlars
