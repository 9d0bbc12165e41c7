// Per-layer (segment) and per-element math of LARS / TVLARS / LAMB, shared by every compiled backend.
//
// The formulas are those of fusedlars/backends/reference.py (the specification; its module docstring
// states them). This header has no torch and no std-library dependencies beyond <cmath>, so the same
// code compiles for the CPU kernels (csrc/cpu) and, with nvcc, for CUDA (csrc/cuda).
//
// Split of the work:
//   * per segment, in double: norms from sums of squares -> trust ratio -> the handful of float
//     coefficients an element update needs (LarsCoef / LambCoef);
//   * per element, templated on the value type T (float, or a SIMD vector of floats for the CPU
//     kernels): the update itself, written with + - * / and fl_sqrt only.
//
// NOTE: [Internal linkage on the host]
// On the host every function here is `static inline` (FUSEDLARS_INLINE). The CPU backend compiles the
// element kernels once per instruction set (csrc/cpu/isa_*.cpp, each under its own
// `#pragma GCC target`). With external linkage, the linker would keep ONE copy of each inline
// function, possibly the AVX-512 one, and call it from the generic code path on a CPU without
// AVX-512. Internal linkage gives each translation unit its own copy built for its own target.
//
// NOTE: [Determinism]
// Nothing here reduces across elements. Norms come in as sums of squares that the caller reduced in
// a fixed order (per-tile partials, tiles of a segment summed in tile order), so a segment's trust
// ratio, and hence every update, is bitwise identical from run to run and for any thread count.
//
// NOTE: [Skips]
// A GradScaler skip (found_inf != 0) and an inactive segment (no grad this step) are decided by the
// caller before anything here runs: such segments are never touched, so params, master weights,
// state, has_state, step and the reported norms keep their values.
//
// NOTE: [Pads stay zero]
// Segments are padded with zeros to 64 bytes. Kernels process exactly seg_numel elements of each
// segment and never write a pad, so pads never change a norm.
#pragma once

#include <cmath>

#include "option_fields.h"

#if defined(__CUDACC__)
#define FUSEDLARS_HD __host__ __device__
#define FUSEDLARS_INLINE __forceinline__
#else
#define FUSEDLARS_HD
#define FUSEDLARS_INLINE static inline __attribute__((always_inline))
#endif

