// Embedding gather and scatter-add bodies, one for every ISA through Vec.
#include "core/vec.h"
#include "train/embedding.h"

namespace pt {
namespace PT_ISA_NS {

void embedding_gather_rows(float* out, const float* weight, const std::int64_t* ids, index_t n0, index_t n1,
                           index_t C, float scale) {
  const Vec s(scale);
  for (index_t n = n0; n < n1; ++n) {
    const float* w = weight + ids[n] * C;
    float* y = out + n * C;
    index_t c = 0;
    for (; c + 8 <= C; c += 8) (Vec::load(w + c) * s).store(y + c);
    if (c < C) {
      const int k = static_cast<int>(C - c);
      (Vec::load(w + c, k) * s).store(y + c, k);
    }
  }
}

// Each element of dweight gets its additions in token order, whatever columns [c0, c1) are.
void embedding_scatter_cols(float* dweight, const float* dout, const std::int64_t* ids, index_t N, index_t C,
                            index_t c0, index_t c1, float scale) {
  const Vec s(scale);
  for (index_t n = 0; n < N; ++n) {
    float* dw = dweight + ids[n] * C;
    const float* g = dout + n * C;
    index_t c = c0;
    for (; c + 8 <= c1; c += 8) (Vec::load(dw + c) + Vec::load(g + c) * s).store(dw + c);
    if (c < c1) {
      const int k = static_cast<int>(c1 - c);
      (Vec::load(dw + c, k) + Vec::load(g + c, k) * s).store(dw + c, k);
    }
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
