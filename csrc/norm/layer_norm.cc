#include "norm/layer_norm.h"

#include <cmath>
#include <vector>

#include "core/isa.h"
#include "core/threading.h"

namespace pt {

// Rows per parallel task: enough work per task to hide the scheduling cost.
static index_t rows_per_task(index_t C) {
  const index_t r = 16384 / (C > 0 ? C : 1);
  return r < 1 ? 1 : r;
}

void add_layer_norm_forward(float* out, float* sum, float* mean, float* rstd, const float* inp,
                            const float* residual, const float* weight, const float* bias, index_t N,
                            index_t C, float eps) {
  const index_t step = rows_per_task(C);
  const index_t tasks = (N + step - 1) / step;
  auto kernel = PT_DISPATCH(layer_norm_forward_rows);
  parallel_for(tasks, [&](index_t t) {
    const index_t r0 = t * step, r1 = r0 + step < N ? r0 + step : N;
    kernel(out, sum, mean, rstd, inp, residual, weight, bias, r0, r1, C, eps);
  });
}

void layer_norm_forward(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                        const float* bias, index_t N, index_t C, float eps) {
  add_layer_norm_forward(out, nullptr, mean, rstd, inp, nullptr, weight, bias, N, C, eps);
}

void layer_norm_backward(float* dinp, float* dweight, float* dbias, const float* dout, const float* inp,
                         const float* weight, const float* mean, const float* rstd, index_t N, index_t C) {
  // Fixed blocks (a function of N only) each sum their rows' dweight/dbias into their own
  // partial; the partials are then added in block order: same bits for any thread count.
  const index_t min_rows = 8, max_blocks = 32;
  index_t block = (N + max_blocks - 1) / max_blocks;
  if (block < min_rows) block = min_rows;
  const index_t blocks = N > 0 ? (N + block - 1) / block : 0;
  std::vector<float> partial(static_cast<size_t>(blocks * 2 * C), 0.0f);
  auto kernel = PT_DISPATCH(layer_norm_backward_rows);
  parallel_for(blocks, [&](index_t b) {
    const index_t r0 = b * block, r1 = r0 + block < N ? r0 + block : N;
    float* dw = partial.data() + b * 2 * C;
    kernel(dinp, dw, dw + C, dout, inp, weight, mean, rstd, r0, r1, C);
  });
  for (index_t c = 0; c < C; ++c) dweight[c] = dbias[c] = 0.0f;
  for (index_t b = 0; b < blocks; ++b) {
    const float* dw = partial.data() + b * 2 * C;
    for (index_t c = 0; c < C; ++c) {
      dweight[c] += dw[c];
      dbias[c] += dw[C + c];
    }
  }
}

void layer_norm_forward_naive(float* out, float* mean, float* rstd, const float* inp, const float* weight,
                              const float* bias, index_t N, index_t C, float eps) {
  for (index_t r = 0; r < N; ++r) {
    const float* x = inp + r * C;
    double m = 0.0, v = 0.0;
    for (index_t c = 0; c < C; ++c) m += x[c];
    m /= static_cast<double>(C);
    for (index_t c = 0; c < C; ++c) v += (x[c] - m) * (x[c] - m);
    v /= static_cast<double>(C);
    const double s = 1.0 / std::sqrt(v + eps);
    for (index_t c = 0; c < C; ++c) out[r * C + c] = static_cast<float>((x[c] - m) * s * weight[c] + bias[c]);
    if (mean) mean[r] = static_cast<float>(m);
    if (rstd) rstd[r] = static_cast<float>(s);
  }
}

void layer_norm_backward_naive(float* dinp, float* dweight, float* dbias, const float* dout,
                               const float* inp, const float* weight, const float* mean,
                               const float* rstd, index_t N, index_t C) {
  std::vector<double> dw(static_cast<size_t>(C), 0.0), db(static_cast<size_t>(C), 0.0);
  for (index_t r = 0; r < N; ++r) {
    const float* x = inp + r * C;
    const float* dy = dout + r * C;
    double a = 0.0, b = 0.0;  // mean of dxhat and of dxhat * xhat
    for (index_t c = 0; c < C; ++c) {
      const double xh = (x[c] - mean[r]) * static_cast<double>(rstd[r]);
      const double dxh = static_cast<double>(dy[c]) * weight[c];
      a += dxh;
      b += dxh * xh;
      dw[c] += dy[c] * xh;
      db[c] += dy[c];
    }
    a /= static_cast<double>(C);
    b /= static_cast<double>(C);
    for (index_t c = 0; c < C; ++c) {
      const double xh = (x[c] - mean[r]) * static_cast<double>(rstd[r]);
      const double dxh = static_cast<double>(dy[c]) * weight[c];
      dinp[r * C + c] = static_cast<float>(rstd[r] * (dxh - a - xh * b));
    }
  }
  for (index_t c = 0; c < C; ++c) {
    dweight[c] = static_cast<float>(dw[c]);
    dbias[c] = static_cast<float>(db[c]);
  }
}

}  // namespace pt
