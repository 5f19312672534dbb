// Adam update, sum of squares and scaling bodies, one for every ISA.
#include "core/vec.h"
#include "train/adam.h"

namespace pt {
namespace PT_ISA_NS {

namespace {

struct AdamConsts {
  Vec b1, b1c, b2, b2c, eps, step, isb, decay;
};

// One vector of the update; `Decoupled` picks AdamW or L2 weight decay.
template <bool Decoupled>
inline void adam_vec(Vec& p, Vec g, Vec& m, Vec& v, const AdamConsts& k) {
  if (Decoupled)
    p = p * k.decay;
  else
    g = fma(k.decay, p, g);
  m = fma(k.b1, m, k.b1c * g);
  v = fma(k.b2, v, k.b2c * (g * g));
  const Vec denom = fma(vsqrt(v), k.isb, k.eps);
  p = p - k.step * m / denom;
}

template <bool Decoupled>
void adam_loop(float* param, const float* grad, float* m, float* v, index_t i0, index_t i1, const AdamConsts& k) {
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) {
    Vec p = Vec::load(param + i), mi = Vec::load(m + i), vi = Vec::load(v + i);
    adam_vec<Decoupled>(p, Vec::load(grad + i), mi, vi, k);
    p.store(param + i);
    mi.store(m + i);
    vi.store(v + i);
  }
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    Vec p = Vec::load(param + i, n), mi = Vec::load(m + i, n), vi = Vec::load(v + i, n);
    adam_vec<Decoupled>(p, Vec::load(grad + i, n), mi, vi, k);
    p.store(param + i, n);
    mi.store(m + i, n);
    vi.store(v + i, n);
  }
}

}  // namespace

void adam_range(float* param, const float* grad, float* m, float* v, index_t i0, index_t i1, float beta1,
                float beta2, float eps, float step_size, float inv_sqrt_bc2, float decay, bool decoupled) {
  const AdamConsts k{Vec(beta1), Vec(1.0f - beta1), Vec(beta2), Vec(1.0f - beta2),
                     Vec(eps),   Vec(step_size),    Vec(inv_sqrt_bc2), Vec(decay)};
  if (decoupled)
    adam_loop<true>(param, grad, m, v, i0, i1, k);
  else
    adam_loop<false>(param, grad, m, v, i0, i1, k);
}

// Eight float64 accumulators in a fixed lane pattern (the compiler vectorises this loop).
double sum_squares(const float* x, index_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  index_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) {
      const double d = x[i + j];
      acc[j] += d * d;
    }
  for (int j = 0; i + j < n; ++j) {
    const double d = x[i + j];
    acc[j] += d * d;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

void scale_range(float* x, index_t i0, index_t i1, float s) {
  const Vec vs(s);
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) (Vec::load(x + i) * vs).store(x + i);
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    (Vec::load(x + i, n) * vs).store(x + i, n);
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
