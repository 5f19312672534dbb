// The benchmark's peak-rate probe, per ISA (see fma_probe_seconds in gemm_kernels.h).
#include "core/vec.h"
#include "gemm/gemm_kernels.h"

namespace pt {
namespace PT_ISA_NS {

#if defined(PT_ISA_AVX512)
// The same 192 flops a round as below, as half as many rounds of 16-lane FMAs.
float fma_probe(index_t iters) {
  __m512 acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = _mm512_set1_ps(1.0f + 0.01f * static_cast<float>(j));
  const __m512 x = _mm512_set1_ps(0.9999999f), y = _mm512_set1_ps(1e-7f);
  for (index_t i = 0; i < iters / 2; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = _mm512_fmadd_ps(acc[j], x, y);
  }
  __m512 s = acc[0];
  for (int j = 1; j < 12; ++j) s = _mm512_add_ps(s, acc[j]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  float sum = 0.0f;
  for (float v : lanes) sum += v;
  return sum;
}
#else
float fma_probe(index_t iters) {
  // 12 independent chains: enough to cover the FMA latency on two pipes.
  Vec acc[12];
  for (int j = 0; j < 12; ++j) acc[j] = Vec(1.0f + 0.01f * static_cast<float>(j));
  const Vec x(0.9999999f), y(1e-7f);
  for (index_t i = 0; i < iters; ++i) {
#pragma GCC unroll 12
    for (int j = 0; j < 12; ++j) acc[j] = fma(acc[j], x, y);
  }
  Vec s = acc[0];
  for (int j = 1; j < 12; ++j) s = s + acc[j];
  return s.sum();
}
#endif

}  // namespace PT_ISA_NS
}  // namespace pt
