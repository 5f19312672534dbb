// GELU, ReLU-backward and dropout bodies, one for every ISA through Vec.
#include "core/vec.h"
#include "train/elementwise.h"

namespace pt {
namespace PT_ISA_NS {

// Applies f(Vec...) over [i0, i1) of the given inputs, storing into out.
template <class F>
inline void map1(float* out, const float* a, index_t i0, index_t i1, F f) {
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) f(Vec::load(a + i)).store(out + i);
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    f(Vec::load(a + i, n)).store(out + i, n);
  }
}

template <class F>
inline void map2(float* out, const float* a, const float* b, index_t i0, index_t i1, F f) {
  index_t i = i0;
  for (; i + 8 <= i1; i += 8) f(Vec::load(a + i), Vec::load(b + i)).store(out + i);
  if (i < i1) {
    const int n = static_cast<int>(i1 - i);
    f(Vec::load(a + i, n), Vec::load(b + i, n)).store(out + i, n);
  }
}

void gelu_forward_range(float* out, const float* inp, index_t i0, index_t i1) {
  map1(out, inp, i0, i1, [](Vec x) { return gelu(x); });
}

void gelu_backward_range(float* dinp, const float* dout, const float* inp, index_t i0, index_t i1) {
  map2(dinp, dout, inp, i0, i1, [](Vec g, Vec x) { return g * gelu_grad(x); });
}

void relu_backward_range(float* dinp, const float* dout, const float* out, index_t i0, index_t i1) {
  map2(dinp, dout, out, i0, i1, [](Vec g, Vec y) { return Vec::select(Vec::less(Vec::zero(), y), g, Vec::zero()); });
}

// The hash is integer arithmetic (exact everywhere); a block of 8 multipliers goes through a
// small array so the compiler can vectorise the hash loop, then one Vec multiply applies it.
void dropout_range(float* out, const float* inp, index_t i0, index_t i1, std::uint32_t threshold, float scale,
                   DropoutKey key, std::uint64_t offset) {
  alignas(32) float mul[8];
  for (index_t i = i0; i < i1; i += 8) {
    const int n = i1 - i < 8 ? static_cast<int>(i1 - i) : 8;
    const std::uint64_t base = offset + static_cast<std::uint64_t>(i);
    for (int j = 0; j < 8; ++j) mul[j] = (dropout_hash(key, base + j) >> 8) >= threshold ? scale : 0.0f;
    const Vec m = Vec::load(mul);
    if (n == 8)
      (Vec::load(inp + i) * m).store(out + i);
    else
      (Vec::load(inp + i, n) * m).store(out + i, n);
  }
}

}  // namespace PT_ISA_NS
}  // namespace pt
