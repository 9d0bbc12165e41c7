// The exact per-tile kernels of low-bit optimizer state (issue #26): bf16 / int8 state buffers and
// master_weights="remainder", for LARS / TVLARS and LAMB. Included by isa_impl.h inside its
// namespace (compiled once per instruction set, like the fp32 kernels).
//
// Per 256-element quantization block of a tile (tiles start at multiples of kTileElems = 64 blocks,
// so a block never crosses a tile, and blocks start at the param's element 0):
//   load      weights, grads and the old state into fp32 block buffers on the stack (the weights
//             are fp32 values in every form: masters, remainder masters rebuilt, bf16/fp16/fp32
//             params; the old state is dequantized exactly: bf16 -> fp32, int8 map[code] * absmax);
//   math      the reference's element formulas in double (lars_math.h NOTE [Exact element math of
//             low-bit state]); s32 = fl32(s) and the new weights' fp32 value into block buffers;
//   store     the weights (the fp32 master, a bf16/fp16 param rounded from it, or split into bf16
//             + int16 remainder), and the state: fp32, bf16 by stochastic rounding with the Philox
//             word of (seed, step after this step, param id, element), or int8 (the block's absmax
//             over all its new values first, then the codes): csrc/lowbit.h, bitwise lowbit.py.
// Sums of squares (pass 1) are taken in double, 16 lanes (lane = element index mod 16), tile partial
// = the lanes summed in lane order: fixed order on every ISA and thread count (NOTE [Determinism]).
//
// NOTE: [What "bitwise" means for the cpu backend's low-bit state]
// The state and weights are the reference's bitwise GIVEN the same per-layer scalars: the element
// math is the reference's double operations in its order, and the per-layer scalars come from
// lars_segment / lamb_segment on the kernel's norms. The norms themselves are sums in another order
// than ATen's float64 vector_norm, so they can differ from the reference's in the last bit, and with
// them LARS's trust ratio (LAMB's moments do not depend on any norm). tests/test_cpu_lowbit.py checks
// exactly this: bitwise equality (state bits, codes, scales, remainders, params) wherever the norms
// are exact sums (inputs whose squares sum exactly in double: both orders give the same norm) or the
// ratio does not depend on them (excluded layers, a clipped ratio, LAMB's moments), over several steps;
// and on general inputs the params within the fp32 tolerance and the state within one rounding step.

constexpr int kQB = lowbit::kQBlock;

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
        for (int l = 0; l < k; ++l)
          out[j + l] = lowbit::master_rebuild(reinterpret_cast<const uint16_t*>(p)[i + j + l], r[i + j + l]);
      } else {
        IO<float>::store(out + j, w);
      }
    }
  }
  FL_MI void store(int64_t i, int n, const float* w32) const {
    if constexpr (REM) {
      uint16_t* pb = reinterpret_cast<uint16_t*>(p);
      for (int j = 0; j < n; ++j) {
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
    for (int j = 0; j < n; ++j) out[j] = lowbit::bf16_bits_to_float(h[j]);
  } else {
    const uint8_t* c = static_cast<const uint8_t*>(s) + i;
    const float* map = sign ? lowbit::kSignedMap : lowbit::kUnsignedMap;
    const float scale = absmax[i / kQB];
    int j = 0;
#if FL_ISA == 2
    for (; j + kW <= n; j += kW) {  // map[code] * scale on 16 lanes: the same product
      const __m512i idx = _mm512_maskz_cvtepu8_epi32((__mmask16)0xFFFF, _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + j)));
      _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)0xFFFF, idx, map, 4), _mm512_set1_ps(scale)));
    }
#endif
    for (; j < n; ++j) out[j] = lowbit::dequantize(c[j], scale, map);
  }
}

// Philox words 0 (and 1 with TWO: LAMB's second buffer) of elements e0 .. e0+n-1 (counter: element,
// step, param id, element >> 32; key: the seed), lowbit.h philox_words per element, in a loop over
// the elements that vectorizes (32x32->64 multiplies on the lanes; no run-time word index).
template <bool TWO>
FL_AI void exact_philox(const ExactCtx& x, const ExactTile& a, int64_t e0, int n, uint32_t* out0, uint32_t* out1) {
  const uint32_t k0i = uint32_t(x.seed), k1i = uint32_t(x.seed >> 32);
  const uint32_t c1i = uint32_t(a.step_after), c2i = a.pidx;
  const uint32_t hi = uint32_t(uint64_t(e0) >> 32), lo0 = uint32_t(e0);  // a block never crosses 2**32
  for (int j = 0; j < n; ++j) {
    uint32_t c0 = lo0 + uint32_t(j), c1 = c1i, c2 = c2i, c3 = hi;
    uint32_t k0 = k0i, k1 = k1i;
    for (int r = 0; r < 10; ++r) {
      const uint64_t p0 = uint64_t(c0) * lowbit::kPhiloxM0;
      const uint64_t p1 = uint64_t(c2) * lowbit::kPhiloxM1;
      const uint32_t n0 = uint32_t(p1 >> 32) ^ c1 ^ k0, n2 = uint32_t(p0 >> 32) ^ c3 ^ k1;
      c1 = uint32_t(p1);
      c3 = uint32_t(p0);
      c0 = n0;
      c2 = n2;
      k0 += lowbit::kPhiloxW0;
      k1 += lowbit::kPhiloxW1;
    }
    out0[j] = c0;
    if constexpr (TWO) out1[j] = c1;
  }
}

