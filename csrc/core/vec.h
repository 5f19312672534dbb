// Vec: eight float32 lanes, the SIMD vocabulary shared by every *_isa.cc kernel.
// Include only from *_isa.cc files: it defines pt::PT_ISA_NS::Vec, an __m256 wrapper in the AVX2
// build and a plain array (auto-vectorised for the baseline target) in the generic build.
#pragma once

#include "core/isa_unit.h"

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(PT_ISA_AVX2)
#include <immintrin.h>
#endif

namespace pt {
namespace PT_ISA_NS {

#if defined(PT_ISA_AVX2)

struct Vec {
  static constexpr int width = 8;
  __m256 v;
  Vec() = default;
  explicit Vec(__m256 x) : v(x) {}
  explicit Vec(float x) : v(_mm256_set1_ps(x)) {}
  static Vec zero() { return Vec(_mm256_setzero_ps()); }
  static Vec load(const float* p) { return Vec(_mm256_loadu_ps(p)); }
  // Loads the first n (<= 8) lanes, zero elsewhere. Loops call these for every vector, full
  // ones included, and a masked store is microcoded on AMD cores (about ten times a plain one
  // on the Zen 4 session machines), so n == 8 takes the plain instruction.
  static Vec load(const float* p, int n) {
    return n >= width ? load(p) : Vec(_mm256_maskload_ps(p, mask(n)));
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  void store(float* p, int n) const {
    if (n >= width) store(p);
    else _mm256_maskstore_ps(p, mask(n), v);
  }
  static __m256i mask(int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx);
  }
  friend Vec operator+(Vec a, Vec b) { return Vec(_mm256_add_ps(a.v, b.v)); }
  friend Vec operator-(Vec a, Vec b) { return Vec(_mm256_sub_ps(a.v, b.v)); }
  friend Vec operator*(Vec a, Vec b) { return Vec(_mm256_mul_ps(a.v, b.v)); }
  friend Vec operator/(Vec a, Vec b) { return Vec(_mm256_div_ps(a.v, b.v)); }
  friend Vec fma(Vec a, Vec b, Vec c) { return Vec(_mm256_fmadd_ps(a.v, b.v, c.v)); }
  friend Vec max(Vec a, Vec b) { return Vec(_mm256_max_ps(a.v, b.v)); }
  friend Vec min(Vec a, Vec b) { return Vec(_mm256_min_ps(a.v, b.v)); }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float max() const {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  // 2^n for integral-valued lanes n in [-126, 127].
  static Vec pow2i(Vec n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
    return Vec(_mm256_castsi256_ps(e));
  }
  static Vec round(Vec x) { return Vec(_mm256_round_ps(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)); }
  static Vec select(Vec mask_ge, Vec a, Vec b) { return Vec(_mm256_blendv_ps(b.v, a.v, mask_ge.v)); }
  static Vec less(Vec a, Vec b) { return Vec(_mm256_cmp_ps(a.v, b.v, _CMP_LT_OQ)); }
  static Vec is_nan(Vec a) { return Vec(_mm256_cmp_ps(a.v, a.v, _CMP_UNORD_Q)); }
};

#else  // generic: a fixed array the compiler vectorises for the baseline target

struct Vec {
  static constexpr int width = 8;
  float v[8];
  Vec() = default;
  explicit Vec(float x) {
    for (int i = 0; i < 8; ++i) v[i] = x;
  }
  static Vec zero() { return Vec(0.0f); }
  static Vec load(const float* p) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = p[i];
    return r;
  }
  static Vec load(const float* p, int n) {
    Vec r(0.0f);
    for (int i = 0; i < n; ++i) r.v[i] = p[i];
    return r;
  }
  void store(float* p) const {
    for (int i = 0; i < 8; ++i) p[i] = v[i];
  }
  void store(float* p, int n) const {
    for (int i = 0; i < n; ++i) p[i] = v[i];
  }
  template <class F>
  static Vec map2(Vec a, Vec b, F f) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = f(a.v[i], b.v[i]);
    return r;
  }
  friend Vec operator+(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x + y; }); }
  friend Vec operator-(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x - y; }); }
  friend Vec operator*(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x * y; }); }
  friend Vec operator/(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x / y; }); }
  friend Vec fma(Vec a, Vec b, Vec c) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  // Same NaN rule as AVX2 maxps/minps: when either lane is NaN the second operand wins.
  friend Vec max(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x > y ? x : y; }); }
  friend Vec min(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x < y ? x : y; }); }
  float sum() const {
    // Same pairing order as the AVX2 horizontal sum, so both ISAs round alike.
    float s[4];
    for (int i = 0; i < 4; ++i) s[i] = v[i] + v[i + 4];
    return (s[0] + s[2]) + (s[1] + s[3]);
  }
  float max() const {
    float s[4];
    for (int i = 0; i < 4; ++i) s[i] = v[i] > v[i + 4] ? v[i] : v[i + 4];
    const float a = s[0] > s[2] ? s[0] : s[2], b = s[1] > s[3] ? s[1] : s[3];
    return a > b ? a : b;
  }
  static Vec pow2i(Vec n) {
    Vec r;
    for (int i = 0; i < 8; ++i) {
      // A float->int cast of NaN or an out-of-range value is undefined behaviour: map those to
      // INT32_MIN as cvtps2dq does, and shift in unsigned arithmetic.
      const float c = n.v[i];
      const std::int32_t k = (c > -2147483648.0f && c < 2147483648.0f)
                                 ? static_cast<std::int32_t>(c)
                                 : std::numeric_limits<std::int32_t>::min();
      const std::uint32_t bits = (static_cast<std::uint32_t>(k) + 127u) << 23;
      float f;
      __builtin_memcpy(&f, &bits, 4);
      r.v[i] = f;
    }
    return r;
  }
  static Vec round(Vec x) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::nearbyint(x.v[i]);
    return r;
  }
  // Lanes of mask with their sign bit set take a, the others b (AVX2 blendv semantics).
  static Vec select(Vec mask, Vec a, Vec b) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::signbit(mask.v[i]) ? a.v[i] : b.v[i];
    return r;
  }
  static Vec less(Vec a, Vec b) { return map2(a, b, [](float x, float y) { return x < y ? -0.0f : 0.0f; }); }
  static Vec is_nan(Vec a) {
    Vec r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::isnan(a.v[i]) ? -0.0f : 0.0f;
    return r;
  }
};

