// GELU, ReLU-backward and dropout bodies, one for every ISA through Vec.
#include "core/vec.h"
#include "train/elementwise.h"

namespace pt {
namespace PT_ISA_NS {

// Applies f(Vec...) over [i0, i1) of the given inputs, storing into out.
template <class F>
inline void map1(float* out, const float* a, index_t i0, index_t i1, F f) {
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) f(Vec::load(a + i)).store(out + i);
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    f(Vec::load(a + i, n)).store(out + i, n);
  }
}

template <class F>
inline void map2(float* out, const float* a, const float* b, index_t i0, index_t i1, F f) {
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) f(Vec::load(a + i), Vec::load(b + i)).store(out + i);
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    f(Vec::load(a + i, n), Vec::load(b + i, n)).store(out + i, n);
  }
}

void gelu_forward_range(float* out, const float* inp, index_t i0, index_t i1) {
  map1(out, inp, i0, i1, [](Vec x) { return gelu(x); });
}

void gelu_backward_range(float* dinp, const float* dout, const float* inp, index_t i0, index_t i1) {
  map2(dinp, dout, inp, i0, i1, [](Vec g, Vec x) { return g * gelu_grad(x); });
}

// sigmoid(x) = 1 / (1 + e^-x): e^-x saturates to +inf-free large values or 0 (exp clamps), so
// the quotient is exact at both ends (1 and 0).
inline Vec sigmoid(Vec x) { return Vec(1.0f) / (Vec(1.0f) + exp(Vec::zero() - x)); }

void swish_forward_range(float* out, const float* inp, index_t i0, index_t i1) {
  map1(out, inp, i0, i1, [](Vec x) { return x * sigmoid(x); });
}

// d swish / dx = s (1 + x (1 - s)), s = sigmoid(x).
void swish_backward_range(float* dinp, const float* dout, const float* inp, index_t i0, index_t i1) {
  map2(dinp, dout, inp, i0, i1, [](Vec g, Vec x) {
    const Vec s = sigmoid(x);
    return g * s * fma(x, Vec(1.0f) - s, Vec(1.0f));
  });
}

void relu_backward_range(float* dinp, const float* dout, const float* out, index_t i0, index_t i1) {
  map2(dinp, dout, out, i0, i1, [](Vec g, Vec y) { return Vec::select(Vec::less(Vec::zero(), y), g, Vec::zero()); });
}

// Multipliers (scale or 0) of the 8 counters base .. base + 7. Integer arithmetic, so every ISA
// and the naive sibling draw the same mask.
inline Vec dropout_multipliers(DropoutKey key, std::uint64_t base, std::uint32_t threshold, float scale) {
#if defined(PT_ISA_AVX2)
  const std::uint32_t lo = static_cast<std::uint32_t>(base);
  if (lo <= 0xFFFFFFF8u) {  // the 8 counters share their high word
    auto fmix = [](__m256i h) {
      h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
      h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0x85ebca6bu)));
      h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 13));
      h = _mm256_mullo_epi32(h, _mm256_set1_epi32(static_cast<int>(0xc2b2ae35u)));
      return _mm256_xor_si256(h, _mm256_srli_epi32(h, 16));
    };
    const __m256i lanes =
        _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    const std::uint32_t hi = static_cast<std::uint32_t>(base >> 32) ^ key.k1;
    __m256i h = fmix(_mm256_xor_si256(lanes, _mm256_set1_epi32(static_cast<int>(key.k0))));
    h = fmix(_mm256_add_epi32(h, _mm256_set1_epi32(static_cast<int>(hi))));
    // (h >> 8) < 2^24, so a signed compare against threshold - 1 (>= -1) is exact.
    const __m256i bar = _mm256_set1_epi32(static_cast<int>(threshold) - 1);
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_srli_epi32(h, 8), bar);
    return Vec(_mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_set1_ps(scale)));
  }
#endif
  alignas(32) float mul[8];
  for (int j = 0; j < 8; ++j) mul[j] = (dropout_hash(key, base + j) >> 8) >= threshold ? scale : 0.0f;
  return Vec::load(mul);
}

void dropout_range(float* out, const float* inp, index_t i0, index_t i1, std::uint32_t threshold, float scale,
                   DropoutKey key, std::uint64_t offset) {
  for (index_t i = i0; i < i1; i += 8) {
    const int n = i1 - i < 8 ? static_cast<int>(i1 - i) : 8;
    const Vec m = dropout_multipliers(key, offset + static_cast<std::uint64_t>(i), threshold, scale);
    if (n == 8)
      (Vec::load(inp + i) * m).store(out + i);
    else
      (Vec::load(inp + i, n) * m).store(out + i, n);
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