// store the new state of one block from its fp32 values s32 (lowbit_state NOTE [Low-bit state: where
// values become fp32]); `rand`: the block's Philox words for bf16
template <int ST>
FL_AI void exact_state_store(void* s, float* absmax, bool sign, int64_t i, int n, const float* s32,
                             const uint32_t* rand) {
  if constexpr (ST == kStoreF32) {
    __builtin_memcpy(static_cast<float*>(s) + i, s32, n * sizeof(float));
  } else if constexpr (ST == kStoreBF16) {
    uint16_t* h = static_cast<uint16_t*>(s) + i;
    for (int j = 0; j < n; ++j) h[j] = lowbit::bf16_sr_bits(s32[j], rand[j]);
  } else {
    uint8_t* c = static_cast<uint8_t*>(s) + i;
    const float* mid = sign ? lowbit::kSignedMid : lowbit::kUnsignedMid;
    const float scale = lowbit::block_absmax(s32, n);
    absmax[i / kQB] = scale;
    int j = 0;
#if FL_ISA == 2
    // (the maskz / mask forms: NOTE [AVX-512 intrinsics with a defined source] in isa_impl.h)
    // lowbit::quantize_code's 8-step search on 16 lanes (gathers of the midpoints); the same compares
    const bool pos = scale > 0.0f;
    for (; j + kW <= n; j += kW) {
      const __m512 v = pos ? _mm512_maskz_div_ps((__mmask16)0xFFFF, _mm512_loadu_ps(s32 + j), _mm512_set1_ps(scale)) : _mm512_setzero_ps();
      __m512i cc = _mm512_setzero_si512();
      for (int step = 128; step > 0; step >>= 1) {
        const __m512i idx = _mm512_add_epi32(cc, _mm512_set1_epi32(step - 1));
        const __m512 m = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), (__mmask16)0xFFFF, idx, mid, 4);
        cc = _mm512_mask_add_epi32(cc, _mm512_cmp_ps_mask(m, v, _CMP_LT_OQ), cc, _mm512_set1_epi32(step));
      }
      _mm_storeu_si128(reinterpret_cast<__m128i*>(c + j), _mm512_maskz_cvtepi32_epi8((__mmask16)0xFFFF, cc));
    }
#endif
    for (; j < n; ++j) c[j] = lowbit::quantize_code(lowbit::normalize(s32[j], scale), mid);
  }
}

FL_AI double exact_grad(const ExactCtx& x, double g) {
  g = g * x.inv;
  if (x.has_clip) g = g / x.clip;
  return x.neg ? -g : g;
}

// 16 double lanes of a sum of squares: lane l takes the elements j with j % 16 == l
struct DAcc {
  double v[kW] = {};
  FL_MI void add(const double* x, int n) {
    int j = 0;
    for (; j + kW <= n; j += kW)
      for (int l = 0; l < kW; ++l) v[l] += x[j + l] * x[j + l];
    for (int l = 0; j + l < n; ++l) v[l] += x[j + l] * x[j + l];
  }
  FL_MI double sum() const {
    double s = 0.0;
    for (int l = 0; l < kW; ++l) s += v[l];
    return s;
  }
};

// ------------------------------------------------------------------------------------------------
// LARS

template <class PT, bool MASTER, bool REM>
void lars_exact_sumsq_t(const ExactTile& a, const ExactCtx& x, double lam, double* out) {
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  DAcc sw, sg, su;
  alignas(64) float wf[kQB], gf[kQB];
  alignas(64) double w[kQB], g[kQB], u[kQB];
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    W.load(i, n, wf);
    exact_grads(gp, i, n, gf);
    for (int j = 0; j < n; ++j) {
      w[j] = wf[j];
      g[j] = exact_grad(x, gf[j]);
      u[j] = g[j] + lam * w[j];
    }
    sw.add(w, n);
    sg.add(g, n);
    su.add(u, n);
  }
  out[0] = sw.sum();
  out[1] = sg.sum();
  out[2] = su.sum();
}