#endif

// Lanes below n selected (for Vec::select), the others not.
inline Vec first_lanes(int n) {
  alignas(32) static const float iota[8] = {0, 1, 2, 3, 4, 5, 6, 7};
  return Vec::less(Vec::load(iota), Vec(static_cast<float>(n)));
}

// Loads the first n (< 8) lanes; the other lanes take `fill` (e.g. -FLT_MAX for a max).
inline Vec load_tail(const float* p, int n, float fill) {
  return Vec::select(first_lanes(n), Vec::load(p, n), Vec(fill));
}

// Lane-wise square root.
inline Vec vsqrt(Vec x) {
#if defined(PT_ISA_AVX2)
  return Vec(_mm256_sqrt_ps(x.v));
#else
  Vec r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::sqrt(x.v[i]);
  return r;
#endif
}

// The one exponential polynomial, shared by exp and exp2: 2^f = sum_k kExp2Poly[k] f^k for
// |f| <= 1/2, degree 6, fitted for the least maximum relative error (8e-8 in float32 arithmetic,
// 2e-9 in exact arithmetic). exp2 evaluates it at f = x - round(x); exp evaluates the same
// polynomial at f = r log2 e for its reduced argument r, with log2 e folded into the
// coefficients (exp_coef) so that neither pays more than six FMAs.
constexpr double kExp2Poly[7] = {1.0,
                                 6.931472028528286e-1,
                                 2.40226479134782e-1,
                                 5.550332476058196e-2,
                                 9.618437402717294e-3,
                                 1.3398872452992608e-3,
                                 1.535334221768461e-4};
