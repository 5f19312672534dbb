// Fused Adam / AdamW update and the global gradient norm used for clipping.
#pragma once

#include <cstddef>

#include "common.h"

namespace pt {

struct AdamParams {
  float lr, beta1, beta2, eps, weight_decay;
  std::int64_t step;  // >= 1, counts this update (bias correction uses beta^step)
  bool decoupled;     // true: AdamW (decay applied to the parameter), false: L2 (added to the gradient)
};

// In place on param, m, v (n elements each, contiguous); grad (n) is read. As torch.optim.Adam /
// AdamW:  g = grad (+ wd * param when !decoupled);  param *= 1 - lr * wd when decoupled;
//   m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;
//   param -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps).
void adam_step(float* param, const float* grad, float* m, float* v, index_t n, const AdamParams& hp);
void adam_step_naive(float* param, const float* grad, float* m, float* v, index_t n, const AdamParams& hp);

// sqrt(sum over arrays of sum x^2): float64 accumulation over fixed blocks, blocks added in a
// fixed order, so the result does not depend on the thread count.
double global_norm(const float* const* arrays, const index_t* sizes, std::size_t count);
// Multiplies x[0:n] by s in place.
void scale_inplace(float* x, index_t n, float s);

// Per-ISA bodies (adam_isa.cc) over [i0, i1). The Adam constants come premultiplied:
// step_size = lr / bc1, inv_sqrt_bc2 = 1 / sqrt(bc2), decay = 1 - lr * wd (AdamW) or wd (L2).
#define PT_ADAM_ISA_DECLS                                                                       \
  void adam_range(float* param, const float* grad, float* m, float* v, index_t i0, index_t i1,   \
                  float beta1, float beta2, float eps, float step_size, float inv_sqrt_bc2,      \
                  float decay, bool decoupled);                                                  \
  double sum_squares(const float* x, index_t n);                                                 \
  void scale_range(float* x, index_t i0, index_t i1, float s);
namespace generic {
PT_ADAM_ISA_DECLS
}
namespace avx2 {
PT_ADAM_ISA_DECLS
}
#undef PT_ADAM_ISA_DECLS

}  // namespace pt
