// Layer norm row kernels, one body for every ISA through Vec. A row (C floats) stays in L1, so
// the sweeps per row (sum, squared deviations, normalise) read memory once: the forward streams
// x in and y out.
#include <cmath>

#include "core/vec.h"
#include "norm/layer_norm.h"
#include "norm/vec_extra.h"

namespace pt {
namespace PT_ISA_NS {

namespace {

// Sum of (x - k) over x[0:C]. Shifting by a value k from the row keeps the terms small when the
// mean is large against the spread, so the mean keeps its digits. Four accumulators hide the
// add latency.
inline float row_shifted_sum(const float* x, float k, index_t C) {
  const Vec vk(k);
  Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  index_t c = 0;
  for (; c + 32 <= C; c += 32) {
    a0 = a0 + (Vec::load(x + c) - vk);
    a1 = a1 + (Vec::load(x + c + 8) - vk);
    a2 = a2 + (Vec::load(x + c + 16) - vk);
    a3 = a3 + (Vec::load(x + c + 24) - vk);
  }
  for (; c + 8 <= C; c += 8) a0 = a0 + (Vec::load(x + c) - vk);
  if (c < C) a1 = a1 + (load_tail(x + c, static_cast<int>(C - c), k) - vk);  // padded lanes give 0
  return ((a0 + a1) + (a2 + a3)).sum();
}

// Sum of (x - m)^2 over x[0:C].
inline float row_sq_dev(const float* x, float m, index_t C) {
  const Vec vm(m);
  Vec a0 = Vec::zero(), a1 = Vec::zero(), a2 = Vec::zero(), a3 = Vec::zero();
  index_t c = 0;
  for (; c + 32 <= C; c += 32) {
    const Vec d0 = Vec::load(x + c) - vm, d1 = Vec::load(x + c + 8) - vm;
    const Vec d2 = Vec::load(x + c + 16) - vm, d3 = Vec::load(x + c + 24) - vm;
    a0 = fma(d0, d0, a0);
    a1 = fma(d1, d1, a1);
    a2 = fma(d2, d2, a2);
    a3 = fma(d3, d3, a3);
  }
  for (; c + 8 <= C; c += 8) {
    const Vec d = Vec::load(x + c) - vm;
    a0 = fma(d, d, a0);
  }
  if (c < C) {
    const Vec d = load_tail(x + c, static_cast<int>(C - c), m) - vm;  // padded lanes give 0
    a1 = fma(d, d, a1);
  }
  return ((a0 + a1) + (a2 + a3)).sum();
}

// y = (x - m) * s * w + b with s = rstd. (x - m) first: folding m into an fma offset would lose
// the digits of x that a large mean shares with it.
inline void row_normalise(float* y, const float* x, const float* w, const float* bias, float m, float s,
                          index_t C) {
  const Vec vs(s), vm(m);
  index_t c = 0;
  for (; c + 8 <= C; c += 8) {
    const Vec xh = (Vec::load(x + c) - vm) * vs;
    fma(xh, Vec::load(w + c), Vec::load(bias + c)).store(y + c);
  }
  if (c < C) {
    const int n = static_cast<int>(C - c);
    const Vec xh = (Vec::load(x + c, n) - vm) * vs;
    fma(xh, Vec::load(w + c, n), Vec::load(bias + c, n)).store(y + c, n);
  }
}

// Asks for a row's cache lines ahead of use: issued for the next row before the in-L1 sweeps
// of the current one, so memory keeps streaming while those sweeps compute.
inline void prefetch_row(const float* p, index_t C) {
  for (index_t c = 0; c < C; c += 16) __builtin_prefetch(p + c);
}

// s = a + b over [0, C).
inline void row_add(float* s, const float* a, const float* b, index_t C) {
  index_t c = 0;
  for (; c + 8 <= C; c += 8) (Vec::load(a + c) + Vec::load(b + c)).store(s + c);
  if (c < C) {
    const int n = static_cast<int>(C - c);
    (Vec::load(a + c, n) + Vec::load(b + c, n)).store(s + c, n);
  }
}

}  // namespace

void layer_norm_forward_rows(float* out, float* sum, float* mean, float* rstd, const float* inp,
                             const float* residual, const float* weight, const float* bias, index_t r0,
                             index_t r1, index_t C, float eps) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * C;
    float* y = out + r * C;
    if (residual) {
      float* s = sum ? sum + r * C : y;
      row_add(s, x, residual + r * C, C);
      x = s;
    }
    if (r + 1 < r1) {
      prefetch_row(inp + (r + 1) * C, C);
      if (residual) prefetch_row(residual + (r + 1) * C, C);
    }
    const float m = x[0] + row_shifted_sum(x, x[0], C) * inv_c;
    const float var = row_sq_dev(x, m, C) * inv_c;
    const float s = 1.0f / std::sqrt(var + eps);
    row_normalise(y, x, weight, bias, m, s, C);
    if (mean) mean[r] = m;
    if (rstd) rstd[r] = s;
  }
}

void layer_norm_backward_rows(float* dinp, float* dweight, float* dbias, const float* dout,
                              const float* inp, const float* weight, const float* mean, const float* rstd,
                              index_t r0, index_t r1, index_t C) {
  const float inv_c = 1.0f / static_cast<float>(C);
  for (index_t r = r0; r < r1; ++r) {
    const float* x = inp + r * C;
    const float* dy = dout + r * C;
    float* dx = dinp + r * C;
    if (r + 1 < r1) {
      prefetch_row(x + C, C);
      prefetch_row(dy + C, C);
    }
    const Vec vs(rstd[r]), vm(mean[r]);
    // Sweep 1: a = sum(dy * w), b = sum(dy * w * xhat); dweight += dy * xhat, dbias += dy.
    Vec a = Vec::zero(), b = Vec::zero();
    index_t c = 0;
    for (; c + 8 <= C; c += 8) {
      const Vec g = Vec::load(dy + c), xh = ((Vec::load(x + c) - vm) * vs);
      const Vec dxh = g * Vec::load(weight + c);
      a = a + dxh;
      b = fma(dxh, xh, b);
      fma(g, xh, Vec::load(dweight + c)).store(dweight + c);
      (Vec::load(dbias + c) + g).store(dbias + c);
    }
    if (c < C) {
      const int n = static_cast<int>(C - c);
      const Vec g = Vec::load(dy + c, n), xh = ((Vec::load(x + c, n) - vm) * vs);
      const Vec dxh = g * Vec::load(weight + c, n);  // 0 in padded lanes
      a = a + dxh;
      b = fma(dxh, xh, b);
      fma(g, xh, Vec::load(dweight + c, n)).store(dweight + c, n);
      (Vec::load(dbias + c, n) + g).store(dbias + c, n);
    }
    const Vec ma(a.sum() * inv_c), mb(b.sum() * inv_c);
    // Sweep 2: dx = rstd * (dy * w - a - xhat * b).
    for (c = 0; c + 8 <= C; c += 8) {
      const Vec xh = ((Vec::load(x + c) - vm) * vs);
      const Vec dxh = Vec::load(dy + c) * Vec::load(weight + c);
      (vs * (dxh - ma - xh * mb)).store(dx + c);
    }
    if (c < C) {
      const int n = static_cast<int>(C - c);
      const Vec xh = ((Vec::load(x + c, n) - vm) * vs);
      const Vec dxh = Vec::load(dy + c, n) * Vec::load(weight + c, n);
      (vs * (dxh - ma - xh * mb)).store(dx + c, n);
    }
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
