#include "train/embedding.h"

#include "core/isa.h"
#include "core/threading.h"

namespace pt {

void embedding_forward(float* out, const float* weight, const std::int64_t* ids, index_t N, index_t C,
                       float scale) {
  const index_t step = 64;
  auto kernel = PT_DISPATCH(embedding_gather_rows);
  parallel_for((N + step - 1) / step, [&](index_t t) {
    const index_t n0 = t * step, n1 = n0 + step < N ? n0 + step : N;
    kernel(out, weight, ids, n0, n1, C, scale);
  });
}

void embedding_backward(float* dweight, const float* dout, const std::int64_t* ids, index_t N, index_t C,
                        float scale) {
  // Column ranges of whole vectors (multiples of 8), at least 64 columns each; the split does
  // not change any element's sum since each element only ever sees its own column.
  const index_t vecs = (C + 7) / 8;
  index_t parts = vecs / 8;
  if (parts < 1) parts = 1;
  if (parts > num_threads()) parts = num_threads();
  auto kernel = PT_DISPATCH(embedding_scatter_cols);
  parallel_for(parts, [&](index_t p) {
    const index_t c0 = vecs * p / parts * 8, c1e = vecs * (p + 1) / parts * 8;
    kernel(dweight, dout, ids, N, C, c0, c1e < C ? c1e : C, scale);
  });
}

void embedding_forward_naive(float* out, const float* weight, const std::int64_t* ids, index_t N, index_t C,
                             float scale) {
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c) out[n * C + c] = weight[ids[n] * C + c] * scale;
}

void embedding_backward_naive(float* dweight, const float* dout, const std::int64_t* ids, index_t N,
                              index_t C, float scale) {
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c) dweight[ids[n] * C + c] += scale * dout[n * C + c];
}

}  // namespace pt
