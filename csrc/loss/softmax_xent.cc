#include "loss/softmax_xent.h"

#include <cmath>
#include <vector>

#include "core/isa.h"
#include "core/threading.h"

namespace pt {

static index_t count_rows(const std::int64_t* targets, index_t N, std::int64_t ignore_index) {
  index_t n = 0;
  for (index_t r = 0; r < N; ++r) n += targets[r] != ignore_index;
  return n;
}

double softmax_cross_entropy_forward_backward(float* dlogits, const float* logits,
                                              const std::int64_t* targets, index_t N, index_t V,
                                              float label_smoothing, std::int64_t ignore_index) {
  const index_t count = count_rows(targets, N, ignore_index);
  const float inv_count = count > 0 ? 1.0f / static_cast<float>(count) : 0.0f;
  std::vector<double> row_loss(static_cast<size_t>(N), 0.0);
  auto kernel = PT_DISPATCH(xent_rows);
  parallel_chunks(N, [&](index_t, index_t r0, index_t r1) {
    std::vector<float> scratch(static_cast<size_t>(xent_scratch_floats(V)));  // per thread
    kernel(row_loss.data(), dlogits, scratch.data(), logits, targets, r0, r1, V, label_smoothing, ignore_index,
           inv_count);
  });
  double total = 0.0;
  for (index_t r = 0; r < N; ++r) total += row_loss[static_cast<size_t>(r)];
  return count > 0 ? total / static_cast<double>(count) : 0.0;
}

void log_softmax_forward(float* out, const float* inp, index_t N, index_t V) {
  auto kernel = PT_DISPATCH(log_softmax_rows);
  parallel_for(N, [&](index_t r) { kernel(out, inp, r, r + 1, V); });
}

void log_softmax_topk(std::int64_t* idx, float* val, const float* inp, index_t N, index_t V, index_t k) {
  auto kernel = PT_DISPATCH(log_softmax_topk_rows);
  parallel_for(N, [&](index_t r) { kernel(idx, val, inp, r, r + 1, V, k); });
}

// logsumexp of one row in double, max-shifted.
static double row_lse(const float* x, index_t V) {
  double m = x[0];
  for (index_t v = 1; v < V; ++v) m = x[v] > m ? x[v] : m;
  double s = 0.0;
  for (index_t v = 0; v < V; ++v) s += std::exp(x[v] - m);
  return m + std::log(s);
}

double softmax_cross_entropy_naive(float* dlogits, const float* logits, const std::int64_t* targets,
                                   index_t N, index_t V, float label_smoothing, std::int64_t ignore_index) {
  const index_t count = count_rows(targets, N, ignore_index);
  const double eps = label_smoothing;
  double total = 0.0;
  for (index_t r = 0; r < N; ++r) {
    const float* x = logits + r * V;
    float* d = dlogits ? dlogits + r * V : nullptr;
    if (targets[r] == ignore_index) {
      if (d)
        for (index_t v = 0; v < V; ++v) d[v] = 0.0f;
      continue;
    }
    const double lse = row_lse(x, V);
    double sum_x = 0.0;
    for (index_t v = 0; v < V; ++v) sum_x += x[v];
    const double xt = x[targets[r]];
    total += (1.0 - eps) * (lse - xt) + eps * (lse - sum_x / static_cast<double>(V));
    if (d) {
      for (index_t v = 0; v < V; ++v) {
        const double g = std::exp(x[v] - lse) - eps / static_cast<double>(V) - (v == targets[r] ? 1.0 - eps : 0.0);
        d[v] = static_cast<float>(g / static_cast<double>(count));
      }
    }
  }
  return count > 0 ? total / static_cast<double>(count) : 0.0;
}

void log_softmax_naive(float* out, const float* inp, index_t N, index_t V) {
  for (index_t r = 0; r < N; ++r) {
    const double lse = row_lse(inp + r * V, V);
    for (index_t v = 0; v < V; ++v) out[r * V + v] = static_cast<float>(inp[r * V + v] - lse);
  }
}

}  // namespace pt