namespace fusedlars {

// ---------------------------------------------------------------------------------------------
// option codes: the values of the tables of fusedlars/backends/codes.py (tests/test_one_source.py checks
// each enum against its table); fusedlars/backends/option_fields.py writes them into the int[] `modes`
// argument of the ops, decoded in csrc/option_decode.h.

enum Denominator : int { kSumOfNorms = 0, kNormOfSum = 1, kGradOnly = 2 };
enum LarsWdMode : int { kLarsL2 = 0, kLarsRatioOnly = 1, kLarsDecoupled = 2 };
enum ZeroNorm : int { kZeroNormOne = 0, kZeroNormSkip = 1 };
enum ZeroNormCheck : int { kCheckRawGrad = 0, kCheckUpdate = 1, kCheckDenominator = 2 };
enum TrustClip : int { kClipNone = 0, kClipLarc = 1, kClipLambc = 2, kClipRange = 3 };
enum MomentumMode : int { kMomentumTorch = 0, kMomentumClassic = 1 };
enum FirstStepBuffer : int { kFirstClone = 0, kFirstZeros = 1 };
enum BiasCorrection : int { kBcBoth = 0, kBcNone = 1, kBcFirstOutside = 2 };
enum LambWdMode : int { kLambInUpdate = 0, kLambL2 = 1, kLambDecoupled = 2 };

// The resolved options of a LARS / LAMB param group (plain data: copied by value to any device). Their
// members are the rows of the table of fusedlars/backends/option_fields.py, through the X-macros of the
// header generated from it (csrc/option_fields.h): doubles first, then ints, each in the table's order.
#define FUSEDLARS_DOUBLE_MEMBER(name, index) double name;
#define FUSEDLARS_INT_MEMBER(name, index) int name;

struct LarsOptions {
  FUSEDLARS_LARS_HYPER(FUSEDLARS_DOUBLE_MEMBER)
  FUSEDLARS_LARS_MODES(FUSEDLARS_INT_MEMBER)
};

struct LambOptions {
  FUSEDLARS_LAMB_HYPER(FUSEDLARS_DOUBLE_MEMBER)
  FUSEDLARS_LAMB_MODES(FUSEDLARS_INT_MEMBER)
};

#undef FUSEDLARS_DOUBLE_MEMBER
#undef FUSEDLARS_INT_MEMBER

// ---------------------------------------------------------------------------------------------
// scalar helpers (NaN-propagating like torch.clamp: a NaN ratio stays NaN)

FUSEDLARS_HD FUSEDLARS_INLINE double fl_clamp(double x, double lo, double hi) {
  x = x < lo ? lo : x;
  return x > hi ? hi : x;
}

FUSEDLARS_HD FUSEDLARS_INLINE double fl_trust_clip(double r, int kind, double lo, double hi, double lr) {
  switch (kind) {
    case kClipLarc: {
      double q = r / lr;
      return q > 1.0 ? 1.0 : q;
    }
    case kClipLambc:
      return r > 1.0 ? 1.0 : r;
    case kClipRange:
      return fl_clamp(r, lo, hi);
    default:
      return r;
  }
}

FUSEDLARS_HD FUSEDLARS_INLINE float fl_sqrt(float x) { return sqrtf(x); }

// b^t for the bias corrections. On the device, pow() is an out-of-line call (__internal_accurate_pow)
// whose calling convention made ptxas spill registers in the LAMB kernels; exp(t*log(b)) inlines.
// For 0 < b < 1 and t up to 1e7 it differs from pow() by a few ulp of a double, far below the
// fp32 rounding of the coefficients it feeds.
FUSEDLARS_HD FUSEDLARS_INLINE double fl_pow(double b, double t) {
#if defined(__CUDA_ARCH__)
  if (b > 0.0) return exp(t * log(b));
  if (b == 0.0) return t == 0.0 ? 1.0 : 0.0;
  const double m = exp(t * log(-b));  // b < 0 (not a valid beta): integer t
  return fmod(t, 2.0) != 0.0 ? -m : m;
#else
  return pow(b, t);
#endif
}
FUSEDLARS_HD FUSEDLARS_INLINE double fl_sqrt(double x) { return sqrt(x); }

// b^t for the exact (low-bit state) kernels: pow() on the host and the device, as the reference's
// torch.pow computes it on each (fl_pow's exp(t*log(b)) differs from it by a few ulp of a double, and
// the exact kernels round double values to fp32 once: a few ulp would change the stored fp32 bits of
// the rare element that lies within them of a rounding boundary). Once per segment, not per element.
FUSEDLARS_HD FUSEDLARS_INLINE double fl_pow_exact(double b, double t) { return pow(b, t); }

// ---------------------------------------------------------------------------------------------
// LARS / TVLARS

// Per-segment outputs (what bucket.w_norm / g_norm / u_norm / trust_ratio receive).
struct LarsSegment {
  double n_w, n_g, n_u;  // raw norms of w, g, g + lam*w
  double r;              // trust ratio actually applied (1 where not adapted)
  double lam_eff;        // weight decay actually applied (0 for a 'skip' zero-norm segment)
};

// Coefficients of the element update of one segment, see lars_update().
struct LarsCoef {
  float r;      // trust ratio
  float lam;    // lam_eff (l2: g' = (g + lam*w) * r)
  float mu_b;   // multiplier of the old buffer (0 when the segment has no state yet)
  float c_g;    // multiplier of g' in the new buffer ((1-d), 1 on a 'clone' first step, lr for classic)
  float a_g;    // step = a_g*g' + a_b*b_new  (nesterov), a_b*b_new (momentum), a_g*g' (no momentum)
  float a_b;
  float dec;    // decoupled decay: w -= dec*w_old, dec = lr*lam_eff
};

// TVLARS factor phi_t (1 for plain LARS and while t < gate); t = completed steps of the segment.
// The formula's definition: fusedlars/backends/formulas.py tv_phi (tests/test_one_source.py checks a step).
FUSEDLARS_HD FUSEDLARS_INLINE double lars_tv_phi(const LarsOptions& o, double t) {
  if (!o.tv_on || t < o.tv_gate) return 1.0;
  return 1.0 / (o.tv_alpha + exp(o.tv_lmbda * (t - o.tv_shift))) + o.tv_gamma_min;
}

// Trust ratio of one segment from its sums of squares (reference.lars_step, line by line).
//   lam: weight_decay * wd_mask;  adapt: segment not excluded from adaptation (and adapt_enabled)
FUSEDLARS_HD FUSEDLARS_INLINE LarsSegment lars_segment(const LarsOptions& o, double ssq_w, double ssq_g,
                                                       double ssq_u, double lam, bool adapt, double t,
                                                       double lr) {
  LarsSegment s;
  s.n_w = sqrt(ssq_w);
  s.n_g = sqrt(ssq_g);
  s.n_u = sqrt(ssq_u);
  const double n_w = fl_clamp(s.n_w, o.clamp_lo, o.clamp_hi);
  const double side_raw = o.denominator == kNormOfSum ? s.n_u : s.n_g;
  const double side = fl_clamp(side_raw, o.clamp_lo, o.clamp_hi);
  const double den = o.denominator == kSumOfNorms ? side + lam * n_w + o.eps : side + o.eps;
  const double ratio = o.eta * lars_tv_phi(o, t) * n_w / den;
  bool ok;
  if (o.zero_norm_check == kCheckRawGrad)
    ok = (s.n_w > 0) && (s.n_g > 0);
  else if (o.zero_norm_check == kCheckUpdate)
    ok = (s.n_w > 0) && (side_raw > 0);
  else
    ok = (s.n_w > 0) && (den > 0);
  double r_adapt;
  s.lam_eff = lam;
  if (o.zero_norm == kZeroNormOne) {
    r_adapt = fl_trust_clip(ok ? ratio : 1.0, o.trust_clip, o.clip_lo, o.clip_hi, lr);
  } else {  // skip: no ratio, no clip and no weight decay on a zero norm
    r_adapt = ok ? fl_trust_clip(ratio, o.trust_clip, o.clip_lo, o.clip_hi, lr) : 1.0;
    if (!(ok || !adapt)) s.lam_eff = 0.0;
  }
  s.r = adapt ? r_adapt : 1.0;
  return s;
}

FUSEDLARS_HD FUSEDLARS_INLINE LarsCoef lars_coef(const LarsOptions& o, const LarsSegment& s, double lr,
                                                 bool has_state) {
  LarsCoef c;
  c.r = (float)s.r;
  c.lam = (float)s.lam_eff;
  const double mu = o.momentum;
  c.mu_b = has_state ? (float)mu : 0.0f;
  if (o.momentum_mode == kMomentumTorch) {
    const bool clone_first = o.first_step_buffer == kFirstClone && !has_state;
    c.c_g = clone_first ? 1.0f : (float)(1.0 - o.dampening);
    c.a_g = (float)lr;
    c.a_b = o.nesterov ? (float)(lr * mu) : (float)lr;
  } else {  // classic: lr inside the buffer
    c.c_g = (float)lr;
    c.a_g = (float)lr;
    c.a_b = o.nesterov ? (float)mu : 1.0f;
  }
  c.dec = (float)(lr * s.lam_eff);
  return c;
}

// Element update. wd: LarsWdMode; mom: 0 none, 1 with buffer; nest: nesterov.
// g: the unscaled (and sign-applied) gradient; w: weight (master if any); b: momentum buffer in/out.
// One body for the fp32 kernels (lars_update: the modes as template constants) and the low-bit ones
// (the modes uniform per segment, read at run time: NOTE [Low-bit element math in fp32]).
//
// NOTE: [Unit coefficients]
// x * 1.0f is x, bit for bit (a NaN stays a NaN), so a kernel may skip a product by a coefficient
// it has checked to be exactly 1: c_g (momentum without dampening, the usual LARS, and every first
// step) in lars_apply_modes<T, true>, and the gradient factor (no GradScaler, no clip). The cpu fp32
// kernels do (csrc/cpu/isa_impl.h lars_update_t, UNIT), and where they also report ||g + wd*w||
// they form g + lam*w once for the sum and the update: 11 vector operations per 16 elements instead
// of 15 in the step that reads each gradient once, which is bound by its arithmetic where memory is
// fast (docs/numbers.md). tests/test_cpu_backend.py checks both paths op by op against numpy fp32.
template <class T, bool UNIT_CG = false>
FUSEDLARS_HD FUSEDLARS_INLINE T lars_apply_modes(const LarsCoef& c, int wd, int mom, bool nest, T w, T gp, T& b) {
  T w_new;
  if (mom) {
    if constexpr (UNIT_CG) b = c.mu_b * b + gp;
    else b = c.mu_b * b + c.c_g * gp;
    w_new = nest ? w - (c.a_g * gp + c.a_b * b) : w - c.a_b * b;
  } else {
    w_new = w - c.a_g * gp;
  }
  if (wd == kLarsDecoupled) w_new = w_new - c.dec * w;
  return w_new;
}

// g' = (g + lam*w) * r (l2) or g * r: the direction the trust ratio scales
template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lars_direction(const LarsCoef& c, int wd, T w, T g) {
  return wd == kLarsL2 ? (g + c.lam * w) * c.r : g * c.r;
}

template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lars_update_modes(const LarsCoef& c, int wd, int mom, bool nest, T w, T g, T& b) {
  return lars_apply_modes<T>(c, wd, mom, nest, w, lars_direction<T>(c, wd, w, g), b);
}

template <int WD, int MOM, bool NEST, class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lars_update(const LarsCoef& c, T w, T g, T& b) {
  return lars_update_modes<T>(c, WD, MOM, NEST, w, g, b);
}

// ---------------------------------------------------------------------------------------------
// LAMB

// Coefficients of one segment's element math, see lamb_moments() / lamb_direction().
struct LambCoef {
  float gscale;       // inv_scale / clip_coef, negated for maximize
  float lam;          // weight_decay * wd_mask
  float wd_keep;      // decoupled: w_d = w * wd_keep, wd_keep = 1 - lr*lam
  float b1, b3, b2, one_minus_b2;
  float bc1;          // 1 - b1^t (1 for 'none' / 'first_outside')
  float ibc1;         // 1 / bc1, one fp32 division per segment (the element math multiplies by it)
  float isq2, er2;    // 1 / sqrt(1 - b2^t) and eps_root * (1 - b2^t) (1 and eps_root without correction)
  float eps;
  float k;            // pass 2: w <- w_d - k*u, k = lr * s * r
};

// Pass 1: new moments (in place) from the unscaled, clipped gradient g. wd: LambWdMode; the l2 mode
// adds lam*w to g here (||g|| is taken by the caller before that). One body for the fp32 kernels (the
// mode a template constant) and the low-bit ones (read at run time: NOTE [Low-bit element math in fp32]).
template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE void lamb_moments_mode(const LambCoef& c, int wd, T w, T g, T& m, T& v) {
  if (wd == kLambL2) g = g + c.lam * w;
  m = c.b1 * m + c.b3 * g;
  v = c.b2 * v + c.one_minus_b2 * g * g;
}

template <int WD, class T>
FUSEDLARS_HD FUSEDLARS_INLINE void lamb_moments(const LambCoef& c, T w, T g, T& m, T& v) {
  lamb_moments_mode<T>(c, WD, w, g, m, v);
}

// The Adam direction u from the NEW moments (recomputed identically in both passes), plus the
// in_update decay term. w is the weight before decay.
// The bias correction of m is a product with ibc1 = 1/bc1 (an fp32 division once per segment, not a
// division per element: three divisions and a sqrt per element made the LAMB passes divider-bound).
// NOTE: [Adam direction in range]
// u = (m/bc1) / (sqrt(v/bc2 + eps_root) + eps) is evaluated as (m/bc1) / (sqrt(v + eps_root*bc2) *
// (1/sqrt(bc2)) + eps): v/bc2 overflows fp32 for |g| above ~1.8e19 at the first step (bc2 = 1e-3),
// while v itself is finite up to |g| ~ 5.8e20, so the element would not move where torch's Adam
// (sqrt(v)/sqrt(bc2)) moves it. The two forms are equal in exact arithmetic.
template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lamb_direction_mode(const LambCoef& c, int wd, T w, T m, T v) {
  T u = (m * c.ibc1) / (fl_sqrt(v + c.er2) * c.isq2 + c.eps);
  if (wd == kLambInUpdate) u = u + c.lam * w;
  return u;
}

template <int WD, class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lamb_direction(const LambCoef& c, T w, T m, T v) {
  return lamb_direction_mode<T>(c, WD, w, m, v);
}

template <int WD, class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lamb_decayed_weight(const LambCoef& c, T w) {
  return WD == kLambDecoupled ? w * c.wd_keep : w;
}

struct LambSegment {
  double n_w, n_g, n_u, r;
};

// Trust ratio from the sums of squares of w_d (decayed weight), g and u.
FUSEDLARS_HD FUSEDLARS_INLINE LambSegment lamb_segment(const LambOptions& o, double ssq_w, double ssq_g,
                                                       double ssq_u, bool adapt, double lr) {
  LambSegment s;
  s.n_w = sqrt(ssq_w);
  s.n_g = sqrt(ssq_g);
  s.n_u = sqrt(ssq_u);
  const double n_w = fl_clamp(s.n_w, o.clamp_lo, o.clamp_hi);
  const double ratio = (n_w > 0 && s.n_u > 0) ? n_w / (s.n_u + o.trust_ratio_eps) : 1.0;
  s.r = (adapt && o.adapt_enabled && !o.adam) ? fl_trust_clip(ratio, o.trust_clip, o.clip_lo, o.clip_hi, lr) : 1.0;
  return s;
}

// Per-segment LAMB coefficients before the ratio is known (k is filled in after pass 1).
// (EXACT_POW: beta^t as the reference forms it, fl_pow_exact: the low-bit kernels' coefficients)
template <bool EXACT_POW = false>
FUSEDLARS_HD FUSEDLARS_INLINE LambCoef lamb_coef(const LambOptions& o, double gscale, double lam, double lr,
                                                 double t_new) {
  auto pw = [](double b, double t) { return EXACT_POW ? fl_pow_exact(b, t) : fl_pow(b, t); };
  LambCoef c;
  c.gscale = (float)gscale;
  c.lam = (float)lam;
  c.wd_keep = (float)(1.0 - lr * lam);
  c.b1 = (float)o.beta1;
  c.b3 = (float)o.beta3;
  c.b2 = (float)o.beta2;
  c.one_minus_b2 = (float)(1.0 - o.beta2);
  const double bc2 = o.bias_correction == kBcBoth ? 1.0 - pw(o.beta2, t_new) : 1.0;
  c.bc1 = o.bias_correction == kBcBoth ? (float)(1.0 - pw(o.beta1, t_new)) : 1.0f;
  c.ibc1 = 1.0f / c.bc1;
  c.isq2 = (float)(1.0 / sqrt(bc2));  // NOTE [Adam direction in range]
  c.er2 = (float)(o.eps_root * bc2);
  c.eps = (float)o.eps;
  c.k = 0.0f;
  return c;
}

FUSEDLARS_HD FUSEDLARS_INLINE float lamb_step_scale(const LambOptions& o, double lr, double r, double t_new) {
  const double s = o.bias_correction == kBcFirstOutside ? 1.0 / (1.0 - fl_pow(o.beta1, t_new)) : 1.0;
  return (float)(lr * s * r);
}

// ---------------------------------------------------------------------------------------------
// The element math of low-bit state (issue #26; fusedlars/backends/lowbit_state.py)
//
// NOTE: [Low-bit element math in fp32]
// With bf16 / int8 state (or remainder masters) every backend must store the same bits, so the
// element math is specified operation by operation. It is the fp32 kernels' own; for LARS / TVLARS:
// the per-segment scalars (lars_segment, in double from the norms) become the fp32 coefficients of
// lars_coef (each formed in double and rounded once), the gradient is fl32(grad) * fl32(+-inv_scale)
// (one fp32 product, the sign of maximize in the factor), and lars_update_modes runs in fp32, each
// operation an IEEE-correct fp32 op in the written order, never contracted to an FMA
// (-ffp-contract=off on the host, --fmad=false in CUDA, enable_fp_fusion=False in Triton; the
// reference and the torch backend do it as one torch op per operation). The old buffer reads +0 where
// the segment has no state yet. The new buffer value is the fp32 that is stored by stochastic rounding
// or quantized (lowbit_state NOTE [Low-bit state: where values become fp32]); the new weight is the
// fp32 master (or the value rounded to the param). The sums of squares stay in double (pass 1, and
// the carried ones of the new fp32 weights). Why fp32 and not float64: the float64 element math of
// stop 23 cost the kernels twice the fp32 instructions (8 double lanes per 16 fp32 ones), and LAMB's
// double divisions and square roots far more; in fp32 the cpu's bf16 LARS step is 1.1-1.3x and bf16
// LAMB 1.7-1.9x faster (docs/numbers.md, "The element math in fp32").

struct LarsExactCoef {
  LarsCoef c;    // lars_coef's fp32 coefficients (mu_b = 0 where the segment has no state)
  int wd;        // LarsWdMode
  int mom;       // 1: a momentum buffer (momentum != 0)
  int nest;      // nesterov
  int zero_b;    // no state yet: the old buffer reads +0
};

FUSEDLARS_HD FUSEDLARS_INLINE LarsExactCoef lars_exact_coef(const LarsOptions& o, const LarsSegment& s, double lr,
                                                           bool has_state) {
  LarsExactCoef c;
  c.c = lars_coef(o, s, lr, has_state);
  c.wd = o.wd_mode;
  c.mom = o.momentum != 0.0;
  c.nest = o.nesterov ? 1 : 0;
  c.zero_b = !has_state;
  return c;
}

// NOTE [Low-bit element math in fp32] for one element (T: float or a vector of floats): returns
// w_new, sets b (in: the old buffer, out: the new one) when c.mom.
template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lars_exact_update(const LarsExactCoef& c, T w, T g, T& b) {
  if (c.zero_b) b = T{};
  return lars_update_modes<T>(c.c, c.wd, c.mom, c.nest != 0, w, g, b);
}

// LAMB with low-bit state: the same rule (NOTE [Low-bit element math in fp32]): lamb_coef's fp32
// coefficients (beta^t as the reference forms it: fl_pow_exact), the gradient fl32(grad) * gscale with
// gscale = fl32(+-inv_scale / clip_coef), lamb_moments_mode / lamb_direction_mode in fp32 (sqrt and
// division IEEE-correct), the decayed weight w * wd_keep, and w_new = w_d - k*u with k = fl32(lr * s * r).
// The sums of squares of pass 1 are of the fp32 w_d and u, in double; ||g|| of the exact g in double.
struct LambExactCoef {
  LambCoef c;  // lamb_coef<true>; c.k filled in after pass 1 (lamb_exact_step_scale)
  int wd;      // LambWdMode
};

FUSEDLARS_HD FUSEDLARS_INLINE LambExactCoef lamb_exact_coef(const LambOptions& o, double gscale, double lam, double lr,
                                                           double t_new) {
  LambExactCoef c;
  c.c = lamb_coef<true>(o, gscale, lam, lr, t_new);
  c.wd = o.wd_mode;
  return c;
}

// One element from the scaled fp32 gradient g (T: float or a vector of floats): the new moments (m, v
// in/out) and the direction u; returns the decayed weight w_d.
template <class T>
FUSEDLARS_HD FUSEDLARS_INLINE T lamb_exact_direction(const LambExactCoef& e, T w, T g, T& m, T& v, T& u) {
  lamb_moments_mode<T>(e.c, e.wd, w, g, m, v);
  u = lamb_direction_mode<T>(e.c, e.wd, w, m, v);
  return e.wd == kLambDecoupled ? w * e.c.wd_keep : w;
}

// lamb_step_scale with beta^t as the reference forms it: k = fl32((lr * s) * r).
FUSEDLARS_HD FUSEDLARS_INLINE float lamb_exact_step_scale(const LambOptions& o, double lr, double r, double t_new) {
  const double s = o.bias_correction == kBcFirstOutside ? 1.0 / (1.0 - fl_pow_exact(o.beta1, t_new)) : 1.0;
  return (float)(lr * s * r);
}

}  // namespace fusedlars
