#include "train/adam.h"

#include <cmath>
#include <vector>

#include "core/isa.h"
#include "core/threading.h"

namespace pt {

static constexpr index_t kBlock = 16384;

void adam_step(float* param, const float* grad, float* m, float* v, index_t n, const AdamParams& hp) {
  const double bc1 = 1.0 - std::pow(static_cast<double>(hp.beta1), static_cast<double>(hp.step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(hp.beta2), static_cast<double>(hp.step));
  const float step_size = static_cast<float>(hp.lr / bc1);
  const float inv_sqrt_bc2 = static_cast<float>(1.0 / std::sqrt(bc2));
  const float decay = hp.decoupled ? 1.0f - hp.lr * hp.weight_decay : hp.weight_decay;
  auto k = PT_DISPATCH(adam_range);
  parallel_for((n + kBlock - 1) / kBlock, [&](index_t b) {
    const index_t i0 = b * kBlock, i1 = i0 + kBlock < n ? i0 + kBlock : n;
    k(param, grad, m, v, i0, i1, hp.beta1, hp.beta2, hp.eps, step_size, inv_sqrt_bc2, decay, hp.decoupled);
  });
}

void adam_step_naive(float* param, const float* grad, float* m, float* v, index_t n, const AdamParams& hp) {
  const double bc1 = 1.0 - std::pow(static_cast<double>(hp.beta1), static_cast<double>(hp.step));
  const double bc2 = 1.0 - std::pow(static_cast<double>(hp.beta2), static_cast<double>(hp.step));
  for (index_t i = 0; i < n; ++i) {
    double p = param[i], g = grad[i];
    if (hp.decoupled)
      p *= 1.0 - static_cast<double>(hp.lr) * hp.weight_decay;
    else
      g += static_cast<double>(hp.weight_decay) * p;
    const double mi = hp.beta1 * static_cast<double>(m[i]) + (1.0 - hp.beta1) * g;
    const double vi = hp.beta2 * static_cast<double>(v[i]) + (1.0 - hp.beta2) * g * g;
    p -= hp.lr / bc1 * mi / (std::sqrt(vi) / std::sqrt(bc2) + hp.eps);
    param[i] = static_cast<float>(p);
    m[i] = static_cast<float>(mi);
    v[i] = static_cast<float>(vi);
  }
}

double global_norm(const float* const* arrays, const index_t* sizes, std::size_t count) {
  // One task per (array, block); each task's float64 partial lands in its own slot.
  std::vector<index_t> first(count + 1, 0);
  for (std::size_t a = 0; a < count; ++a) first[a + 1] = first[a] + (sizes[a] + kBlock - 1) / kBlock;
  const index_t tasks = first[count];
  std::vector<double> partial(static_cast<std::size_t>(tasks), 0.0);
  std::vector<std::size_t> owner(static_cast<std::size_t>(tasks));
  for (std::size_t a = 0; a < count; ++a)
    for (index_t t = first[a]; t < first[a + 1]; ++t) owner[static_cast<std::size_t>(t)] = a;
  auto k = PT_DISPATCH(sum_squares);
  parallel_for(tasks, [&](index_t t) {
    const std::size_t a = owner[static_cast<std::size_t>(t)];
    const index_t i0 = (t - first[a]) * kBlock, i1 = i0 + kBlock < sizes[a] ? i0 + kBlock : sizes[a];
    partial[static_cast<std::size_t>(t)] = k(arrays[a] + i0, i1 - i0);
  });
  double total = 0.0;
  for (double p : partial) total += p;
  return std::sqrt(total);
}

void scale_inplace(float* x, index_t n, float s) {
  auto k = PT_DISPATCH(scale_range);
  parallel_for((n + kBlock - 1) / kBlock, [&](index_t b) {
    const index_t i0 = b * kBlock, i1 = i0 + kBlock < n ? i0 + kBlock : n;
    k(x, i0, i1, s);
  });
}

}  // namespace pt
