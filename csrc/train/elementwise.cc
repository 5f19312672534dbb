#include "train/elementwise.h"

#include <cmath>

#include "core/isa.h"
#include "core/threading.h"

namespace pt {

// Calls body(i0, i1) over fixed blocks of [0, n) in parallel.
template <class Body>
static void blocks(index_t n, Body&& body) {
  const index_t step = 16384;
  parallel_for((n + step - 1) / step, [&](index_t b) {
    const index_t i0 = b * step, i1 = i0 + step < n ? i0 + step : n;
    body(i0, i1);
  });
}

void gelu_forward(float* out, const float* inp, index_t n) {
  auto k = PT_DISPATCH(gelu_forward_range);
  blocks(n, [&](index_t i0, index_t i1) { k(out, inp, i0, i1); });
}

void gelu_backward(float* dinp, const float* dout, const float* inp, index_t n) {
  auto k = PT_DISPATCH(gelu_backward_range);
  blocks(n, [&](index_t i0, index_t i1) { k(dinp, dout, inp, i0, i1); });
}

void swish_forward(float* out, const float* inp, index_t n) {
  auto k = PT_DISPATCH(swish_forward_range);
  blocks(n, [&](index_t i0, index_t i1) { k(out, inp, i0, i1); });
}

void swish_backward(float* dinp, const float* dout, const float* inp, index_t n) {
  auto k = PT_DISPATCH(swish_backward_range);
  blocks(n, [&](index_t i0, index_t i1) { k(dinp, dout, inp, i0, i1); });
}

void relu_backward(float* dinp, const float* dout, const float* out, index_t n) {
  auto k = PT_DISPATCH(relu_backward_range);
  blocks(n, [&](index_t i0, index_t i1) { k(dinp, dout, out, i0, i1); });
}

std::uint32_t dropout_threshold(float p) {
  const double t = std::nearbyint(static_cast<double>(p) * 16777216.0);
  return static_cast<std::uint32_t>(t < 0 ? 0 : (t > 16777216.0 ? 16777216.0 : t));
}

DropoutKey dropout_key(std::uint64_t seed) {
  // splitmix64 of the seed, so nearby seeds give unrelated keys.
  std::uint64_t z = seed + 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return {static_cast<std::uint32_t>(z), static_cast<std::uint32_t>(z >> 32)};
}

void dropout_forward(float* out, const float* inp, index_t n, float p, std::uint64_t seed, std::uint64_t offset) {
  const std::uint32_t thr = dropout_threshold(p);
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  const DropoutKey key = dropout_key(seed);
  auto k = PT_DISPATCH(dropout_range);
  blocks(n, [&](index_t i0, index_t i1) { k(out, inp, i0, i1, thr, scale, key, offset); });
}

void gelu_forward_naive(float* out, const float* inp, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const double x = inp[i];
    out[i] = static_cast<float>(0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))));
  }
}

void gelu_backward_naive(float* dinp, const float* dout, const float* inp, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const double x = inp[i];
    const double cdf = 0.5 * (1.0 + std::erf(x / std::sqrt(2.0)));
    const double pdf = std::exp(-0.5 * x * x) / std::sqrt(2.0 * M_PI);
    dinp[i] = static_cast<float>(dout[i] * (cdf + x * pdf));
  }
}

void swish_forward_naive(float* out, const float* inp, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const double x = inp[i];
    out[i] = static_cast<float>(x / (1.0 + std::exp(-x)));
  }
}

void swish_backward_naive(float* dinp, const float* dout, const float* inp, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    const double x = inp[i];
    const double s = 1.0 / (1.0 + std::exp(-x));
    dinp[i] = static_cast<float>(dout[i] * s * (1.0 + x * (1.0 - s)));
  }
}

void dropout_forward_naive(float* out, const float* inp, index_t n, float p, std::uint64_t seed,
                           std::uint64_t offset) {
  const std::uint32_t thr = dropout_threshold(p);
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  const DropoutKey key = dropout_key(seed);
  for (index_t i = 0; i < n; ++i)
    out[i] = (dropout_hash(key, offset + static_cast<std::uint64_t>(i)) >> 8) >= thr ? inp[i] * scale : 0.0f;
}

}  // namespace pt
