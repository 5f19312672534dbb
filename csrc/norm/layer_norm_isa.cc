// Layer norm row kernels, one body for every ISA through Vec. A row (C floats) stays in L1, so
// the sweeps per row (sum, squared deviations, normalise) read memory once: the forward streams
// x in and y out, reading row r + 1 while it writes row r.
#include <cmath>

#include "core/vec.h"
#include "norm/layer_norm.h"

namespace pt {
namespace PT_ISA_NS {

namespace {

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

// Asks for a row's cache lines ahead of use (the backward issues it for the next row before the
// in-L1 sweeps of the current one, so memory keeps streaming while they compute).
inline void prefetch_row(const float* p, index_t C) {
  for (index_t c = 0; c < C; c += 16) __builtin_prefetch(p + c);
}

// Where a row's values come from: x, plus residual when fused; `keep` (when non-null) receives
// them, because the fused row must be materialised for the later sweeps. Without keep the later
// sweeps read x in place.
struct RowSource {
  const float* x;
  const float* res;
  float* keep;
  float first() const { return res ? x[0] + res[0] : x[0]; }
  const float* values() const { return keep ? keep : x; }
};

// n (8 or the tail count) values of the source at column c, stored into keep.
inline Vec source_vec(const RowSource& q, index_t c, int n) {
  Vec v = n == 8 ? Vec::load(q.x + c) : Vec::load(q.x + c, n);
  if (q.res) v = v + (n == 8 ? Vec::load(q.res + c) : Vec::load(q.res + c, n));
  if (q.keep) n == 8 ? v.store(q.keep + c) : v.store(q.keep + c, n);
  return v;
}

// One sweep over columns that can do two jobs at once:
//   Norm: y = (xr - m) * s * w + b for the current row, whose values xr are in L1 by now;
//   Next: reads the next row's source (from memory) and returns its sum of (v - k).
// Doing both in one loop keeps loads from memory flowing while the current row is written, the
// way a copy streams. The shift k (the row's first value) keeps the terms small when the mean is
// large against the spread, so the mean keeps its digits. Every row's sum is formed by the same
// code, whichever job it was paired with.
template <bool Norm, bool Next>
float sweep(float* y, const float* xr, const float* w, const float* b, float m, float s, const RowSource& next,
            float k, index_t C) {
  const Vec vm(m), vs(s), vk(k);
  Vec a0 = Vec::zero(), a1 = Vec::zero();
  index_t c = 0;
  for (; c + 16 <= C; c += 16) {
    if (Norm) {
      const Vec xh0 = (Vec::load(xr + c) - vm) * vs, xh1 = (Vec::load(xr + c + 8) - vm) * vs;
      fma(xh0, Vec::load(w + c), Vec::load(b + c)).store(y + c);
      fma(xh1, Vec::load(w + c + 8), Vec::load(b + c + 8)).store(y + c + 8);
    }
    if (Next) {
      a0 = a0 + (source_vec(next, c, 8) - vk);
      a1 = a1 + (source_vec(next, c + 8, 8) - vk);
    }
  }
  for (; c < C; c += 8) {
    const int n = C - c < 8 ? static_cast<int>(C - c) : 8;
    if (Norm) {
      const Vec xh = (Vec::load(xr + c, n) - vm) * vs;
      fma(xh, Vec::load(w + c, n), Vec::load(b + c, n)).store(y + c, n);
    }
    if (Next) a0 = a0 + Vec::select(first_lanes(n), source_vec(next, c, n) - vk, Vec::zero());
  }
  return (a0 + a1).sum();
}

}  // namespace

void layer_norm_forward_rows(float* out, float* sum, float* mean, float* rstd, const float* inp,
                             const float* residual, const float* weight, const float* bias, index_t r0,
                             index_t r1, index_t C, float eps) {
  const float inv_c = 1.0f / static_cast<float>(C);
  auto source = [&](index_t r) {
    float* keep = residual ? (sum ? sum : out) + r * C : nullptr;
    return RowSource{inp + r * C, residual ? residual + r * C : nullptr, keep};
  };
  if (r0 >= r1) return;
  RowSource cur = source(r0);
  float k = cur.first();
  float shifted = sweep<false, true>(nullptr, nullptr, nullptr, nullptr, 0.0f, 0.0f, cur, k, C);
  for (index_t r = r0; r < r1; ++r) {
    const float* xr = cur.values();
    const float m = k + shifted * inv_c;
    const float var = row_sq_dev(xr, m, C) * inv_c;
    const float s = 1.0f / std::sqrt(var + eps);
    float* y = out + r * C;
    if (r + 1 < r1) {
      cur = source(r + 1);
      k = cur.first();
      shifted = sweep<true, true>(y, xr, weight, bias, m, s, cur, k, C);
    } else {
      sweep<true, false>(y, xr, weight, bias, m, s, cur, 0.0f, C);
    }
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