template <class PT, bool MASTER, bool REM, int ST>
void lars_exact_update_t(const ExactTile& a, const ExactCtx& x, const LarsExactCoef& c_in) {
  const LarsExactCoef c = c_in;
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  const bool mom = c.step_mode != 0;
  alignas(64) float wf[kQB], gf[kQB], sf[kQB], s32[kQB], w32[kQB];
  alignas(64) uint32_t rnd[kQB];
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    W.load(i, n, wf);
    exact_grads(gp, i, n, gf);
    if (mom) exact_state_load<ST>(a.s0, a.a0, true, a.start + i, n, sf);
    else for (int j = 0; j < n; ++j) sf[j] = 0.0f;
    for (int j = 0; j < n; ++j) {
      double b_new;
      const double wn = lars_exact_update<double>(c, wf[j], exact_grad(x, gf[j]), sf[j], b_new);
      s32[j] = static_cast<float>(b_new);
      w32[j] = static_cast<float>(wn);
    }
    W.store(i, n, w32);
    if (mom) {
      if constexpr (ST == kStoreBF16) exact_philox<false>(x, a, a.start + i, n, rnd, nullptr);
      exact_state_store<ST>(a.s0, a.a0, true, a.start + i, n, s32, rnd);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// LAMB

// one block's element math: fills wd (decayed weight), g (scaled grad, before l2), u, and the new
// moments' fp32 values; w32 (the new weights) when K is given (pass 2)
template <class PT, bool MASTER, bool REM, int ST, bool PASS2>
FL_AI void lamb_exact_block(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c, int64_t i, int n,
                            double* wd, double* g, double* u, float* m32, float* v32, float* w32) {
  const ExactW<PT, MASTER, REM> W(a);
  const PT* gp = static_cast<const PT*>(a.grad) + a.start;
  alignas(64) float wf[kQB], gf[kQB], mf[kQB], vf[kQB];
  W.load(i, n, wf);
  exact_grads(gp, i, n, gf);
  exact_state_load<ST>(a.s0, a.a0, true, a.start + i, n, mf);
  exact_state_load<ST>(a.s1, a.a1, false, a.start + i, n, vf);
  for (int j = 0; j < n; ++j) {
    const double gj = exact_grad(x, gf[j]);
    double m = mf[j], v = vf[j], uj;
    const double wdj = lamb_exact_direction<double>(c, double(wf[j]), gj, m, v, uj);
    if constexpr (PASS2) {
      m32[j] = static_cast<float>(m);
      v32[j] = static_cast<float>(v);
      w32[j] = static_cast<float>(wdj - c.k * uj);
    } else {
      wd[j] = wdj;
      g[j] = gj;
      u[j] = uj;
    }
  }
}

template <class PT, bool MASTER, bool REM, int ST>
void lamb_exact_pass1_t(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c_in, double* out) {
  const LambExactCoef c = c_in;
  DAcc sw, sg, su;
  alignas(64) double wd[kQB], g[kQB], u[kQB];
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    lamb_exact_block<PT, MASTER, REM, ST, false>(a, x, c, i, n, wd, g, u, nullptr, nullptr, nullptr);
    sw.add(wd, n);
    sg.add(g, n);
    su.add(u, n);
  }
  out[0] = sw.sum();
  out[1] = sg.sum();
  out[2] = su.sum();
}

template <class PT, bool MASTER, bool REM, int ST>
void lamb_exact_pass2_t(const ExactTile& a, const ExactCtx& x, const LambExactCoef& c_in) {
  const LambExactCoef c = c_in;
  const ExactW<PT, MASTER, REM> W(a);
  alignas(64) float m32[kQB], v32[kQB], w32[kQB];
  alignas(64) uint32_t r0[kQB], r1[kQB];
  for (int64_t i = 0; i < a.len; i += kQB) {
    const int n = static_cast<int>(a.len - i < kQB ? a.len - i : kQB);
    lamb_exact_block<PT, MASTER, REM, ST, true>(a, x, c, i, n, nullptr, nullptr, nullptr, m32, v32, w32);
    W.store(i, n, w32);
    // LAMB's two buffers take words 0 and 1 of one Philox call (lowbit_state.WORD)
    if constexpr (ST == kStoreBF16) exact_philox<true>(x, a, a.start + i, n, r0, r1);
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

void lars_exact_update_k(const ExactTile& a, int variant, const ExactCtx& x, const LarsExactCoef& c) {
  by_exact_variant(variant, x.storage, [&]<class PT, bool M, bool R, int ST>() {
    lars_exact_update_t<PT, M, R, ST>(a, x, c);
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