constexpr double kLog2eD = 1.4426950408889634;

// Coefficient k of the polynomial as one in r = f ln 2: kExp2Poly[k] (log2 e)^k, so the sum is
// e^r (natural) or 2^f (not natural).
constexpr float exp_coef(int k, bool natural) {
  double c = kExp2Poly[k];
  for (int i = 0; natural && i < k; ++i) c *= kLog2eD;
  return static_cast<float>(c);
}

template <bool Natural>
inline Vec exp_polynomial(Vec x) {
  Vec p(exp_coef(6, Natural));
  p = fma(p, x, Vec(exp_coef(5, Natural)));
  p = fma(p, x, Vec(exp_coef(4, Natural)));
  p = fma(p, x, Vec(exp_coef(3, Natural)));
  p = fma(p, x, Vec(exp_coef(2, Natural)));
  p = fma(p, x, Vec(exp_coef(1, Natural)));
  return fma(p, x, Vec(exp_coef(0, Natural)));
}

// e^x, relative error about 1e-7 for x <= 88; e^x for x < -87.3 is 0; NaN stays NaN.
inline Vec exp(Vec x) {
  const Vec nan_lanes = Vec::is_nan(x);
  const Vec lo(-87.33654f), hi(88.37626f);
  const Vec xc = min(max(x, lo), hi);
  const Vec n = Vec::round(xc * Vec(1.44269504088896341f));
  // r = x - n ln2, with ln2 split in two for precision; |r| <= ln2 / 2
  Vec r = fma(n, Vec(-0.693359375f), xc);
  r = fma(n, Vec(2.12194440e-4f), r);
  Vec y = exp_polynomial<true>(r) * Vec::pow2i(n);
  y = Vec::select(Vec::less(x, lo), Vec::zero(), y);
  return Vec::select(nan_lanes, x, y);
}

// 2^x, relative error about 1e-7 for x in [-125, 127]; 2^x for x < -126 is 0 (x = -inf gives
// exactly 0), larger x are clamped to 127, NaN stays NaN. n = round(x) and the fraction x - n are
// exact.
inline Vec exp2(Vec x) {
  const Vec lo(-126.0f);
  const Vec xc = min(Vec(127.0f), max(lo, x));  // operand order keeps NaN
  const Vec n = Vec::round(xc);
  const Vec y = exp_polynomial<false>(xc - n) * Vec::pow2i(n);
  return Vec::select(Vec::less(x, lo), Vec::zero(), y);
}

// erf(x), absolute error below 2e-7 (Abramowitz & Stegun 7.1.26 with an exact e^(-x^2)).
inline Vec erf(Vec x) {
  const Vec negative = Vec::less(x, Vec::zero());
  const Vec a = max(x, Vec::zero() - x);
  const Vec t = Vec(1.0f) / fma(Vec(0.3275911f), a, Vec(1.0f));
  Vec p(1.061405429f);
  p = fma(p, t, Vec(-1.453152027f));
  p = fma(p, t, Vec(1.421413741f));
  p = fma(p, t, Vec(-0.284496736f));
  p = fma(p, t, Vec(0.254829592f));
  const Vec y = Vec(1.0f) - p * t * exp(Vec::zero() - a * a);
  return Vec::select(negative, Vec::zero() - y, y);
}

// GELU in its exact form x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as torch.nn.functional.gelu.
inline Vec gelu(Vec x) {
  return Vec(0.5f) * x * (Vec(1.0f) + erf(x * Vec(0.70710678118654752f)));
}

// d gelu / dx = Phi(x) + x * phi(x).
inline Vec gelu_grad(Vec x) {
  const Vec cdf = Vec(0.5f) * (Vec(1.0f) + erf(x * Vec(0.70710678118654752f)));
  const Vec pdf = Vec(0.39894228040143268f) * exp(Vec(-0.5f) * x * x);
  return fma(x, pdf, cdf);
}

}  // namespace PT_ISA_NS
}  // namespace pt
